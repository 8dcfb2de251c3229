"""Reference sampler steps in plain PyTorch: the spec the fused kernels are tested against.

Every function here is a direct transcription of a paper formula, one small function per
idea, with the equation it comes from in a comment. Nothing is fused and nothing is clever.

Notation (VP space, Ho et al. 2020 eq. 4): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` with
``ab_t`` the cumulative product of ``1 - beta`` ("alpha bar"). A step goes from ``ab_t`` to
``ab_prev`` (the next, less noisy, visited step; ``ab_prev == 1.0`` exactly means "clean",
i.e. after the last step). Euler samplers work in sigma space (Karras et al. 2022):
``sigma = sqrt((1 - ab) / ab)`` and ``x_sigma = x_t / sqrt(ab) = x0 + sigma eps``.

Conventions shared by all public functions:

- Compute dtype: float64 when ``x`` is float64, otherwise float32 (half types are upcast);
  results are returned in ``x.dtype``.
- Schedule values (``ab_t``, ``ab_prev``, ``sigma``, ...) are python floats or floating
  tensors of shape ``[]`` or ``[B]`` (one value per sample), any float dtype, any device;
  they are converted to the compute dtype on ``x``'s device and broadcast over ``x``'s
  trailing dims. Keep them on ``x``'s device to avoid a host-to-device copy.
- No host synchronisation: no ``.item()`` and no python branch on a tensor value, so the
  steps can run on the GPU inside a sampling loop (dynamic thresholding's quantile is a
  device op). Only python-number arguments are range-checked.
- Step functions return ``(x_next, x0)``: the next sample and the (processed) prediction of
  the clean sample.

References: Ho et al. 2020 (DDPM); Song et al. 2021 (DDIM); Nichol & Dhariwal 2021
(improved DDPM, learned variances, respacing); Dhariwal & Nichol 2021 (classifier
guidance); Ho & Salimans 2022 (classifier-free guidance); Salimans & Ho 2022 (v-prediction);
Saharia et al. 2022 (Imagen, dynamic thresholding); Karras et al. 2022 (EDM, Alg. 2);
Lu et al. 2022 (DPM-Solver++); Lin et al. 2023 (guidance rescale).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "predict_x0",
    "predict_eps",
    "process_x0",
    "cfg_combine",
    "split_learned_variance",
    "ddpm_variance",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "euler_ancestral_step",
    "dpmpp_2m_step",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)
_LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# Floor of the posterior variance before its log (the variance is exactly 0 on the step to
# clean); the same floor as diffusers' DDPMScheduler.
_MIN_VARIANCE = 1e-20

ScheduleValue = float | Tensor


# ---------------------------------------------------------------------------------------
# Validation and dtype helpers
# ---------------------------------------------------------------------------------------


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; expected one of {valid}")


def _check_float_tensor(t: object, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_like(t: object, name: str, x: Tensor, what: str = "x") -> None:
    """``t`` must be a floating tensor with x's shape and device."""
    _check_float_tensor(t, name)
    if t.shape != x.shape:
        raise ValueError(
            f"{name} must have the shape of {what} {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {what} is on {x.device}")


def _check_sample(x: object, name: str = "x") -> None:
    _check_float_tensor(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch dimension (got a 0-d tensor)")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _schedule(
    value: ScheduleValue,
    name: str,
    like: Tensor,
    low: float | None = None,
    high: float | None = None,
) -> Tensor:
    """A schedule value as a tensor of ``like``'s dtype and device, broadcastable to ``like``.

    Python numbers become 0-d tensors through ``torch.full`` (a fill kernel: no
    host-to-device copy, hence no sync). ``[B]`` tensors are viewed as ``[B, 1, ..., 1]``.
    Only python numbers are range-checked (checking a tensor would sync).
    """
    if _is_number(value):
        v = float(value)
        if math.isnan(v) or (low is not None and v < low) or (high is not None and v > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be {bounds}, got {v}")
        return torch.full((), v, dtype=like.dtype, device=like.device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a python float or a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    batch = like.shape[0] if like.ndim > 0 else None
    if value.ndim == 0:
        return value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 1 and value.shape[0] == batch:
        return value.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"{name} must be a python float or a tensor of shape [] or [B] with B={batch}, "
        f"got shape {tuple(value.shape)}"
    )


def _sigma(value: ScheduleValue, name: str, like: Tensor) -> Tensor:
    """A current noise level: like :func:`_schedule`, and a python number must be > 0."""
    if _is_number(value) and not value > 0:
        raise ValueError(f"{name} must be > 0 (the current noise level), got {value}")
    return _schedule(value, name, like, 0.0)


def _check_process_args(clip_range: float | None, thresholding: tuple | None) -> None:
    if clip_range is not None and thresholding is not None:
        raise ValueError(
            "clip_range and thresholding are exclusive: pass one of them (or neither), not both"
        )
    if clip_range is not None:
        if not _is_number(clip_range) or not clip_range > 0:
            raise ValueError(f"clip_range must be a positive number, got {clip_range!r}")
    if thresholding is not None:
        if (
            not isinstance(thresholding, (tuple, list))
            or len(thresholding) != 2
            or not all(_is_number(v) for v in thresholding)
        ):
            raise ValueError(
                f"thresholding must be a pair (ratio, max_value) of numbers, got {thresholding!r}"
            )
        ratio, max_value = thresholding
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"thresholding ratio must be in (0, 1], got {ratio}")
        if not max_value >= 1.0:
            raise ValueError(f"thresholding max_value must be >= 1, got {max_value}")


def _check_eta(eta: float) -> None:
    if not _is_number(eta):
        raise TypeError(f"eta must be a python number, got {type(eta).__name__}")
    if math.isnan(eta) or eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _prepare_step(
    x: Tensor,
    model_output: Tensor,
    prediction_type: str,
    clip_range: float | None,
    thresholding: tuple | None,
) -> tuple[Tensor, Tensor]:
    """Validate the common step arguments; return (x, model_output) in the compute dtype."""
    _check_sample(x)
    _check_like(model_output, "model_output", x)
    _check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    _check_process_args(clip_range, thresholding)
    dtype = _compute_dtype(x)
    return x.to(dtype), model_output.to(dtype)


def _optional_like(t: Tensor | None, name: str, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    _check_like(t, name, x)
    return t.to(dtype)


# ---------------------------------------------------------------------------------------
# Predictions (compute-dtype tensors in, compute-dtype tensors out)
# ---------------------------------------------------------------------------------------


def _x0_from_output(x: Tensor, m: Tensor, ab: Tensor, prediction_type: str) -> Tensor:
    """x0 from the model output in VP space."""
    if prediction_type == "epsilon":
        # Ho et al. 2020 eq. 4 solved for x0 (eq. 15): x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
        return (x - torch.sqrt(1 - ab) * m) / torch.sqrt(ab)
    if prediction_type == "sample":
        return m
    # v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022) => x0 = sqrt(ab) x_t - sqrt(1-ab) v
    return torch.sqrt(ab) * x - torch.sqrt(1 - ab) * m


def _eps_from_output(x: Tensor, m: Tensor, ab: Tensor, prediction_type: str) -> Tensor:
    """eps from the model output in VP space."""
    if prediction_type == "epsilon":
        return m
    if prediction_type == "sample":
        return _eps_from_x0(x, m, ab)
    # v-prediction (Salimans & Ho 2022): eps = sqrt(ab) v + sqrt(1-ab) x_t
    return torch.sqrt(ab) * m + torch.sqrt(1 - ab) * x


def _eps_from_x0(x: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    # Ho et al. 2020 eq. 4 solved for eps: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)
    return (x - torch.sqrt(ab) * x0) / torch.sqrt(1 - ab)


def _x0_from_output_sigma_space(
    x: Tensor, m: Tensor, sigma: Tensor, prediction_type: str
) -> Tensor:
    """x0 from the model output in sigma space (x = x_t / sqrt(ab) = x0 + sigma eps).

    These are the VP formulas applied to x_t = x / sqrt(sigma^2 + 1), ab = 1 / (sigma^2 + 1).
    """
    if prediction_type == "epsilon":
        return x - sigma * m
    if prediction_type == "sample":
        return m
    return -sigma / torch.sqrt(sigma**2 + 1) * m + x / (sigma**2 + 1)


def _threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3 / Fig. A.32).

    s = the ``ratio`` quantile of |x0| over each sample, clamped to [1, max_value];
    x0 <- clamp(x0, -s, s) / s. With s clamped at 1 it is plain clipping to [-1, 1].
    """
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _process_x0(x0: Tensor, clip_range: float | None, thresholding: tuple | None) -> Tensor:
    if thresholding is not None:
        return _threshold(x0, float(thresholding[0]), float(thresholding[1]))
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def _predict(
    from_output: Callable[[Tensor, Tensor, Tensor, str], Tensor],
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    prediction_type: str,
) -> Tensor:
    """Validate the public prediction arguments and apply ``from_output`` (one of the VP
    prediction helpers above) in the compute dtype; the result is in ``x.dtype``."""
    _check_sample(x)
    _check_like(model_output, "model_output", x)
    _check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    ab = _schedule(ab_t, "ab_t", xc, 0.0, 1.0)
    return from_output(xc, model_output.to(dtype), ab, prediction_type).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Public prediction helpers
# ---------------------------------------------------------------------------------------


def predict_x0(
    x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str
) -> Tensor:
    """The model's prediction of the clean sample x0 (VP space).

    Args:
        x: noisy sample x_t, ``[B, ...]``.
        model_output: the model output, shape of ``x``.
        ab_t: alpha bar of x's noise level (float, or tensor ``[]`` / ``[B]``).
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        x0 in ``x.dtype``.

    Example:
        >>> x0 = predict_x0(x, eps_hat, 0.5, "epsilon")
    """
    return _predict(_x0_from_output, x, model_output, ab_t, prediction_type)


def predict_eps(
    x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str
) -> Tensor:
    """The model's prediction of the noise eps (VP space).

    Args:
        x: noisy sample x_t, ``[B, ...]``.
        model_output: the model output, shape of ``x``.
        ab_t: alpha bar of x's noise level (float, or tensor ``[]`` / ``[B]``).
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        eps in ``x.dtype``.

    Example:
        >>> eps = predict_eps(x, v_hat, ab, "v_prediction")
    """
    return _predict(_eps_from_output, x, model_output, ab_t, prediction_type)


def process_x0(
    x0: Tensor, clip_range: float | None = None, thresholding: tuple | None = None
) -> Tensor:
    """Clip or dynamically threshold a prediction of x0.

    Args:
        x0: predicted clean sample ``[B, ...]``.
        clip_range: r > 0 clamps to [-r, r].
        thresholding: ``(ratio, max_value)``: dynamic thresholding (Saharia et al. 2022):
            s = clamp(quantile(|x0| per sample, ratio), 1, max_value); clamp(x0, -s, s) / s.
            Exclusive with ``clip_range``.

    Returns:
        The processed x0 in ``x0.dtype`` (unchanged values when both are None).

    Example:
        >>> process_x0(x0, thresholding=(0.995, 1.5))
    """
    _check_sample(x0, "x0")
    _check_process_args(clip_range, thresholding)
    return _process_x0(x0.to(_compute_dtype(x0)), clip_range, thresholding).to(x0.dtype)


def cfg_combine(
    m_uncond: Tensor, m_cond: Tensor, scale: ScheduleValue, rescale: ScheduleValue = 0.0
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) with optional guidance rescale.

    ``m = m_uncond + scale (m_cond - m_uncond)``; with ``rescale`` (Lin et al. 2023, Sec. 3.4,
    eq. 15-16): ``m_rescaled = m * std(m_cond) / std(m)`` with the unbiased std over all
    dims but the batch, and ``m <- rescale * m_rescaled + (1 - rescale) * m`` (as diffusers'
    ``rescale_noise_cfg``).

    Args:
        m_uncond: unconditional model output ``[B, ...]``.
        m_cond: conditional model output, same shape.
        scale: guidance weight w (float or tensor ``[]`` / ``[B]``); 1 gives ``m_cond``.
        rescale: guidance rescale factor phi in [0, 1] (float or tensor ``[]`` / ``[B]``).

    Returns:
        The guided output in ``m_cond.dtype``.

    Example:
        >>> m = cfg_combine(*model(torch.cat([x, x]), t).chunk(2), 7.5, rescale=0.7)
    """
    _check_sample(m_cond, "m_cond")
    _check_like(m_uncond, "m_uncond", m_cond, "m_cond")
    dtype = _compute_dtype(m_cond)
    cond, uncond = m_cond.to(dtype), m_uncond.to(dtype)
    w = _schedule(scale, "scale", cond)
    guided = uncond + w * (cond - uncond)  # Ho & Salimans 2022 eq. 6 (with w = 1 + their w)
    if _is_number(rescale) and rescale == 0:
        return guided.to(m_cond.dtype)
    if cond.ndim < 2 or cond[0].numel() < 2:
        raise ValueError(
            "guidance rescale needs a per-sample std: m_cond must be [B, ...] with at least "
            f"2 elements per sample, got shape {tuple(cond.shape)}"
        )
    phi = _schedule(rescale, "rescale", cond)
    dims = list(range(1, cond.ndim))
    # Lin et al. 2023 eq. 15: match the std of the guided output to the conditional one
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    # eq. 16: blend to avoid over-smoothed images
    return (phi * rescaled + (1 - phi) * guided).to(m_cond.dtype)


def split_learned_variance(
    model_output: Tensor, variance_type: str
) -> tuple[Tensor, Tensor | None]:
    """Split a learned-variance model output (improved-diffusion layout).

    Args:
        model_output: ``[B, 2C, ...]`` for ``learned`` / ``learned_range`` (first C channels
            the prediction, last C the variance values), else the prediction itself.
        variance_type: one of :data:`VARIANCE_TYPES`.

    Returns:
        ``(prediction, variance_values)``; ``variance_values`` is None for fixed variances.
        Both are views of ``model_output``.

    Example:
        >>> m, v = split_learned_variance(out, "learned_range")
    """
    _check_float_tensor(model_output, "model_output")
    _check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    if variance_type not in _LEARNED_VARIANCE_TYPES:
        return model_output, None
    if model_output.ndim < 2 or model_output.shape[1] % 2 != 0:
        raise ValueError(
            f"variance_type {variance_type!r} needs a model output with an even number of "
            f"channels (dim 1: prediction then variance), got shape {tuple(model_output.shape)}"
        )
    prediction, values = model_output.chunk(2, dim=1)
    return prediction, values


# ---------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020; Nichol & Dhariwal 2021)
# ---------------------------------------------------------------------------------------


def _respaced_beta(ab_t: Tensor, ab_prev: Tensor) -> Tensor:
    # The beta of the (possibly respaced) step t -> prev: alpha' = ab_t / ab_prev,
    # beta' = 1 - alpha' (Nichol & Dhariwal 2021, Sec. 4 respacing).
    return 1 - ab_t / ab_prev


def _posterior_mean_coefficients(ab_t: Tensor, ab_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients (of x0, of x_t) of the posterior mean q(x_prev | x_t, x0), Ho et al. eq. 7.

    mu~ = sqrt(ab_prev) beta' / (1 - ab_t) x0 + sqrt(alpha') (1 - ab_prev) / (1 - ab_t) x_t.
    """
    beta = _respaced_beta(ab_t, ab_prev)
    coef_x0 = torch.sqrt(ab_prev) * beta / (1 - ab_t)
    # sqrt(alpha') with alpha' = ab_t / ab_prev directly: sqrt(1 - beta') loses the small
    # alpha' of the last steps of a cosine schedule to cancellation
    coef_xt = torch.sqrt(ab_t / ab_prev) * (1 - ab_prev) / (1 - ab_t)
    return coef_x0, coef_xt


def _ddpm_log_variance(
    ab_t: Tensor, ab_prev: Tensor, variance_type: str, v: Tensor | None
) -> Tensor:
    """Log of the reverse-step variance for each variance type."""
    beta = _respaced_beta(ab_t, ab_prev)
    # Posterior variance beta~ = (1 - ab_prev) / (1 - ab_t) beta' (Ho et al. eq. 7); it is 0
    # on the step to clean, so it is floored before the log.
    log_small = torch.log(((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=_MIN_VARIANCE))
    if variance_type in ("fixed_small", "fixed_small_log"):
        # sigma^2 = beta~ (Ho et al. Sec. 3.2); the "_log" form is the same number.
        return log_small
    if variance_type in ("fixed_large", "fixed_large_log"):
        # sigma^2 = beta' (Ho et al. Sec. 3.2)
        return torch.log(beta)
    if variance_type == "learned":
        # The model outputs log sigma^2 directly (improved-diffusion LEARNED).
        return v
    # learned_range: Nichol & Dhariwal 2021 eq. 15, with v in [-1, 1] mapped to frac in [0, 1]:
    # log sigma^2 = frac log beta' + (1 - frac) log beta~
    frac = (v + 1) / 2
    return frac * torch.log(beta) + (1 - frac) * log_small


def ddpm_variance(
    ab_t: ScheduleValue,
    ab_prev: ScheduleValue,
    variance_type: str,
    v: Tensor | None = None,
) -> Tensor:
    """Variance sigma^2 of a DDPM reverse step (the noise std is its square root).

    ``fixed_small``: ``(1-ab_prev)/(1-ab_t) beta'`` floored at 1e-20 (``fixed_small_log``
    is the same value through its log); ``fixed_large`` / ``fixed_large_log``: ``beta'``;
    ``learned``: ``exp(v)`` (v is a log variance, improved-diffusion); ``learned_range``:
    ``exp(frac log beta' + (1-frac) log max(beta~, 1e-20))``, ``frac = (v+1)/2``.

    Args:
        ab_t: alpha bar at the current step (float or tensor ``[]`` / ``[B]``).
        ab_prev: alpha bar at the next visited step (1.0 for clean).
        variance_type: one of :data:`VARIANCE_TYPES`.
        v: the model's variance values ``[B, C, ...]`` (learned types only).

    Returns:
        The variance: v's shape, in v's compute dtype, when v is given; else a float64
        tensor of the broadcast schedule shape.

    Example:
        >>> ddpm_variance(0.5, 0.6, "fixed_large")
        tensor(0.1667, dtype=torch.float64)
    """
    _check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    if variance_type in _LEARNED_VARIANCE_TYPES:
        if v is None:
            raise ValueError(f"variance_type {variance_type!r} needs the model's variance values v")
        _check_sample(v, "v")
        like = v.to(_compute_dtype(v))
    else:
        if v is not None:
            raise ValueError(f"variance_type {variance_type!r} takes no variance values v")
        device = next((a.device for a in (ab_t, ab_prev) if isinstance(a, Tensor)), None)
        batch = max((a.numel() for a in (ab_t, ab_prev) if isinstance(a, Tensor)), default=1)
        like = torch.empty(batch, dtype=torch.float64, device=device)
    at = _schedule(ab_t, "ab_t", like, 0.0, 1.0)
    ap = _schedule(ab_prev, "ab_prev", like, 0.0, 1.0)
    log_var = _ddpm_log_variance(at, ap, variance_type, like if v is not None else None)
    if v is None:
        log_var = log_var.expand(torch.broadcast_shapes(at.shape, ap.shape))
    return torch.exp(log_var)


def _noise_mask(add_noise: bool | Tensor | None, ab_prev: Tensor, like: Tensor) -> Tensor:
    """Bool tensor (broadcastable to x): where this step adds noise."""
    if add_noise is None:
        return ab_prev < 1  # no noise on the step to clean (ab_prev == 1)
    if isinstance(add_noise, bool):
        return torch.full((), add_noise, dtype=torch.bool, device=like.device)
    if not isinstance(add_noise, Tensor) or add_noise.dtype != torch.bool:
        raise TypeError("add_noise must be None, a bool or a bool tensor of shape [] or [B]")
    if add_noise.ndim == 0:
        return add_noise.to(like.device)
    if add_noise.ndim == 1 and add_noise.shape[0] == like.shape[0]:
        return add_noise.to(like.device).view(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"add_noise must have shape [] or [B] with B={like.shape[0]}, got {tuple(add_noise.shape)}"
    )


def ddpm_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_prev: ScheduleValue,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    noise: Tensor | None = None,
    add_noise: bool | Tensor | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_prev (Ho et al. 2020 eq. 6-7, Alg. 2).

    x_prev = mu~(x_t, x0) + sigma z, mu~ from the processed x0 (eq. 7) with the respaced
    beta' = 1 - ab_t / ab_prev, sigma^2 from ``variance_type`` (see :func:`ddpm_variance`).

    Args:
        x: noisy sample x_t ``[B, C, ...]``.
        model_output: ``[B, C, ...]``, or ``[B, 2C, ...]`` for learned variances.
        ab_t: alpha bar at the current step (float or tensor ``[]`` / ``[B]``).
        ab_prev: alpha bar at the next visited step; 1.0 means clean.
        prediction_type: one of :data:`PREDICTION_TYPES`.
        variance_type: one of :data:`VARIANCE_TYPES`.
        clip_range: clamp x0 to [-r, r] (exclusive with ``thresholding``).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0.
        noise: z ~ N(0, I), shape of x; None adds no noise (returns the mean).
        add_noise: None adds noise where ``ab_prev < 1`` (none on the step to clean); a bool
            or a bool tensor ``[]`` / ``[B]`` overrides.
        grad: classifier guidance (Dhariwal & Nichol 2021, Alg. 1): the already-scaled
            gradient of log p(y | x_t), shape of x; the mean is shifted by sigma^2 grad
            where noise is added (per element for learned variances).

    Returns:
        ``(x_prev, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = ddpm_step(x, eps_hat, ab[t], ab[t_prev], noise=torch.randn_like(x))
    """
    _check_sample(x)
    _check_float_tensor(model_output, "model_output")
    _check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    if variance_type in _LEARNED_VARIANCE_TYPES:
        expected = (*x.shape[:1], 2 * x.shape[1], *x.shape[2:]) if x.ndim >= 2 else None
        if expected is None or model_output.shape != expected:
            raise ValueError(
                f"variance_type {variance_type!r} needs model_output of shape {expected} "
                f"(x {tuple(x.shape)} with 2x channels: prediction then variance values), "
                f"got {tuple(model_output.shape)}"
            )
    pred, v = split_learned_variance(model_output, variance_type)
    xc, m = _prepare_step(x, pred, prediction_type, clip_range, thresholding)
    v = None if v is None else v.to(xc.dtype)
    z = _optional_like(noise, "noise", x, xc.dtype)
    g = _optional_like(grad, "grad", x, xc.dtype)
    at = _schedule(ab_t, "ab_t", xc, 0.0, 1.0)
    ap = _schedule(ab_prev, "ab_prev", xc, 0.0, 1.0)

    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    coef_x0, coef_xt = _posterior_mean_coefficients(at, ap)
    mean = coef_x0 * x0 + coef_xt * xc  # Ho et al. eq. 7

    log_var = _ddpm_log_variance(at, ap, variance_type, v)
    noisy = _noise_mask(add_noise, ap, xc)
    if g is not None:
        # Dhariwal & Nichol 2021 Alg. 1 (condition_mean): mu + Sigma grad log p(y | x_t)
        mean = mean + torch.where(noisy, torch.exp(log_var), 0.0) * g
    x_prev = mean
    if z is not None:
        # Ho et al. Alg. 2 line 4: x_prev = mu + sigma z
        x_prev = mean + torch.where(noisy, torch.exp(0.5 * log_var), 0.0) * z
    return x_prev.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------
# DDIM (Song et al. 2021)
# ---------------------------------------------------------------------------------------


def _ddim_sigma(ab_t: Tensor, ab_prev: Tensor, eta: float) -> Tensor:
    # Song et al. 2021 eq. 16: sigma = eta sqrt((1-ab_prev)/(1-ab_t)) sqrt(1 - ab_t/ab_prev)
    return eta * torch.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_prev: ScheduleValue,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021 eq. 12 with sigma from eq. 16).

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.

    Args:
        x: noisy sample x_t ``[B, ...]``.
        model_output: the model output, shape of x.
        ab_t: alpha bar at the current step (float or tensor ``[]`` / ``[B]``).
        ab_prev: alpha bar at the next visited step; 1.0 means clean.
        eta: 0 is deterministic DDIM, 1 has the DDPM posterior variance (python number >= 0;
            for eta > 1 the direction coefficient is clamped at 0).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        clip_range: clamp x0 to [-r, r] (exclusive with ``thresholding``).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0.
        use_clipped_model_output: re-derive eps from the processed x0 (as diffusers);
            otherwise eps comes from the raw model output.
        noise: z ~ N(0, I), shape of x; None adds no noise.
        grad: classifier guidance, the already-scaled gradient of log p(y | x_t); the mean is
            shifted by sigma^2 grad (condition_mean rule, so it vanishes for eta = 0).

    Returns:
        ``(x_prev, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = ddim_step(x, eps_hat, ab[t], ab[t_prev])
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    _check_eta(eta)
    z = _optional_like(noise, "noise", x, xc.dtype)
    g = _optional_like(grad, "grad", x, xc.dtype)
    at = _schedule(ab_t, "ab_t", xc, 0.0, 1.0)
    ap = _schedule(ab_prev, "ab_prev", xc, 0.0, 1.0)

    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    if use_clipped_model_output:
        eps = _eps_from_x0(xc, x0, at)
    else:
        eps = _eps_from_output(xc, m, at, prediction_type)
    sigma = _ddim_sigma(at, ap, float(eta))
    # Song et al. eq. 12: "predicted x0" + "direction pointing to x_t" + random noise. The
    # clamp only absorbs rounding (1 - ab_prev - sigma^2 >= 0 for eta <= 1).
    x_prev = torch.sqrt(ap) * x0 + torch.sqrt((1 - ap - sigma**2).clamp(min=0)) * eps
    if g is not None:
        x_prev = x_prev + sigma**2 * g
    if z is not None:
        x_prev = x_prev + sigma * z
    return x_prev.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------
# Euler and Euler ancestral in sigma space (Karras et al. 2022; k-diffusion)
# ---------------------------------------------------------------------------------------


def euler_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 2
    with S_churn = 0; the first-order part of its Heun step).

    x is the sigma-space sample x0 + sigma eps (= x_t / sqrt(ab)); d = (x - x0) / sigma
    (Karras et al. eq. 1/Alg. 2 line 7); x_next = x + (sigma_next - sigma) d.

    Args:
        x: sigma-space sample ``[B, ...]``.
        model_output: the model output (of the VP model, on x_t = x / sqrt(sigma^2 + 1)).
        sigma: current noise level (> 0; float or tensor ``[]`` / ``[B]``).
        sigma_next: next noise level (0 for clean).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        clip_range: clamp x0 to [-r, r] (exclusive with ``thresholding``).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = euler_step(x, eps_hat, sigmas[i], sigmas[i + 1])
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    s = _sigma(sigma, "sigma", xc)
    s_next = _schedule(sigma_next, "sigma_next", xc, 0.0)
    x0 = _process_x0(
        _x0_from_output_sigma_space(xc, m, s, prediction_type), clip_range, thresholding
    )
    d = (xc - x0) / s  # dx/dsigma of the probability-flow ODE
    x_next = xc + (s_next - s) * d
    return x_next.to(x.dtype), x0.to(x.dtype)


def _ancestral_sigmas(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """k-diffusion's get_ancestral_step: split sigma_next^2 into a deterministic part
    sigma_down^2 and a fresh-noise part sigma_up^2."""
    up = eta * torch.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    up = torch.minimum(sigma_next, up)
    down = torch.sqrt((sigma_next**2 - up**2).clamp(min=0))
    return up, down


def euler_ancestral_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Euler ancestral step in sigma space (k-diffusion sample_euler_ancestral).

    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2); x_next = x + (sigma_down - sigma) d +
    sigma_up z with d = (x - x0) / sigma.

    Args:
        x: sigma-space sample ``[B, ...]``.
        model_output: the model output, shape of x.
        sigma: current noise level (> 0; float or tensor ``[]`` / ``[B]``).
        sigma_next: next noise level (0 for clean: then x_next = x0).
        eta: ancestral noise scale (python number >= 0; 0 gives :func:`euler_step`).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        clip_range: clamp x0 to [-r, r] (exclusive with ``thresholding``).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0.
        noise: z ~ N(0, I), shape of x; None adds no noise.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = euler_ancestral_step(x, eps_hat, s, s_next, noise=torch.randn_like(x))
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    _check_eta(eta)
    z = _optional_like(noise, "noise", x, xc.dtype)
    s = _sigma(sigma, "sigma", xc)
    s_next = _schedule(sigma_next, "sigma_next", xc, 0.0)
    x0 = _process_x0(
        _x0_from_output_sigma_space(xc, m, s, prediction_type), clip_range, thresholding
    )
    up, down = _ancestral_sigmas(s, s_next, float(eta))
    d = (xc - x0) / s
    x_next = xc + (down - s) * d
    if z is not None:
        x_next = x_next + up * z
    return x_next.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022)
# ---------------------------------------------------------------------------------------


def _half_log_snr(ab: Tensor) -> Tensor:
    # lambda = log(alpha / sigma) with alpha = sqrt(ab), sigma = sqrt(1 - ab) (Lu et al. Sec. 2);
    # +inf for clean (ab = 1), -inf for pure noise (ab = 0).
    return 0.5 * (torch.log(ab) - torch.log1p(-ab))


def dpmpp_2m_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_next: ScheduleValue,
    *,
    x0_prev: Tensor | None = None,
    ab_prev: ScheduleValue | None = None,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2; midpoint form as diffusers'
    ``solver_type="midpoint"``), VP space.

    h = lambda_next - lambda_t. First order (DDIM, Lu et al. eq. 9):
    x_next = (sigma_next / sigma_t) x - alpha_next (exp(-h) - 1) x0. Second order, with the
    previous visited step's x0_prev and r = h_prev / h, h_prev = lambda_t - lambda_prev:
    D = x0 + (x0 - x0_prev) / (2 r) replaces x0.

    The step to clean (``ab_next == 1``: h = inf) is always first order (the second-order
    term diverges there; diffusers forces first order on that step too). ``ab_prev = 0``
    (lambda_prev = -inf) also gives first order, per sample.

    Args:
        x: noisy sample x_t ``[B, ...]``.
        model_output: the model output, shape of x.
        ab_t: alpha bar at the current step (float or tensor ``[]`` / ``[B]``).
        ab_next: alpha bar at the next visited step (1.0 for clean).
        x0_prev: the (processed) x0 returned by the previous step; None for first order.
        ab_prev: alpha bar of the previous visited step (required with ``x0_prev``).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        clip_range: clamp x0 to [-r, r] (exclusive with ``thresholding``).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``; pass x0 as the next step's ``x0_prev``.

    Example:
        >>> x, x0 = dpmpp_2m_step(x, eps_hat, ab[t], ab[t_next], x0_prev=x0, ab_prev=ab[t_old])
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    if x0_prev is not None and ab_prev is None:
        raise ValueError("x0_prev needs ab_prev (alpha bar of the step that produced x0_prev)")
    prev = _optional_like(x0_prev, "x0_prev", x, xc.dtype)
    at = _schedule(ab_t, "ab_t", xc, 0.0, 1.0)
    an = _schedule(ab_next, "ab_next", xc, 0.0, 1.0)

    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    alpha_t, sigma_t = torch.sqrt(at), torch.sqrt(1 - at)
    alpha_n, sigma_n = torch.sqrt(an), torch.sqrt(1 - an)
    # exp(-h) = (alpha_t sigma_next) / (sigma_t alpha_next): finite for ab_next = 1 and ab_t = 0
    exp_neg_h = alpha_t * sigma_n / (sigma_t * alpha_n)

    d = x0
    if prev is not None:
        ap = _schedule(ab_prev, "ab_prev", xc, 0.0, 1.0)
        lam_t = _half_log_snr(at)
        h = _half_log_snr(an) - lam_t
        h_prev = lam_t - _half_log_snr(ap)
        half_inv_r = h / (2 * h_prev)  # 1 / (2 r)
        half_inv_r = torch.where(an == 1, 0.0, half_inv_r)  # first order on the step to clean
        d = x0 + half_inv_r * (x0 - prev)  # Lu et al. Alg. 2 (multistep, midpoint)
    x_next = (sigma_n / sigma_t) * xc - alpha_n * (exp_neg_h - 1) * d
    return x_next.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): the UniP predictor and the UniC corrector
# ---------------------------------------------------------------------------------------
#
# Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
# Diffusion Models", arXiv:2302.04867), in the notation of its Sec. 2-3: the state is
# x_t = alpha_t x0 + sigma_t eps (VP: alpha^2 + sigma^2 = 1; rectified flow: alpha = 1 - s,
# sigma = s), lambda = log(alpha / sigma), and a step goes from s to t with
# h = lambda_t - lambda_s. Every visited point keeps its model output converted to the data
# prediction x0 ("predict_x0", the data-prediction form of the paper's appendix) or to the
# noise prediction eps: its "converted output" M. With hh = -h (data) or hh = h (noise) and
# the point's own prediction m0 = M_s, UniP-p and UniC-p (Sec. 3.1 / 3.2) are
#
#     x_t = R x_s - A_t (e^hh - 1) m0 - A_t B(hh) (sum_m a_m D_m  [+ a_p (M_t - m0)])   (*)
#
# with R = sigma_t / sigma_s, A_t = alpha_t (data) or R = alpha_t / alpha_s, A_t = sigma_t
# (noise); D_m = (M_{s_m} - m0) / r_m the divided differences of the earlier points s_m,
# r_m = (lambda_{s_m} - lambda_s) / h; the bracketed term only in the corrector UniC, whose
# new point is t itself (M_t: the model output at the predicted x_t, r_p = 1). B(h) is
# bh1: B(h) = h, or bh2: B(h) = e^h - 1 (Sec. 3.3), and the weights a solve the order
# condition of Theorem 3.1, R_p(h) a = phi_p(h) / B(h) (``unipc_rhos``). The first term
# alone, p = 1, is DDIM / DPM-Solver-1; UniP-2 with bh2 is DPM-Solver++(2M).

UNIPC_SOLVER_TYPES = ("bh1", "bh2")
UNIPC_PREDICTION_TYPES = (*PREDICTION_TYPES, "flow_prediction")


def unipc_phi_terms(hh: Tensor, count: int) -> list[Tensor]:
    """``i! hh phi_{i+1}(hh)`` for i = 1..count (the right-hand side of Theorem 3.1 before
    the division by B), with ``phi_1(z) = (e^z - 1) / z`` and ``phi_{k+1}(z) = (phi_k(z) -
    1/k!) / z``, by the same recursion as the reference implementation."""
    terms = []
    g = torch.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    factorial = 1.0
    for i in range(1, count + 1):
        terms.append(g * factorial)
        factorial *= i + 1
        g = g / hh - 1.0 / factorial  # hh phi_{i+2}(hh)
    return terms


def unipc_b(hh: Tensor, solver_type: str) -> Tensor:
    """B(h) of UniPC (Zhao et al. 2023, Sec. 3.3): ``bh1``: B(h) = h; ``bh2``: e^h - 1."""
    _check_choice(solver_type, "solver_type", UNIPC_SOLVER_TYPES)
    return hh if solver_type == "bh1" else torch.expm1(hh)


def unipc_rhos(r: Tensor, hh: Tensor, order: int, solver_type: str, corrector: bool) -> Tensor:
    """The weights ``a`` of the divided differences in a UniP-p / UniC-p update, from the
    order condition of Zhao et al. 2023 Theorem 3.1: ``R_m a = phi_m(hh) / B(hh)``, where
    row i of ``R_m`` is the points' ratios to the power i and ``phi_m(hh)_i = i! hh
    phi_{i+1}(hh)`` (``unipc_phi_terms``).

    UniC-p has m = p points (the history ratios and r_p = 1 for the new output); UniP-p has
    m = p - 1 (the history only). With one point (UniC-1, UniP-2) the weight is 1/2, as in
    the authors' code and diffusers (the solve gives 1/2 + O(h)).

    Args:
        r: ``[..., order - 1]`` ratios ``(lambda_{s_m} - lambda_s) / h`` of the history points.
        hh: ``[...]`` the signed step: -h (data prediction) or h (noise prediction).
        order: p >= 1.
        solver_type: "bh1" or "bh2".
        corrector: UniC (True) or UniP (False).

    Returns:
        ``[..., m]``: one weight per point (the corrector's last one is the new output's).

    Example:
        >>> unipc_rhos(torch.tensor([[-1.0, -2.0]]), torch.tensor([-0.5]), 3, "bh2", False)
    """
    points = torch.cat([r, torch.ones_like(hh)[..., None]], dim=-1) if corrector else r
    m = points.shape[-1]
    if m <= 1:
        return torch.full_like(points, 0.5)
    rows = torch.stack([points**i for i in range(m)], dim=-2)  # row i: points^i
    rhs = torch.stack(unipc_phi_terms(hh, m), dim=-1) / unipc_b(hh, solver_type)[..., None]
    # solve_ex without error checks: checking the info flag would sync with the device
    return torch.linalg.solve_ex(rows, rhs, check_errors=False)[0]


def unipc_convert(
    x: Tensor,
    model_output: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction_type: str,
    predict_x0: bool,
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> Tensor:
    """The converted output M of UniPC: the data prediction x0 (processed if asked) or the
    noise prediction eps, of the point ``x = alpha x0 + sigma eps``.

    epsilon: ``x0 = (x - sigma m) / alpha``; v_prediction (Salimans & Ho 2022, VP):
    ``x0 = alpha x - sigma m``, ``eps = alpha m + sigma x``; sample: ``x0 = m``; flow_prediction
    (velocity ``v = eps - x0`` of ``x = (1 - s) x0 + s eps``): ``x0 = x - s v``.

    Args: x, model_output: compute-dtype tensors; alpha, sigma: broadcastable schedule values
    of x's point; prediction_type: one of ``UNIPC_PREDICTION_TYPES``; predict_x0: x0 or eps;
    clip_range, thresholding: clipping / dynamic thresholding of x0 (data prediction only).
    """
    m = model_output
    if predict_x0:
        if prediction_type == "epsilon":
            x0 = (x - sigma * m) / alpha
        elif prediction_type == "sample":
            x0 = m
        elif prediction_type == "v_prediction":
            x0 = alpha * x - sigma * m
        else:
            x0 = x - sigma * m
        return _process_x0(x0, clip_range, thresholding)
    if prediction_type == "epsilon":
        return m
    if prediction_type == "sample":
        return (x - alpha * m) / sigma
    if prediction_type == "v_prediction":
        return alpha * m + sigma * x
    return x + alpha * m  # flow: eps = x + (1 - s) v


def _per_point(value: ScheduleValue, name: str, xc: Tensor) -> Tensor:
    """A schedule value as a compute-dtype tensor of shape [] or [B] on x's device."""
    t = _schedule(value, name, xc, 0.0)
    return t.reshape(-1) if t.dim() else t


def _over_x(value: Tensor, x: Tensor) -> Tensor:
    """A [] or [B] value shaped to broadcast over x."""
    return value.view(-1, *([1] * (x.dim() - 1))) if value.dim() else value


def unipc_update(
    x: Tensor,
    m0: Tensor,
    earlier: tuple | list,
    lam: tuple | list,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_s: Tensor,
    sigma_s: Tensor,
    *,
    predict_x0: bool,
    solver_type: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP-p (``model_t`` None) or UniC-p update (*) from the point s to t.

    Args:
        x: the sample at s, compute dtype.
        m0: the converted output of s.
        earlier: converted outputs of the earlier points s_1, s_2, ... (p - 1 of them).
        lam: ``(lambda_t, lambda_s, lambda_{s_1}, ...)``, each ``[]`` or ``[B]``.
        alpha_t, sigma_t, alpha_s, sigma_s: ``[]`` or ``[B]`` schedule values of t and s.
        predict_x0: data (True) or noise prediction.
        solver_type: "bh1" or "bh2".
        model_t: UniC: the converted output at t (the predicted x_t's model output).

    Returns:
        x_t in the compute dtype.
    """
    lam_t, lam_s = lam[0], lam[1]
    h = lam_t - lam_s
    hh = -h if predict_x0 else h
    order = len(earlier) + 1
    if predict_x0:
        ratio, a_t = sigma_t / sigma_s, alpha_t
        # alpha_t (e^-h - 1) written without e^-h: finite at sigma_t = 0 (the step to clean)
        first = sigma_t * alpha_s / sigma_s - alpha_t
    else:
        ratio, a_t = alpha_t / alpha_s, sigma_t
        first = alpha_t * sigma_s / alpha_s - sigma_t  # sigma_t (e^h - 1)
    x_t = _over_x(ratio, x) * x - _over_x(first, x) * m0
    if order == 1 and model_t is None:
        return x_t
    r = torch.stack([(lam_m - lam_s) / h for lam_m in lam[2:]], dim=-1) if order > 1 else None
    if r is None:
        r = hh.new_zeros((*hh.shape, 0))
    rhos = unipc_rhos(r, hh, order, solver_type, corrector=model_t is not None)
    gain = a_t * unipc_b(hh, solver_type)  # A_t B(hh)
    correction = torch.zeros_like(x)
    for k, m_k in enumerate(earlier):
        d_k = (m_k - m0) / _over_x(r[..., k], x)  # D_k, divided difference
        correction = correction + _over_x(rhos[..., k], x) * d_k
    if model_t is not None:
        correction = correction + _over_x(rhos[..., -1], x) * (model_t - m0)
    return x_t - _over_x(gain, x) * correction


def unipc_step(
    x: Tensor,
    model_output: Tensor,
    alpha: tuple | list,
    sigma: tuple | list,
    *,
    history: tuple | list = (),
    last_sample: Tensor | None = None,
    corrector_order: int = 0,
    predictor_order: int = 1,
    predict_x0: bool = True,
    solver_type: str = "bh2",
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One UniPC step k: the corrector UniC of the sample ``x`` the last predictor made, then
    the predictor UniP of the next sample (Zhao et al. 2023, Sec. 3; the order of diffusers'
    ``UniPCMultistepScheduler.step``).

    ``M_k`` is the model output at ``x`` converted (``unipc_convert``, from the uncorrected
    ``x``). UniC-q (``corrector_order`` q >= 1) recomputes the step from the previous
    point: ``x^c = UniC(last_sample; M_{k-1}, ..., M_{k-q}; M_k)``; then UniP-p
    (``predictor_order`` p) steps from ``x^c``: ``x_next = UniP(x^c; M_k, M_{k-1}, ...,
    M_{k-p+1})``. Without the corrector (q = 0: a chain's first step, ``disable_corrector``)
    ``x^c = x``.

    Args:
        x: the sample at step k ``[B, ...]`` (the last predictor's output).
        model_output: the model output at ``x``.
        alpha, sigma: schedule values of the points, newest first: ``t_{k+1}`` (the target),
            ``t_k`` (x's point), then ``t_{k-1}, t_{k-2}, ...`` (those of ``history``); each
            a float or a ``[]`` / ``[B]`` tensor. ``sigma = 0`` is clean data.
        history: the converted outputs ``M_{k-1}, M_{k-2}, ...`` of the earlier points,
            newest first (``max(q, p - 1)`` of them).
        last_sample: the corrected sample of step k - 1 (the previous predictor's input);
            needed with a corrector.
        corrector_order: q (0: no corrector).
        predictor_order: p >= 1.
        predict_x0: keep data predictions (True) or noise predictions.
        solver_type: "bh1" or "bh2".
        prediction_type: one of ``UNIPC_PREDICTION_TYPES``.
        clip_range: clamp x0 to ``[-r, r]`` (data prediction; exclusive with thresholding).
        thresholding: ``(ratio, max_value)`` dynamic thresholding of x0 (data prediction).

    Returns:
        ``(x_next, x_corrected, M_k)`` in ``x.dtype``: the next sample, the corrected sample
        (the next step's ``last_sample``) and the converted output (its ``history[0]``).

    Example:
        >>> x1, xc0, m0 = unipc_step(x, eps, (a[1], a[0]), (s[1], s[0]))
        >>> x2, xc1, m1 = unipc_step(x1, eps1, (a[2], a[1], a[0]), (s[2], s[1], s[0]),
        ...                          history=(m0,), last_sample=xc0, corrector_order=1,
        ...                          predictor_order=2)
    """
    _check_sample(x)
    _check_like(model_output, "model_output", x)
    _check_choice(prediction_type, "prediction_type", UNIPC_PREDICTION_TYPES)
    _check_choice(solver_type, "solver_type", UNIPC_SOLVER_TYPES)
    _check_process_args(clip_range, thresholding)
    q, p = int(corrector_order), int(predictor_order)
    if p < 1 or q < 0 or len(history) < max(q, p - 1) or len(alpha) < 2 + max(q, p - 1):
        raise ValueError(
            f"corrector order {q} / predictor order {p} need {max(q, p - 1)} history entries "
            f"and {2 + max(q, p - 1)} points, got {len(history)} and {len(alpha)}"
        )
    if len(sigma) != len(alpha):
        raise ValueError("alpha and sigma must list the same points")
    if q and last_sample is None:
        raise ValueError("the corrector needs last_sample")
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    alphas = [_per_point(v, f"alpha[{j}]", xc) for j, v in enumerate(alpha)]
    sigmas = [_per_point(v, f"sigma[{j}]", xc) for j, v in enumerate(sigma)]
    # lambda = log(alpha / sigma): +inf at sigma = 0 (clean), -inf at alpha = 0
    lam = [torch.log(a) - torch.log(s) for a, s in zip(alphas, sigmas)]
    hist = [h.to(dtype) for h in history]
    kw = dict(predict_x0=predict_x0, solver_type=solver_type)

    converted = unipc_convert(
        xc,
        model_output.to(dtype),
        _over_x(alphas[1], xc),
        _over_x(sigmas[1], xc),
        prediction_type,
        predict_x0,
        clip_range,
        thresholding,
    )
    corrected = xc
    if q:  # UniC-q from t_{k-1} to t_k with M_k as the new point
        corrected = unipc_update(
            last_sample.to(dtype),
            hist[0],
            hist[1:q],
            [lam[1], *lam[2 : 2 + q]],
            alphas[1],
            sigmas[1],
            alphas[2],
            sigmas[2],
            model_t=converted,
            **kw,
        )
    # UniP-p from t_k to t_{k+1}
    x_next = unipc_update(
        corrected,
        converted,
        hist[: p - 1],
        [lam[0], *lam[1 : p + 1]],
        alphas[0],
        sigmas[0],
        alphas[1],
        sigmas[1],
        **kw,
    )
    return x_next.to(x.dtype), corrected.to(x.dtype), converted.to(x.dtype)

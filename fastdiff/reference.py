"""Reference sampler steps in plain PyTorch: the spec the fused kernels are tested against.

One small function per paper formula, with its equation number. VP notation (Ho et al. 2020
eq. 4): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; a step goes from ``ab_t`` to ``ab_next``
(the next, less noisy, visited step; 1.0 is clean). Euler works in sigma space (Karras et
al. 2022): ``sigma = sqrt((1 - ab) / ab)``, ``x_sigma = x_t / sqrt(ab) = x0 + sigma eps``.

Contract of every step: float64 ``x`` computes in float64, any other float dtype in float32,
and results come back in ``x.dtype``; schedule values are python floats or tensors ``[]`` /
``[B]`` (any float dtype and device), broadcast over x's trailing dims; no host sync (no
``.item()``, no branch on a tensor value). Steps return ``(x_next, x0)``. Arguments are not
validated here: ``fastdiff.checks`` does that at the public boundary (``Sampler``, the
drop-ins).

Example:
    >>> x_next, x0 = ddim_step(x, eps_hat, ab[t], ab[t_next], eta=0.0)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastdiff.checks import PREDICTION_TYPES, is_number

__all__ = [
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "ancestral_sigmas",
    "cfg_combine",
    "compute_dtype_of",
    "ddim_step",
    "ddpm_step",
    "ddpm_variance",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_step",
    "predict_eps",
    "predict_x0",
    "process_x0",
    "split_learned_variance",
]

VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)
_LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# Floor of the posterior variance before its log (it is exactly 0 on the step to clean); the
# same floor as diffusers' DDPMScheduler.
_MIN_VARIANCE = 1e-20

ScheduleValue = float | Tensor


# -- dtypes and schedule values -------------------------------------------------------------


def compute_dtype_of(x: Tensor) -> torch.dtype:
    """The reference's compute dtype for ``x``: float64 stays float64, every other float
    dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _schedule(value: ScheduleValue, name: str, like: Tensor, low=None, high=None) -> Tensor:
    """A schedule value in ``like``'s dtype and device, broadcastable to ``like``: a python
    number becomes a 0-d ``torch.full`` (no host-to-device copy), a ``[B]`` tensor is viewed
    as ``[B, 1, ..., 1]``. (``low`` / ``high`` are documentation only.)"""
    if is_number(value):
        return torch.full((), float(value), dtype=like.dtype, device=like.device)
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 0:
        return value
    if value.ndim == 1 and like.ndim > 0 and value.shape[0] == like.shape[0]:
        return value.view(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"{name} must be a python float or a tensor of shape [] or [B] with "
        f"B={like.shape[0] if like.ndim else None}, got shape {tuple(value.shape)}"
    )


def _sigma(value: ScheduleValue, name: str, like: Tensor) -> Tensor:
    """A current noise level (> 0), as :func:`_schedule`."""
    return _schedule(value, name, like)


def _optional_like(t: Tensor | None, name: str, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """An optional tensor like ``x`` (noise, grad, x0_prev) in the compute dtype."""
    return None if t is None else t.to(dtype)


def _prepare_step(x, model_output, prediction_type, clip_range, thresholding):
    """``(x, model_output)`` in the compute dtype."""
    dtype = compute_dtype_of(x)
    return x.to(dtype), model_output.to(dtype)


# -- predictions (compute-dtype tensors in and out) -----------------------------------------


def _x0_from_output(x: Tensor, m: Tensor, ab: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        # Ho et al. 2020 eq. 4 solved for x0 (eq. 15)
        return (x - torch.sqrt(1 - ab) * m) / torch.sqrt(ab)
    if prediction_type == "sample":
        return m
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) => x0 = sqrt(ab) x - sqrt(1 - ab) v
    return torch.sqrt(ab) * x - torch.sqrt(1 - ab) * m


def _eps_from_x0(x: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    # Ho et al. 2020 eq. 4 solved for eps
    return (x - torch.sqrt(ab) * x0) / torch.sqrt(1 - ab)


def _eps_from_output(x: Tensor, m: Tensor, ab: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return m
    if prediction_type == "sample":
        return _eps_from_x0(x, m, ab)
    # v-prediction (Salimans & Ho 2022): eps = sqrt(ab) v + sqrt(1 - ab) x
    return torch.sqrt(ab) * m + torch.sqrt(1 - ab) * x


def _x0_from_output_sigma_space(x: Tensor, m: Tensor, sigma: Tensor, prediction_type: str):
    """The VP formulas on x_t = x / sqrt(sigma^2 + 1), ab = 1 / (sigma^2 + 1)."""
    if prediction_type == "epsilon":
        return x - sigma * m
    if prediction_type == "sample":
        return m
    return -sigma / torch.sqrt(sigma**2 + 1) * m + x / (sigma**2 + 1)


def _threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): s = clamp(quantile(|x0|, ratio),
    1, max_value) per sample; x0 <- clamp(x0, -s, s) / s. s is a constant for autograd (a
    per-sample normalization; the fused kernel's backward treats it the same way)."""
    s = torch.quantile(x0.detach().reshape(x0.shape[0], -1).abs(), ratio, dim=1)
    s = s.clamp(min=1.0, max=max_value).view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _process_x0(x0: Tensor, clip_range: float | None, thresholding: tuple | None) -> Tensor:
    if thresholding is not None:
        return _threshold(x0, float(thresholding[0]), float(thresholding[1]))
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def _predict(from_output: Callable, x: Tensor, model_output: Tensor, ab_t, prediction_type):
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    ab = _schedule(ab_t, "ab_t", xc)
    return from_output(xc, model_output.to(dtype), ab, prediction_type).to(x.dtype)


def predict_x0(x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str):
    """The model's x0 (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v), in ``x.dtype``.

    Example:
        >>> x0 = predict_x0(x, eps_hat, 0.5, "epsilon")
    """
    return _predict(_x0_from_output, x, model_output, ab_t, prediction_type)


def predict_eps(x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str):
    """The model's eps (Ho et al. 2020 eq. 4 solved for eps), in ``x.dtype``.

    Example:
        >>> eps = predict_eps(x, v_hat, ab, "v_prediction")
    """
    return _predict(_eps_from_output, x, model_output, ab_t, prediction_type)


def process_x0(x0: Tensor, clip_range: float | None = None, thresholding: tuple | None = None):
    """Clamp x0 to ``[-clip_range, clip_range]``, or dynamic thresholding with
    ``thresholding=(ratio, max_value)`` (Saharia et al. 2022); in ``x0.dtype``.

    Example:
        >>> process_x0(x0, thresholding=(0.995, 1.5))
    """
    return _process_x0(x0.to(compute_dtype_of(x0)), clip_range, thresholding).to(x0.dtype)


def cfg_combine(
    m_uncond: Tensor, m_cond: Tensor, scale: ScheduleValue, rescale: ScheduleValue = 0.0
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022 eq. 6): ``m = m_u + w (m_c - m_u)``; with
    ``rescale`` phi (Lin et al. 2023 eq. 15-16): ``m <- phi m std(m_c) / std(m) + (1 - phi) m``
    (unbiased std over all dims but the batch, as diffusers' ``rescale_noise_cfg``).

    Returns the guided output in ``m_cond.dtype``.

    Example:
        >>> m = cfg_combine(*model(torch.cat([x, x]), t).chunk(2), 7.5, rescale=0.7)
    """
    dtype = compute_dtype_of(m_cond)
    cond, uncond = m_cond.to(dtype), m_uncond.to(dtype)
    guided = uncond + _schedule(scale, "scale", cond) * (cond - uncond)
    if is_number(rescale) and rescale == 0:
        return guided.to(m_cond.dtype)
    phi = _schedule(rescale, "rescale", cond)
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return (phi * rescaled + (1 - phi) * guided).to(m_cond.dtype)


def split_learned_variance(model_output: Tensor, variance_type: str):
    """``(prediction, variance values)`` of an improved-diffusion output ``[B, 2C, ...]``
    for learned variances (views), ``(model_output, None)`` otherwise.

    Example:
        >>> m, v = split_learned_variance(out, "learned_range")
    """
    if variance_type not in _LEARNED_VARIANCE_TYPES:
        return model_output, None
    if model_output.ndim < 2 or model_output.shape[1] % 2 != 0:
        raise ValueError(
            f"variance_type {variance_type!r} needs a model output with an even number of "
            f"channels (dim 1: prediction then variance), got shape {tuple(model_output.shape)}"
        )
    prediction, values = model_output.chunk(2, dim=1)
    return prediction, values


# -- DDPM (Ho et al. 2020; Nichol & Dhariwal 2021) ------------------------------------------


def _respaced_beta(ab_t: Tensor, ab_next: Tensor) -> Tensor:
    # beta' = 1 - ab_t / ab_next of the (possibly respaced) step (Nichol & Dhariwal 2021 Sec. 4)
    return 1 - ab_t / ab_next


def _posterior_mean_coefficients(ab_t: Tensor, ab_next: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, x_t) coefficients of the posterior mean (Ho et al. eq. 7):
    ``sqrt(ab') beta' / (1 - ab_t)`` and ``sqrt(alpha') (1 - ab') / (1 - ab_t)``, with
    ``alpha' = ab_t / ab'`` directly (``sqrt(1 - beta')`` cancels for tiny alpha')."""
    beta = _respaced_beta(ab_t, ab_next)
    coef_x0 = torch.sqrt(ab_next) * beta / (1 - ab_t)
    coef_xt = torch.sqrt(ab_t / ab_next) * (1 - ab_next) / (1 - ab_t)
    return coef_x0, coef_xt


def _ddpm_log_variance(ab_t, ab_next, variance_type: str, v: Tensor | None) -> Tensor:
    beta = _respaced_beta(ab_t, ab_next)
    # beta~ = (1 - ab') / (1 - ab_t) beta' (Ho et al. eq. 7), floored before the log
    log_small = torch.log(((1 - ab_next) / (1 - ab_t) * beta).clamp(min=_MIN_VARIANCE))
    if variance_type in ("fixed_small", "fixed_small_log"):
        return log_small
    if variance_type in ("fixed_large", "fixed_large_log"):
        return torch.log(beta)  # sigma^2 = beta' (Ho et al. Sec. 3.2)
    if variance_type == "learned":
        return v  # a log variance (improved-diffusion LEARNED)
    # learned_range: Nichol & Dhariwal 2021 eq. 15, frac = (v + 1) / 2
    frac = (v + 1) / 2
    return frac * torch.log(beta) + (1 - frac) * log_small


def ddpm_variance(
    ab_t: ScheduleValue, ab_next: ScheduleValue, variance_type: str, v: Tensor | None = None
) -> Tensor:
    """Variance sigma^2 of a DDPM reverse step: fixed_small ``beta~`` (floored at 1e-20),
    fixed_large ``beta'``, learned ``exp(v)``, learned_range ``exp(frac log beta' + (1 - frac)
    log beta~)`` (Nichol & Dhariwal 2021 eq. 15); the ``_log`` forms are the same numbers.

    Returns v's shape in v's compute dtype with v, else float64 of the schedule's shape.

    Example:
        >>> ddpm_variance(0.5, 0.6, "fixed_large")
        tensor(0.1667, dtype=torch.float64)
    """
    if variance_type in _LEARNED_VARIANCE_TYPES:
        if v is None:
            raise ValueError(f"variance_type {variance_type!r} needs the model's variance values v")
        like = v.to(compute_dtype_of(v))
    else:
        device = next((a.device for a in (ab_t, ab_next) if isinstance(a, Tensor)), None)
        batch = max((a.numel() for a in (ab_t, ab_next) if isinstance(a, Tensor)), default=1)
        like = torch.empty(batch, dtype=torch.float64, device=device)
    at, an = _schedule(ab_t, "ab_t", like), _schedule(ab_next, "ab_next", like)
    log_var = _ddpm_log_variance(at, an, variance_type, like if v is not None else None)
    if v is None:
        log_var = log_var.expand(torch.broadcast_shapes(at.shape, an.shape))
    return torch.exp(log_var)


def _noise_mask(add_noise: bool | Tensor | None, ab_next: Tensor, like: Tensor) -> Tensor:
    """Where the step adds noise (broadcastable to x): by default not on the step to clean."""
    if add_noise is None:
        return ab_next < 1
    if isinstance(add_noise, bool):
        return torch.full((), add_noise, dtype=torch.bool, device=like.device)
    add_noise = add_noise.to(like.device)
    return add_noise.view(-1, *([1] * (like.ndim - 1))) if add_noise.ndim == 1 else add_noise


def ddpm_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_next: ScheduleValue,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    noise: Tensor | None = None,
    add_noise: bool | Tensor | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step (Ho et al. 2020 eq. 6-7, Alg. 2):
    ``x_next = mu~(x_t, x0) + sigma z`` with the processed x0, ``beta' = 1 - ab_t / ab_next``
    and sigma^2 of :func:`ddpm_variance`; classifier guidance (Dhariwal & Nichol 2021 Alg. 1)
    adds ``sigma^2 grad``.

    Args:
        x, model_output: x_t ``[B, C, ...]`` and the model output (``[B, 2C, ...]`` with a
            learned variance: prediction, then variance values).
        ab_t, ab_next: alpha bar at this step and at the next visited one (1.0: clean).
        noise: z like x (None: the mean). add_noise: None adds noise where ``ab_next < 1``;
            a bool or bool tensor ``[]`` / ``[B]`` overrides.
        grad: the already-scaled gradient of log p(y | x_t), like x.

    Example:
        >>> x, x0 = ddpm_step(x, eps_hat, ab[t], ab[t_next], noise=torch.randn_like(x))
    """
    pred, v = split_learned_variance(model_output, variance_type)
    xc, m = _prepare_step(x, pred, prediction_type, clip_range, thresholding)
    at, an = _schedule(ab_t, "ab_t", xc), _schedule(ab_next, "ab_next", xc)
    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    coef_x0, coef_xt = _posterior_mean_coefficients(at, an)
    x_next = coef_x0 * x0 + coef_xt * xc  # eq. 7
    log_var = _ddpm_log_variance(at, an, variance_type, None if v is None else v.to(xc.dtype))
    noisy = _noise_mask(add_noise, an, xc)
    z, g = _optional_like(noise, "noise", x, xc.dtype), _optional_like(grad, "grad", x, xc.dtype)
    if g is not None:
        x_next = x_next + torch.where(noisy, torch.exp(log_var), 0.0) * g
    if z is not None:  # Alg. 2 line 4
        x_next = x_next + torch.where(noisy, torch.exp(0.5 * log_var), 0.0) * z
    return x_next.to(x.dtype), x0.to(x.dtype)


# -- DDIM (Song et al. 2021) ----------------------------------------------------------------


def _ddim_sigma(ab_t: Tensor, ab_next: Tensor, eta: float) -> Tensor:
    # Song et al. 2021 eq. 16
    return eta * torch.sqrt((1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next))


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_next: ScheduleValue,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021 eq. 12, sigma of eq. 16 times ``eta``):
    ``x_next = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z`` (+ ``sigma^2 grad``).
    eps comes from the raw model output, or from the processed x0 with
    ``use_clipped_model_output``; for eta > 1 the direction coefficient is clamped at 0.

    Example:
        >>> x, x0 = ddim_step(x, eps_hat, ab[t], ab[t_next])
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    at, an = _schedule(ab_t, "ab_t", xc), _schedule(ab_next, "ab_next", xc)
    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    if use_clipped_model_output:
        eps = _eps_from_x0(xc, x0, at)
    else:
        eps = _eps_from_output(xc, m, at, prediction_type)
    sigma = _ddim_sigma(at, an, eta)
    x_next = torch.sqrt(an) * x0 + torch.sqrt((1 - an - sigma**2).clamp(min=0)) * eps
    z, g = _optional_like(noise, "noise", x, xc.dtype), _optional_like(grad, "grad", x, xc.dtype)
    if g is not None:
        x_next = x_next + sigma**2 * g
    if z is not None:
        x_next = x_next + sigma * z
    return x_next.to(x.dtype), x0.to(x.dtype)


# -- Euler and Euler ancestral in sigma space (Karras et al. 2022; k-diffusion) -------------


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
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022 Alg. 2,
    no churn): ``d = (x - x0) / sigma``, ``x_next = x + (sigma_next - sigma) d``.

    Example:
        >>> x, x0 = euler_step(x, eps_hat, sigmas[i], sigmas[i + 1])
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    s, s_next = _sigma(sigma, "sigma", xc), _schedule(sigma_next, "sigma_next", xc)
    x0 = _x0_from_output_sigma_space(xc, m, s, prediction_type)
    x0 = _process_x0(x0, clip_range, thresholding)
    x_next = xc + (s_next - s) * (xc - x0) / s
    return x_next.to(x.dtype), x0.to(x.dtype)


def ancestral_sigmas(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """k-diffusion's ``get_ancestral_step``: ``(sigma_down, sigma_up)`` with
    ``sigma_up = min(sigma', eta sqrt(sigma'^2 (1 - sigma'^2 / sigma^2)))`` and
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``sigma = inf`` (zero SNR) is allowed.

    Example:
        >>> down, up = ancestral_sigmas(torch.tensor(2.0), torch.tensor(1.0), 1.0)
    """
    sn2 = sigma_next**2
    sigma_up = torch.minimum(sigma_next, eta * (sn2 * (1.0 - sn2 / sigma**2)).clamp_min(0).sqrt())
    return (sn2 - sigma_up**2).clamp_min(0.0).sqrt(), sigma_up


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
    """One Euler ancestral step (k-diffusion ``sample_euler_ancestral``):
    ``x_next = x + (sigma_down - sigma) d + sigma_up z``, the split of :func:`ancestral_sigmas`.

    Example:
        >>> x, x0 = euler_ancestral_step(x, eps_hat, s, s_next, noise=torch.randn_like(x))
    """
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    s, s_next = _sigma(sigma, "sigma", xc), _schedule(sigma_next, "sigma_next", xc)
    x0 = _x0_from_output_sigma_space(xc, m, s, prediction_type)
    x0 = _process_x0(x0, clip_range, thresholding)
    down, up = ancestral_sigmas(s, s_next, eta)
    x_next = xc + (down - s) * (xc - x0) / s
    if noise is not None:
        x_next = x_next + up * noise.to(xc.dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)


# -- DPM-Solver++(2M) (Lu et al. 2022) ------------------------------------------------------


def _half_log_snr(ab: Tensor) -> Tensor:
    # lambda = log(alpha / sigma) (Lu et al. Sec. 2); +inf for clean, -inf for pure noise
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
    """One DPM-Solver++(2M) step (Lu et al. 2022 Alg. 2, midpoint form as diffusers):
    first order (eq. 9, = DDIM) ``x_next = (sigma'/sigma) x - alpha' (exp(-h) - 1) x0`` with
    ``h = lambda' - lambda``; with ``x0_prev`` from the previous visited step (alpha bar
    ``ab_prev``), ``D = x0 + (x0 - x0_prev) / (2 r)``, ``r = h_prev / h``, replaces x0.
    The step to clean (``ab_next == 1``) and ``ab_prev == 0`` are first order.

    Example:
        >>> x, x0 = dpmpp_2m_step(x, eps_hat, ab[t], ab[t_next], x0_prev=x0, ab_prev=ab[t_old])
    """
    if x0_prev is not None and ab_prev is None:
        raise ValueError("x0_prev needs ab_prev (alpha bar of the step that produced x0_prev)")
    xc, m = _prepare_step(x, model_output, prediction_type, clip_range, thresholding)
    at, an = _schedule(ab_t, "ab_t", xc), _schedule(ab_next, "ab_next", xc)
    x0 = _process_x0(_x0_from_output(xc, m, at, prediction_type), clip_range, thresholding)
    alpha_t, sigma_t = torch.sqrt(at), torch.sqrt(1 - at)
    alpha_n, sigma_n = torch.sqrt(an), torch.sqrt(1 - an)
    exp_neg_h = alpha_t * sigma_n / (sigma_t * alpha_n)  # finite for ab_next = 1 and ab_t = 0
    d = x0
    if x0_prev is not None:
        lam_t = _half_log_snr(at)
        h = _half_log_snr(an) - lam_t
        h_prev = lam_t - _half_log_snr(_schedule(ab_prev, "ab_prev", xc))
        half_inv_r = torch.where(an == 1, 0.0, h / (2 * h_prev))  # 1 / (2 r)
        d = x0 + half_inv_r * (x0 - x0_prev.to(xc.dtype))
    x_next = (sigma_n / sigma_t) * xc - alpha_n * (exp_neg_h - 1) * d
    return x_next.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------
# Flow matching (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024)
# ---------------------------------------------------------------------------------------
# State x_s = (1 - s) x0 + s eps, s in [0, 1] (Esser et al. 2024, Sec. 3.1; Liu et al. 2023,
# eq. 1). The model predicts the velocity v = dx_s/ds = eps - x0 ("flow_prediction"), so
# x0 = x - s v and eps = x + (1 - s) v. Levels (sigma = s) are python floats or tensors of
# shape [] / [B], as above; nothing here validates (the samplers check at their boundary).


def _level(value: ScheduleValue, like: Tensor) -> Tensor:
    """A noise level in like's dtype and device, shaped to broadcast over like."""
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


def flow_forward(x0: Tensor, eps: Tensor, sigma: ScheduleValue) -> Tensor:
    """The flow path ``x_s = (1 - s) x0 + s eps`` (Esser et al. 2024, Sec. 3.1).

    Example:
        >>> x = flow_forward(x0, torch.randn_like(x0), 0.7)
    """
    dtype = compute_dtype_of(x0)
    s = _level(sigma, x0.to(dtype))
    return ((1 - s) * x0.to(dtype) + s * eps.to(dtype)).to(x0.dtype)


def _flow_x0(x: Tensor, m: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "flow_prediction":
        return x - s * m  # x0 = x - s v
    if prediction_type == "epsilon":
        return (x - s * m) / (1 - s)  # the flow path solved for x0
    if prediction_type == "sample":
        return m
    raise ValueError(f"unknown flow prediction_type {prediction_type!r}")


def flow_x0(
    x: Tensor, model_output: Tensor, sigma: ScheduleValue, prediction_type: str = "flow_prediction"
) -> Tensor:
    """x0 from a flow model's output: ``x - s v`` (velocity), ``(x - s eps) / (1 - s)``
    (noise) or the output itself ("sample").

    Example:
        >>> x0 = flow_x0(x, v_hat, 0.7)
    """
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    return _flow_x0(xc, model_output.to(dtype), _level(sigma, xc), prediction_type).to(x.dtype)


def flow_eps(
    x: Tensor, model_output: Tensor, sigma: ScheduleValue, prediction_type: str = "flow_prediction"
) -> Tensor:
    """eps from a flow model's output: ``(x - (1 - s) x0) / s`` with x0 from :func:`flow_x0`
    (for a velocity ``eps = x + (1 - s) v``).

    Example:
        >>> eps = flow_eps(x, v_hat, 0.7)
    """
    dtype = compute_dtype_of(x)
    xc, m = x.to(dtype), model_output.to(dtype)
    s = _level(sigma, xc)
    if prediction_type == "flow_prediction":
        return (xc + (1 - s) * m).to(x.dtype)
    if prediction_type == "epsilon":
        return m.to(x.dtype)
    return ((xc - (1 - s) * _flow_x0(xc, m, s, prediction_type)) / s).to(x.dtype)


def _flow_prepared(x, model_output, sigma, prediction_type, clip_range, thresholding):
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    s = _level(sigma, xc)
    x0 = _flow_x0(xc, model_output.to(dtype), s, prediction_type)
    if clip_range is not None or thresholding is not None:
        x0 = process_x0(x0, clip_range, thresholding)
    return xc, s, x0


def flow_euler_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    prediction_type: str = "flow_prediction",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """One Euler step of the flow ODE ``dx/ds = v`` (Liu et al. 2023, Sec. 2.1)::

        x' = x + (s' - s) v,   v = (x - x0) / s

    with x0 processed (clipped / thresholded) first; for an unprocessed velocity output
    ``v`` is the output itself.

    Args:
        x: the state ``x_s`` ``[B, ...]``.
        model_output: the model output, like x.
        sigma: the current level s > 0.
        sigma_next: the next level s' (0: clean).
        prediction_type: "flow_prediction", "epsilon" or "sample".
        clip_range, thresholding: x0 processing (see :func:`process_x0`).

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = flow_euler_step(x, v_hat, sigmas[i], sigmas[i + 1])
    """
    xc, s, x0 = _flow_prepared(x, model_output, sigma, prediction_type, clip_range, thresholding)
    processed = clip_range is not None or thresholding is not None
    if prediction_type == "flow_prediction" and not processed:
        v = model_output.to(xc.dtype)  # also at s = 0 (diffusers' inverted sigmas start there)
    else:
        v = (xc - x0) / s
    x_next = xc + (_level(sigma_next, xc) - s) * v
    return x_next.to(x.dtype), x0.to(x.dtype)


def flow_stochastic_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    noise: Tensor | None,
    *,
    prediction_type: str = "flow_prediction",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The stochastic flow step (diffusers' ``stochastic_sampling``): x0 put back on the flow
    path at s' with fresh noise::

        x' = (1 - s') x0 + s' z    (+ s'^2 grad: the mean shifted by its variance times the
                                    classifier gradient, Dhariwal & Nichol 2021, Alg. 1)

    Args:
        x, model_output, sigma, sigma_next, prediction_type, clip_range, thresholding: see
            :func:`flow_euler_step`.
        noise: z ~ N(0, I) like x (None: the mean alone).
        grad: classifier guidance, the already-scaled gradient of log p(y | x), or None.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = flow_stochastic_step(x, v_hat, 0.7, 0.5, torch.randn_like(x))
    """
    xc, _, x0 = _flow_prepared(x, model_output, sigma, prediction_type, clip_range, thresholding)
    s_next = _level(sigma_next, xc)
    x_next = (1 - s_next) * x0
    if grad is not None:
        x_next = x_next + s_next**2 * grad.to(xc.dtype)
    if noise is not None:
        x_next = x_next + s_next * noise.to(xc.dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)


def flow_dpmpp_2m_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    x0_prev: Tensor | None = None,
    sigma_prev: ScheduleValue | None = None,
    prediction_type: str = "flow_prediction",
    clip_range: float | None = None,
    thresholding: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) on the flow path, where
    ``alpha = 1 - s`` and ``sigma = s`` (diffusers' ``use_flow_sigmas``)::

        lambda = log((1 - s) / s),  h = lambda' - lambda,  r = (lambda - lambda_prev) / h
        x' = (s' / s) x + (1 - s') (1 - e^-h) D,  D = x0 + (x0 - x0_prev) / (2 r)

    ``D = x0`` (first order) without ``x0_prev`` and on the step to clean (s' = 0).

    Args:
        x, model_output, sigma, sigma_next, prediction_type, clip_range, thresholding: see
            :func:`flow_euler_step` (s < 1: lambda is finite).
        x0_prev: the previous step's x0, or None.
        sigma_prev: the previous step's level (with ``x0_prev``).

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = flow_dpmpp_2m_step(x, v_hat, 0.6, 0.4, x0_prev=x0, sigma_prev=0.8)
    """
    xc, s, x0 = _flow_prepared(x, model_output, sigma, prediction_type, clip_range, thresholding)
    s_next = _level(sigma_next, xc)
    # e^-h = (1 - s) s' / (s (1 - s')): finite on the step to clean (s' = 0)
    exp_neg_h = (1 - s) * s_next / (s * (1 - s_next))
    d = x0
    if x0_prev is not None:
        s_prev = _level(sigma_prev, xc)

        def lam(v):
            return torch.log(1 - v) - torch.log(v)

        h = lam(s_next) - lam(s)
        half_inv_r = torch.where(s_next == 0, 0.0, h / (2 * (lam(s) - lam(s_prev))))
        d = x0 + half_inv_r * (x0 - x0_prev.to(xc.dtype))
    x_next = (s_next / s) * xc + (1 - s_next) * (1 - exp_neg_h) * d
    return x_next.to(x.dtype), x0.to(x.dtype)


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
    dtype = compute_dtype_of(x)
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

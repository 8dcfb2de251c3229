"""VP reference steps (Ho et al. 2020 eq. 4 notation): predictions, DDPM, DDIM, Euler /
Euler ancestral in sigma space and DPM-Solver++(2M).

Example:
    >>> x_next, x0 = ddim_step(x, eps_hat, ab[t], ab[t_next], eta=0.0)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastdiff.reference.common import (
    ScheduleValue,
    X0Options,
    compute_dtype_of,
    schedule_like,
)
from fastdiff.reference.sigma import churn_step

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


def _sigma(value: ScheduleValue, name: str, like: Tensor) -> Tensor:
    """A current noise level (> 0), as :func:`schedule_like`."""
    return schedule_like(value, name, like)


def _optional_like(t: Tensor | None, name: str, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """An optional tensor like ``x`` (noise, grad, x0_prev) in the compute dtype."""
    return None if t is None else t.to(dtype)


def _prepare_step(x: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, model_output)`` in the compute dtype."""
    dtype = compute_dtype_of(x)
    return x.to(dtype), model_output.to(dtype)


# -- predictions (compute-dtype tensors in and out) -----------------------------------------


def vp_x0_compute(x: Tensor, m: Tensor, ab: Tensor, prediction_type: str) -> Tensor:
    """x0 from a model output at ``alpha_bar = ab`` (tensors already in the compute dtype;
    shared with ``reference.dpm``)."""
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


def _vp_start(x: Tensor, model_output: Tensor, ab_t, ab_next, x0_options: dict):
    """What every VP step starts from: ``(x, model output, ab_t, ab_next, x0)``, in the
    compute dtype, x0 processed (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v)."""
    opts = X0Options.of(x0_options)
    xc, m = _prepare_step(x, model_output)
    at, an = schedule_like(ab_t, "ab_t", xc), schedule_like(ab_next, "ab_next", xc)
    return xc, m, at, an, opts.process(vp_x0_compute(xc, m, at, opts.prediction_type))


def _sigma_start(x: Tensor, model_output: Tensor, sigma, sigma_next, x0_options: dict, made_at=0):
    """What every sigma-space step starts from: ``(x, sigma, sigma_next, x0)`` in the compute
    dtype, x0 read (then processed) at the level the output was made at:
    ``(sigma, sigma_next)[made_at]``."""
    opts = X0Options.of(x0_options)
    xc, m = _prepare_step(x, model_output)
    s, s_next = _sigma(sigma, "sigma", xc), _sigma(sigma_next, "sigma_next", xc)
    x0 = _x0_from_output_sigma_space(xc, m, (s, s_next)[made_at], opts.prediction_type)
    return xc, s, s_next, opts.process(x0)


def _predict(from_output: Callable, x: Tensor, model_output: Tensor, ab_t, prediction_type):
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    ab = schedule_like(ab_t, "ab_t", xc)
    return from_output(xc, model_output.to(dtype), ab, prediction_type).to(x.dtype)


def predict_x0(x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str):
    """The model's x0 (Ho et al. 2020 eq. 15; Salimans & Ho 2022 for v), in ``x.dtype``.

    Example:
        >>> x0 = predict_x0(x, eps_hat, 0.5, "epsilon")
    """
    return _predict(vp_x0_compute, x, model_output, ab_t, prediction_type)


def predict_eps(x: Tensor, model_output: Tensor, ab_t: ScheduleValue, prediction_type: str):
    """The model's eps (Ho et al. 2020 eq. 4 solved for eps), in ``x.dtype``.

    Example:
        >>> eps = predict_eps(x, v_hat, ab, "v_prediction")
    """
    return _predict(_eps_from_output, x, model_output, ab_t, prediction_type)


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


def posterior_mean_coefficients(ab_t: Tensor, ab_next: Tensor) -> tuple[Tensor, Tensor]:
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
    at, an = schedule_like(ab_t, "ab_t", like), schedule_like(ab_next, "ab_next", like)
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
    variance_type: str = "fixed_small",
    noise: Tensor | None = None,
    add_noise: bool | Tensor | None = None,
    grad: Tensor | None = None,
    **x0_options,
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
        x0_options: ``prediction_type`` ("epsilon"), ``clip_range``, ``thresholding``
            (:class:`X0Options`).

    Example:
        >>> x, x0 = ddpm_step(x, eps_hat, ab[t], ab[t_next], noise=torch.randn_like(x))
    """
    pred, v = split_learned_variance(model_output, variance_type)
    xc, _, at, an, x0 = _vp_start(x, pred, ab_t, ab_next, x0_options)
    coef_x0, coef_xt = posterior_mean_coefficients(at, an)
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
    use_clipped_model_output: bool = False,
    eta: float = 0.0,
    noise: Tensor | None = None,
    grad: Tensor | None = None,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021 eq. 12, sigma of eq. 16 times ``eta``):
    ``x_next = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z`` (+ ``sigma^2 grad``).
    eps comes from the raw model output, or from the processed x0 with
    ``use_clipped_model_output``; for eta > 1 the direction coefficient is clamped at 0.
    ``x0_options``: ``prediction_type`` ("epsilon"), ``clip_range``, ``thresholding``
    (:class:`X0Options`), as every step here.

    Example:
        >>> x, x0 = ddim_step(x, eps_hat, ab[t], ab[t_next])
    """
    xc, m, at, an, x0 = _vp_start(x, model_output, ab_t, ab_next, x0_options)
    if use_clipped_model_output:
        eps = _eps_from_x0(xc, x0, at)
    else:
        eps = _eps_from_output(xc, m, at, X0Options.of(x0_options).prediction_type)
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
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022 Alg. 2,
    no churn): ``d = (x - x0) / sigma``, ``x_next = x + (sigma_next - sigma) d``.

    Example:
        >>> x, x0 = euler_step(x, eps_hat, sigmas[i], sigmas[i + 1])
    """
    xc, s, s_next, x0 = _sigma_start(x, model_output, sigma, sigma_next, x0_options)
    x_next = xc + (s_next - s) * (xc - x0) / s
    return x_next.to(x.dtype), x0.to(x.dtype)


def euler_churn_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_hat: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    prediction_type: str = "epsilon",
    s_noise: float = 1.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """diffusers' ``EulerDiscreteScheduler.step`` with churn (Karras et al. 2022 Alg. 2 lines
    5-8 with an Euler step): ``x_hat = x + S_noise sqrt(sigma_hat^2 - sigma^2) z``
    (:func:`churn_step`; none without ``noise``, where ``sigma_hat = sigma``), x0 from the
    model output (made at x, as diffusers reads it) at x_hat with ``sigma_hat`` (epsilon) or
    ``sigma`` (v_prediction: diffusers' c_skip / c_out), then :func:`euler_step` from x_hat at
    ``sigma_hat`` to ``sigma_next``.

    Example:
        >>> x, x0 = euler_churn_step(x, eps_hat, s, 1.2 * s, s_next, noise=torch.randn_like(x))
    """
    xc, m = _prepare_step(x, model_output)
    if noise is not None:
        xc = churn_step(xc, noise.to(xc.dtype), sigma, sigma_hat, s_noise)
    s_x0 = sigma if prediction_type == "v_prediction" else sigma_hat
    x0 = _x0_from_output_sigma_space(xc, m, _sigma(s_x0, "sigma", xc), prediction_type)
    x_next, _ = euler_step(xc, x0, sigma_hat, sigma_next, prediction_type="sample")
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
    noise: Tensor | None = None,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """One Euler ancestral step (k-diffusion ``sample_euler_ancestral``):
    ``x_next = x + (sigma_down - sigma) d + sigma_up z``, the split of :func:`ancestral_sigmas`.

    Example:
        >>> x, x0 = euler_ancestral_step(x, eps_hat, s, s_next, noise=torch.randn_like(x))
    """
    xc, s, s_next, x0 = _sigma_start(x, model_output, sigma, sigma_next, x0_options)
    down, up = ancestral_sigmas(s, s_next, eta)
    x_next = xc + (down - s) * (xc - x0) / s
    if noise is not None:
        x_next = x_next + up * noise.to(xc.dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)


# -- Heun's 2nd-order method (Karras et al. 2022 Alg. 1) -------------------------------------


def heun_correction_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    *,
    x_start: Tensor,
    x0_start: Tensor,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """The second half of one Heun step (Karras et al. 2022 Alg. 1 lines 7-8). The first half
    (:func:`euler_step` from ``x_start`` at ``sigma``, whose x0 was ``x0_start``) gave
    ``x = x_start + (sigma_next - sigma) d``, ``d = (x_start - x0_start) / sigma``; the model
    output at ``(x, sigma_next)`` gives ``d' = (x - x0) / sigma_next`` and::

        x_next = x_start + (sigma_next - sigma) (d + d') / 2

    Returns ``(x_next, x0)``, x0 predicted at ``sigma_next``.

    Example:
        >>> x1, d0 = euler_step(x, eps0, s, s_next)
        >>> x_next, x0 = heun_correction_step(x1, eps1, s, s_next, x_start=x, x0_start=d0)
    """
    xc, s, s_next, x0 = _sigma_start(x, model_output, sigma, sigma_next, x0_options, made_at=1)
    xs = x_start.to(xc.dtype)
    d = (xs - x0_start.to(xc.dtype)) / s
    d_next = (xc - x0) / s_next
    x_next = xs + (s_next - s) * (d + d_next) / 2
    return x_next.to(x.dtype), x0.to(x.dtype)

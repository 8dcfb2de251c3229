"""Reference steps of the k-diffusion samplers, on a denoiser in sigma (variance-exploding)
space: the state is ``x = x0 + sigma eps`` and the model returns ``D(x, sigma)``, the
denoised estimate of x0 (Karras et al. 2022 Sec. 2; k-diffusion's ``sample_*`` functions).

Euler and Euler ancestral are ``reference.euler_step`` / ``euler_ancestral_step`` with
``prediction_type="sample"``; here are the others: Karras's churn (Alg. 2 lines 4-6), the
second-order Heun correction (Alg. 2 lines 7-11), the SDE form of DPM-Solver++(2M) (Lu et
al. 2022, SDE-DPM-Solver++(2M), with k-diffusion's ``eta``), and the LCM step (Luo et al.
2023 Alg. 1: a consistency estimate re-noised). DPM-Solver++(2M) itself is
``reference.dpmpp_multistep_step`` with ``space="ve"``.

Contract as the other reference steps (``fastdiff.reference``): float64 computes in float64,
other dtypes in float32, results in ``x.dtype``; sigmas are python floats or ``[]`` / ``[B]``
tensors; every step returns ``(x_next, x0)`` where x0 is the denoiser output used.

Example:
    >>> x, d = dpmpp_2m_sde_step(x, denoised, 14.6, 9.7, denoised_prev=old, sigma_prev=20.0)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.reference.common import (
    ScheduleValue,
    compute_dtype_of,
    schedule_like,
)

__all__ = [
    "SDE_SOLVER_TYPES",
    "churn_gamma",
    "churn_step",
    "dpmpp_2m_sde_step",
    "heun_step",
    "lcm_step",
]

SDE_SOLVER_TYPES = ("midpoint", "heun")


def _prepared(x: Tensor, *tensors: Tensor | None) -> tuple[Tensor, ...]:
    dtype = compute_dtype_of(x)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def churn_gamma(
    sigma: float | Tensor, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float
) -> float:
    """Karras et al. 2022 Alg. 2 (its input gamma_i): ``gamma = min(S_churn / N,
    sqrt(2) - 1)`` where ``S_tmin <= sigma <= S_tmax``, else 0 (a host number: the plan is
    known up front; a 0-d CPU tensor sigma is compared in its dtype, as diffusers compares
    its float32 sigmas).

    Example:
        >>> churn_gamma(10.0, 20, 10.0, 0.0, float("inf"))
        0.4142135623730951
    """
    if not s_tmin <= sigma <= s_tmax:
        return 0.0
    return min(s_churn / n_steps, 2**0.5 - 1)


def churn_step(
    x: Tensor, noise: Tensor, sigma: ScheduleValue, sigma_hat: ScheduleValue, s_noise: float = 1.0
) -> Tensor:
    """Karras et al. 2022 Alg. 2 lines 5-6: raise the noise level from sigma to
    ``sigma_hat = (1 + gamma) sigma``: ``x_hat = x + S_noise sqrt(sigma_hat^2 - sigma^2) z``.

    Example:
        >>> x_hat = churn_step(x, torch.randn_like(x), 10.0, 11.0)
    """
    xc, z = _prepared(x, noise)
    s, s_hat = schedule_like(sigma, "sigma", xc), schedule_like(sigma_hat, "sigma_hat", xc)
    return (xc + s_noise * (s_hat**2 - s**2).sqrt() * z).to(x.dtype)


def heun_step(
    x: Tensor,
    denoised: Tensor,
    denoised_2: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
) -> tuple[Tensor, Tensor]:
    """One Heun step (Karras et al. 2022 Alg. 2 lines 7-11; Alg. 1 without churn) from ``x`` at
    ``sigma`` (sigma_hat after churn) to ``sigma_next > 0``, given both denoiser outputs:
    ``d = (x - D) / sigma``, ``x_2 = x + (sigma' - sigma) d`` (line 8, where ``denoised_2 =
    D(x_2, sigma')``), ``d' = (x_2 - D_2) / sigma'`` and
    ``x' = x + (sigma' - sigma) (d + d') / 2`` (line 11).

    Example:
        >>> x2, _ = euler_step(x, d1, s, s_next, prediction_type="sample")
        >>> x, _ = heun_step(x, d1, model(x2, s_next), s, s_next)
    """
    xc, d1, d2 = _prepared(x, denoised, denoised_2)
    s, s_next = schedule_like(sigma, "sigma", xc), schedule_like(sigma_next, "sigma_next", xc)
    d = (xc - d1) / s
    x_2 = xc + (s_next - s) * d
    d_2 = (x_2 - d2) / s_next
    x_next = xc + (s_next - s) * (d + d_2) / 2
    return x_next.to(x.dtype), d2.to(x.dtype)


def _log_ratio(s: Tensor, s_next: Tensor) -> Tensor:
    # h = lambda' - lambda with lambda = log(alpha / sigma) = -log sigma (alpha = 1, VE)
    return s.log() - s_next.log()


def dpmpp_2m_sde_step(
    x: Tensor,
    denoised: Tensor,
    sigma: ScheduleValue,
    sigma_next: float,
    *,
    denoised_prev: Tensor | None = None,
    sigma_prev: ScheduleValue | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) SDE step (Lu et al. 2022, SDE-DPM-Solver++(2M); the
    eta-scaled form of k-diffusion's ``sample_dpmpp_2m_sde``). With ``h = log(sigma /
    sigma')``, ``eta_h = eta h``::

        x' = (sigma' / sigma) e^(-eta_h) x + (1 - e^(-h - eta_h)) D
             + c (D - D_prev) / r                          (with D_prev, r = h_prev / h)
             + sigma' sqrt(1 - e^(-2 eta_h)) S_noise z

    ``c = (1 - e^(-h - eta_h)) / 2`` (midpoint) or ``(1 - e^(-h - eta_h)) / (-h - eta_h) + 1``
    (heun). ``sigma_next = 0`` (a python number) is the denoising step ``x' = D``.

    Example:
        >>> x, d = dpmpp_2m_sde_step(x, denoised, s, s_next, noise=torch.randn_like(x))
    """
    xc, d, d_prev, z = _prepared(x, denoised, denoised_prev, noise)
    if sigma_next == 0:
        return d.to(x.dtype), denoised.to(x.dtype)
    s, s_next = schedule_like(sigma, "sigma", xc), schedule_like(sigma_next, "sigma_next", xc)
    h = _log_ratio(s, s_next)
    eta_h = eta * h
    gain = -torch.expm1(-h - eta_h)
    x_next = (s_next / s) * torch.exp(-eta_h) * xc + gain * d
    if d_prev is not None:
        r = _log_ratio(schedule_like(sigma_prev, "sigma_prev", xc), s) / h
        c = 0.5 * gain if solver_type == "midpoint" else gain / (-h - eta_h) + 1
        x_next = x_next + c / r * (d - d_prev)
    if eta and z is not None:
        x_next = x_next + s_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise * z
    return x_next.to(x.dtype), denoised.to(x.dtype)


def lcm_step(
    x: Tensor, denoised: Tensor, sigma_next: ScheduleValue, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One LCM step (Luo et al. 2023 Alg. 1, the multistep consistency sampler of Song
    et al. 2023 Alg. 1) in sigma space: ``x' = D + sigma' z`` (``x' = D`` without noise, the
    last step). ``x`` is unused: the consistency estimate replaces the state.

    Example:
        >>> x, d = lcm_step(x, denoised, sigmas[i + 1], torch.randn_like(x))
    """
    _, d, z = _prepared(x, denoised, noise)
    x_next = d if z is None else d + schedule_like(sigma_next, "sigma_next", d) * z
    return x_next.to(x.dtype), denoised.to(x.dtype)

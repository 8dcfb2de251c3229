"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095) on a state
``x = alpha x0 + sigma eps`` of either space: VP (``alpha = sqrt(ab)``, ``sigma =
sqrt(1 - ab)``) or flow matching (``alpha = 1 - s``, ``sigma = s``), as diffusers'
``DPMSolverMultistepScheduler`` runs it: the ODE solver and its SDE form, orders 1 to 3, the
"midpoint" and "heun" second-order forms.

With ``lambda = log(alpha / sigma)``, ``h = lambda' - lambda`` and ``H = h`` (ODE) or ``2h``
(SDE), ``phi = 1 - e^-H``; x0 is the current data prediction ``D0``, and the previous ones
give ``r0 = h_0 / h``, ``r1 = h_1 / h`` (``h_0, h_1``: the log-SNR steps before this one)::

    ODE:  x' = (sigma' / sigma) x + alpha' phi D0 + alpha' c1 D1 + alpha' c2 D2
    SDE:  x' = (sigma' / sigma) e^-h x + alpha' phi D0 + alpha' c1 D1 + alpha' c2 D2
               + sigma' sqrt(phi) z

- order 1: DPM-Solver++1 (eq. 8 of 2211.01095, = DDIM) and SDE-DPM-Solver++1;
- order 2 (Alg. 2, DPM-Solver++(2M); SDE-DPM-Solver++(2M)): ``D1 = (D0 - D0_prev) / r0``,
  ``c1 = phi / 2`` (midpoint) or ``1 - phi / H`` (heun);
- order 3 (the third-order multistep form of DPM-Solver, arXiv:2206.00927 App. B, in data
  prediction): ``D1_0 = (D0 - D0_prev) / r0``, ``D1_1 = (D0_prev - D0_prev2) / r1``,
  ``D1 = D1_0 + r0 (D1_0 - D1_1) / (r0 + r1)``, ``D2 = (D1_0 - D1_1) / (r0 + r1)``,
  ``c1 = 1 - phi / H``, ``c2 = 1/2 + (phi - H) / H^2`` (ODE) or ``(phi - H) / H^2 - 1/2``
  (SDE: diffusers' coefficient, reproduced as the drop-in's spec; it is ``-1 + O(h)`` where
  the ODE's is ``O(h)``).

The step to ``sigma' = 0`` (h infinite) is first order: ``x' = D0``; a step with ``h = 0`` (a
plan whose last level repeats) leaves x as it is, the limit (diffusers' heun form divides 0
by 0 there); the SDE adds no noise on a step with ``h < 0`` (a final ``sigma_min`` above the
plan's last level: the variance ``1 - e^-2h`` is negative, diffusers' square root NaN).

Contract as the other reference steps (``fastdiff.reference``): float64 computes in float64,
other dtypes in float32, results in ``x.dtype``; levels are python floats or ``[]`` / ``[B]``
tensors. Returns ``(x_next, x0)``.

Example:
    >>> x, x0 = dpmpp_multistep_step(x, eps_hat, ab[t], ab[t_next],
    ...                              history=[(x0_prev, ab[t_prev])], sde=True, noise=z)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastdiff.reference.common import ScheduleValue, X0Options, compute_dtype_of, schedule_like
from fastdiff.reference.flow import flow_x0_compute
from fastdiff.reference.vp import vp_x0_compute

__all__ = ["DPM_SOLVER_TYPES", "DPM_SPACES", "dpmpp_multistep_step"]

DPM_SOLVER_TYPES = ("midpoint", "heun")


DPM_SPACES = ("vp", "flow", "ve")


def _denoised(x: Tensor, m: Tensor, level: Tensor, prediction_type: str) -> Tensor:
    """VE (k-diffusion's samplers): the model output is the denoised x0 itself."""
    if prediction_type != "sample":
        raise ValueError(
            f'space "ve" takes the denoised x0 (prediction_type "sample"), got {prediction_type!r}'
        )
    return m


# each space's model output -> x0 and its default prediction type
_X0_OF = {
    "vp": (vp_x0_compute, "epsilon"),
    "flow": (flow_x0_compute, "flow_prediction"),
    "ve": (_denoised, "sample"),
}


def _alpha_sigma(level: Tensor, space: str) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) of a level: alpha bar (VP), s (flow) or sigma (VE, alpha = 1)."""
    if space == "vp":
        return level.sqrt(), (1 - level).sqrt()
    if space == "ve":
        return torch.ones_like(level), level
    return 1 - level, level


def _log_snr(level: ScheduleValue, space: str, like: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) of a level (+inf for clean)."""
    alpha, sigma = _alpha_sigma(schedule_like(level, "level", like), space)
    return alpha.log() - sigma.log()


def dpmpp_multistep_step(
    x: Tensor,
    model_output: Tensor,
    level: ScheduleValue,
    level_next: ScheduleValue,
    *,
    history: Sequence[tuple[Tensor, ScheduleValue]] = (),
    space: str = "vp",
    sde: bool = False,
    solver_type: str = "midpoint",
    noise: Tensor | None = None,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++ multistep step (see the module docstring) of order ``1 + len(history)``.

    Args:
        x: the current sample.
        model_output: the model output (epsilon, sample, v_prediction; flow_prediction on
            flow levels), converted to x0 (then clipped / thresholded) as diffusers does.
        level, level_next: alpha bar (``space="vp"``, 1 for clean), s (``"flow"``, 0 for
            clean) or sigma (``"ve"``, 0 for clean) at the step and at the step it goes to.
        history: the previous steps' x0 and levels, newest first (at most 2); one entry:
            DPM-Solver++(2M) (Alg. 2).
        space: "vp", "flow" or "ve" (k-diffusion's sigma space, ``x = x0 + sigma eps``,
            where the model output is the denoised x0).
        sde: the SDE form (SDE-DPM-Solver++), which adds ``sigma' sqrt(1 - e^-2h) noise``.
        solver_type: "midpoint" or "heun" (order 2; order 3 has one form).
        noise: standard normal noise like x (with ``sde``).
        x0_options: ``prediction_type`` (default: "epsilon" in VP, "flow_prediction" in
            flow, "sample" in VE), ``clip_range``, ``thresholding`` (diffusers'
            thresholding): :class:`X0Options`.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = dpmpp_multistep_step(x, v_hat, 0.6, 0.4, space="flow",
        ...                              prediction_type="flow_prediction")
    """
    if space not in DPM_SPACES:
        raise ValueError(f"space must be one of {DPM_SPACES}, got {space!r}")
    x0_compute, default_prediction = _X0_OF[space]
    opts = X0Options.of(x0_options, default_prediction)
    dtype = compute_dtype_of(x)
    xc, m = x.to(dtype), model_output.to(dtype)
    lev = schedule_like(level, "level", xc)
    x0 = opts.process(x0_compute(xc, m, lev, opts.prediction_type))
    _, sigma = _alpha_sigma(lev, space)
    alpha_n, sigma_n = _alpha_sigma(schedule_like(level_next, "level_next", xc), space)
    lam = _log_snr(level, space, xc)
    h = _log_snr(level_next, space, xc) - lam  # +inf on the step to clean
    big_h = 2 * h if sde else h
    phi = -torch.expm1(-big_h)
    decay = torch.exp(-h) if sde else torch.ones_like(h)
    x_next = (sigma_n / sigma) * decay * xc + alpha_n * phi * x0
    if history:
        d_prev, lev_prev = history[0]
        d_prev = d_prev.to(dtype)
        lam_prev = _log_snr(lev_prev, space, xc)
        r0 = (lam - lam_prev) / h
        d1_0 = (x0 - d_prev) / r0
        if len(history) == 1:
            c1 = 0.5 * phi if solver_type == "midpoint" else 1 - phi / big_h
            update = alpha_n * c1 * d1_0
        else:
            d_prev2, lev_prev2 = history[1]
            r1 = (lam_prev - _log_snr(lev_prev2, space, xc)) / h
            d1_1 = (d_prev - d_prev2.to(dtype)) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            c2 = (phi - big_h) / big_h**2 + (-0.5 if sde else 0.5)
            update = alpha_n * (1 - phi / big_h) * d1 + alpha_n * c2 * d2
        x_next = torch.where(sigma_n > 0, x_next + update, x0)  # first order to clean
    if sde and noise is not None:
        x_next = x_next + sigma_n * phi.clamp_min(0).sqrt() * noise.to(dtype)  # 0 for h < 0
    x_next = torch.where(h == 0, xc, x_next)  # the limit h -> 0 (diffusers' heun: 0 / 0)
    return x_next.to(x.dtype), x0.to(x.dtype)

"""Reference steps of the consistency-model samplers (VP notation, as ``reference.vp``):
LCM (Luo et al. 2023) and TCD (Zheng et al. 2024), and the forward re-noising between two
noise levels that ends them.

Example:
    >>> x, denoised = consistency_step(x, eps_hat, ab[t], 1.0, ab[t_next], c_skip=cs, c_out=co)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.reference.common import ScheduleValue, X0Options, compute_dtype_of, schedule_like
from fastdiff.reference.vp import predict_eps, predict_x0

__all__ = ["consistency_step", "renoise"]


def consistency_step(
    x: Tensor,
    model_output: Tensor,
    ab_t: ScheduleValue,
    ab_s: ScheduleValue,
    ab_next: ScheduleValue,
    *,
    c_skip: ScheduleValue = 0.0,
    c_out: ScheduleValue = 1.0,
    noise: Tensor | None = None,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """One multistep consistency sampling step: LCM (Luo et al. 2023: the eps-parameterized
    consistency function of Sec. 4.1, eq. 9, in their multistep sampling algorithm) and TCD's
    strategic stochastic sampling (Zheng et al. 2024, Sec. 4.2)::

        x0  = process(x0(x, m))                          # Ho et al. 2020 eq. 15
        x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps         # DDIM jump to level ab_s (eps raw)
        y   = c_skip x + c_out x_s                       # LCM: ab_s = 1, so y = f(x, t)
        x'  = sqrt(ab_next / ab_s) y + sqrt(1 - ab_next / ab_s) z   # forward q(x' | y)

    LCM: ``ab_s = 1`` and diffusers' boundary scalings ``c_skip = 1/4 / (u^2 + 1/4)``,
    ``c_out = u / sqrt(u^2 + 1/4)`` of ``u = t * timestep_scaling``; TCD: ``c_skip = 0``,
    ``c_out = 1``, ``ab_s`` at ``s = floor((1 - gamma) t_next)``. Without ``noise`` the z
    term is left out (a step that adds no noise passes ``ab_next = ab_s``: ``x' = y``).
    ``x0_options``: ``prediction_type`` ("epsilon"), ``clip_range``, ``thresholding``
    (:class:`X0Options`). Returns ``(x_next, y)``: y is LCM's ``denoised`` and TCD's
    ``pred_noised_sample``.

    Example:
        >>> x, denoised = consistency_step(x, eps_hat, ab[t], 1.0, ab[t_next], c_skip=cs,
        ...                                c_out=co, noise=torch.randn_like(x))
    """
    opts = X0Options.of(x0_options)
    dtype = compute_dtype_of(x)
    xc, m = x.to(dtype), model_output.to(dtype)
    a_s, an = schedule_like(ab_s, "ab_s", xc), schedule_like(ab_next, "ab_next", xc)
    x0 = opts.process(predict_x0(xc, m, ab_t, opts.prediction_type))
    eps = predict_eps(xc, m, ab_t, opts.prediction_type)
    x_s = torch.sqrt(a_s) * x0 + torch.sqrt(1 - a_s) * eps
    y = schedule_like(c_skip, "c_skip", xc) * xc + schedule_like(c_out, "c_out", xc) * x_s
    x_next = _renoise(y, a_s, an, None if noise is None else noise.to(dtype))
    return x_next.to(x.dtype), y.to(x.dtype)


def _renoise(y: Tensor, ab_from: Tensor, ab_to: Tensor, z: Tensor | None) -> Tensor:
    # the forward process from level ab_from to ab_to (Ho et al. 2020 eq. 4, respaced)
    ratio = ab_to / ab_from
    if z is None:
        return torch.sqrt(ratio) * y
    return torch.sqrt(ratio) * y + torch.sqrt((1 - ratio).clamp(min=0)) * z


def renoise(
    y: Tensor, ab_from: ScheduleValue, ab_to: ScheduleValue, noise: Tensor | None = None
) -> Tensor:
    """The forward process from level ``ab_from`` to ``ab_to`` (Ho et al. 2020 eq. 4 between
    two noise levels): ``sqrt(ab_to / ab_from) y + sqrt(1 - ab_to / ab_from) z``, the last
    line of :func:`consistency_step`; in ``y.dtype``.

    Example:
        >>> x_next = renoise(denoised, 1.0, ab[t_next], torch.randn_like(denoised))
    """
    yc = y.to(compute_dtype_of(y))
    a_from, a_to = schedule_like(ab_from, "ab_from", yc), schedule_like(ab_to, "ab_to", yc)
    z = None if noise is None else noise.to(yc.dtype)
    return _renoise(yc, a_from, a_to, z).to(y.dtype)

"""Flow-matching reference steps (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024).

Example:
    >>> x, x0 = flow_euler_step(x, v_hat, sigmas[i], sigmas[i + 1])
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.reference.common import (
    ScheduleValue,
    X0Options,
    compute_dtype_of,
)

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


def flow_x0_compute(x: Tensor, m: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """x0 from a model output on the flow path ``x = (1 - s) x0 + s eps`` (tensors already in
    the compute dtype; :func:`flow_x0` is the public step-level form)."""
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
    return flow_x0_compute(xc, model_output.to(dtype), _level(sigma, xc), prediction_type).to(
        x.dtype
    )


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
    return ((xc - (1 - s) * flow_x0_compute(xc, m, s, prediction_type)) / s).to(x.dtype)


def _flow_start(x: Tensor, model_output: Tensor, sigma: ScheduleValue, x0_options: dict):
    """What every flow step starts from: ``(x, s, x0, options)``, x and s in the compute
    dtype, x0 processed (:class:`X0Options`, whose default here is "flow_prediction")."""
    opts = X0Options.of(x0_options, "flow_prediction")
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    s = _level(sigma, xc)
    x0 = flow_x0_compute(xc, model_output.to(dtype), s, opts.prediction_type)
    return xc, s, opts.process(x0), opts


def flow_euler_step(
    x: Tensor,
    model_output: Tensor,
    sigma: ScheduleValue,
    sigma_next: ScheduleValue,
    **x0_options,
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
        x0_options: ``prediction_type`` ("flow_prediction", "epsilon" or "sample"; the
            default "flow_prediction"), ``clip_range``, ``thresholding`` (:class:`X0Options`).

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = flow_euler_step(x, v_hat, sigmas[i], sigmas[i + 1])
    """
    xc, s, x0, opts = _flow_start(x, model_output, sigma, x0_options)
    if opts.prediction_type == "flow_prediction" and not opts.processes:
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
    grad: Tensor | None = None,
    **x0_options,
) -> tuple[Tensor, Tensor]:
    """The stochastic flow step (diffusers' ``stochastic_sampling``): x0 put back on the flow
    path at s' with fresh noise::

        x' = (1 - s') x0 + s' z    (+ s'^2 grad: the mean shifted by its variance times the
                                    classifier gradient, Dhariwal & Nichol 2021, Alg. 1)

    Args:
        x, model_output, sigma, sigma_next, x0_options: see :func:`flow_euler_step`.
        noise: z ~ N(0, I) like x (None: the mean alone).
        grad: classifier guidance, the already-scaled gradient of log p(y | x), or None.

    Returns:
        ``(x_next, x0)`` in ``x.dtype``.

    Example:
        >>> x, x0 = flow_stochastic_step(x, v_hat, 0.7, 0.5, torch.randn_like(x))
    """
    xc, _, x0, _ = _flow_start(x, model_output, sigma, x0_options)
    s_next = _level(sigma_next, xc)
    x_next = (1 - s_next) * x0
    if grad is not None:
        x_next = x_next + s_next**2 * grad.to(xc.dtype)
    if noise is not None:
        x_next = x_next + s_next * noise.to(xc.dtype)
    return x_next.to(x.dtype), x0.to(x.dtype)

"""Shared pieces of the reference steps: the compute dtype, schedule values, x0 processing
(clipping, dynamic thresholding), the x0 options every step takes, the DPM-Solver++(2M)
update of any parameterization and classifier-free guidance.

Example:
    >>> x0 = process_x0(x0, thresholding=(0.995, 1.5))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastdiff.checks import is_number

ScheduleValue = float | Tensor


# -- dtypes and schedule values -------------------------------------------------------------


def compute_dtype_of(x: Tensor) -> torch.dtype:
    """The reference's compute dtype for ``x``: float64 stays float64, every other float
    dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def schedule_like(value: ScheduleValue, name: str, like: Tensor, low=None, high=None) -> Tensor:
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


def _threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): s = clamp(quantile(|x0|, ratio),
    1, max_value) per sample; x0 <- clamp(x0, -s, s) / s. s is a constant for autograd (a
    per-sample normalization; the fused kernel's backward treats it the same way)."""
    s = torch.quantile(x0.detach().reshape(x0.shape[0], -1).abs(), ratio, dim=1)
    s = s.clamp(min=1.0, max=max_value).view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def process_x0_compute(x0: Tensor, clip_range: float | None, thresholding: tuple | None) -> Tensor:
    if thresholding is not None:
        return _threshold(x0, float(thresholding[0]), float(thresholding[1]))
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def process_x0(x0: Tensor, clip_range: float | None = None, thresholding: tuple | None = None):
    """Clamp x0 to ``[-clip_range, clip_range]``, or dynamic thresholding with
    ``thresholding=(ratio, max_value)`` (Saharia et al. 2022); in ``x0.dtype``.

    Example:
        >>> process_x0(x0, thresholding=(0.995, 1.5))
    """
    return process_x0_compute(x0.to(compute_dtype_of(x0)), clip_range, thresholding).to(x0.dtype)


@dataclass(frozen=True)
class X0Options:
    """How a step reads x0 off the model output and post-processes it: the model's
    ``prediction_type`` and at most one of ``clip_range`` (clamp x0 to ``[-r, r]``) and
    ``thresholding`` (``(ratio, max_value)``, dynamic thresholding; see :func:`process_x0`).

    The steps take these as keywords (``**x0_options``) and read them with :meth:`of`, so a
    name that is not one of these is a TypeError.

    Example:
        >>> X0Options.of({"clip_range": 1.0}, "flow_prediction").process(x0)
    """

    prediction_type: str = "epsilon"
    clip_range: float | None = None
    thresholding: tuple | None = None

    @classmethod
    def of(cls, options: dict, prediction_type: str = "epsilon") -> X0Options:
        """The options a step was given as keywords, ``prediction_type`` the step's default."""
        return cls(**{"prediction_type": prediction_type, **options})

    @property
    def processes(self) -> bool:
        """Whether x0 is clipped or thresholded."""
        return self.clip_range is not None or self.thresholding is not None

    def process(self, x0: Tensor) -> Tensor:
        """:func:`process_x0_compute` of a compute-dtype x0."""
        return process_x0_compute(x0, self.clip_range, self.thresholding)


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
    guided = uncond + schedule_like(scale, "scale", cond) * (cond - uncond)
    if is_number(rescale) and rescale == 0:
        return guided.to(m_cond.dtype)
    phi = schedule_like(rescale, "rescale", cond)
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return (phi * rescaled + (1 - phi) * guided).to(m_cond.dtype)

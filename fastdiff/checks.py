"""The one check layer: validators shared by every public entry point.

Arguments are checked once, at the public boundary (``Sampler.__init__`` / ``Sampler.step``,
``fastdiff.sample``, ``SamplingGraph``, the diffusers drop-ins), with these functions, so
the two backends can never disagree about what is valid. ``fastdiff.reference`` is the math
alone, and the kernel launcher checks only what protects memory (shape, dtype, layout).
Each validator raises ``TypeError`` / ``ValueError`` with a message that names the argument,
and returns the value normalized (python floats, tuples).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from fastdiff.kernels.utils import same_layout

__all__ = [
    "PREDICTION_TYPES",
    "check_choice",
    "check_churn",
    "check_clip_range",
    "check_finite_table",
    "check_guidance",
    "check_int",
    "check_like",
    "check_model_output",
    "check_number",
    "check_out",
    "check_processing",
    "check_sampler",
    "check_seeds",
    "check_tensor",
    "check_thresholding",
    "is_number",
]

# What a VP model may predict (Ho et al. 2020 eps; x0; Salimans & Ho 2022 v).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def is_number(value: Any) -> bool:
    """A real python (or numpy) number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def check_int(name: str, value: Any, low: int) -> int:
    """An integer (python or numpy, not a bool) ``>= low``, as a python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_churn(
    s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any
) -> tuple[float, float, float, float]:
    """Karras et al. 2022's churn (Alg. 2): ``s_churn >= 0`` and ``s_noise`` finite numbers,
    ``s_tmin`` / ``s_tmax`` numbers, not NaN (infinite allowed: the default ``s_tmax``)."""
    s_churn = check_number("s_churn", s_churn, low=0.0)
    s_noise = check_number("s_noise", s_noise)
    for name, value in (("s_tmin", s_tmin), ("s_tmax", s_tmax)):
        if not is_number(value) or math.isnan(value):
            raise ValueError(f"{name} must be a number (inf allowed), got {value!r}")
    return s_churn, float(s_tmin), float(s_tmax), s_noise


def check_guidance(guidance_scale: Any, guidance_rescale: Any = 0.0) -> tuple[float | None, float]:
    """Classifier-free guidance: a finite scale (or None), a rescale in [0, 1] that needs it.

    Returns:
        ``(guidance_scale or None, guidance_rescale)`` as floats.
    """
    rescale = check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
    if guidance_scale is None:
        if rescale:
            raise ValueError("guidance_rescale needs guidance_scale")
        return None, rescale
    return check_number("guidance_scale", guidance_scale), rescale


def check_clip_range(clip_range: Any, name: str = "clip_range") -> float | None:
    """Clipping of x0 to ``[-r, r]``: a positive number, or None."""
    if clip_range is None:
        return None
    if not is_number(clip_range) or not clip_range > 0 or not math.isfinite(clip_range):
        raise ValueError(f"{name} must be a positive number, got {clip_range!r}")
    return float(clip_range)


def check_thresholding(thresholding: Any) -> tuple[float, float] | None:
    """Dynamic thresholding (Saharia et al. 2022): a ``(ratio, max_value)`` pair with
    ``0 < ratio <= 1`` and ``max_value >= 1``, or None."""
    if thresholding is None:
        return None
    if not isinstance(thresholding, (tuple, list)) or len(thresholding) != 2:
        raise ValueError(
            f"thresholding must be a (ratio, max_value) pair of numbers, got {thresholding!r}"
        )
    ratio = check_number("thresholding ratio", thresholding[0])
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"thresholding ratio must be in (0, 1], got {ratio}")
    max_value = check_number("thresholding max_value", thresholding[1], low=1.0)
    return ratio, max_value


def check_processing(
    clip_range: Any, thresholding: Any, clip_name: str = "clip_range"
) -> tuple[float | None, tuple[float, float] | None]:
    """x0 processing: clipping or thresholding (exclusive), each checked."""
    if clip_range is not None and thresholding is not None:
        raise ValueError(f"{clip_name} and thresholding are exclusive: choose one")
    return check_clip_range(clip_range, clip_name), check_thresholding(thresholding)


def check_sampler(sampler: Any) -> None:
    """``sampler`` must be a ``fastdiff.Sampler``."""
    from fastdiff.samplers import Sampler  # samplers import this module

    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a fastdiff.Sampler, got {type(sampler).__name__}")


def check_finite_table(
    table: torch.Tensor, columns: tuple[str, ...], where: Callable[[int], str], why: str
) -> None:
    """A 2-D coefficient table (built on the host, read there) must be finite; else a
    ``ValueError`` naming the first bad entry: its column, ``where(row)`` (e.g. "step 3"),
    then ``why`` (what does not fit)."""
    bad = ~torch.isfinite(table)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"coefficient {columns[col]!r} of {where(row)} is not finite; {why}")


# -- tensors at a step ------------------------------------------------------------------------


def check_tensor(name: str, t: Any) -> torch.Tensor:
    """``t`` must be a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_like(name: str, t: Any, x: torch.Tensor) -> torch.Tensor:
    """``t`` must be a floating-point tensor with x's shape (exactly: no broadcasting), on
    x's device."""
    check_tensor(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return t


def check_out(name: str, t: Any, x: torch.Tensor) -> torch.Tensor:
    """A preallocated output (``out=``, ``x0_out=``): like x (:func:`check_like`) and laid out
    like x (the same strides), so that it is written as it is, on both backends."""
    check_like(name, t, x)
    if t.stride() != x.stride() and not same_layout(t, x):
        raise ValueError(
            f"{name} must be laid out like x (strides {t.stride()} vs {x.stride()}); "
            "allocate it with torch.empty_like(x)"
        )
    return t


def check_seeds(seeds: Any, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-sample Philox keys: a 1-D int64 tensor with ``batch`` entries (on ``device``)."""
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("seeds must be a 1-D int64 tensor with one seed per sample")
    if seeds.shape[0] != batch:
        raise ValueError(f"got {seeds.shape[0]} seeds for a batch of {batch} samples")
    if device is not None and seeds.device != device:
        raise ValueError(f"seeds are on {seeds.device} but x is on {device}")
    return seeds


def check_model_output(
    model_output: Any, x: torch.Tensor, *, guided: bool = False, variance_type: str | None = None
) -> torch.Tensor:
    """The model output of a step on ``x``: x's shape, with the batch doubled by guidance
    (unconditional half first) and the channels doubled by a learned ``variance_type``
    (prediction, then variance values)."""
    check_tensor("model_output", model_output)
    learned = variance_type in ("learned", "learned_range")
    if learned and x.dim() < 2:
        raise ValueError(f"variance_type {variance_type!r} needs x with channels [B, C, ...]")
    shape = x.shape
    if guided or learned:
        shape = (x.shape[0] * (2 if guided else 1), *x.shape[1:])
        if learned:
            shape = (shape[0], 2 * x.shape[1], *x.shape[2:])
    if model_output.shape != shape:
        got = f"got {tuple(model_output.shape)}"
        if learned:
            raise ValueError(
                f"variance_type {variance_type!r} needs model_output of shape {shape} (x "
                f"{tuple(x.shape)} with 2x channels: prediction then variance values), {got}"
            )
        if guided:
            raise ValueError(
                f"model_output must have shape {shape} (guidance doubles the batch: "
                f"unconditional half first), {got}"
            )
        raise ValueError(f"model_output must have the shape of x {tuple(shape)}, {got}")
    if model_output.device != x.device:
        raise ValueError(f"model_output is on {model_output.device} but x is on {x.device}")
    return model_output

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
from typing import Any

__all__ = [
    "PREDICTION_TYPES",
    "check_choice",
    "check_clip_range",
    "check_guidance",
    "check_int",
    "check_number",
    "check_processing",
    "check_sampler",
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


def check_clip_range(clip_range: Any) -> float | None:
    """Clipping of x0 to ``[-r, r]``: a positive number, or None."""
    if clip_range is None:
        return None
    return check_number("clip_range", clip_range, low=0.0, low_open=True)


def check_thresholding(thresholding: Any) -> tuple[float, float] | None:
    """Dynamic thresholding (Saharia et al. 2022): a ``(ratio, max_value)`` pair with
    ``0 < ratio <= 1`` and ``max_value >= 1``, or None."""
    if thresholding is None:
        return None
    if not isinstance(thresholding, (tuple, list)) or len(thresholding) != 2:
        raise ValueError(
            f"thresholding must be a (ratio, max_value) pair of numbers, got {thresholding!r}"
        )
    ratio = check_number("thresholding ratio", thresholding[0], low=0.0, high=1.0, low_open=True)
    max_value = check_number("thresholding max_value", thresholding[1], low=1.0)
    return ratio, max_value


def check_processing(
    clip_range: Any, thresholding: Any
) -> tuple[float | None, tuple[float, float] | None]:
    """x0 processing: clipping or thresholding (exclusive), each checked."""
    if clip_range is not None and thresholding is not None:
        raise ValueError("clip_range and thresholding are exclusive: choose one")
    return check_clip_range(clip_range), check_thresholding(thresholding)


def check_sampler(sampler: Any) -> None:
    """``sampler`` must be a ``fastdiff.Sampler``."""
    from fastdiff.samplers import Sampler  # samplers import this module

    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a fastdiff.Sampler, got {type(sampler).__name__}")

"""Timestep plans: which train timesteps a sampler visits, descending, as int64 CPU tensors.

Spacings of Lin et al. 2023 (Table 2) with diffusers' semantics, improved-diffusion's section
respacing (Nichol & Dhariwal 2021) and DDIM's even striding (Song et al. 2021).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.checks import check_choice, check_int

__all__ = ["TIMESTEP_SPACINGS", "make_plan", "respaced_timesteps", "spaced_timesteps"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """``N`` evenly spaced train timesteps out of ``T``, descending (Lin et al. 2023, Table 2).

    - ``"leading"``: ``k * (T // N) + steps_offset`` for ``k = N-1..0``.
    - ``"trailing"``: ``round(T - k * T / N) - 1`` for ``k = 0..N-1``, stepped in floating
      point as diffusers does (``numpy.arange``; an extra point it may yield is dropped).
    - ``"linspace"``: ``round(linspace(0, T-1, N))`` reversed (half to even).

    ``steps_offset`` shifts ``"leading"`` only, as in diffusers.

    Args:
        num_train_timesteps: ``T`` (>= 1).
        num_inference_steps: ``N``, ``1 <= N <= T``.
        timestep_spacing: one of :data:`TIMESTEP_SPACINGS`.
        steps_offset: >= 0; the largest ``"leading"`` timestep must stay ``<= T-1``.

    Returns:
        int64 CPU tensor ``[N]``, strictly decreasing, in ``[0, T-1]``.

    Example:
        >>> spaced_timesteps(1000, 4, "trailing")
        tensor([999, 749, 499, 249])
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    N = check_int("num_inference_steps", num_inference_steps, 1)
    if N > T:
        raise ValueError(
            f"num_inference_steps ({N}) cannot be larger than num_train_timesteps ({T})"
        )
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    offset = check_int("steps_offset", steps_offset, 0)

    if timestep_spacing == "leading":
        plan = np.arange(N - 1, -1, -1, dtype=np.int64) * (T // N) + offset
        if plan[0] > T - 1:
            raise ValueError(
                f"steps_offset={offset} pushes the first 'leading' timestep to {plan[0]}, "
                f"past num_train_timesteps - 1 = {T - 1}"
            )
    elif timestep_spacing == "trailing":
        points = np.arange(T, 0, -T / N)[:N]  # numpy's float stepping may overshoot by one
        plan = np.round(points).astype(np.int64) - 1
    else:  # "linspace"
        plan = np.round(np.linspace(0, T - 1, N))[::-1].astype(np.int64)
    plan = torch.from_numpy(np.ascontiguousarray(plan))
    _check_explicit_plan(T, plan)  # cannot fail for N <= T; guards the float arithmetic
    return plan


def _section_counts(section_counts: Any) -> list[int]:
    """Parse improved-diffusion's section counts ("10,15,20" or a sequence of ints)."""
    if isinstance(section_counts, str):
        try:
            counts = [int(part.strip()) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"section counts must be comma-separated ints or 'ddimN', got {section_counts!r}"
            ) from None
    else:
        try:
            items = list(section_counts)
        except TypeError:
            raise TypeError(
                f"section_counts must be a str or a sequence of ints, got "
                f"{type(section_counts).__name__}"
            ) from None
        counts = [check_int("each section count", c, 0) for c in items]
    if not counts:
        raise ValueError("section_counts must not be empty")
    for c in counts:
        if c < 0:
            raise ValueError(f"section counts must be >= 0, got {c}")
    if sum(counts) == 0:
        raise ValueError(f"section_counts {section_counts!r} ask for 0 steps in total")
    return counts


def respaced_timesteps(
    num_train_timesteps: int, section_counts: str | Sequence[int]
) -> torch.Tensor:
    """improved-diffusion's timestep respacing (Nichol & Dhariwal 2021), descending.

    - Section counts (``"10,15,20"`` or ``[10, 15, 20]``): ``[0, T)`` is cut into equal
      sections (the first ``T % len`` one step longer); a section of ``size`` steps asked for
      ``n`` takes ``round(k * (size-1)/(n-1))``, ``k = 0..n-1`` (accumulated in floating point,
      half to even, as improved-diffusion), so it keeps its first and last timesteps.
    - ``"ddimN"``: the smallest integer stride ``s`` for which ``range(0, T, s)`` has exactly
      ``N`` timesteps (Song et al. 2021).

    Args:
        num_train_timesteps: ``T`` (>= 1).
        section_counts: ``"ddimN"``, comma-separated counts, or a sequence of ints (>= 0).

    Returns:
        int64 CPU tensor, strictly decreasing, in ``[0, T-1]``.

    Example:
        >>> respaced_timesteps(1000, "ddim4")
        tensor([750, 500, 250,   0])
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    if isinstance(section_counts, str) and section_counts.strip().startswith("ddim"):
        try:
            N = int(section_counts.strip()[len("ddim") :])
        except ValueError:
            raise ValueError(f"expected 'ddimN' with an int N, got {section_counts!r}") from None
        if N < 1:
            raise ValueError(f"'ddimN' needs N >= 1, got {section_counts!r}")
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == N:
                return torch.arange(0, T, stride, dtype=torch.long).flip(0)
        raise ValueError(
            f"cannot get exactly {N} timesteps out of {T} with an integer stride "
            f"({section_counts!r})"
        )

    counts = _section_counts(section_counts)
    base, extra = divmod(T, len(counts))
    start = 0
    visited: set[int] = set()
    for i, n in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if n > size:
            raise ValueError(
                f"section {i} ({start}..{start + size - 1}) has {size} timesteps, "
                f"cannot take {n} steps from it"
            )
        stride = (size - 1) / (n - 1) if n > 1 else 1.0
        position = 0.0
        for _ in range(n):
            visited.add(start + round(position))
            position += stride
        start += size
    return torch.tensor(sorted(visited, reverse=True), dtype=torch.long)


def _check_explicit_plan(T: int, plan: torch.Tensor) -> None:
    """An explicit plan: non-empty, 1-D, strictly decreasing, in [0, T-1]."""
    if plan.dim() != 1:
        raise ValueError(f"an explicit plan must be 1-D, got shape {tuple(plan.shape)}")
    if plan.numel() == 0:
        raise ValueError("an explicit plan must not be empty")
    if plan.numel() > 1 and not bool((plan[1:] < plan[:-1]).all()):
        raise ValueError(f"an explicit plan must be strictly decreasing, got {plan.tolist()}")
    lo, hi = int(plan.min()), int(plan.max())
    if lo < 0 or hi > T - 1:
        bad = lo if lo < 0 else hi
        raise ValueError(f"explicit plan timestep {bad} out of range [0, {T - 1}]")


def _explicit_plan(steps: Any) -> torch.Tensor:
    """A sequence / 1-D tensor / array of ints as an int64 CPU tensor (values unchecked)."""
    if isinstance(steps, torch.Tensor):
        if steps.dtype == torch.bool or steps.is_floating_point() or steps.is_complex():
            raise TypeError(f"an explicit plan must hold ints, got dtype {steps.dtype}")
        if steps.dim() != 1:
            raise ValueError(f"an explicit plan must be 1-D, got shape {tuple(steps.shape)}")
        return steps.detach().to(device="cpu", dtype=torch.long).clone()
    if not isinstance(steps, (Sequence, np.ndarray)):
        raise TypeError(
            f"steps must be an int, a str or a sequence of ints, got {type(steps).__name__}"
        )
    if isinstance(steps, np.ndarray) and steps.ndim != 1:
        raise ValueError(f"an explicit plan must be 1-D, got shape {steps.shape}")
    items = steps.tolist() if isinstance(steps, np.ndarray) else list(steps)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"an explicit plan must hold ints, got {item!r} in {steps!r}")
    return torch.tensor([int(item) for item in items], dtype=torch.long)


def make_plan(
    num_train_timesteps: int,
    steps: int | str | Sequence[int] | torch.Tensor,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """The train timesteps a sampler visits, chosen by the type of ``steps``.

    - ``int``: :func:`spaced_timesteps` with ``timestep_spacing`` and ``steps_offset``.
    - ``str``: :func:`respaced_timesteps` (``"ddim50"``, ``"10,15,20"``).
    - a sequence / 1-D tensor / array of ints: an explicit plan (non-empty, strictly
      decreasing, in ``[0, T-1]``).

    ``timestep_spacing`` is always checked; a non-zero ``steps_offset`` needs an int ``steps``.

    Args:
        num_train_timesteps: ``T`` (>= 1).
        steps: the step count, the respacing string, or the explicit timesteps.
        timestep_spacing: one of :data:`TIMESTEP_SPACINGS`.
        steps_offset: see :func:`spaced_timesteps`.

    Returns:
        int64 CPU tensor, strictly decreasing, in ``[0, T-1]`` (a fresh copy).

    Example:
        >>> make_plan(1000, [999, 500, 0])
        tensor([999, 500,   0])
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if isinstance(steps, bool):
        raise TypeError("steps must be an int, a str or a sequence of ints, got a bool")
    if isinstance(steps, numbers.Integral):
        return spaced_timesteps(T, int(steps), timestep_spacing, steps_offset)
    offset = check_int("steps_offset", steps_offset, 0)
    if offset != 0:
        raise ValueError(
            f"steps_offset={offset} only applies to an int number of steps, not to {steps!r}"
        )
    if isinstance(steps, str):
        return respaced_timesteps(T, steps)
    plan = _explicit_plan(steps)
    _check_explicit_plan(T, plan)
    return plan

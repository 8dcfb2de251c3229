"""Counter-based Gaussian noise: the same stream in PyTorch and inside the fused kernels.

Every normal is a pure function of ``(seed, step, stream, element)``: Philox4x32-10 (Salmon
et al. 2011) maps the counter ``(element // 4, step, stream, 0)`` under the per-sample 64-bit
key ``seed`` to four 32-bit words, and two Box-Muller transforms of the 24-bit uniforms
``(u >> 8) 2**-24 + 2**-25`` (strictly inside (0, 1); |z| <= 5.89) give the normals of
elements ``4q .. 4q+3``: ``r cos a, r sin a`` with ``r = sqrt(-2 ln u0)``, ``a = 2 pi u1 - pi``.
``stream`` is 0 for a step's noise and 1 for the initial noise; ``element`` is the position
in memory within the sample (a channels_last tensor draws the same values at the same memory
positions). A sample's noise so depends on its seed alone, not on the batch, the block size,
the launch order or the number of GPUs. ``randn`` is the spec; ``fastdiff.kernels.fused_step``
computes the identical words.

Example:
    >>> z = randn(seeds_from(0, 2), 0, (2, 4, 8, 8))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff.checks import check_seeds
from fastdiff.kernels.utils import (
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    memory_format_of,
)

__all__ = ["PHILOX_ROUNDS", "memory_format_of", "philox4x32", "randn", "seeds_from"]

_MASK32 = 0xFFFFFFFF
TWO_PI = 2.0 * math.pi


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for 32-bit unsigned values held in int64.

    The 64-bit product does not fit a signed int64, so it is assembled from 16-bit halves.
    """
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = p01 + p10  # < 2**33
    low = p00 + ((mid & 0xFFFF) << 16)  # < 2**33
    lo = low & _MASK32
    hi = (p11 + (mid >> 16) + (low >> 32)) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 bijection of a 4-word counter under a 2-word key (int64 tensors of 32-bit values).

    Args:
        c0, c1, c2, c3: counter words, int64 tensors with values in ``[0, 2**32)`` (broadcast).
        k0, k1: key words, same convention.
        rounds: number of rounds (10 is the standard, crush-resistant choice).

    Returns:
        Four int64 tensors of 32-bit words.
    """
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """24-bit uniforms strictly inside (0, 1) from 32-bit words (float32, exact)."""
    return (words >> 8).to(torch.float32) * (2.0**-24) + 2.0**-25


def _box_muller(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard normals from two 32-bit words (Box & Muller 1958)."""
    radius = torch.sqrt(-2.0 * torch.log(_uniform(w0)))
    angle = TWO_PI * _uniform(w1) - math.pi  # in (-pi, pi)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def seeds_from(
    seed: int, batch_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-sample seeds of a batch drawn from one integer: ``seed * 2**32 + arange(batch_size)``.

    Sample ``b`` of a batch drawn with ``seed`` has seed ``seed * 2**32 + b``, so the first
    samples of a larger batch with the same ``seed`` are the samples of a smaller one, and
    different ``seed`` values never share a per-sample seed (for batches below 2**32).

    Args:
        seed: a non-negative integer below ``2**31``.
        batch_size: number of samples.
        device: where the seeds live.

    Returns:
        int64 tensor ``[batch_size]``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return torch.arange(batch_size, dtype=torch.int64, device=device) + seed * 2**32


def randn(
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    shape: Sequence[int],
    *,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Standard normal noise keyed by ``(seed, step, stream, element)``, on ``seeds.device``.

    Args:
        seeds: int64 tensor ``[B]``, one key per sample.
        step: the step index: an int, a 0-d int tensor, or an int tensor ``[B]`` (per sample).
        shape: the output shape, batch first (``shape[0] == B``).
        stream: 0 for step noise, 1 for the initial noise.
        dtype: output dtype (the normals are computed in float32).
        memory_format: ``torch.channels_last`` to lay the stream out in channels-last memory
            order, as the kernel does for a channels_last tensor.

    Returns:
        A tensor of ``shape`` whose element at memory position ``j`` of sample ``b`` is the
        ``j % 4``-th normal of Philox(key=seeds[b], counter=(j // 4, step, stream, 0)).

    Example:
        >>> z = randn(seeds_from(0, 2), 0, (2, 4, 8, 8))
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension")
    check_seeds(seeds, shape[0])
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    device = seeds.device
    batch = shape[0]
    numel = math.prod(shape[1:])
    quads = (numel + 3) // 4

    seeds64 = seeds.view(batch, 1)
    k0 = seeds64 & _MASK32
    k1 = (seeds64 >> 32) & _MASK32
    step_t = torch.as_tensor(step, dtype=torch.int64, device=device)
    if step_t.dim() == 1 and step_t.shape[0] != batch:
        raise ValueError(f"per-sample step has {step_t.shape[0]} entries for {batch} samples")
    c1 = (step_t.reshape(-1, 1) if step_t.dim() else step_t) & _MASK32
    c0 = torch.arange(quads, dtype=torch.int64, device=device).view(1, quads)
    c2 = torch.full((1, 1), stream, dtype=torch.int64, device=device)
    zero = torch.zeros((1, 1), dtype=torch.int64, device=device)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, zero, k0, k1)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    flat = torch.stack(torch.broadcast_tensors(n0, n1, n2, n3), dim=-1).reshape(batch, 4 * quads)
    flat = flat[:, :numel].to(dtype).contiguous()  # dense even when numel % 4 != 0
    if memory_format == torch.channels_last:
        if len(shape) != 4:
            raise ValueError("channels_last noise needs a 4-D shape")
        b, c, h, w = shape
        return flat.reshape(b, h, w, c).permute(0, 3, 1, 2)
    if memory_format != torch.contiguous_format:
        raise ValueError(f"unsupported memory_format {memory_format}")
    return flat.reshape(shape)

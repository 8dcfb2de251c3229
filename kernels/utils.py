"""Facts about tensors that the kernels and everything above them share (torch only).

Example:
    >>> is_dense(x.to(memory_format=torch.channels_last))
    True
"""

from __future__ import annotations

import torch

__all__ = [
    "KERNEL_DTYPES",
    "KERNEL_DTYPE_NAMES",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_ROUNDS",
    "PHILOX_W0",
    "PHILOX_W1",
    "as_dense",
    "is_dense",
    "memory_format_of",
    "same_layout",
]

# The I/O dtypes of the fused kernels (arithmetic is float32 whatever the I/O dtype).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)

# Philox4x32-10 (Salmon et al. 2011, Table 2): rounds, multipliers and Weyl key increments of
# the in-kernel noise and of its PyTorch twin fastdiff.philox.
PHILOX_ROUNDS = 10
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor dense in channels_last order (it may also be contiguous)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def is_dense(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` as it is: contiguous, or a 4-D channels_last tensor."""
    return x.is_contiguous() or _channels_last(x)


def as_dense(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``x`` itself when the kernels take it (and ``contiguous`` is not asked), else a copy."""
    return x if not contiguous and is_dense(x) else x.contiguous()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format whose element order a tensor like ``x`` follows:
    ``torch.channels_last`` for a 4-D channels_last tensor that is not also contiguous,
    ``torch.contiguous_format`` otherwise (the order of the in-kernel noise stream, and what
    ``Tensor.contiguous(memory_format=)`` takes to lay another tensor out like ``x``)."""
    if not x.is_contiguous() and _channels_last(x):
        return torch.channels_last
    return torch.contiguous_format


def same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``t`` is laid out like ``x`` within each sample (equal strides on every
    non-batch dimension of size > 1; ``t`` has ``x``'s trailing shape)."""
    return all(t.stride(d) == x.stride(d) for d in range(1, x.dim()) if x.shape[d] > 1)

"""The backend switch: fused Triton kernels or the plain PyTorch reference.

* ``"triton"``: the fused kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``"reference"``: plain PyTorch (any device, float64 included).
* ``"auto"``: the kernels for CUDA tensors in float32 / float16 / bfloat16, the reference
  otherwise.

A sampler's ``backend`` argument wins; when it is None the ``FASTDIFF_BACKEND`` environment
variable decides, and ``"auto"`` when that is unset.
"""

from __future__ import annotations

import os

import torch

from fastdiff.kernels.utils import KERNEL_DTYPES

__all__ = ["BACKENDS", "check_backend", "resolve_backend"]

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: str | None) -> str | None:
    """Validate a backend name (None means: ask ``FASTDIFF_BACKEND`` at step time)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str | None, x: torch.Tensor, dtypes=()) -> str:
    """The backend that runs a step on ``x``: ``"triton"`` or ``"reference"``.

    Args:
        backend: "auto", "triton", "reference" or None (use ``FASTDIFF_BACKEND``, else auto).
        x: the sample the step runs on.
        dtypes: the dtypes of the step's other inputs and outputs: "auto" takes the kernels
            only when they are kernel dtypes too.

    Returns:
        "triton" or "reference".

    Example:
        >>> resolve_backend("auto", torch.zeros(1))
        'reference'
    """
    if backend is None:
        backend = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"FASTDIFF_BACKEND={backend!r} is not one of {BACKENDS}")
    check_backend(backend)
    if backend == "auto":
        kernel = x.is_cuda and x.dtype in KERNEL_DTYPES
        return "triton" if kernel and all(d in KERNEL_DTYPES for d in dtypes) else "reference"
    return backend

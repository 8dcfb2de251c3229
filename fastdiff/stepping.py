"""One reverse step on either backend: the dispatch behind ``Sampler.step`` and the
diffusers drop-ins' ``step``.

``run_step`` resolves the backend (``fastdiff.backend``). The kernel path lays the model
output, noise, x0_prev and grad out like x and makes one ``fused_step`` launch. The
reference path combines the guidance halves (Ho & Salimans 2022 eq. 6; Lin et al. 2023
eq. 15-16), computes the in-kernel Philox noise of ``seeds`` in PyTorch, runs the reference
math, then casts and writes ``out`` / ``x0_out``. Arguments are checked before, at the public
boundary (``fastdiff.checks``).

Example:
    >>> x_next, x0 = run_step(None, x, eps, table, rows, reference_step, seeds=seeds)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastdiff import philox, reference
from fastdiff.backend import resolve_backend
from fastdiff.kernels.fused_step import LoopAdvance, fused_step
from fastdiff.kernels.utils import as_dense, memory_format_of

__all__ = ["ReferenceStep", "run_step"]

# (x, model_output, x0_prev, noise, grad) -> (x_next, x0): the reference math of one step,
# with the guidance halves already combined (a learned variance keeps its channels).
ReferenceStep = Callable[
    [Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None], tuple[Tensor, Tensor]
]


def run_step(
    backend: str | None,
    x: Tensor,
    model_output: Tensor,
    table: Tensor,
    rows: Tensor,
    reference_step: ReferenceStep,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_range: float | None = None,
    thresholding: tuple[float, float] | None = None,
    variance_mode: str = "fixed",
    x0_prev: Tensor | None = None,
    noise: Tensor | None = None,
    seeds: Tensor | None = None,
    grad: Tensor | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
    write_x0: bool = True,
    out_dtype: torch.dtype | None = None,
    x0_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    check: Callable[[], None] | None = None,
    history: Tensor | None = None,
    last_sample: Tensor | None = None,
    x0_noise: bool = False,
    advance: LoopAdvance | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One step: ``fused_step`` on the table rows, or ``reference_step`` on the same inputs.

    Args:
        backend: "triton", "reference", "auto" or None (``FASTDIFF_BACKEND``, else auto);
            auto takes the kernel when x is on CUDA and every tensor has a kernel dtype.
        x, model_output, table, rows: as ``fused_step`` takes them (x need not be dense, the
            other inputs need not be laid out like x: the kernel path copies what is not).
        reference_step: the reference math (``ReferenceStep``); it gets x and the model
            output in ``compute_dtype`` (None: as they are) and the noise in the compute
            dtype of the reference (``compute_dtype``, else float64 / float32).
        guidance_scale, guidance_rescale, clip_range, thresholding, variance_mode, x0_prev,
            noise, seeds, grad, history, last_sample, x0_noise: the step's options, as
            ``fused_step`` takes them (the reference step returns its own x0).
        advance: a graphed loop's ``LoopAdvance``, advanced by the kernel path's launch
            (``fused_step``); the reference path advances nothing (``advance.launches``
            tells the loop).
        out, x0_out: preallocated outputs (checked like x before); may alias x / x0_prev.
        write_x0: also return x0 (False: None, and one pass fewer on the kernel path).
        out_dtype, x0_dtype: dtypes of the returned sample and x0 (default: x's).
        compute_dtype: the dtype the reference path computes in (None: x's, as the
            reference functions take it).
        check: the caller's checks of the tensors' shapes, devices and layouts. The
            reference path runs it first; the kernel path only when the kernel refuses its
            inputs (every signature the kernel takes passes them), so that both backends
            raise the caller's error and a valid step pays nothing for it.

    Returns:
        ``(x_next, x0)``; x0 is None when neither ``write_x0`` nor ``x0_out`` asks for it.
    """
    out_dtype = out.dtype if out is not None else (out_dtype or x.dtype)
    x0_dtype = x0_out.dtype if x0_out is not None else (x0_dtype or out_dtype)
    write_x0 = write_x0 or x0_out is not None
    others = (model_output, x0_prev, noise, grad)
    if backend not in ("triton", "reference"):  # (an explicit backend needs no resolving)
        backend = resolve_backend(backend, x, _dtypes(out_dtype, x0_dtype, others))
    if backend == "triton":
        if x.is_contiguous():
            dense = x
        else:  # a learned variance reads NCHW
            dense = x.contiguous() if variance_mode != "fixed" else as_dense(x)
        if dense is not x and check is not None:  # out= is checked against x itself
            check()
        x = dense
        strides = x.stride()
        if (
            model_output.stride() != strides
            or (x0_prev is not None and x0_prev.stride() != strides)
            or (noise is not None and noise.stride() != strides)
            or (grad is not None and grad.stride() != strides)
        ):
            fmt = memory_format_of(x)
            model_output, x0_prev, noise, grad = (
                t if t is None or t.stride() == strides else t.contiguous(memory_format=fmt)
                for t in others
            )
        if out is None and out_dtype != x.dtype:
            out = torch.empty_like(x, dtype=out_dtype)
        if x0_out is None and write_x0 and x0_dtype != x.dtype:
            x0_out = torch.empty_like(x, dtype=x0_dtype)
        try:
            return fused_step(
                x,
                model_output,
                table,
                rows,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                clip_range=clip_range,
                thresholding=thresholding,
                variance_mode=variance_mode,
                x0_prev=x0_prev,
                noise=noise,
                seeds=seeds,
                grad=grad,
                out=out,
                x0_out=x0_out,
                write_x0=write_x0,
                history=history,
                last_sample=last_sample,
                x0_noise=x0_noise,
                advance=advance,
            )
        except (TypeError, ValueError):
            if check is not None:
                check()  # the caller's error, as on the reference path
            raise

    if check is not None:
        check()
    if noise is None and seeds is not None:  # the kernel's Philox stream, in PyTorch
        step = rows.reshape(()) if rows.numel() == 1 else rows
        noise = philox.randn(seeds, step, x.shape, memory_format=memory_format_of(x))
    if compute_dtype is not None:
        x, model_output = x.to(compute_dtype), model_output.to(compute_dtype)
    if noise is not None:
        noise_dtype = compute_dtype or reference.compute_dtype_of(x)
        noise = noise.to(device=x.device, dtype=noise_dtype)
    if guidance_scale is not None:
        model_output = _guided(model_output, x, variance_mode, guidance_scale, guidance_rescale)
    x_next, x0 = reference_step(x, model_output, x0_prev, noise, grad)
    x_next = x_next.to(out_dtype) if out is None else out.copy_(x_next)
    if not write_x0:
        return x_next, None
    return x_next, (x0.to(x0_dtype) if x0_out is None else x0_out.copy_(x0))


def _dtypes(out_dtype: torch.dtype, x0_dtype: torch.dtype, tensors):
    """The dtypes "auto" checks (lazily: only auto on CUDA reads them)."""
    yield out_dtype
    yield x0_dtype
    for t in tensors:
        if t is not None:
            yield t.dtype


def _guided(model_output: Tensor, x: Tensor, variance_mode: str, scale: float, rescale: float):
    """The guided model output of a doubled batch (unconditional half first); a learned
    variance keeps the conditional half's variance channels, as the kernel reads them."""
    batch = x.shape[0]
    learned = variance_mode != "fixed"
    pred = model_output[:, : x.shape[1]] if learned else model_output
    pred = reference.cfg_combine(pred[:batch], pred[batch:], scale, rescale)
    return torch.cat([pred, model_output[batch:, x.shape[1] :]], dim=1) if learned else pred

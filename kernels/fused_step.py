"""One reverse diffusion step of any fastdiff sampler, fused into one Triton kernel.

Every sampler of fastdiff (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++(2M)) is, per
element, the same computation (DESIGN.md section 1) with per-step coefficients read from a
row of a device table built once on the host in float64 (``fastdiff.samplers``):

1. classifier-free guidance (Ho & Salimans 2022, eq. 6), optional::

       m = m_uncond + w * (m_cond - m_uncond)          # both halves of a doubled batch
       m = m * r_b                                     # per-sample guidance rescale factor
                                                       # (Lin et al. 2023, eq. 15-16)

2. the prediction converted to x0 (Ho et al. 2020 eq. 15 for epsilon; v of Salimans & Ho
   2022), then clipped to ``[-r, r]`` or thresholded by a per-sample ``s`` (Saharia et al.
   2022: ``clamp(x0, -s, s) / s``)::

       x0 = process(X0_X * x + X0_M * m)

3. the linear update (posterior mean, DDIM, Euler, DPM-Solver++ all take this form, with
   the epsilon of the step folded into the X / X0 / M coefficients; without an x0_prev
   tensor, x0_prev = x0, the first-order step of a multistep row)::

       std    = STD                                    # fixed variances
              | STD * exp(v / 2)                       # learned: v is the log variance
              | STD * exp((f LMAX + (1 - f) LMIN) / 2) # learned_range, f = (v + 1) / 2
       x_next = X * x + X0 * x0 + M * m + X0_PREV * x0_prev + std**2 * g + std * z

   with ``g`` the (already scaled) classifier-guidance gradient (Dhariwal & Nichol 2021,
   condition_mean) and ``z`` standard normal noise: read from a tensor, or Philox4x32-10
   inside the kernel keyed by (per-sample seed, step, element), see ``fastdiff.philox``.

4. UniPC (Zhao et al. 2023; ``fastdiff.unipc``), with a ``history`` ring of the converted
   outputs M (x0 or eps) of the last steps and the last corrected sample: the corrector of
   step k and the predictor of step k + 1 in one launch, with M = ``x0`` above::

       x_c     = UC_X * x + UC_LAST * last + UC_NEW * M + sum_j UC_H[j] * hist[j]  # UniC
       x_next += UP_LAST * last + sum_j UP_H[j] * hist[j]  # UniP from x_c, expanded
       hist[HIST_SLOT] = M;  last' = x_c

   (``UNIPC_COLUMNS``: coefficients by ring slot j; the slot written is not read; the
   predictor's coefficients of x_c are folded into the others on the host, so that terms
   which cancel in exact arithmetic cancel in float64 there). Reads x, m, last and the
   ring, writes x_c, x_next and M: 5 + 3 passes at order 2.

The table row of sample ``b`` is ``rows[b * rows_stride]`` (stride 0: one row for the whole
batch), so the step index and per-sample timesteps live on the device: no host sync, no
recompilation from step to step, and the launch can be captured in a CUDA graph.

Traffic: reads x and the model output, writes x_next: 3 passes over the tensor; +1 with
guidance (the second half), +1 for x0_prev (multistep), +1 with an explicit noise tensor, +1
for the learned-variance channels, +1 when x0 is written. Everything else stays in registers,
in float32, whatever the I/O dtypes. Dynamic thresholding needs the per-sample quantile of
|x0| first: one extra launch of this kernel that only writes x0, and a per-sample
``kthvalue``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["COLUMNS", "UNIPC_COLUMNS", "UNIPC_MAX_SLOTS", "VARIANCE_MODES", "fused_step"]

# Columns of a coefficient table row, in order.
COLUMNS = ("x0_x", "x0_m", "x", "x0", "m", "x0_prev", "std", "log_var_min", "log_var_max")
# A UniPC table (``history=``) has these columns after COLUMNS: the corrector's coefficients of
# x, of the last corrected sample, of the new M and of each ring slot; the next sample's of the
# last corrected sample and of each slot; the ring slot M is written to and the slot (0/1) of
# the corrected sample written.
UNIPC_MAX_SLOTS = 4
UNIPC_COLUMNS = (
    *COLUMNS,
    "uc_x",
    "uc_last",
    "uc_new",
    *(f"uc_h{j}" for j in range(UNIPC_MAX_SLOTS)),
    "up_last",
    *(f"up_h{j}" for j in range(UNIPC_MAX_SLOTS)),
    "hist_slot",
    "last_slot",
)
VARIANCE_MODES = {"fixed": 0, "learned": 1, "learned_range": 2}
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Philox4x32 constants (Salmon et al. 2011), the same as fastdiff.philox.
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_normal4(seed, step, quad, FAST_MATH: tl.constexpr):
    """Four standard normals of counter (quad, step, 0, 0) under the 64-bit key ``seed``.

    Philox4x32-10 followed by two Box-Muller transforms of 24-bit uniforms in (0, 1);
    bit-for-bit the words of ``fastdiff.philox.philox4x32``.
    """
    # Broadcast (seed, step) [S, 1] against quad [1, Q] once, so every word is [S, Q].
    zero = (seed * 0 + quad * 0).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32) + zero
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    c0 = quad.to(tl.uint32) + zero
    c1 = (step & 0xFFFFFFFF).to(tl.uint32) + zero
    c2 = zero
    c3 = zero
    m0 = tl.full(c0.shape, _PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, _PHILOX_M1, tl.uint32)
    w0 = tl.full(c0.shape, _PHILOX_W0, tl.uint32)
    w1 = tl.full(c0.shape, _PHILOX_W1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    u0 = (c0 >> 8).to(tl.float32) * 5.960464477539063e-08 + 2.9802322387695312e-08
    u1 = (c1 >> 8).to(tl.float32) * 5.960464477539063e-08 + 2.9802322387695312e-08
    u2 = (c2 >> 8).to(tl.float32) * 5.960464477539063e-08 + 2.9802322387695312e-08
    u3 = (c3 >> 8).to(tl.float32) * 5.960464477539063e-08 + 2.9802322387695312e-08
    # Angles in (-pi, pi), where the hardware sin/cos approximations are accurate.
    a01 = 6.283185307179586 * u1 - 3.141592653589793
    a23 = 6.283185307179586 * u3 - 3.141592653589793
    if FAST_MATH:
        # MUFU lg2/sin/cos approximations (abs. error ~1e-6): the precise libdevice versions
        # make the step compute-bound for 16-bit I/O.
        r01 = tl.sqrt(-2.0 * libdevice.fast_logf(u0))
        r23 = tl.sqrt(-2.0 * libdevice.fast_logf(u2))
        cos01, sin01 = libdevice.fast_cosf(a01), libdevice.fast_sinf(a01)
        cos23, sin23 = libdevice.fast_cosf(a23), libdevice.fast_sinf(a23)
    else:
        r01 = tl.sqrt(-2.0 * tl.log(u0))
        r23 = tl.sqrt(-2.0 * tl.log(u2))
        cos01, sin01 = tl.cos(a01), tl.sin(a01)
        cos23, sin23 = tl.cos(a23), tl.sin(a23)
    return r01 * cos01, r01 * sin01, r23 * cos23, r23 * sin23


_UNIPC0 = tl.constexpr(len(COLUMNS))  # first UniPC column
_UNIPC_MAX = tl.constexpr(UNIPC_MAX_SLOTS)


@triton.jit
def _unipc_terms(
    coef,
    b_ok,
    mask,
    b2,
    j2,
    x,
    m_conv,
    hist_ptr,
    last_ptr,
    hist_bstride,
    hist_sstride,
    last_bstride,
    last_sstride,
    SLOTS: tl.constexpr,
):
    """UniPC (Zhao et al. 2023): the corrected sample x_c of this step (UniC) and the terms
    UP_LAST last + sum_j UP_H[j] hist[j] of the next sample (UniP), from the row's
    UNIPC_COLUMNS; also the ring slot and the last-sample slot this step writes."""
    hist_slot = tl.load(coef + (_UNIPC0 + 4 + 2 * _UNIPC_MAX), mask=b_ok, other=0.0)
    last_slot = tl.load(coef + (_UNIPC0 + 5 + 2 * _UNIPC_MAX), mask=b_ok, other=0.0)
    hist_slot = hist_slot.to(tl.int64)[:, None]
    last_slot = last_slot.to(tl.int64)[:, None]
    last_off = (1 - last_slot) * last_sstride + b2 * last_bstride + j2
    last = tl.load(last_ptr + last_off, mask=mask, other=0.0).to(tl.float32)
    uc_x = tl.load(coef + _UNIPC0, mask=b_ok, other=0.0)[:, None]
    uc_last = tl.load(coef + (_UNIPC0 + 1), mask=b_ok, other=0.0)[:, None]
    uc_new = tl.load(coef + (_UNIPC0 + 2), mask=b_ok, other=0.0)[:, None]
    x_c = uc_x * x + uc_last * last + uc_new * m_conv
    pred = tl.load(coef + (_UNIPC0 + 3 + _UNIPC_MAX), mask=b_ok, other=0.0)[:, None] * last
    for j in tl.static_range(SLOTS):
        # the slot this step writes holds no input of it: not read (one pass fewer)
        h_off = j * hist_sstride + b2 * hist_bstride + j2
        h = tl.load(hist_ptr + h_off, mask=mask & (hist_slot != j), other=0.0).to(tl.float32)
        x_c += tl.load(coef + (_UNIPC0 + 3 + j), mask=b_ok, other=0.0)[:, None] * h
        pred += tl.load(coef + (_UNIPC0 + 4 + _UNIPC_MAX + j), mask=b_ok, other=0.0)[:, None] * h
    return x_c, pred, hist_slot, last_slot


# Per-sample scalars (rows, seeds, thresholds, rescale factors) are not specialized on their
# pointers' alignment: a step index is a view rows[i:i+1], aligned for every other i only.
@triton.jit(do_not_specialize=["thresh_ptr", "mscale_ptr", "seed_ptr", "rows_ptr"])
def _fused_step_kernel(
    x_ptr,
    m_ptr,
    prev_ptr,
    noise_ptr,
    grad_ptr,
    thresh_ptr,
    mscale_ptr,
    seed_ptr,
    table_ptr,
    rows_ptr,
    out_ptr,
    x0_ptr,
    n_samples,
    n_per_sample,
    x_bstride,
    m_bstride,
    m_var_off,
    m_cond_off,
    prev_bstride,
    noise_bstride,
    grad_bstride,
    out_bstride,
    x0_bstride,
    rows_stride,
    guidance_scale,
    clip_range,
    N_COLS: tl.constexpr,
    CFG: tl.constexpr,
    MSCALE: tl.constexpr,
    CLIP: tl.constexpr,
    THRESH: tl.constexpr,
    VAR_MODE: tl.constexpr,
    HAS_PREV: tl.constexpr,
    NOISE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_X0: tl.constexpr,
    FAST_MATH: tl.constexpr,
    hist_ptr,
    last_ptr,
    hist_bstride,
    hist_sstride,
    last_bstride,
    last_sstride,
    HIST_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Tile: BLOCK_S samples x BLOCK_N elements of each (BLOCK_S > 1 only for small samples).
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    b = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    b_ok = b < n_samples
    mask = b_ok[:, None] & (j < n_per_sample)[None, :]
    b2 = b[:, None]
    j2 = j[None, :]

    # Schedule gather: this sample's row of the coefficient table.
    row = tl.load(rows_ptr + b * rows_stride, mask=b_ok, other=0).to(tl.int64)
    coef = table_ptr + row * N_COLS
    c_x0_x = tl.load(coef + 0, mask=b_ok, other=0.0)[:, None]
    c_x0_m = tl.load(coef + 1, mask=b_ok, other=0.0)[:, None]
    c_x = tl.load(coef + 2, mask=b_ok, other=0.0)[:, None]
    c_x0 = tl.load(coef + 3, mask=b_ok, other=0.0)[:, None]
    c_m = tl.load(coef + 4, mask=b_ok, other=0.0)[:, None]

    x = tl.load(x_ptr + b2 * x_bstride + j2, mask=mask, other=0.0).to(tl.float32)
    m_off = b2 * m_bstride + j2
    m = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        m_cond = tl.load(m_ptr + m_cond_off + m_off, mask=mask, other=0.0).to(tl.float32)
        m = m + guidance_scale * (m_cond - m)
    if MSCALE:
        m = m * tl.load(mscale_ptr + b, mask=b_ok, other=1.0).to(tl.float32)[:, None]

    x0 = c_x0_x * x + c_x0_m * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if THRESH:
        s = tl.load(thresh_ptr + b, mask=b_ok, other=1.0).to(tl.float32)[:, None]
        x0 = tl.minimum(tl.maximum(x0, -s), s) / s
    if WRITE_OUT:
        x_next = c_x * x + c_x0 * x0 + c_m * m
        if HIST_SLOTS > 0:
            x_c, h_pred, hist_slot, last_slot = _unipc_terms(
                coef,
                b_ok,
                mask,
                b2,
                j2,
                x,
                x0,
                hist_ptr,
                last_ptr,
                hist_bstride,
                hist_sstride,
                last_bstride,
                last_sstride,
                HIST_SLOTS,
            )
            x_next += h_pred
        c_prev = tl.load(coef + 5, mask=b_ok, other=0.0)[:, None]
        if HAS_PREV:
            prev = tl.load(prev_ptr + b2 * prev_bstride + j2, mask=mask, other=0.0)
            x_next += c_prev * prev.to(tl.float32)
        else:
            # No previous x0 (a chain's first step): x0_prev = x0, which turns a multistep
            # row into its first-order step, as the reference does.
            x_next += c_prev * x0
        if NOISE != 0 or HAS_GRAD:
            std = tl.load(coef + 6, mask=b_ok, other=0.0)[:, None]
            if VAR_MODE != 0:
                v_off = m_off + m_var_off
                if CFG:
                    v_off += m_cond_off
                v = tl.load(m_ptr + v_off, mask=mask, other=0.0).to(tl.float32)
                if VAR_MODE == 2:
                    lmin = tl.load(coef + 7, mask=b_ok, other=0.0)[:, None]
                    lmax = tl.load(coef + 8, mask=b_ok, other=0.0)[:, None]
                    frac = 0.5 * (v + 1.0)
                    v = frac * lmax + (1.0 - frac) * lmin
                std = std * tl.exp(0.5 * v)
            if HAS_GRAD:
                g = tl.load(grad_ptr + b2 * grad_bstride + j2, mask=mask, other=0.0)
                x_next += (std * std) * g.to(tl.float32)
            if NOISE == 1:
                z = tl.load(noise_ptr + b2 * noise_bstride + j2, mask=mask, other=0.0)
                x_next += std * z.to(tl.float32)
            if NOISE == 2:
                # Four normals per Philox call: quad q serves elements 4q .. 4q+3 of a sample.
                seed = tl.load(seed_ptr + b, mask=b_ok, other=0)[:, None]
                quad = pid_n * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4).to(tl.int64)
                z0, z1, z2, z3 = _philox_normal4(seed, row[:, None], quad[None, :], FAST_MATH)
                z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK_S, BLOCK_N))
                x_next += std * z
        tl.store(out_ptr + b2 * out_bstride + j2, x_next.to(out_ptr.dtype.element_ty), mask=mask)
        if HIST_SLOTS > 0:  # UniPC state: slots no load of this step reads
            h_off = hist_slot * hist_sstride + b2 * hist_bstride + j2
            tl.store(hist_ptr + h_off, x0.to(hist_ptr.dtype.element_ty), mask=mask)
            l_off = last_slot * last_sstride + b2 * last_bstride + j2
            tl.store(last_ptr + l_off, x_c.to(last_ptr.dtype.element_ty), mask=mask)
    # Stored last, after every load: x0_out may alias x0_prev (and out may alias x).
    if WRITE_X0:
        tl.store(x0_ptr + b2 * x0_bstride + j2, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_same_layout(name: str, t: torch.Tensor, x: torch.Tensor, batch: int) -> None:
    """``t`` must be a [batch, *x.shape[1:]] tensor laid out within each sample like ``x``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != (batch, *x.shape[1:]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(batch, *x.shape[1:])}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in _IO_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the kernel takes float32, float16, bfloat16")
    if x.dim() > 1 and any(t.stride(d) != x.stride(d) for d in range(1, x.dim()) if x.shape[d] > 1):
        raise ValueError(
            f"{name} is laid out differently from x (strides {t.stride()} vs {x.stride()}); "
            "pass tensors with the same memory format (contiguous or channels_last)"
        )


def _block_sizes(n_samples: int, n_per_sample: int) -> tuple[int, int, int]:
    """Tile shape (BLOCK_S, BLOCK_N) and num_warps.

    On a GPU, 4 warps a program and 2048 elements (16 a thread) for large steps, 1024 below
    4M elements. Measured on an H200 (benchmarks/RESULTS.md): for (256, 3, 256, 256) the
    Philox step in bfloat16 reaches 80% of copy bandwidth with 2048-element tiles and 70%
    with 1024 or 8192; float32 and deterministic steps are at 94-98% for any tile from 1024
    to 8192; for the small latents (8, 4, 128, 128) a Python loop of steps runs at 23 us a
    step with 1024-element tiles and up to 37 with 512 or 2048.
    Under the interpreter, 64K elements a program: each program instance costs ~10 ms there.
    """
    if _interpreting():
        tile = 1 << 16
    else:
        tile = 2048 if n_samples * n_per_sample >= 1 << 22 else 1024
    block_n = max(4, min(triton.next_power_of_2(n_per_sample), tile))
    block_s = max(1, min(tile // block_n, triton.next_power_of_2(n_samples)))
    return block_s, block_n, 4


def _per_sample_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated q-quantile of each row (torch.quantile's rule, any row length)."""
    n = values.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = values.kthvalue(lo + 1, dim=1).values
    if hi == lo:
        return v_lo
    v_hi = values.kthvalue(hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def fused_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_range: float | None = None,
    thresholding: tuple[float, float] | None = None,
    variance_mode: str = "fixed",
    x0_prev: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    write_x0: bool = True,
    history: torch.Tensor | None = None,
    last_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one reverse step (rows of ``table``) to a batch, in one kernel launch.

    Args:
        x: the current sample ``[B, ...]`` (float32 / float16 / bfloat16; contiguous or
            channels_last).
        model_output: ``[B, ...]``; ``[2B, ...]`` with guidance (unconditional half first);
            with a learned variance, ``[B, 2C, ...]`` (prediction channels, then variance).
        table: float32 ``[R, len(COLUMNS)]`` coefficient table on x's device.
        rows: int tensor on x's device: ``[1]`` (one row for the whole batch; a 0-d tensor
            also works) or ``[B]`` (per-sample rows). The row index is also the step counter
            of the in-kernel noise.
        guidance_scale: classifier-free guidance scale ``w``; None means no guidance.
        guidance_rescale: ``phi`` of Lin et al. 2023 (needs a per-sample std: extra pass).
        clip_range: clamp x0 to ``[-r, r]``.
        thresholding: ``(ratio, max_value)`` dynamic thresholding (an extra pass).
        variance_mode: "fixed", "learned" or "learned_range".
        x0_prev: the previous step's x0 (multistep samplers).
        noise: explicit standard-normal noise like x.
        seeds: int64 ``[B]`` per-sample Philox keys: in-kernel noise (instead of ``noise``).
        grad: classifier-guidance gradient like x.
        out, x0_out: optional preallocated outputs (like x); ``out`` may alias ``x``.
        write_x0: also write the predicted x0 (one more pass over the tensor).
        history: UniPC (``fastdiff.unipc``): the ring ``[S, B, ...]`` (S <= UNIPC_MAX_SLOTS,
            each slot laid out like x) of converted model outputs; with it ``table`` has
            ``UNIPC_COLUMNS``, and the step writes this step's M (the processed "x0") into
            the row's ``hist_slot``.
        last_sample: with ``history``: ``[2, B, ...]``, the corrected samples of this and
            the previous step (the row's ``last_slot`` is written, the other read).

    Returns:
        ``(x_next, x0)``, both laid out like x, in x's dtype; x0 is None without
        ``write_x0`` (dynamic thresholding still uses a temporary x0 for its quantile).

    Example:
        >>> x_next, x0 = fused_step(x, eps, table, rows, seeds=seeds)
    """
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    guided = guidance_scale is not None
    if guided and guidance_rescale and not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    write_x0 = write_x0 or x0_out is not None
    tensors = (x, model_output, table, rows, x0_prev, noise, seeds, grad, out, x0_out)
    tensors += (history, last_sample)
    key = (
        tuple(_signature(t) for t in tensors),
        guided,
        bool(guidance_rescale) and guided,
        clip_range is None,
        thresholding,
        variance_mode,
        write_x0,
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(*tensors, guided, clip_range, thresholding, variance_mode)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan

    batch = plan.batch
    mscale = None
    if guided and guidance_rescale:
        # Lin et al. 2023 eq. 15-16 needs per-sample stds: a reduction before the step.
        m_view = model_output[:, : plan.channels] if plan.channels else model_output
        m_uncond = m_view[:batch].float()
        m_cond = m_view[batch:].float()
        dims = tuple(range(1, x.dim()))
        guided_out = m_uncond + guidance_scale * (m_cond - m_uncond)
        ratio = m_cond.std(dim=dims) / guided_out.std(dim=dims)
        mscale = guidance_rescale * ratio + (1.0 - guidance_rescale)
    if out is None:
        out = torch.empty_like(x)
    if x0_out is None and (write_x0 or thresholding is not None):
        x0_out = torch.empty_like(x)
    dynamic = {
        "x_ptr": x,
        "m_ptr": model_output,
        "prev_ptr": x0_prev if x0_prev is not None else x,
        "noise_ptr": noise if noise is not None else x,
        "grad_ptr": grad if grad is not None else x,
        "thresh_ptr": table,
        "mscale_ptr": mscale if mscale is not None else table,
        "seed_ptr": seeds if seeds is not None else rows,
        "table_ptr": table,
        "rows_ptr": rows,
        "out_ptr": out,
        "x0_ptr": x0_out if x0_out is not None else out,
        "hist_ptr": history if history is not None else x,
        "last_ptr": last_sample if last_sample is not None else x,
        "guidance_scale": float(guidance_scale) if guided else 0.0,
        "clip_range": float(clip_range) if clip_range is not None else 0.0,
    }
    if thresholding is not None:
        ratio, max_value = thresholding
        # Pass 1: x0 only; then the per-sample quantile of |x0| (Saharia et al. 2022).
        _launch(plan, dynamic, x.device, THRESH=False, WRITE_OUT=False, WRITE_X0=True)
        abs_x0 = x0_out.float().abs().reshape(batch, -1)
        dynamic["thresh_ptr"] = (
            _per_sample_quantile(abs_x0, ratio).clamp(1.0, max_value).contiguous()
        )
    _launch(
        plan, dynamic, x.device, THRESH=thresholding is not None, WRITE_OUT=True, WRITE_X0=write_x0
    )
    return out, (x0_out if write_x0 else None)


# -- launch plans: validation and block sizes once per signature, then a lean launch ----------


class _Plan:
    """What one input signature needs: its grid, its integer arguments and, once compiled,
    the kernels to launch without Triton's per-call argument binding (which costs tens of
    microseconds for this many arguments and would dominate small latents)."""

    __slots__ = ("batch", "channels", "grid", "statics", "kernels")

    def __init__(self, batch, channels, grid, statics):
        self.batch = batch
        self.channels = channels
        self.grid = grid
        self.statics = statics
        self.kernels = {}


_PLANS: dict = {}
_FAST_LAUNCH = {"enabled": True}


def _signature(t: torch.Tensor | None):
    """Everything about a tensor that validation and Triton's specialization depend on."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def _plan(
    x,
    model_output,
    table,
    rows,
    x0_prev,
    noise,
    seeds,
    grad,
    out,
    x0_out,
    history,
    last_sample,
    guided,
    clip_range,
    thresholding,
    variance_mode,
) -> _Plan:
    """Validate a signature (clear errors) and compute its launch constants."""
    if not isinstance(x, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("x and model_output must be tensors")
    if x.dtype not in _IO_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; the kernel takes float32, float16 or bfloat16 "
            "(use backend='reference' for float64)"
        )
    if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor with the batch first, got {tuple(x.shape)}")
    if x.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU); "
            "use backend='reference' for CPU tensors"
        )
    batch = x.shape[0]
    if x.dim() > 1 and not (
        x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    ):
        raise ValueError("x must be contiguous or channels_last (a dense tensor)")
    n_per_sample = x[0].numel()
    if variance_mode not in VARIANCE_MODES:
        raise ValueError(
            f"variance_mode must be one of {sorted(VARIANCE_MODES)}, got {variance_mode!r}"
        )
    n_cols = len(COLUMNS if history is None else UNIPC_COLUMNS)
    if table.dim() != 2 or table.shape[1] != n_cols or table.dtype != torch.float32:
        raise ValueError(
            f"table must be float32 [R, {n_cols}], got {table.dtype} {tuple(table.shape)}"
        )
    if table.device != x.device or not table.is_contiguous():
        raise ValueError("table must be a contiguous tensor on x's device")
    if rows.dtype not in (torch.int32, torch.int64) or rows.device != x.device:
        raise ValueError("rows must be an int32/int64 tensor on x's device")
    if rows.numel() not in (1, batch) or rows.dim() > 1:
        raise ValueError(f"rows must have 1 or {batch} entries, got shape {tuple(rows.shape)}")
    rows_stride = 0 if rows.numel() == 1 and batch != 1 else (rows.stride(0) if rows.dim() else 0)
    if noise is not None and seeds is not None:
        raise ValueError("pass either noise or seeds, not both")
    if clip_range is not None and thresholding is not None:
        raise ValueError("clip_range and thresholding are exclusive")
    if thresholding is not None:
        ratio, max_value = thresholding
        if not 0.0 < ratio <= 1.0 or not max_value >= 1.0:
            raise ValueError(
                f"thresholding needs 0 < ratio <= 1 and max_value >= 1, got {thresholding}"
            )

    # Model output: halves for guidance, channel halves for a learned variance.
    m_batch = 2 * batch if guided else batch
    if model_output.dim() != x.dim() or model_output.shape[0] != m_batch:
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)}; expected batch {m_batch}"
            + (" (guidance doubles the batch: unconditional half first)" if guided else "")
        )
    if model_output.device != x.device:
        raise ValueError(f"model_output is on {model_output.device} but x is on {x.device}")
    m_var_off = 0
    channels = 0
    if variance_mode == "fixed":
        m_view = model_output
    else:
        if x.dim() < 2 or model_output.shape[1] != 2 * x.shape[1]:
            raise ValueError(
                "a learned variance needs 2x channels in model_output (prediction, then "
                f"variance), got {tuple(model_output.shape)} for x {tuple(x.shape)}"
            )
        if not model_output.is_contiguous():
            raise ValueError("a learned-variance model_output must be contiguous (NCHW)")
        channels = x.shape[1]
        m_view = model_output[:, :channels]
        m_var_off = model_output.stride(1) * channels
    _check_same_layout("model_output", m_view[:batch], x, batch)
    m_cond_off = batch * model_output.stride(0) if guided else 0
    for name, t in (
        ("x0_prev", x0_prev),
        ("noise", noise),
        ("grad", grad),
        ("out", out),
        ("x0_out", x0_out),
    ):
        if t is not None:
            _check_same_layout(name, t, x, batch)
    if seeds is not None:
        if seeds.dtype != torch.int64 or seeds.shape != (batch,) or seeds.device != x.device:
            raise ValueError(f"seeds must be an int64 tensor [{batch}] on x's device")
    hist_slots = _check_unipc_state(history, last_sample, x0_prev, x, batch)

    block_s, block_n, num_warps = _block_sizes(batch, n_per_sample)
    grid = (triton.cdiv(n_per_sample, block_n), triton.cdiv(batch, block_s))
    x_bstride = x.stride(0)  # outputs made by empty_like(x) share x's strides
    statics = dict(
        n_samples=batch,
        n_per_sample=n_per_sample,
        x_bstride=x_bstride,
        m_bstride=model_output.stride(0),
        m_var_off=m_var_off,
        m_cond_off=m_cond_off,
        prev_bstride=x0_prev.stride(0) if x0_prev is not None else 0,
        noise_bstride=noise.stride(0) if noise is not None else 0,
        grad_bstride=grad.stride(0) if grad is not None else 0,
        out_bstride=out.stride(0) if out is not None else x_bstride,
        x0_bstride=x0_out.stride(0) if x0_out is not None else x_bstride,
        rows_stride=rows_stride,
        N_COLS=n_cols,
        CFG=guided,
        CLIP=clip_range is not None,
        VAR_MODE=VARIANCE_MODES[variance_mode],
        HAS_PREV=x0_prev is not None,
        NOISE=1 if noise is not None else (2 if seeds is not None else 0),
        HAS_GRAD=grad is not None,
        FAST_MATH=not _interpreting(),
        hist_bstride=history.stride(1) if history is not None else 0,
        hist_sstride=history.stride(0) if history is not None else 0,
        last_bstride=last_sample.stride(1) if last_sample is not None else 0,
        last_sstride=last_sample.stride(0) if last_sample is not None else 0,
        HIST_SLOTS=hist_slots,
        BLOCK_S=block_s,
        BLOCK_N=block_n,
    )
    statics["num_warps"] = num_warps
    return _Plan(batch, channels, grid, statics)


def _check_unipc_state(history, last_sample, x0_prev, x, batch) -> int:
    """UniPC's ring ``[S, B, ...]`` and last samples ``[2, B, ...]``, every slot laid out like
    x; returns S (0 without them)."""
    if history is None and last_sample is None:
        return 0
    if history is None or last_sample is None:
        raise ValueError("history and last_sample go together (UniPC)")
    if x0_prev is not None:
        raise ValueError("x0_prev has no place in a UniPC step (its history is the ring)")
    for name, t, slots in (("history", history, None), ("last_sample", last_sample, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != x.dim() + 1:
            raise ValueError(f"{name} must be a [slots, B, ...] tensor like x")
        if not 1 <= t.shape[0] <= (slots or UNIPC_MAX_SLOTS) or (slots and t.shape[0] != slots):
            raise ValueError(f"{name} has {t.shape[0]} slots, expected {slots or '1 to 4'}")
        _check_same_layout(name, t[0], x, batch)
        if t.shape[0] > 1 and t.stride(0) < t[0].numel():
            raise ValueError(f"the slots of {name} overlap (stride {t.stride(0)})")
    return history.shape[0]


def _launch(plan: _Plan, dynamic: dict, device: torch.device, **flags) -> None:
    """Launch through Triton the first time (it compiles and specializes), then straight
    through the compiled kernel's launcher with the same arguments in signature order, as
    Triton's own ``JITFunction.run`` does after its argument binding."""
    flags["MSCALE"] = dynamic["mscale_ptr"] is not dynamic["table_ptr"]
    flag_key = tuple(flags.values())
    kernel = plan.kernels.get(flag_key)
    if kernel is not None and _FAST_LAUNCH["enabled"]:
        values = {**plan.statics, **dynamic, **flags}
        args = [values[name] for name in _fused_step_kernel.arg_names]
        stream = triton.runtime.driver.active.get_current_stream(device.index)
        grid = plan.grid
        hooks = triton.knobs.runtime
        try:
            metadata = kernel.launch_metadata(grid, stream, *args)
            kernel.run(
                grid[0],
                grid[1],
                1,
                stream,
                kernel.function,
                kernel.packed_metadata,
                metadata,
                hooks.launch_enter_hook,
                hooks.launch_exit_hook,
                *args,
            )
            return
        except (TypeError, AttributeError):  # a Triton whose launcher differs: bind instead
            _FAST_LAUNCH["enabled"] = False
    compiled = _fused_step_kernel[plan.grid](**dynamic, **plan.statics, **flags)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if not _interpreting() and hasattr(triton, "knobs") and hasattr(compiled, "packed_metadata"):
        plan.kernels[flag_key] = compiled

"""One reverse diffusion step of any fastdiff sampler, fused into one Triton kernel.

Every sampler (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++(2M)) is, per element, the
same computation with per-step coefficients from a row of a float32 device table (the
columns of ``COLUMNS``, built on the host in float64 by ``fastdiff.tables``)::

    m      = m_u + w (m_c - m_u)                 # CFG, Ho & Salimans 2022 eq. 6 (optional)
    m      = r_b m                               # guidance rescale, Lin et al. 2023 eq. 15-16
    x0     = process(X0_X x + X0_M m)            # Ho et al. 2020 eq. 15; v: Salimans & Ho 2022
    std    = STD | STD exp(v / 2) | STD exp((f LMAX + (1 - f) LMIN) / 2),  f = (v + 1) / 2
    x_next = X x + X0 x0 + M m + X0_PREV x0_prev + std^2 g + std z
    x0_out = x0 + X0_Z z                         # with x0_noise: the x0 of x + c z (churn)

``process`` is the identity, ``clamp(., -r, r)``, or dynamic thresholding
``clamp(., -s, s) / s`` with ``s`` the per-sample quantile of ``|x0|`` clamped to
``[1, max_value]`` (Saharia et al. 2022). Without an ``x0_prev`` tensor, ``x0_prev = x0``
(the first-order step of a multistep row). ``v`` is the model's learned-variance channels
(Nichol & Dhariwal 2021 eq. 15), ``g`` the scaled classifier-guidance gradient (Dhariwal &
Nichol 2021), ``z`` standard normal noise: read from a tensor, or Philox4x32-10 made in the
kernel keyed by (per-sample seed, table row, element), bit-identical to ``fastdiff.philox``.
Sample ``b`` reads row ``rows[b * rows_stride]`` (stride 0: one row for the batch), so the
step lives on the device: no host sync, no recompilation, capturable in a CUDA graph.

Traffic of the one launch: reads x and m, writes x_next (3 passes over the tensor); +1 with
guidance (the second half), +1 for x0_prev, +1 for a noise tensor, +1 for the
learned-variance channels, +1 for a classifier gradient, +1 when x0 is written. Everything
else stays in registers, in float32, whatever the I/O dtypes. Dynamic thresholding adds one
launch that writes x0 to a temporary (2 passes) and a per-sample ``kthvalue``; guidance
rescale a per-sample std (torch, 2 passes).

Backward (only when an input requires grad): ``x_next`` and ``x0`` are linear in x, m (both
halves: ``(1 - w) r`` and ``w r``), x0_prev, z and g, except for the clip / threshold masks,
which one launch of the same kernel (``BACKWARD``) recomputes from x and m; the threshold
``s`` is a constant (its gradient is not propagated, in the reference as here).

UniPC (Zhao et al. 2023; ``fastdiff.unipc``), with a ``history`` ring of the converted
outputs M (x0 or eps) of the last steps and the last corrected sample: the corrector of
step k and the predictor of step k + 1 in one launch, with M = ``x0`` above::

    x_c     = UC_X * x + UC_LAST * last + UC_NEW * M + sum_j UC_H[j] * hist[j]  # UniC
    x_next += UP_LAST * last + sum_j UP_H[j] * hist[j]  # UniP from x_c, expanded
    hist[HIST_SLOT] = M;  last' = x_c

(``UNIPC_COLUMNS``: coefficients by ring slot j; the slot written is not read; the
predictor's coefficients of x_c are folded into the others on the host, so that terms
which cancel in exact arithmetic cancel in float64 there). Reads x, m, last and the
ring, writes x_c, x_next and M: 5 + 3 passes at order 2. Without a corrector (a
``last_sample`` of no slots, constexpr ``HIST_CORRECTOR`` off: DPM-Solver++ 3M's x0 ring,
whose corrector columns are 0) only ``x_next += sum_j UP_H[j] * hist[j]`` and the M store:
last and the corrector columns are not read, x_c is not written (reads x, m and the S - 1
slots, writes x_next and M: 6 passes at S = 3).

Example:
    >>> x_next, x0 = fused_step(x, eps, table, rows, seeds=seeds)
"""

from __future__ import annotations

import inspect
import operator
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .utils import (
    KERNEL_DTYPE_NAMES,
    KERNEL_DTYPES,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    is_dense,
    memory_format_of,
    same_layout,
)

__all__ = [
    "COLUMNS",
    "LoopAdvance",
    "UNIPC_COLUMNS",
    "UNIPC_MAX_SLOTS",
    "VARIANCE_MODES",
    "fused_step",
    "step_config",
    "step_with_config",
]

# Columns of a coefficient table row, in order.
COLUMNS = (
    "x0_x", "x0_m", "x", "x0", "m", "x0_prev", "std", "log_var_min", "log_var_max", "x0_z"
)  # fmt: skip
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

_PHILOX_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
_PHILOX_M0 = tl.constexpr(PHILOX_M0)
_PHILOX_M1 = tl.constexpr(PHILOX_M1)
_PHILOX_W0 = tl.constexpr(PHILOX_W0)
_PHILOX_W1 = tl.constexpr(PHILOX_W1)


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
    for _ in tl.static_range(_PHILOX_ROUNDS):
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


@triton.jit
def _tile(n_samples, n_per_sample, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: BLOCK_S samples ``b`` x BLOCK_N elements ``j`` of each (int64
    offsets; BLOCK_S > 1 only for small samples), its mask, and ``b``, ``j`` as 2-D."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    b = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    b_ok = b < n_samples
    mask = b_ok[:, None] & (j < n_per_sample)[None, :]
    return pid_n, b, b_ok, mask, b[:, None], j[None, :]


@triton.jit
def _coefficients(table_ptr, rows_ptr, b, b_ok, rows_stride, N_COLS: tl.constexpr):
    """Schedule gather: each sample's row index, a pointer to its table row, and the
    coefficients X0_X, X0_M, X, X0, M as [BLOCK_S, 1] columns."""
    row = tl.load(rows_ptr + b * rows_stride, mask=b_ok, other=0).to(tl.int64)
    coef = table_ptr + row * N_COLS
    c_x0_x = tl.load(coef + 0, mask=b_ok, other=0.0)[:, None]
    c_x0_m = tl.load(coef + 1, mask=b_ok, other=0.0)[:, None]
    c_x = tl.load(coef + 2, mask=b_ok, other=0.0)[:, None]
    c_x0 = tl.load(coef + 3, mask=b_ok, other=0.0)[:, None]
    c_m = tl.load(coef + 4, mask=b_ok, other=0.0)[:, None]
    return row, coef, c_x0_x, c_x0_m, c_x, c_x0, c_m


@triton.jit
def _guided_output(m_ptr, m_off, m_cond_off, mask, guidance_scale, CFG: tl.constexpr):
    """The model output, with guidance ``m_u + w (m_c - m_u)`` of the two halves (CFG)."""
    m = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        m_cond = tl.load(m_ptr + m_cond_off + m_off, mask=mask, other=0.0).to(tl.float32)
        m = m + guidance_scale * (m_cond - m)
    return m


@triton.jit
def _std(coef, b_ok, m_ptr, v_off, m_cond_off, mask, CFG: tl.constexpr, VAR_MODE: tl.constexpr):
    """The row's noise std STD, and ``dl/dv`` (1 unless learned_range). With a learned variance
    the std is ``STD exp(l / 2)``: ``l = v`` (the model's variance channels, of the
    conditional half with CFG; learned), or ``l = f LMAX + (1 - f) LMIN`` with
    ``f = (v + 1) / 2`` (learned_range)."""
    std = tl.load(coef + 6, mask=b_ok, other=0.0)[:, None]
    slope = tl.full(std.shape, 1.0, tl.float32)
    if VAR_MODE != 0:
        if CFG:
            v_off += m_cond_off
        v = tl.load(m_ptr + v_off, mask=mask, other=0.0).to(tl.float32)
        lmin = tl.load(coef + 7, mask=b_ok, other=0.0)[:, None]
        lmax = tl.load(coef + 8, mask=b_ok, other=0.0)[:, None]
        if VAR_MODE == 2:
            frac = 0.5 * (v + 1.0)
            v = frac * lmax + (1.0 - frac) * lmin
            slope = 0.5 * (lmax - lmin)
        std = std * tl.exp(0.5 * v)
    return std, slope


@triton.jit
def _philox_block(
    seed_ptr,
    b,
    b_ok,
    row,
    pid_n,
    FAST_MATH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """The tile's in-kernel noise: four normals per Philox call, quad q of a sample serving
    its elements 4q .. 4q+3 (PAIRS: quads 2p and 2p + 1 made side by side)."""
    seed = tl.load(seed_ptr + b, mask=b_ok, other=0)[:, None]
    if PAIRS:
        # Two consecutive quads per register group (8 elements: a 16-byte vector of 16-bit
        # I/O): the normals land in the load's layout, with no exchange through shared memory.
        pair = pid_n * (BLOCK_N // 4) + 2 * tl.arange(0, BLOCK_N // 8).to(tl.int64)
        e0, e1, e2, e3 = _philox_normal4(seed, row[:, None], pair[None, :], FAST_MATH)
        o0, o1, o2, o3 = _philox_normal4(seed, row[:, None], pair[None, :] + 1, FAST_MATH)
        z0, z1, z2, z3 = tl.join(e0, o0), tl.join(e1, o1), tl.join(e2, o2), tl.join(e3, o3)
    else:
        quad = pid_n * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4).to(tl.int64)
        z0, z1, z2, z3 = _philox_normal4(seed, row[:, None], quad[None, :], FAST_MATH)
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK_S, BLOCK_N))


_UNIPC0 = tl.constexpr(len(COLUMNS))  # first UniPC column
_UNIPC_MAX = tl.constexpr(UNIPC_MAX_SLOTS)


@triton.jit
def _unipc_terms(
    coef,
    b_ok,
    mask,
    x,
    m_conv,
    hist_at,
    last_at,
    hist_sstride,
    last_sstride,
    SLOTS: tl.constexpr,
    CORRECTOR: tl.constexpr,
):
    """UniPC (Zhao et al. 2023): the corrected sample x_c of this step (UniC) and the terms
    UP_LAST last + sum_j UP_H[j] hist[j] of the next sample (UniP), from the row's
    UNIPC_COLUMNS; also the ring slot and the last-sample slot this step writes. ``hist_at``
    and ``last_at`` point at the tile in slot 0 of the ring and of the last samples. Without
    CORRECTOR only sum_j UP_H[j] hist[j] (last and the corrector columns unread; x_c is x, a
    placeholder the caller does not store)."""
    hist_slot = tl.load(coef + (_UNIPC0 + 4 + 2 * _UNIPC_MAX), mask=b_ok, other=0.0)
    last_slot = tl.load(coef + (_UNIPC0 + 5 + 2 * _UNIPC_MAX), mask=b_ok, other=0.0)
    hist_slot = hist_slot.to(tl.int64)[:, None]
    last_slot = last_slot.to(tl.int64)[:, None]
    if CORRECTOR:
        last = tl.load(last_at + (1 - last_slot) * last_sstride, mask=mask, other=0.0)
        last = last.to(tl.float32)
        uc_x = tl.load(coef + _UNIPC0, mask=b_ok, other=0.0)[:, None]
        uc_last = tl.load(coef + (_UNIPC0 + 1), mask=b_ok, other=0.0)[:, None]
        uc_new = tl.load(coef + (_UNIPC0 + 2), mask=b_ok, other=0.0)[:, None]
        x_c = uc_x * x + uc_last * last + uc_new * m_conv
        pred = tl.load(coef + (_UNIPC0 + 3 + _UNIPC_MAX), mask=b_ok, other=0.0)[:, None] * last
    else:
        x_c = x
        pred = tl.zeros_like(x)
    for j in tl.static_range(SLOTS):
        # the slot this step writes holds no input of it: not read (one pass fewer)
        h = tl.load(hist_at + j * hist_sstride, mask=mask & (hist_slot != j), other=0.0)
        h = h.to(tl.float32)
        if CORRECTOR:
            x_c += tl.load(coef + (_UNIPC0 + 3 + j), mask=b_ok, other=0.0)[:, None] * h
        pred += tl.load(coef + (_UNIPC0 + 4 + _UNIPC_MAX + j), mask=b_ok, other=0.0)[:, None] * h
    return x_c, pred, hist_slot, last_slot


@triton.jit
def _advance_loop(
    counter_ptr, ticket_ptr, plan_ptr, t_ptr, src_ptr, dst_ptr, n_steps, x_next, scaled_at,
    mask, ADVANCE: tl.constexpr,
):  # fmt: skip
    """A graphed loop's advance at the end of its step (``ADVANCE``): the program that takes
    the grid's last ticket increments the counter, writes the next timestep (and with
    ADVANCE >= 2 the next per-step value ``v``) and resets the ticket; with ADVANCE 3 every
    program also stores its tile of the next step's model input ``round(x_next) * v`` at
    ``scaled_at`` (the written sample, rounded to the buffer's dtype, times ``v`` in float32
    and rounded once: what ``torch.mul`` of the sample and a 1-D float32 ``v`` gives). The
    barrier orders every thread's loads and stores of this program before its ticket
    (acquire-release at GPU scope: the last program sees every other program's done). Every
    program reads the counter and the next plan entry before its ticket (the counter is
    incremented only after the last ticket, so each reads the step's own value), which keeps
    those two loads out of the last program's chain of dependent memory round trips."""
    count = tl.load(counter_ptr) + 1
    more = count < n_steps
    at = tl.minimum(count, n_steps - 1)  # in bounds also where nothing is written
    t_next = tl.load(plan_ptr + at)
    if ADVANCE >= 2:
        v_next = tl.load(src_ptr + at)
    if ADVANCE == 3:
        dtype = scaled_at.dtype.element_ty
        scaled = x_next.to(dtype).to(tl.float32) * v_next
        tl.store(scaled_at, scaled.to(dtype), mask=mask)
    tl.debug_barrier()
    total = tl.num_programs(0) * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == total - 1:
        tl.store(counter_ptr, count)
        tl.store(t_ptr, t_next, mask=more)
        if ADVANCE >= 2:
            tl.store(dst_ptr, v_next, mask=more)
        tl.store(ticket_ptr, 0)


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
    hist_ptr,
    last_ptr,
    gout_ptr,
    gx0_ptr,
    dx_ptr,
    dm_ptr,
    dprev_ptr,
    dnoise_ptr,
    dgrad_ptr,
    dscale_ptr,
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
    hist_bstride,
    hist_sstride,
    last_bstride,
    last_sstride,
    gout_bstride,
    gx0_bstride,
    dm_bstride,
    dm_var_off,
    dm_cond_off,
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
    STD: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_X0: tl.constexpr,
    HIST_SLOTS: tl.constexpr,
    HIST_CORRECTOR: tl.constexpr,
    X0_NOISE: tl.constexpr,
    BACKWARD: tl.constexpr,
    HAS_GX0: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DM: tl.constexpr,
    NEED_DPREV: tl.constexpr,
    NEED_DNOISE: tl.constexpr,
    NEED_DGRAD: tl.constexpr,
    NEED_DSCALE: tl.constexpr,
    FAST_MATH: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    adv_counter_ptr=None,
    adv_ticket_ptr=None,
    adv_plan_ptr=None,
    adv_t_ptr=None,
    adv_src_ptr=None,
    adv_dst_ptr=None,
    adv_scaled_ptr=None,
    adv_steps=None,
    ADVANCE: tl.constexpr = 0,
):
    """The step (see the module docstring), or with BACKWARD its gradients: x_next and x0 are
    linear in every input given the masks of the x0 processing, which the backward recomputes
    from x and m (nothing but the inputs is saved). The pointers of the other direction are
    None. STD: the step's std is needed (noise or a classifier gradient, or their gradients);
    in the backward NOISE and HAS_GRAD say what the learned-variance gradient reads.

    ADVANCE (forward only; 0: off): the launch also advances a graphed loop
    (:class:`LoopAdvance`): every program, after its last store, takes a ticket; the last
    one (all others have read their rows, which may be the counter, by then) increments the
    counter, writes the next iteration's timestep ``plan[counter]`` (nothing once the
    counter reaches ``adv_steps``) and, with ADVANCE >= 2, the next per-step value
    ``src[counter]`` into ``dst``, then resets the ticket to 0; with ADVANCE 3 every program
    also writes its tile of the next model input ``out * src[counter]`` into ``scaled``
    (laid out as ``out``)."""
    pid_n, b, b_ok, mask, b2, j2 = _tile(n_samples, n_per_sample, BLOCK_S, BLOCK_N)
    row, coef, c_x0_x, c_x0_m, c_x, c_x0, c_m = _coefficients(
        table_ptr, rows_ptr, b, b_ok, rows_stride, N_COLS
    )
    x_off = b2 * x_bstride + j2
    m_off = b2 * m_bstride + j2
    if BACKWARD:
        c_prev = tl.load(coef + 5, mask=b_ok, other=0.0)[:, None]
        gy = tl.load(gout_ptr + b2 * gout_bstride + j2, mask=mask, other=0.0).to(tl.float32)
        # dL/dx0, through the processing mask (recomputed from x and m) to the raw x0.
        dx0 = c_x0 * gy
        if not HAS_PREV:
            dx0 += c_prev * gy  # x0_prev = x0
        if HAS_GX0:
            gx0 = tl.load(gx0_ptr + b2 * gx0_bstride + j2, mask=mask, other=0.0).to(tl.float32)
            dx0 += gx0
        mg = _guided_output(m_ptr, m_off, m_cond_off, mask, guidance_scale, CFG)
        r = tl.full((BLOCK_S, 1), 1.0, tl.float32)
        if MSCALE:
            r = tl.load(mscale_ptr + b, mask=b_ok, other=1.0).to(tl.float32)[:, None]
        if CLIP or THRESH:
            x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
            x0 = c_x0_x * x + c_x0_m * (mg * r)
            if CLIP:
                dx0 = tl.where((x0 >= -clip_range) & (x0 <= clip_range), dx0, 0.0)
            if THRESH:  # s is a constant
                s = tl.load(thresh_ptr + b, mask=b_ok, other=1.0).to(tl.float32)[:, None]
                dx0 = tl.where((x0 >= -s) & (x0 <= s), dx0 / s, 0.0)
        dms = c_m * gy + c_x0_m * dx0  # dL/d(r m)
        if NEED_DX:
            dx = c_x * gy + c_x0_x * dx0
            tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DPREV:
            tl.store(dprev_ptr + x_off, (c_prev * gy).to(dprev_ptr.dtype.element_ty), mask=mask)
        if NEED_DSCALE:  # summed per sample on the host side: dL/dr
            tl.store(dscale_ptr + b2 * n_per_sample + j2, dms * mg, mask=mask)
        dm_off = b2 * dm_bstride + j2
        if NEED_DM:
            dmg = dms * r
            if CFG:  # m = (1 - w) m_u + w m_c
                tl.store(
                    dm_ptr + dm_off,
                    ((1.0 - guidance_scale) * dmg).to(dm_ptr.dtype.element_ty),
                    mask=mask,
                )
                tl.store(
                    dm_ptr + dm_cond_off + dm_off,
                    (guidance_scale * dmg).to(dm_ptr.dtype.element_ty),
                    mask=mask,
                )
            else:
                tl.store(dm_ptr + dm_off, dmg.to(dm_ptr.dtype.element_ty), mask=mask)
    else:
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        m = _guided_output(m_ptr, m_off, m_cond_off, mask, guidance_scale, CFG)
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
                hist_at = hist_ptr + b2 * hist_bstride + j2
                last_at = last_ptr + b2 * last_bstride + j2
                x_c, h_pred, hist_slot, last_slot = _unipc_terms(
                    coef,
                    b_ok,
                    mask,
                    x,
                    x0,
                    hist_at,
                    last_at,
                    hist_sstride,
                    last_sstride,
                    HIST_SLOTS,
                    HIST_CORRECTOR,
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

    # The variance term std^2 g + std z; the backward's dv = dL/dv / (gy slope) of it.
    if STD:
        std, slope = _std(coef, b_ok, m_ptr, m_off + m_var_off, m_cond_off, mask, CFG, VAR_MODE)
        if BACKWARD:
            acc = tl.zeros((BLOCK_S, BLOCK_N), tl.float32)
            z_std = 0.5 * std  # d(std)/dv = std slope / 2; d(std^2)/dv = std^2 slope
        else:
            acc = x_next
            z_std = std
        if HAS_GRAD:
            g = tl.load(grad_ptr + b2 * grad_bstride + j2, mask=mask, other=0.0)
            acc += std * std * g.to(tl.float32)
        if NOISE == 1:
            z = tl.load(noise_ptr + b2 * noise_bstride + j2, mask=mask, other=0.0).to(tl.float32)
            acc += z_std * z
        if NOISE == 2:
            pairs: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth < 32 and BLOCK_N >= 8
            z = _philox_block(seed_ptr, b, b_ok, row, pid_n, FAST_MATH, BLOCK_S, BLOCK_N, pairs)
            acc += z_std * z
        if BACKWARD:
            if VAR_MODE != 0 and NEED_DM:
                dv = gy * acc * slope
                dm_v = dm_ptr + dm_var_off + dm_off
                if CFG:  # the variance channels of the conditional half
                    tl.store(dm_v, tl.zeros_like(dv).to(dm_ptr.dtype.element_ty), mask=mask)
                    dm_v += dm_cond_off
                tl.store(dm_v, dv.to(dm_ptr.dtype.element_ty), mask=mask)
            if NEED_DNOISE:
                dz = gy * std
                if X0_NOISE and HAS_GX0:  # the written x0's X0_Z z
                    dz += tl.load(coef + 9, mask=b_ok, other=0.0)[:, None] * gx0
                tl.store(dnoise_ptr + x_off, dz.to(dnoise_ptr.dtype.element_ty), mask=mask)
            if NEED_DGRAD:
                dgrad = gy * std * std
                tl.store(dgrad_ptr + x_off, dgrad.to(dgrad_ptr.dtype.element_ty), mask=mask)
        else:
            x_next = acc
            if X0_NOISE:  # the x0 of the noised sample x + c z: x0 + X0_Z z, after processing
                x0 += tl.load(coef + 9, mask=b_ok, other=0.0)[:, None] * z

    if not BACKWARD:
        if WRITE_OUT:
            out = x_next.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + b2 * out_bstride + j2, out, mask=mask)
            if HIST_SLOTS > 0:  # UniPC state: slots no load of this step reads
                h_new = x0.to(hist_ptr.dtype.element_ty)
                tl.store(hist_at + hist_slot * hist_sstride, h_new, mask=mask)
                if HIST_CORRECTOR:
                    l_new = x_c.to(last_ptr.dtype.element_ty)
                    tl.store(last_at + last_slot * last_sstride, l_new, mask=mask)
        # Stored last, after every load: x0_out may alias x0_prev (and out may alias x).
        if WRITE_X0:
            tl.store(x0_ptr + b2 * x0_bstride + j2, x0.to(x0_ptr.dtype.element_ty), mask=mask)
        if ADVANCE != 0:
            if ADVANCE == 3:  # the next model input where out is stored (LoopAdvance.scaled)
                tl.static_assert(WRITE_OUT)
                scaled_at = adv_scaled_ptr + b2 * out_bstride + j2
            else:
                scaled_at = adv_scaled_ptr
            _advance_loop(
                adv_counter_ptr, adv_ticket_ptr, adv_plan_ptr, adv_t_ptr, adv_src_ptr,
                adv_dst_ptr, adv_steps, x_next, scaled_at, mask, ADVANCE,
            )  # fmt: skip


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the kernel takes {KERNEL_DTYPE_NAMES} "
            "(backend='reference' takes float64 too)"
        )


def _check_same_layout(name: str, t: torch.Tensor, x: torch.Tensor, batch: int) -> None:
    """``t`` must be a [batch, *x.shape[1:]] tensor laid out within each sample like ``x``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != (batch, *x.shape[1:]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(batch, *x.shape[1:])}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _check_dtype(name, t)
    if not same_layout(t, x):
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
    x0_prev: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    last_sample: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_range: float | None = None,
    thresholding: tuple[float, float] | None = None,
    variance_mode: str = "fixed",
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    x0_noise: bool = False,
    grad: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    write_x0: bool = True,
    advance: LoopAdvance | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one reverse step (rows of ``table``) to a batch, in one kernel launch.

    Checks only what protects memory (shapes, dtypes, layouts, devices); the values of the
    options are checked at the public boundary (``fastdiff.checks``). Differentiable: with
    grad enabled and an input that requires grad, the step runs as an autograd Function
    whose backward is one launch of the kernel with ``BACKWARD``.

    Args:
        x: the current sample ``[B, ...]`` (a dtype of ``KERNEL_DTYPES``; contiguous or
            channels_last).
        model_output: ``[B, ...]`` laid out like x; ``[2B, ...]`` with guidance
            (unconditional half first); with a learned variance, contiguous ``[B, 2C, ...]``
            (prediction channels, then variance).
        table: float32 ``[R, len(COLUMNS)]`` coefficient table on x's device.
        rows: int tensor on x's device, ``[1]`` (or 0-d) for the batch or ``[B]`` per
            sample; the row index is also the step counter of the in-kernel noise.
        x0_prev: the previous step's x0 (multistep samplers).
        history: UniPC (``fastdiff.unipc``): the ring ``[S, B, ...]`` (S <= UNIPC_MAX_SLOTS,
            each slot laid out like x) of converted model outputs; with it ``table`` has
            ``UNIPC_COLUMNS``, and the step writes this step's M (the processed "x0") into
            the row's ``hist_slot``.
        last_sample: with ``history``: ``[2, B, ...]``, the corrected samples of this and
            the previous step (the row's ``last_slot`` is written, the other read); or
            ``[0, B, ...]`` (no slots): a ring step without UniPC's corrector
            (DPM-Solver++ 3M), which reads only the ring besides x and m and writes only
            x_next and the row's ring slot (its corrector columns are not read).
        guidance_scale: classifier-free guidance scale ``w``; None: no guidance.
        guidance_rescale: ``phi`` of Lin et al. 2023 (a per-sample std: 2 extra passes).
        clip_range: clamp x0 to ``[-r, r]``.
        thresholding: ``(ratio, max_value)`` dynamic thresholding (2 extra passes).
        variance_mode: "fixed", "learned" or "learned_range".
        noise: explicit standard-normal noise like x (wins over ``seeds``).
        seeds: int64 ``[B]`` per-sample Philox keys: in-kernel noise.
        x0_noise: the x0 written carries the step's noise, ``x0 + X0_Z z`` (the x0 of a
            churned sample ``x + c z``, Karras et al. 2022 Alg. 2); needs noise or seeds.
        grad: classifier-guidance gradient like x.
        out, x0_out: preallocated outputs like x; ``out`` may alias x, ``x0_out`` x0_prev.
        write_x0: also write the predicted x0 (one more pass).
        advance: a graphed loop's :class:`LoopAdvance`: the launch also advances the loop
            (its counter, next timestep and per-step value) after its stores; counted in
            ``advance.launches``. Not on the differentiable path (nothing is advanced there:
            the count tells).

    Returns:
        ``(x_next, x0)`` laid out like x, in x's dtype (or out's / x0_out's); x0 is None
        without ``write_x0``.

    Example:
        >>> x_next, x0 = fused_step(x, eps, table, rows, seeds=seeds)
    """
    # step_config of these arguments (locals(): them alone, by name), without its name check
    config = _options_config(x, model_output, table, rows, locals().get)
    return step_with_config(
        config, x, model_output, table, rows, guidance_scale, guidance_rescale, clip_range,
        thresholding, x0_prev, noise, seeds, grad, out, x0_out, write_x0, history, last_sample,
        advance,
    )  # fmt: skip


# fused_step's keyword options and their defaults (step_config takes the same), and those of
# them that are tensors, in the order _config_of keys them after (x, model_output, table, rows)
_STEP_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(fused_step).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
_TENSOR_OPTIONS = ("x0_prev", "noise", "seeds", "grad", "out", "x0_out", "history", "last_sample")
# (_options_config reads these with dict.get's None default)
_NONE_DEFAULTS = (*_TENSOR_OPTIONS, "guidance_scale", "clip_range", "thresholding")
assert all(_STEP_OPTIONS[name] is None for name in _NONE_DEFAULTS)


def step_config(
    x: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, **options
) -> _LaunchConfig:
    """The checked launch configuration of ``fused_step``'s arguments (the same checks and
    errors): what :func:`step_with_config` launches for arguments of the same signature.
    ``options`` are ``fused_step``'s keyword options (the launch-only ones, such as
    ``guidance_rescale`` or ``write_x0``, are accepted and do not change the configuration);
    an unknown name is a TypeError.

    For a caller that keeps its own cache of signatures (the diffusers drop-ins: one entry
    per scheduler, step options and input layout) and so skips ``fused_step``'s own key of
    every tensor on a step whose inputs it knows to match.

    Returns:
        The configuration, valid for tensors with the same shape, strides, dtype, device
        and 16-byte alignment as these (and the same option kinds: guidance or not, clip or
        not, thresholding or not, ``variance_mode``, ``x0_noise``).

    Example:
        >>> config = step_config(x, eps, table, rows)
        >>> x_next, x0 = step_with_config(config, x, eps, table, rows)
    """
    if not options.keys() <= _STEP_OPTIONS.keys():
        unknown = sorted(options.keys() - _STEP_OPTIONS.keys())
        raise TypeError(
            f"step_config() got unexpected keyword argument(s) {unknown}: it takes "
            f"fused_step's options {sorted(_STEP_OPTIONS)}"
        )
    return _options_config(x, model_output, table, rows, options.get)


def _options_config(x, model_output, table, rows, get) -> _LaunchConfig:
    """``step_config`` of options whose names are known to be fused_step's, read by ``get``
    (``dict.get`` of fused_step's own arguments, or of step_config's checked options; the
    tensor options and guidance / clip / thresholding default to None)."""
    tensors = (x, model_output, table, rows, *map(get, _TENSOR_OPTIONS))
    guided = get("guidance_scale") is not None
    clip_range, thresholding = get("clip_range"), get("thresholding")
    variance_mode = get("variance_mode", _STEP_OPTIONS["variance_mode"])
    x0_noise = get("x0_noise", _STEP_OPTIONS["x0_noise"])
    return _config_of(tensors, guided, clip_range, thresholding, variance_mode, x0_noise)


def step_with_config(
    config: _LaunchConfig,
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_range: float | None = None,
    thresholding: tuple[float, float] | None = None,
    x0_prev: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    write_x0: bool = True,
    history: torch.Tensor | None = None,
    last_sample: torch.Tensor | None = None,
    advance: LoopAdvance | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fused_step`` with the configuration :func:`step_config` returned for arguments of
    this signature, unchecked: the caller guarantees that every tensor has the shape,
    strides, dtype, device and alignment of the ones checked (nothing else protects memory
    here). Same arguments and result as ``fused_step`` (``variance_mode`` and ``x0_noise``
    are the configuration's), also by position in this order (``fused_step`` passes them
    so: binding keywords costs microseconds)."""
    write_x0 = write_x0 or x0_out is not None
    mscale = None
    if guidance_scale is not None and guidance_rescale:
        mscale = _rescale_factor(model_output, config, guidance_scale, guidance_rescale)
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad
        or model_output.requires_grad
        or (x0_prev is not None and x0_prev.requires_grad)
        or (noise is not None and noise.requires_grad)
        or (grad is not None and grad.requires_grad)
        or (mscale is not None and mscale.requires_grad)
    )
    if differentiable or thresholding is not None:  # (thresholding: two launches)
        options = (table, rows, seeds, guidance_scale, clip_range, thresholding, write_x0)
        options += (history, last_sample)
        if not differentiable:
            x_next, x0, _ = _forward(
                config, options, x, model_output, x0_prev, noise, grad, mscale, out, x0_out,
                advance,
            )  # fmt: skip
            return x_next, x0
        if history is not None:
            raise ValueError("a UniPC step (history=) is not differentiable; run it under no_grad")
        x_next, x0 = _FusedStep.apply(
            config, options, x, model_output, x0_prev, noise, grad, mscale
        )
        if out is not None:
            x_next = out.copy_(x_next)
        if x0_out is not None:
            x0 = x0_out.copy_(x0)
        return x_next, x0
    # The one-launch forward (``_forward`` without thresholding: a frame and the options
    # tuple less on the hot path).
    if out is None:
        out = torch.empty_like(x)
    if x0_out is None and write_x0:
        x0_out = torch.empty_like(x)
    values = _forward_values(
        x, model_output, table, rows, seeds, guidance_scale, clip_range, noise, grad, mscale,
        None, x0_prev, out, x0_out, history, last_sample,
    )  # fmt: skip
    flags = (False, True, write_x0, config.statics["STD"], mscale is not None)
    _launch(config, values, x.device, flags, () if advance is None else advance.take(out))
    return out, (x0_out if write_x0 else None)


def _config_of(tensors, guided, clip_range, thresholding, variance_mode, x0_noise):
    """The cached launch configuration of ``tensors`` (``fused_step``'s tensor arguments in
    order) and the option kinds; checked (``_launch_config``) at a signature's first call."""
    # The cache key: everything about each tensor that validation and Triton's
    # specialization depend on (shape, strides, dtype, device, 16-byte alignment), built in
    # one comprehension (no call per tensor; None slots stay None, so positions still count).
    key = (
        guided,
        clip_range is None,
        thresholding is None,
        variance_mode,
        x0_noise,
        *[
            None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
            for t in tensors
        ],
    )
    config = _LAUNCH_CONFIGS.get(key)
    if config is None:
        config = _launch_config(*tensors, guided, clip_range, variance_mode, x0_noise)
        if len(_LAUNCH_CONFIGS) > 256:
            _LAUNCH_CONFIGS.clear()
        _LAUNCH_CONFIGS[key] = config
    return config


def _rescale_factor(model_output, config, guidance_scale, guidance_rescale) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023 eq. 15-16) as a per-sample factor of the guided
    output: ``phi std(m_c) / std(m) + 1 - phi`` (torch: a reduction before the step)."""
    batch = config.batch
    m_view = model_output[:, : config.channels] if config.channels else model_output
    m_uncond = m_view[:batch].float()
    m_cond = m_view[batch:].float()
    dims = tuple(range(1, m_view.dim()))
    guided = m_uncond + guidance_scale * (m_cond - m_uncond)
    ratio = m_cond.std(dim=dims) / guided.std(dim=dims)
    return guidance_rescale * ratio + (1.0 - guidance_rescale)


def _forward(
    config, options, x, model_output, x0_prev, noise, grad, mscale, out, x0_out, advance=None
):
    """The step's launches (the last one advances ``advance``'s loop, if given); returns
    ``(x_next, x0 or None, thresholds or None)``."""
    table, rows, seeds, guidance_scale, clip_range = options[:5]
    thresholding, write_x0, history, last_sample = options[5:]
    if out is None:
        out = torch.empty_like(x)
    if x0_out is None and write_x0:
        x0_out = torch.empty_like(x)
    inputs = (x, model_output, table, rows, seeds, guidance_scale, clip_range, noise, grad, mscale)
    std, has_mscale = config.statics["STD"], mscale is not None
    thresh = None
    if thresholding is not None:
        ratio, max_value = thresholding
        # Pass 1: x0 only, into a temporary (x0_out may alias x0_prev, which pass 2 reads);
        # then the per-sample quantile of |x0| (Saharia et al. 2022).
        raw = torch.empty_like(x, dtype=x0_out.dtype if x0_out is not None else x.dtype)
        pre = _forward_values(*inputs, None, x0_prev, out, raw, history, last_sample)
        extra = (("x0_bstride", raw.stride(0)),)
        _launch(config, pre, x.device, (False, False, True, False, has_mscale), extra)
        abs_x0 = raw.float().abs().reshape(config.batch, -1)
        thresh = _per_sample_quantile(abs_x0, ratio).clamp(1.0, max_value).contiguous()
    values = _forward_values(*inputs, thresh, x0_prev, out, x0_out, history, last_sample)
    flags = (thresh is not None, True, write_x0, std, has_mscale)
    _launch(config, values, x.device, flags, () if advance is None else advance.take(out))
    return out, (x0_out if write_x0 else None), thresh


class _FusedStep(torch.autograd.Function):
    """The step as an autograd Function (inputs x, model_output, x0_prev, noise, grad and
    the rescale factor); see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, config, options, x, model_output, x0_prev, noise, grad, mscale):
        x_next, x0, thresh = _forward(
            config, options, x, model_output, x0_prev, noise, grad, mscale, None, None
        )
        ctx.config, ctx.options = config, options
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x0_prev, noise, grad))
        ctx.save_for_backward(x, model_output, noise, grad, mscale, thresh)
        return x_next, x0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_x0):
        x, model_output, noise, grad, mscale, thresh = ctx.saved_tensors
        need_x, need_m, need_prev, need_noise, need_grad, need_scale = ctx.needs_input_grad[2:]
        grads = _backward(
            ctx.config, ctx.options, x, model_output, noise, grad, mscale, thresh,
            g_out, g_x0, (need_x, need_m, need_prev, need_noise, need_grad, need_scale),
            ctx.dtypes,
        )  # fmt: skip
        return None, None, *grads


# The kernel arguments of both directions that change from call to call (``_forward_values``)
# and those of the forward alone: _launch takes them in this order.
_INPUT_NAMES = (
    "x_ptr", "m_ptr", "noise_ptr", "grad_ptr", "thresh_ptr", "mscale_ptr", "seed_ptr",
    "table_ptr", "rows_ptr", "guidance_scale", "clip_range",
)  # fmt: skip
_FORWARD_NAMES = (*_INPUT_NAMES, "prev_ptr", "out_ptr", "x0_ptr", "hist_ptr", "last_ptr")
# The forward's switches that differ between its launches, in the order _launch takes them.
_FLAG_NAMES = ("THRESH", "WRITE_OUT", "WRITE_X0", "STD", "MSCALE")


def _forward_values(
    x, model_output, table, rows, seeds, guidance_scale, clip_range, noise, grad, mscale, thresh,
    x0_prev, out, x0_out, history, last_sample,
) -> tuple:  # fmt: skip
    """The values of ``_FORWARD_NAMES``: the inputs read (an absent one stood in for by a
    tensor the kernel does not read), the option scalars, then what only the forward reads
    and writes (a last_sample of no slots, no corrector: not read, x stands in for it)."""
    return (
        x,
        model_output,
        x if noise is None else noise,
        x if grad is None else grad,
        table if thresh is None else thresh,
        table if mscale is None else mscale,
        rows if seeds is None else seeds,
        table,
        rows,
        0.0 if guidance_scale is None else float(guidance_scale),
        0.0 if clip_range is None else float(clip_range),
        x if x0_prev is None else x0_prev,
        out,
        out if x0_out is None else x0_out,
        x if history is None else history,
        x if last_sample is None or not last_sample.numel() else last_sample,
    )


def _input_args(options, x, model_output, noise, grad, mscale, thresh) -> dict:
    """The values of ``_INPUT_NAMES`` by name (the backward's launch binds them)."""
    table, rows, seeds, guidance_scale, clip_range = options[:5]
    values = _forward_values(
        x, model_output, table, rows, seeds, guidance_scale, clip_range, noise, grad, mscale,
        thresh, None, None, None, None, None,
    )  # fmt: skip
    return dict(zip(_INPUT_NAMES, values))


def _like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` laid out like ``x`` within each sample (a copy only when it is not)."""
    return t if same_layout(t, x) else t.contiguous(memory_format=memory_format_of(x))


def _backward(config, options, x, model_output, noise, grad, mscale, thresh, g_out, g_x0,
              needs, dtypes):  # fmt: skip
    """One launch of the backward kernel: the gradients of the Function's inputs."""
    need_x, need_m, need_prev, need_noise, need_grad, need_scale = needs
    gy = _like_x(g_out, x) if g_out is not None else torch.zeros_like(x)
    gx0 = _like_x(g_x0, x) if g_x0 is not None else None
    prev_dtype, noise_dtype, grad_dtype = dtypes
    dx = torch.empty_like(x) if need_x else None
    fmt = torch.contiguous_format if config.channels else memory_format_of(x)
    dm = torch.empty_like(model_output, memory_format=fmt) if need_m else None
    dprev = torch.empty_like(x, dtype=prev_dtype) if need_prev else None
    dnoise = torch.empty_like(x, dtype=noise_dtype) if need_noise else None
    dgrad = torch.empty_like(x, dtype=grad_dtype) if need_grad else None
    dscale = None
    if need_scale:
        dscale = torch.empty(config.batch, x[0].numel(), dtype=torch.float32, device=x.device)
    m_ref = dm if dm is not None else model_output
    learned = config.statics["VAR_MODE"] != 0  # the noise and g scale dL/dv only
    values = {**config.statics, **_FORWARD_ONLY}
    values.update(_input_args(options, x, model_output, noise, grad, mscale, thresh))
    values.update(
        gout_ptr=gy,
        gx0_ptr=gx0,
        dx_ptr=dx,
        dm_ptr=dm,
        dprev_ptr=dprev,
        dnoise_ptr=dnoise,
        dgrad_ptr=dgrad,
        dscale_ptr=dscale,
        gout_bstride=gy.stride(0),
        gx0_bstride=gx0.stride(0) if gx0 is not None else 0,
        dm_bstride=m_ref.stride(0),
        dm_var_off=m_ref.stride(1) * config.channels if config.channels else 0,
        dm_cond_off=config.batch * m_ref.stride(0) if config.statics["CFG"] else 0,
        MSCALE=mscale is not None,
        THRESH=thresh is not None,
        NOISE=config.statics["NOISE"] if learned else 0,
        HAS_GRAD=config.statics["HAS_GRAD"] and learned,
        STD=learned or dnoise is not None or dgrad is not None,
        BACKWARD=True,
        HAS_GX0=gx0 is not None,
        NEED_DX=dx is not None,
        NEED_DM=dm is not None,
        NEED_DPREV=dprev is not None,
        NEED_DNOISE=dnoise is not None,
        NEED_DGRAD=dgrad is not None,
        NEED_DSCALE=dscale is not None,
    )
    _fused_step_kernel[config.grid](**values)
    return dx, dm, dprev, dnoise, dgrad, (dscale.sum(dim=1) if dscale is not None else None)


# -- launch configurations: validation and block sizes once per signature, then a lean launch


class _LaunchConfig:
    """What one input signature needs: its grid, its integer arguments and, once compiled,
    the kernels to launch without Triton's per-call argument binding (which costs tens of
    microseconds for this many arguments and would dominate small latents)."""

    __slots__ = ("batch", "channels", "grid", "statics", "kernels", "arg_lists")

    def __init__(self, batch, channels, grid, statics):
        self.batch = batch
        self.channels = channels
        self.grid = grid
        self.statics = statics
        self.kernels = {}  # by _launch's flags (and extra): the compiled kernel
        self.arg_lists = {}  # by the same key: _argument_order


# What the kernel's other direction reads and writes: None (a constexpr, not launched).
_FORWARD_ONLY = dict.fromkeys(
    "prev_ptr out_ptr x0_ptr hist_ptr last_ptr prev_bstride out_bstride x0_bstride "
    "hist_bstride hist_sstride last_bstride last_sstride".split()
) | {"WRITE_OUT": False, "WRITE_X0": False, "HIST_SLOTS": 0, "HIST_CORRECTOR": False}
_BACKWARD_ONLY = dict.fromkeys(
    "gout_ptr gx0_ptr dx_ptr dm_ptr dprev_ptr dnoise_ptr dgrad_ptr dscale_ptr gout_bstride "
    "gx0_bstride dm_bstride dm_var_off dm_cond_off".split()
) | dict.fromkeys(
    "BACKWARD HAS_GX0 NEED_DX NEED_DM NEED_DPREV NEED_DNOISE NEED_DGRAD NEED_DSCALE".split(), False
)


# A launch that advances no loop (LoopAdvance.kernel_args: one that does).
_NO_ADVANCE = dict.fromkeys(
    "adv_counter_ptr adv_ticket_ptr adv_plan_ptr adv_t_ptr adv_src_ptr adv_dst_ptr "
    "adv_scaled_ptr adv_steps".split()
) | {"ADVANCE": 0}


class LoopAdvance:
    """A graphed loop's state that its step's launch advances (``fused_step(advance=)``,
    ``ADVANCE``), so that an iteration needs no launch of its own for it: the loop's step
    counter (0-d int64), a ticket (int32 ``[1]`` scratch, zero between launches), the plan
    (1-D, ``num_steps`` timesteps) and the 0-d timestep buffer the loop hands its step
    (``plan[counter]``, in the plan's dtype); optionally a per-step value (``set_side``):
    ``side_src[counter]`` written to ``side_dst`` (``[1]``) as well, and the next step's
    model input scaled by it (``set_scaled``: ``scaled = out * side_dst``, Euler's
    ``scale_model_input``, written by the same launch).

    ``out`` is the loop's sample buffer, where its caller may have the step write (the
    kernel reads every element before it writes it). ``launches`` counts the advancing
    launches (the caller resets and reads it: exactly one per iteration, or the loop
    advances by more than one step).

    Example:
        >>> advance = LoopAdvance(counter, ticket, plan, timestep, out=latents)
        >>> fused_step(latents, eps, table, counter.reshape(1), out=latents, advance=advance)
    """

    def __init__(
        self,
        counter: torch.Tensor,
        ticket: torch.Tensor,
        plan: torch.Tensor,
        timestep: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
    ) -> None:
        device = counter.device
        if counter.dtype != torch.int64 or counter.dim() != 0:
            raise ValueError("counter must be a 0-d int64 tensor")
        if ticket.dtype != torch.int32 or ticket.numel() != 1 or ticket.device != device:
            raise ValueError("ticket must be a one-element int32 tensor on the counter's device")
        if plan.dim() != 1 or plan.numel() == 0 or not plan.is_contiguous():
            raise ValueError("plan must be a non-empty contiguous 1-D tensor")
        if timestep.dim() != 0 or timestep.dtype != plan.dtype:
            raise ValueError("timestep must be a 0-d tensor of the plan's dtype")
        if plan.device != device or timestep.device != device:
            raise ValueError("plan and timestep must be on the counter's device")
        self.counter, self.ticket, self.plan, self.timestep = counter, ticket, plan, timestep
        self.num_steps = plan.numel()
        self.out = out
        self.side_src: torch.Tensor | None = None
        self.side_dst: torch.Tensor | None = None
        self.scaled: torch.Tensor | None = None
        self.scaled_reads = 0  # the scaled input handed out (the caller counts and resets)
        self.launches = 0
        self.kernel_args = self._arguments()

    def set_side(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Also write ``src[counter]`` (a contiguous 1-D tensor of at least ``num_steps``
        values, one a plan step) into ``dst`` (one element of ``src``'s dtype) at every
        advance."""
        if src.dim() != 1 or src.numel() < self.num_steps or not src.is_contiguous():
            raise ValueError(f"src must be a contiguous 1-D tensor of >= {self.num_steps} values")
        if dst.numel() != 1 or dst.dtype != src.dtype:
            raise ValueError("dst must be one element of src's dtype")
        if src.device != self.counter.device or dst.device != self.counter.device:
            raise ValueError("src and dst must be on the counter's device")
        self.side_src, self.side_dst = src, dst
        self.kernel_args = self._arguments()

    def set_scaled(self, scaled: torch.Tensor | None) -> None:
        """Also write the next step's model input ``out * side_dst`` (after the advance) into
        ``scaled``, a buffer like ``out`` (same shape, strides, dtype; float32 side values),
        at every advance; the step's launch must then store its sample into ``out``. None:
        no longer."""
        if scaled is not None:
            out, src = self.out, self.side_src
            if out is None or src is None or src.dtype != torch.float32:
                raise ValueError("set_scaled needs out and a float32 per-step value (set_side)")
            if scaled.shape != out.shape or scaled.stride() != out.stride():
                raise ValueError("scaled must have out's shape and strides")
            if scaled.dtype != out.dtype or scaled.device != out.device:
                raise ValueError("scaled must have out's dtype and device")
        self.scaled = scaled
        self.kernel_args = self._arguments()

    def restart(self) -> None:
        """A run's start, from ``out`` holding its first sample and the counter at 0: the
        timestep, the ticket, the per-step value and the model input as the advance leaves
        them before step 0."""
        self.timestep.copy_(self.plan[0])
        self.ticket.zero_()
        if self.side_dst is not None:
            self.side_dst.copy_(self.side_src[:1])
        if self.scaled is not None:
            torch.mul(self.out, self.side_dst, out=self.scaled)

    def leave(self, sample: torch.Tensor) -> None:
        """What an advancing launch leaves in these buffers, done by PyTorch after a step the
        loop advanced itself (``sample``: the step's result; the counter incremented)."""
        at = self.counter.clamp(max=self.num_steps - 1)
        self.timestep.copy_(torch.take(self.plan, at))
        if self.side_dst is not None:
            self.side_dst.copy_(torch.take(self.side_src, at))
        if self.scaled is not None:
            torch.mul(sample, self.side_dst, out=self.scaled)

    def take(self, out: torch.Tensor) -> tuple:
        """The kernel's advance arguments for one launch storing its sample into ``out``,
        counted in ``launches``."""
        if self.scaled is not None and out is not self.out:
            raise ValueError("a launch that writes the scaled model input must store into out")
        self.launches += 1
        return self.kernel_args

    def _arguments(self) -> tuple:
        """The kernel's advance arguments as ``(name, value)`` pairs (``_launch``'s extra)."""
        side = self.side_src is not None
        return (
            ("adv_counter_ptr", self.counter),
            ("adv_ticket_ptr", self.ticket),
            ("adv_plan_ptr", self.plan),
            ("adv_t_ptr", self.timestep),
            ("adv_src_ptr", self.side_src if side else None),
            ("adv_dst_ptr", self.side_dst if side else None),
            ("adv_scaled_ptr", self.scaled),
            ("adv_steps", self.num_steps),
            ("ADVANCE", 3 if self.scaled is not None else 2 if side else 1),
        )


_LAUNCH_CONFIGS: dict = {}
_FAST_LAUNCH = {"enabled": True}


def _launch_config(
    x, model_output, table, rows, x0_prev, noise, seeds, grad, out, x0_out, history,
    last_sample, guided, clip_range,
    variance_mode, x0_noise=False,
) -> _LaunchConfig:  # fmt: skip
    """Check what protects memory (clear errors) and compute the launch constants."""
    if not isinstance(x, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("x and model_output must be tensors")
    _check_dtype("x", x)
    if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor with the batch first, got {tuple(x.shape)}")
    if x.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU); "
            "use backend='reference' for CPU tensors"
        )
    batch = x.shape[0]
    if x.dim() > 1 and not is_dense(x):
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
    hist_slots, corrector = _check_unipc_state(history, last_sample, x0_prev, x, batch)
    if x0_noise and (noise is None and seeds is None or hist_slots):
        raise ValueError("x0_noise needs the step's noise (noise= or seeds=) and no history")

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
        HIST_CORRECTOR=corrector,
        X0_NOISE=bool(x0_noise),
        BLOCK_S=block_s,
        BLOCK_N=block_n,
        **_BACKWARD_ONLY,
        **_NO_ADVANCE,
    )
    statics["STD"] = statics["NOISE"] != 0 or statics["HAS_GRAD"]  # the forward's
    statics["num_warps"] = num_warps
    return _LaunchConfig(batch, channels, grid, statics)


def _check_unipc_state(history, last_sample, x0_prev, x, batch) -> tuple[int, bool]:
    """UniPC's ring ``[S, B, ...]`` and last samples ``[2, B, ...]`` (or ``[0, B, ...]``: no
    corrector), every slot laid out like x; returns S (0 without them) and whether the step
    has the corrector (``HIST_CORRECTOR``)."""
    if history is None and last_sample is None:
        return 0, False
    if history is None or last_sample is None:
        raise ValueError("history and last_sample go together (UniPC)")
    if x0_prev is not None:
        raise ValueError("x0_prev has no place in a UniPC step (its history is the ring)")
    corrector = not (isinstance(last_sample, torch.Tensor) and last_sample.shape[:1] == (0,))
    state = [("history", history, None)] + [("last_sample", last_sample, 2)] * corrector
    for name, t, slots in state:
        if not isinstance(t, torch.Tensor) or t.dim() != x.dim() + 1:
            raise ValueError(f"{name} must be a [slots, B, ...] tensor like x")
        if not 1 <= t.shape[0] <= (slots or UNIPC_MAX_SLOTS) or (slots and t.shape[0] != slots):
            expected = f"{slots} (or 0: no corrector)" if slots else "1 to 4"
            raise ValueError(f"{name} has {t.shape[0]} slots, expected {expected}")
        _check_same_layout(name, t[0], x, batch)
        if t.shape[0] > 1 and t.stride(0) < t[0].numel():
            raise ValueError(f"the slots of {name} overlap (stride {t.stride(0)})")
    if not corrector and last_sample.shape[1:] != x.shape:
        raise ValueError(
            f"last_sample has shape {tuple(last_sample.shape)}, expected {(0, *x.shape)} "
            "(no slots: a ring step without corrector)"
        )
    return history.shape[0], corrector


def _launch(
    config: _LaunchConfig, values: tuple, device: torch.device, flags: tuple, extra: tuple = ()
) -> None:
    """Launch the forward kernel with ``values`` (of ``_FORWARD_NAMES``), ``flags`` (of
    ``_FLAG_NAMES``) and ``extra`` ((name, value) pairs overriding the signature's
    constants): bound by Triton the first time (it compiles and specializes), then through
    :func:`_fast_launch` with the compiled kernel and the arguments put in signature order
    by one C call (``_argument_order``)."""
    key = (flags, extra) if extra else flags
    kernel = config.kernels.get(key)
    if kernel is not None:
        order = config.arg_lists.get(key)
        if order is None:
            order = config.arg_lists[key] = _argument_order(config, flags, extra)
        gather, constants = order
        if _fast_launch(kernel, config.grid, device, gather(values + constants)):
            return
    bound = {**config.statics, **dict(extra), **dict(zip(_FLAG_NAMES, flags))}
    bound.update(zip(_FORWARD_NAMES, values))
    compiled = _fused_step_kernel[config.grid](**bound)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if not _interpreting() and hasattr(triton, "knobs") and hasattr(compiled, "packed_metadata"):
        config.kernels[key] = compiled


def _argument_order(config: _LaunchConfig, flags: tuple, extra: tuple):
    """``(gather, constants)``: ``gather(values + constants)`` is the kernel's argument
    tuple in signature order (``operator.itemgetter``), ``constants`` the values of every
    argument not in ``_FORWARD_NAMES`` (the signature's, these flags', ``extra``; None for
    the backward's pointers)."""
    fixed = {**config.statics, **dict(extra), **dict(zip(_FLAG_NAMES, flags))}
    names = _fused_step_kernel.arg_names
    dynamic = {name: i for i, name in enumerate(_FORWARD_NAMES)}
    others = [name for name in names if name not in dynamic]
    at = {name: len(_FORWARD_NAMES) + i for i, name in enumerate(others)}
    gather = operator.itemgetter(*(dynamic[n] if n in dynamic else at[n] for n in names))
    return gather, tuple(fixed.get(name) for name in others)


def _fast_launch(kernel, grid, device: torch.device, args: tuple) -> bool:
    """Launch a compiled kernel through Triton's private launcher, with the arguments in
    signature order, as Triton's ``JITFunction.run`` does after binding them (the binding
    costs tens of microseconds a call). On a Triton whose launcher differs it warns once,
    switches itself off and returns False: the caller then binds as usual.
    """
    if not _FAST_LAUNCH["enabled"]:
        return False
    try:
        stream = triton.runtime.driver.active.get_current_stream(device.index)
        hooks = triton.knobs.runtime
        # A launch hook or None: Triton 3.6 keeps None there, later Tritons a HookChain that
        # may be empty (calling an empty chain does nothing: None skips the call).
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        if enter is not None and getattr(enter, "calls", True) == []:
            enter = None
        if leave is not None and getattr(leave, "calls", True) == []:
            leave = None
        # The launch metadata is read by the hooks only: Triton's ``launch_metadata``
        # returns None without an enter hook (3.6) or builds it for a chain even when empty
        # (3.9, where it also loads the module: ``kernel.run`` below does that first).
        metadata = None if enter is None else kernel.launch_metadata(grid, stream, *args)
        kernel.run(
            grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, metadata,
            enter, leave, *args,
        )  # fmt: skip
        return True
    except (TypeError, AttributeError) as error:
        _FAST_LAUNCH["enabled"] = False
        warnings.warn(
            f"fastdiff: Triton's compiled-kernel launcher did not take the fused step's "
            f"arguments ({type(error).__name__}: {error}); launching through Triton's "
            "argument binding from now on (correct, slower per call)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

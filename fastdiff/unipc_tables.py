"""UniPC (Zhao et al. 2023) on the fused step: its coefficient tables and its device history ring.

A UniPC step k (in the order of diffusers' ``UniPCMultistepScheduler.step``) corrects the
sample x_k that the last predictor made (UniC, with the new model output), then predicts
x_{k+1} from the corrected sample (UniP); ``fastdiff.reference.unipc_step`` is the math.
Both are linear in x_k (which also converts the model output m into M_k, the x0 or eps
prediction), m, the corrected sample of step k - 1 and the converted outputs M_{k-1},
M_{k-2}, ... of the earlier steps. So one ``fastdiff.kernels.fused_step`` launch applies
both, with one row of a UniPC table (``UNIPC_COLUMNS``):

* The converted outputs live in a device ring of ``solver_order + 1`` slots (step k writes
  slot ``k % S`` and reads the others), the corrected samples in two slots (``k % 2``): no
  Python list of tensors, so a loop of steps can be captured in a CUDA graph, and no step
  overwrites what it reads, so running a step again from the same sample gives the same
  result (what a graph's verification does).
* The orders of step k depend on how many steps the chain has taken before it (``w``, capped
  at ``solver_order``: the warm-up of a multistep method), on ``lower_order_final`` and on
  ``disable_corrector`` (``step_orders``). A table holds one block of rows per ``w``: row
  ``w * block + k``.

Every coefficient is computed on the host in float64, once per plan (``unipc_table``), from
the plan's ``alpha_t`` and ``sigma_t`` (VP: ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``;
rectified flow: ``alpha = 1 - s``, ``sigma = s``).

Example:
    >>> q, p = step_orders(3, 2, 10, solver_order=2, lower_order_final=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import philox, reference
from fastdiff.checks import check_finite_table
from fastdiff.kernels.fused_step import UNIPC_COLUMNS, UNIPC_MAX_SLOTS

__all__ = [
    "MAX_ORDER",
    "UCOL",
    "UniPCHistory",
    "conversion_coefficients",
    "reference_on_ring",
    "ring_slots",
    "step_orders",
    "unipc_table",
]

UCOL = {name: k for k, name in enumerate(UNIPC_COLUMNS)}
MAX_ORDER = UNIPC_MAX_SLOTS - 1


def ring_slots(solver_order: int) -> int:
    """Slots of the ring of converted outputs: ``solver_order + 1`` (one more than a step
    reads, so the one it writes is not among them)."""
    return solver_order + 1


def step_orders(
    k: int,
    w: int,
    num_steps: int,
    solver_order: int,
    lower_order_final: bool,
    disable_corrector: Sequence[int] = (),
) -> tuple[int, int]:
    """The corrector order q and the predictor order p of step k, as diffusers'
    ``UniPCMultistepScheduler.step`` sets them.

    The predictor of step j has order ``min(cap_j, w_j + 1)`` with ``w_j`` the steps the
    chain took before j (capped at ``solver_order``) and ``cap_j = min(solver_order,
    num_steps - j)`` with ``lower_order_final`` (else ``solver_order``). The corrector of
    step k re-takes step k - 1 at that step's order; it is off on a chain's first step and
    where ``k - 1`` is in ``disable_corrector``.

    Args:
        k: the step index.
        w: earlier steps of the chain, capped at ``solver_order``.
        num_steps: steps in the plan.
        solver_order: 1 to 3.
        lower_order_final: lower the order on the last steps.
        disable_corrector: step indices whose correction (applied at the next step) is off.

    Returns:
        ``(q, p)``; q = 0 without corrector.
    """

    def cap(j: int) -> int:
        return min(solver_order, num_steps - j) if lower_order_final else solver_order

    p = min(cap(k), w + 1)
    q = 0 if w == 0 or (k - 1) in disable_corrector else min(cap(k - 1), w)
    return q, p


def conversion_coefficients(
    alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str, predict_x0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = c_x x + c_m m``: the converted output of ``fastdiff.reference.unipc_convert``
    (x0 with ``predict_x0``, else eps) as coefficients of the sample and the model output,
    for the point ``x = alpha x0 + sigma eps`` (float64 tensors [n])."""
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    if predict_x0:
        return {
            "epsilon": (1.0 / alpha, -sigma / alpha),
            "sample": (zero, one),
            "v_prediction": (alpha, -sigma),
            "flow_prediction": (one, -sigma),
        }[prediction_type]
    return {
        "epsilon": (zero, one),
        "sample": (1.0 / sigma, -alpha / sigma),
        "v_prediction": (sigma, alpha),
        "flow_prediction": (one, alpha),
    }[prediction_type]


def _update_coefficients(lam, alpha_t, sigma_t, alpha_s, sigma_s, predict_x0, solver_type, new):
    """The update (*) of ``fastdiff.reference`` from s to t as coefficients over rows (1-D
    float64 tensors): ``x_t = ratio x_s + c_0 M_s + sum_m c_m M_{s_m} [+ c_new M_t]``.

    ``lam = (lambda_t, lambda_s, lambda_{s_1}, ...)``; ``new``: the corrector (UniC).
    Returns ``(ratio, c_0, [c_1, ...], c_new or None)``.
    """
    h = lam[0] - lam[1]
    hh = -h if predict_x0 else h
    if predict_x0:
        ratio, a_t = sigma_t / sigma_s, alpha_t
        first = sigma_t * alpha_s / sigma_s - alpha_t  # alpha_t (e^-h - 1), finite at the ends
    else:
        ratio, a_t = alpha_t / alpha_s, sigma_t
        first = alpha_t * sigma_s / alpha_s - sigma_t  # sigma_t (e^h - 1)
    c_0 = -first
    earlier, c_new = [], None
    if len(lam) > 2 or new:
        ratios = [((lam_m - lam[1]) / h)[:, None] for lam_m in lam[2:]]
        r = torch.cat([*ratios, h.new_zeros((len(h), 0))], dim=-1)  # r_m, m = 1..p-1
        rhos = reference.unipc_rhos(r, hh, len(lam) - 1, solver_type, corrector=new)
        gain = a_t * reference.unipc_b(hh, solver_type)  # A_t B(hh)
        for m in range(r.shape[-1]):  # D_m = (M_{s_m} - M_s) / r_m
            weight = gain * (rhos[:, m] / r[:, m])
            earlier.append(-weight)
            c_0 = c_0 + weight
        if new:
            c_new = -gain * rhos[:, -1]
            c_0 = c_0 + gain * rhos[:, -1]
    return ratio, c_0, earlier, c_new


def unipc_table(
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    conversion: tuple[torch.Tensor, torch.Tensor],
    *,
    solver_order: int,
    solver_type: str,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Sequence[int] = (),
    processed: bool = False,
    poison_rows: bool = False,
) -> torch.Tensor:
    """The UniPC coefficient table of a plan (``UNIPC_COLUMNS``; see the module docstring).

    Row ``w * block + k`` is step k after w earlier steps of the chain (``block = n``, or
    ``n + 1`` with ``poison_rows``: a NaN row at the end of each block). Its columns: the
    conversion ``x0_x, x0_m`` of step k; the corrector (UniC) of step k: ``uc_x`` (1 without
    corrector), ``uc_last``, ``uc_new`` and ``uc_h{slot}``; the predictor (UniP) from the
    corrected sample to k + 1, with the corrected sample expanded into its terms: ``x``,
    ``m`` (or ``x0``, of M_k, when M is processed), ``up_last`` and ``up_h{slot}``;
    ``hist_slot = k % S`` and ``last_slot = k % 2``. Rows that no chain reaches (w > k) are
    NaN.

    Args:
        alpha, sigma: float64 [n + 1]: the n steps' points and the final one (sigma 0: clean).
        conversion: ``(x0_x, x0_m)`` float64 [n] (``conversion_coefficients``).
        solver_order, solver_type, predict_x0, lower_order_final, disable_corrector: UniPC's
            options (diffusers' names).
        processed: M is clipped or thresholded (not linear in x and m): the next sample takes
            it as it is, else its terms ``x0_x x + x0_m m`` are folded in.
        poison_rows: end each block with a NaN row (the drop-in's index past the plan).

    Returns:
        float64 ``[(solver_order + 1) * block, len(UNIPC_COLUMNS)]``.

    Raises:
        ValueError: a reachable coefficient is not finite (the plan and options do not fit).
    """
    n = len(alpha) - 1
    lam = torch.log(alpha) - torch.log(sigma)  # +inf at sigma = 0
    slots = ring_slots(solver_order)
    block = n + int(poison_rows)
    table = torch.full(((solver_order + 1) * block, len(UNIPC_COLUMNS)), float("nan"))
    table = table.to(torch.float64)
    x0_x, x0_m = conversion
    for w in range(solver_order + 1):
        groups: dict[tuple[int, int], list[int]] = {}
        for k in range(w, n):
            orders = step_orders(k, w, n, solver_order, lower_order_final, disable_corrector)
            groups.setdefault(orders, []).append(k)
        for (q, p), ks in groups.items():
            k = torch.tensor(ks)
            rows = torch.zeros(len(ks), len(UNIPC_COLUMNS), dtype=torch.float64)
            at = torch.arange(len(ks))

            def put(name: str, lag: int, value: torch.Tensor, rows=rows, k=k, at=at) -> None:
                rows[at, UCOL[f"{name}0"] + (k - lag) % slots] += value

            rows[:, UCOL["x0_x"]], rows[:, UCOL["x0_m"]] = x0_x[k], x0_m[k]
            if q:  # UniC-q: step k - 1 -> k again, with M_k
                points = [k, k - 1, *(k - 1 - i for i in range(1, q))]
                ratio, c_0, earlier, c_new = _update_coefficients(
                    [lam[j] for j in points],
                    alpha[k],
                    sigma[k],
                    alpha[k - 1],
                    sigma[k - 1],
                    predict_x0,
                    solver_type,
                    new=True,
                )
                rows[:, UCOL["uc_last"]], rows[:, UCOL["uc_new"]] = ratio, c_new
                put("uc_h", 1, c_0)
                for i, c in enumerate(earlier, start=1):
                    put("uc_h", 1 + i, c)
            else:
                rows[:, UCOL["uc_x"]] = 1.0
            # UniP-p: the corrected sample at k -> k + 1
            points = [k + 1, k, *(k - i for i in range(1, p))]
            ratio, c_0, earlier, _ = _update_coefficients(
                [lam[j] for j in points],
                alpha[k + 1],
                sigma[k + 1],
                alpha[k],
                sigma[k],
                predict_x0,
                solver_type,
                new=False,
            )
            # x_next = ratio x_c + c_0 M_k + sum_i c_i M_{k-i}, with x_c expanded (and M_k too,
            # unless clipped or thresholded): terms that cancel then cancel here, in float64
            corrector = rows[:, UCOL["uc_h0"] : UCOL["uc_h0"] + slots]
            rows[:, UCOL["up_h0"] : UCOL["up_h0"] + slots] = ratio[:, None] * corrector
            for i, c in enumerate(earlier, start=1):
                put("up_h", i, c)
            rows[:, UCOL["up_last"]] = ratio * rows[:, UCOL["uc_last"]]
            on_m = ratio * rows[:, UCOL["uc_new"]] + c_0  # of M_k
            rows[:, UCOL["x"]] = ratio * rows[:, UCOL["uc_x"]]
            if processed:
                rows[:, UCOL["x0"]] = on_m
            else:
                rows[:, UCOL["x"]] += on_m * x0_x[k]
                rows[:, UCOL["m"]] = on_m * x0_m[k]
            rows[:, UCOL["hist_slot"]] = (k % slots).double()
            rows[:, UCOL["last_slot"]] = (k % 2).double()
            check_finite_table(
                rows,
                UNIPC_COLUMNS,
                lambda row, ks=ks, w=w, q=q, p=p: (
                    f"UniPC step {ks[row]} (after {w} steps, corrector order {q}, predictor "
                    f"order {p})"
                ),
                "the plan's noise levels and the options do not fit (a step of zero or "
                "infinite log-SNR length at this order)",
            )
            table[w * block + k] = rows
    return table


class UniPCHistory:
    """The device state of UniPC chains: for each layout of the sample (device, shape, memory
    format, dtype), a ring ``[S, B, ...]`` of converted outputs and the corrected samples
    ``[2, B, ...]``, every slot laid out like the sample, zero-initialized.

    Args:
        slots: S, the ring's length (``ring_slots(solver_order)``).
        last_slots: the corrected samples' slots: 2, or 0 for a ring without UniPC's
            corrector (DPM-Solver++ 3M: ``[0, B, ...]``, which ``fused_step`` reads as no
            corrector).
    """

    def __init__(self, slots: int, last_slots: int = 2) -> None:
        if last_slots not in (0, 2):
            raise ValueError(f"last_slots must be 2 (UniPC) or 0 (no corrector), got {last_slots}")
        self.slots = slots
        self.last_slots = last_slots
        self._buffers: dict = {}

    def buffers(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring and the last-sample slots for samples like ``x``, stored in ``dtype``."""
        fmt = philox.memory_format_of(x)
        key = (x.device, tuple(x.shape), fmt, dtype)
        found = self._buffers.get(key)
        if found is None:
            batch, rest = x.shape[0], tuple(x.shape[1:])

            def alloc(count: int) -> torch.Tensor:
                t = torch.empty((count * batch, *rest), dtype=dtype, device=x.device)
                if fmt != torch.contiguous_format:
                    t = torch.empty_like(t, memory_format=fmt)
                return t.zero_().view(count, batch, *rest)

            found = self._buffers[key] = (alloc(self.slots), alloc(self.last_slots))
        return found

    def clear(self) -> None:
        """Zero every buffer (a chain's start: its unused slots are then multiplied by 0 and
        must be finite). Device fills, no host sync."""
        for ring, last in self._buffers.values():
            ring.zero_()
            last.zero_()


def reference_on_ring(
    x: torch.Tensor,
    model_output: torch.Tensor,
    k: int,
    orders: tuple[int, int],
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    ring: torch.Tensor,
    last: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step k on the reference backend (``fastdiff.reference.unipc_step``) with the history
    in the ring and slots the kernel uses, which it updates as the kernel does.

    Args:
        x, model_output: the step's inputs (the reference's compute dtype).
        k: the step index.
        orders: ``(q, p)`` of ``step_orders``.
        alpha, sigma: the plan's points, float64 [n + 1].
        ring, last: ``UniPCHistory.buffers`` in the compute dtype.
        **options: ``unipc_step``'s predict_x0, solver_type, prediction_type, clip_range,
            thresholding.

    Returns:
        ``(x_next, M_k)``.
    """
    q, p = orders
    depth = max(q, p - 1)
    slots = ring.shape[0]
    points = [k + 1, k, *(k - j for j in range(1, depth + 1))]
    x_next, corrected, converted = reference.unipc_step(
        x,
        model_output,
        [float(alpha[j]) for j in points],
        [float(sigma[j]) for j in points],
        history=[ring[(k - j) % slots] for j in range(1, depth + 1)],
        last_sample=last[(k - 1) % 2] if q else None,
        corrector_order=q,
        predictor_order=p,
        **options,
    )
    ring[k % slots].copy_(converted)
    last[k % 2].copy_(corrected)
    return x_next, converted

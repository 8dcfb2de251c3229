"""UniPC (Zhao et al. 2023) on the fused step: its coefficient tables, its device history and
the native ``UniPCSampler``.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import checks, philox, reference
from fastdiff.kernels.fused_step import COLUMNS, UNIPC_COLUMNS, UNIPC_MAX_SLOTS
from fastdiff.samplers import Sampler, StepOutput
from fastdiff.stepping import run_step

__all__ = [
    "UCOL",
    "UniPCHistory",
    "UniPCMixin",
    "UniPCSampler",
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
            bad = ~torch.isfinite(rows)
            if bad.any():
                row, col = (int(v) for v in bad.nonzero()[0])
                raise ValueError(
                    f"UniPC coefficient {UNIPC_COLUMNS[col]!r} of step {ks[row]} (after {w} "
                    f"steps, corrector order {q}, predictor order {p}) is not finite: the plan's "
                    "noise levels and the options do not fit (a step of zero or infinite "
                    "log-SNR length at this order)"
                )
            table[w * block + k] = rows
    return table


class UniPCHistory:
    """The device state of UniPC chains: for each layout of the sample (device, shape, memory
    format, dtype), a ring ``[S, B, ...]`` of converted outputs and the corrected samples
    ``[2, B, ...]``, every slot laid out like the sample, zero-initialized.

    Args:
        slots: S, the ring's length (``ring_slots(solver_order)``).
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
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

            found = self._buffers[key] = (alloc(self.slots), alloc(2))
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


class UniPCMixin:
    """UniPC (Zhao et al. 2023) on a ``fastdiff.Sampler``'s plan: the corrector of each step
    and the predictor of the next in one fused launch, with the multistep history in device
    buffers that the sampler owns (see the module docstring). Mixed in before a sampler base
    that provides the plan; the class provides :meth:`noise_levels` (the plan's alpha_t and
    sigma_t), e.g. ``UniPCSampler`` (VP).

    Drive it as any sampler (``fastdiff.sample``, ``SamplingGraph``): ``step(x, m, i)``. With a
    python int ``i``, a step that does not follow the previous one (``i != previous + 1``)
    starts a new chain there (first order, no corrector), so full and truncated chains need
    nothing more. With a tensor ``i`` (captured loops, per-sample steps) the sampler cannot
    see where a chain starts: it is the step given to :meth:`begin_chain` (default 0).

    Args:
        *args: the sampler base's (schedule, steps).
        solver_order: 1 to 3 (the predictor's order; the corrector adds one).
        solver_type: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).
        predict_x0: keep data predictions (True: the data-prediction UniPC, with clipping and
            thresholding available) or noise predictions.
        lower_order_final: lower the order on the last steps (the last one is first order).
        disable_corrector: step indices whose correction, applied at the next step, is off.
        **kwargs: the sampler base's (prediction_type, clip_sample_range, thresholding,
            conditioning, backend, ...).
    """

    multistep = False  # the loop passes no x0_prev: the history is the sampler's own
    _history_on_device = True  # no Python-side history is read by a step

    def __init__(
        self,
        *args,
        solver_order: int = 2,
        solver_type: str = "bh2",
        predict_x0: bool = True,
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        **kwargs,
    ) -> None:
        if isinstance(solver_order, bool) or solver_order not in range(1, MAX_ORDER + 1):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        self.solver_order = int(solver_order)
        self.solver_type = checks.check_choice(
            "solver_type", solver_type, reference.UNIPC_SOLVER_TYPES
        )
        self.predict_x0 = bool(predict_x0)
        self.lower_order_final = bool(lower_order_final)
        if not all(isinstance(j, int) and not isinstance(j, bool) for j in disable_corrector):
            raise TypeError(f"disable_corrector must be step indices, got {disable_corrector!r}")
        self.disable_corrector = tuple(disable_corrector)
        if not self.lower_order_final and self.solver_order > 1:
            raise ValueError(
                "lower_order_final=False with solver_order > 1: the last step, to clean data, "
                "has an infinite log-SNR length and diverges above first order"
            )
        if not self.predict_x0 and (
            kwargs.get("clip_sample_range") is not None or kwargs.get("thresholding") is not None
        ):
            raise ValueError(
                "clip_sample_range / thresholding process x0: they need predict_x0=True"
            )
        self._history = UniPCHistory(ring_slots(self.solver_order))
        self._next: int | None = None  # the step index that continues the chain
        self._done = 0  # steps of the current chain (capped at solver_order)
        self._chain_start = 0  # where chains of tensor-indexed steps start
        self._unipc_cache: dict = {}
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_steps}, solver_order={self.solver_order}, "
            f"solver_type={self.solver_type!r}, predict_x0={self.predict_x0}, "
            f"prediction_type={self.prediction_type!r}, backend={self.backend!r})"
        )

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` of the plan's steps and of the clean end (sigma 0): float64
        CPU tensors ``[num_steps + 1]``, the points of ``unipc_table``."""
        raise NotImplementedError

    # -- the table --------------------------------------------------------------------------

    def _build_table(self) -> torch.Tensor:
        alpha, sigma = self.noise_levels()
        conversion = conversion_coefficients(
            alpha[:-1], sigma[:-1], self.prediction_type, self.predict_x0
        )
        try:
            self.unipc_table = unipc_table(
                alpha,
                sigma,
                conversion,
                solver_order=self.solver_order,
                solver_type=self.solver_type,
                predict_x0=self.predict_x0,
                lower_order_final=self.lower_order_final,
                disable_corrector=self.disable_corrector,
                processed=self.predict_x0
                and (self.clip_sample_range is not None or self.thresholding is not None),
            )
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: {err} (a plan that starts at alpha_bar = 0, zero "
                "terminal SNR, needs solver_type='bh2' and solver_order <= 2)"
            ) from None
        # The base table: the sampler's own columns of a chain started at step 0.
        n = len(alpha) - 1
        rows = torch.arange(n) + n * torch.clamp(torch.arange(n), max=self.solver_order)
        return self.unipc_table[rows, : len(COLUMNS)].clone()

    def _unipc_tables(self, device: torch.device) -> dict:
        """Device copies (float32) of the UniPC table: ``full`` with its ``row_views``, and the
        ``active`` table of tensor-indexed steps (row k: step k of a chain started at
        ``begin_chain``'s step)."""
        cached = self._unipc_cache.get(device)
        if cached is None:
            full = self.unipc_table.to(device=device, dtype=torch.float32).contiguous()
            rows = torch.arange(len(full), dtype=torch.int64, device=device)
            cached = self._unipc_cache[device] = {
                "full": full,
                "row_views": [rows[j : j + 1] for j in range(len(full))],
                "active": {},
            }
        start = self._chain_start
        if start not in cached["active"]:
            n = self.num_steps
            k = torch.arange(n)
            w = torch.clamp(k - start, min=0, max=self.solver_order)
            cached["active"][start] = cached["full"][(w * n + k).to(device)].contiguous()
        return cached

    # -- the chain ---------------------------------------------------------------------------

    def begin_chain(self, start: int = 0) -> None:
        """Start a new chain at step ``start``: its history is cleared, its first step is first
        order without corrector. Steps with a python int index call it themselves when they
        do not follow the previous step; a loop over tensor step indices (a CUDA graph)
        calls it before its first step.

        Args:
            start: the chain's first step index.
        """
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int, got {type(start).__name__}")
        if not 0 <= start < self.num_steps:
            raise IndexError(f"start {start} outside [0, {self.num_steps})")
        self._history.clear()
        self._chain_start = start
        self._next, self._done = start, 0

    def graph_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The device buffers a step on samples like ``x`` reads and writes besides x (the
        ring and the last corrected samples, allocated here if new): what a CUDA graph of
        several steps must save and restore with x to re-run them (its verification).

        Args:
            x: a sample like the loop's (shape, dtype, device, memory format).

        Returns:
            ``[ring, last]``.
        """
        return list(self._history.buffers(x, x.dtype))

    def _host_position(self, i) -> tuple[int, int]:
        """(k, w) of a step whose index is a python int: the chain bookkeeping on the host."""
        if i != self._next:
            self._history.clear()
            self._next, self._done = i, 0
        w = self._done
        self._next, self._done = i + 1, min(w + 1, self.solver_order)
        return i, w

    def _tensor_position(self, i: torch.Tensor) -> tuple[int, int]:
        """(k, w) of a tensor step index on the reference backend (reads it on the host; the
        kernel path never does): one index for the whole batch."""
        values = i.reshape(-1).tolist()
        if len(set(values)) != 1:
            raise ValueError(
                f"the reference backend of {type(self).__name__} takes one step index a batch"
            )
        k = values[0]
        if k < self._chain_start:
            raise ValueError(f"step {k} is before the chain's start {self._chain_start}")
        return k, min(k - self._chain_start, self.solver_order)

    # -- the step ----------------------------------------------------------------------------

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        i: int | torch.Tensor,
        *,
        x0_prev: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        grad: torch.Tensor | None = None,
        return_x0: bool = True,
        out: torch.Tensor | None = None,
        x0_out: torch.Tensor | None = None,
    ) -> StepOutput:
        """One UniPC step at index ``i``: the corrector of the sample the last step made, and
        the predictor to step ``i + 1`` (or to clean data after the last step); the contract
        of ``Sampler.step``.

        Args:
            x, model_output, i, guidance_scale, guidance_rescale, out: as ``Sampler.step``.
            x0_prev, noise, seeds: ignored (UniPC is deterministic and keeps its own history).
            grad: refused (no variance to scale a classifier gradient by).
            return_x0: also return the step's x0 (data prediction only; one more pass).
            x0_out: preallocated x0 output (data prediction only).

        Returns:
            StepOutput(prev_sample, pred_original_sample): x0 with ``predict_x0`` and
            ``return_x0``, else None.

        Example:
            >>> for i in range(sampler.num_steps):
            ...     x = sampler.step(x, model(x, sampler.model_condition(i, 4, x.device)), i,
            ...                      return_x0=False).prev_sample
        """
        if not isinstance(x, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("x and model_output must be tensors")
        if not x.is_floating_point() or not model_output.is_floating_point():
            raise TypeError(
                f"x and model_output must be floating point, got {x.dtype}, {model_output.dtype}"
            )
        i = self._step_index(i, x.shape[0], x.device)
        if grad is not None:
            raise ValueError(
                "classifier guidance shifts the mean by variance x gradient; UniPC's step has "
                "no variance (use DDPM, DDIM with eta > 0 or Euler ancestral)"
            )
        guidance_scale, guidance_rescale = checks.check_guidance(guidance_scale, guidance_rescale)
        if x0_out is not None and not self.predict_x0:
            raise ValueError("predict_x0=False keeps noise predictions: there is no x0 to write")
        want_x0 = self.predict_x0 and (return_x0 or x0_out is not None)
        tables = self._unipc_tables(x.device)
        if isinstance(i, int):
            position = self._host_position(i)
            k, w = position
            table, rows = tables["full"], tables["row_views"][w * self.num_steps + k]
        else:
            position = None  # the kernel reads it from the device; the reference on the host
            table, rows = tables["active"][self._chain_start], i.reshape(-1)
        ring, last = self._history.buffers(x, x.dtype)

        def reference_step(xr, m, _x0_prev, _noise, _grad):
            self._position = position if position is not None else self._tensor_position(i)
            x_next, x0 = self._reference_step(xr, m, None, i, None, None, None)
            return x_next.to(x.dtype), x0.to(x.dtype)  # the ring is written in x's dtype

        x_next, x0 = run_step(
            self.backend,
            x,
            model_output,
            table,
            rows,
            reference_step,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            clip_range=self.clip_sample_range,
            thresholding=self.thresholding,
            out=out,
            x0_out=x0_out,
            write_x0=want_x0,
            history=ring,
            last_sample=last,
        )
        return StepOutput(x_next, x0)

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        """The reference path: ``fastdiff.reference.unipc_step`` on this step's schedule values,
        with the history in the same ring and slots as the kernel's (compute dtype)."""
        k, w = self._position
        orders = step_orders(
            k, w, self.num_steps, self.solver_order, self.lower_order_final, self.disable_corrector
        )
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return reference_on_ring(
            x,
            m,
            k,
            orders,
            *self.noise_levels(),
            *self._history.buffers(x, dtype),
            predict_x0=self.predict_x0,
            solver_type=self.solver_type,
            prediction_type=self.prediction_type,
            clip_range=self.clip_sample_range if self.predict_x0 else None,
            thresholding=self.thresholding if self.predict_x0 else None,
        )


class UniPCSampler(UniPCMixin, Sampler):
    """UniPC (Zhao et al. 2023) in VP space (``UniPCMixin`` on a ``Sampler`` plan):
    ``alpha_t = sqrt(ab_t)``, ``sigma_t = sqrt(1 - ab_t)``, then clean data.

    Args:
        schedule: the model's noise schedule.
        steps: see ``Sampler`` (trailing or linspace spacing suit it best).
        solver_order, solver_type, predict_x0, lower_order_final, disable_corrector: see
            ``UniPCMixin``.
        **kwargs: ``Sampler``'s (prediction_type, timestep_spacing, clip_sample_range,
            thresholding, conditioning, backend, ...).

    Example:
        >>> sampler = UniPCSampler(schedule, 10, timestep_spacing="trailing")
        >>> x = fastdiff.sample(model, sampler, shape=(4, 3, 32, 32), seed=0)
    """

    def __init__(self, schedule, steps=20, **kwargs) -> None:
        super().__init__(schedule, steps, **kwargs)

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        ab = torch.cat([self.alpha_bar, self.alpha_bar_next[-1:]])
        return ab.sqrt(), (1.0 - ab).sqrt()

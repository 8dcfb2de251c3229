"""DPM-Solver++ 3M's x0 ring (``solver_order=3``) for the fused DPM-Solver drop-in: the
persistent ``[3, B, ...]`` ring of the last x0s that the kernel reads as UniPC's history
without corrector, its phase, and the rows of each phase."""

from __future__ import annotations

import torch

from fastdiff import unipc_tables


class DPMRingMixin:
    """The ring's state and rows (``FusedDPMSolverMultistepScheduler``: its ``_ring_history``,
    ``_ring_slots``, ``_ring_phase``, ``model_outputs``, ``lower_order_nums`` and row
    lookups)."""

    def _third_order_state(self, tabs: dict, x: torch.Tensor, x0_dtype: torch.dtype, n: int):
        """``solver_order=3``: the rows (of the block ``lower_order_nums`` picks, or of the
        device chain), the kernel's rows (of the ring's phase block), the previous x0s the
        reference reads (a callable: read only there), x0's slot of the ring with a host
        index (the step's x0, which the kernel writes once, as the ring's new slot; None
        with a device index), the kernel's ``history`` / ``last_sample`` (no slots: no
        corrector) and the reference path's ``store`` of x0 into its slot.

        The ring holds the x0 of step k in slot ``(k + phase) % 3``. With a host index the
        phase is read off ``model_outputs``: the newest previous x0 that is a ring slot (or
        None: a device step's, in the ring at the current phase) fixes it, so a step taken
        again (the list shifted, its x0s one slot on) reads the ring as it lies; a previous
        x0 held elsewhere (a list the caller replaced) is copied into its slot (at most one
        copy reads a slot, never one another copy writes). With a device index the slot is
        known on the device only, at the phase of the last host step: the kernel writes x0
        to its slot (no slot returned, ``model_outputs`` gets None), the reference path copies
        it there.

        Example:
            >>> rows, kernel_rows, prevs, x0_slot, history, store = self._third_order_state(
            ...     tabs, x, torch.float32, n)
        """
        index = self._step_index
        done = self.lower_order_nums
        ring, slots, last = self._ring(x, x0_dtype)
        if done == 0:
            self._ring_history.clear()  # the chain's start: unread slots are multiplied by 0
            self._ring_phase = 0
        kernel = {"history": ring, "last_sample": last, "write_x0": False}
        lags = range(1, min(done, 2) + 1)
        if not isinstance(index, torch.Tensor):
            offset = (n + 1, 2 * n + 2)[done] if done < 2 else 0
            rows = self._index_rows(tabs, offset=offset)
            kept = {lag: self._kept_x0(index, lag, slots) for lag in lags}
            phase = self._ring_phase_of(index, kept, slots)
            self._ring_phase = phase
            prevs = [slots[(index - lag + phase) % 3] for lag in lags]
            for lag, prev in zip(lags, prevs):
                if kept[lag] is not prev:
                    prev.copy_(kept[lag])
            x0_slot = slots[(index + phase) % 3]
            kernel_rows = self._phase_rows(tabs, rows, index + offset, phase)
            return rows, kernel_rows, (lambda: prevs), x0_slot, kernel, x0_slot.copy_
        phase = self._ring_phase
        rows = self._device_chain_rows(tabs, index, done == 0, n)
        kernel_rows = rows + phase * len(tabs["order"]) if phase else rows
        positions: dict[int, torch.Tensor] = {}

        def position(lag: int) -> torch.Tensor:  # the slot of step index - lag, on the device
            if lag not in positions:  # (made where read only: the kernel path reads none)
                positions[lag] = (index + (phase - lag)).remainder(3).reshape(1)
            return positions[lag]

        for lag in lags:
            kept = self.model_outputs[-lag]
            if kept is not None and not any(kept is slot for slot in slots):
                ring.index_copy_(0, position(lag), kept.unsqueeze(0).to(ring.dtype))

        def prevs():
            return [ring.index_select(0, position(lag))[0] for lag in lags]

        def store(x0):  # the reference path's x0 into its slot (the kernel writes it itself)
            ring.index_copy_(0, position(0), x0.unsqueeze(0).to(ring.dtype))

        return rows, kernel_rows, prevs, None, kernel, store

    def _kept_x0(self, index: int, lag: int, slots: list[torch.Tensor]) -> torch.Tensor:
        """The x0 of step ``index - lag`` as ``model_outputs`` keeps it; None there (a device
        step's x0) is its ring slot at the current phase."""
        kept = self.model_outputs[-lag]
        return slots[(index - lag + self._ring_phase) % 3] if kept is None else kept

    def _ring_phase_of(self, index: int, kept: dict, slots: list[torch.Tensor]) -> int:
        """The ring phase of a host step: that of the newest kept x0 that is a ring slot
        (slot s holding step ``index - lag``: ``(s - index + lag) % 3``), else the current
        one (a chain's first step, or a history held outside the ring)."""
        for lag, tensor in kept.items():
            for s, slot in enumerate(slots):
                if tensor is slot:
                    return (s - index + lag) % 3
        return self._ring_phase

    def _phase_rows(self, tabs: dict, rows: torch.Tensor, row: int, phase: int):
        """The kernel's rows of a host step (``rows``, the view of table row ``row``):
        ``rows`` itself at phase 0, else the row's copy in the phase's block of the history
        table (a view made once per row). The in-kernel noise is keyed by the row: a step
        taken again at another phase draws other Philox noise (a loop stays at phase 0)."""
        if not phase:
            return rows
        row += phase * len(tabs["order"])
        views = tabs["row_views"]
        view = views.get(("history", row))
        if view is None:
            view = views[("history", row)] = tabs["history_rows"][row : row + 1]
        return view

    def _ring(self, x: torch.Tensor, dtype: torch.dtype):
        """The persistent x0 ring ``[3, B, ...]`` of samples like ``x`` in ``dtype`` (each slot
        laid out like x: ``unipc_tables.UniPCHistory``), its slot views (made once:
        ``model_outputs`` holds them) and the kernel's last-sample state of no slots (a ring
        step without UniPC's corrector)."""
        if self._ring_history is None:
            self._ring_history = unipc_tables.UniPCHistory(3, last_slots=0)
        ring, last = self._ring_history.buffers(x, dtype)
        slots = self._ring_slots.get(ring.data_ptr())
        if slots is None:
            slots = self._ring_slots[ring.data_ptr()] = list(ring.unbind(0))
        return ring, slots, last

"""The plan and the tables of the fused diffusers schedulers (mixed into
``FusedSchedulerMixin``): diffusers' plan kept on the host after ``set_timesteps``, the
coefficient tables built from it once per step-time options and uploaded once per device,
and the table rows a step reads.

Rows and host syncs. A row is chosen either on the host (a python int step index or
timestep: a slice of a cached device ``arange``, no copy) or on the device (a timestep given
as a CUDA tensor: integer arithmetic or a gather on the device, never ``nonzero()`` or
``.item()``). Tables end in NaN "poison" rows that a timestep missing from the plan maps to,
so a device lookup that finds nothing gives NaN instead of a silently wrong step.

Example:
    >>> tabs = self._device_tables(("ddim", eta), x.device, lambda: self._build(eta))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.diffusers._common import upload
from fastdiff.kernels.fused_step import COLUMNS

__all__ = ["PlanTablesMixin"]


class PlanTablesMixin:
    """The plan on the host and the device tables (see the module docstring)."""

    def _planning_device(self, device: torch.device | str | None) -> torch.device | str | None:
        """The device to hand diffusers' set_timesteps: None (plan on the host; ``_plan_changed``
        then uploads the timesteps, asynchronously, and nothing is read back from the device)
        unless diffusers computes plan values on the device."""
        return None

    def _plan_changed(self, device: torch.device | str | None) -> None:
        """After diffusers' set_timesteps: keep the plan's values on the host (python floats
        or ints, and the host tensor), put ``self.timesteps`` where the caller wants it, draw
        a new noise seed at the next stochastic step. Tables are kept when the plan is the
        same as before (a loop that calls set_timesteps again, e.g. before a CUDA graph
        capture, uploads nothing)."""
        host = self.timesteps
        planned_on_host = host.is_cpu
        if not planned_on_host:  # planned on the device (``_planning_device``)
            host = host.cpu()
        sigmas = vars(self).get("sigmas")  # (getattr of a missing attribute costs microseconds)
        values = host.tolist()
        state = (values, host.dtype, self._plan_signature())
        previous = self._plan_sigmas
        same = state == self._plan_state and (
            previous is sigmas
            or (sigmas is not None and previous is not None and torch.equal(sigmas, previous))
        )
        if planned_on_host and device is not None:
            # the same plan on the same device: the uploaded timesteps again (no copy)
            target = torch.device(device)
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
            kept = self._plan_tensor if same else None
            if kept is not None and kept.device == target and kept.dim() == 1:
                self.timesteps = kept
            else:
                self.timesteps = upload(host, target)
        if not same:
            self._tables.clear()
            self._launches.clear()  # (keyed by the tables, among others)
            self._last_tables = None
            self._plan_device.clear()
        self._plan_state = state
        self._plan_host = host
        # diffusers' set_timesteps makes new sigmas each time (it never changes them in place)
        self._plan_sigmas = sigmas
        self._plan_values = values
        self._plan_len = len(values)
        plan = self.timesteps  # the tensor the pipeline iterates
        if plan is not self._plan_tensor:  # (the same tensor kept: the same address)
            self._plan_tensor = plan
            self._plan_address = (
                plan.data_ptr(),
                plan.stride(0) * plan.element_size() if plan.dim() == 1 else 0,
                plan.dtype,
                plan.device,
            )
        self._seeds_cache.clear()
        self._seed = None

    def _plan_signature(self) -> tuple:
        """Plan state besides the timesteps and sigmas that the tables depend on."""
        return (self.num_inference_steps, vars(self).get("custom_timesteps"))

    # -- tables ------------------------------------------------------------------------------

    def _device_tables(
        self, key: tuple, device: torch.device, build: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The tables for ``key`` on ``device`` (built on the host once per key, uploaded once
        per device). ``build`` returns CPU tensors: "table" float64 ``[R, len(COLUMNS)]`` and
        per-row schedule values ``[R]`` for the reference path."""
        last = self._last_tables  # the common case: the same tables as the previous step
        if last is not None and last[0] == key and last[1] == device:
            return last[2]
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        per_key = self._tables.get(key)
        if per_key is None:
            host = build()
            table = host["table"]
            if table.dim() != 2 or table.shape[1] != len(COLUMNS):
                raise AssertionError("internal: coefficient table has the wrong shape")
            per_key = self._tables[key] = {"host": host}
        cached = per_key.get(device)
        if cached is None:
            host = per_key["host"]
            cached = {
                name: upload(value.float().contiguous() if name == "table" else value, device)
                for name, value in host.items()
            }
            cached["arange"] = torch.arange(len(host["table"]), dtype=torch.int64, device=device)
            cached["row_views"] = {}
            per_key[device] = cached
        self._last_tables = (key, device, cached)
        return cached

    @staticmethod
    def _row(tables: dict[str, torch.Tensor], row: int) -> torch.Tensor:
        """Row ``row`` as the kernel takes it: ``tables["arange"][row : row + 1]``, a view
        made once per row (slicing a tensor costs microseconds)."""
        views = tables["row_views"]
        view = views.get(row)
        if view is None:
            view = views[row] = tables["arange"][row : row + 1]
        return view

"""Row selection of the two table layouts: one row per train timestep (DDPM / DDIM) and
one row per plan step, found through diffusers' step index (Euler / DPM / UniPC / flow).

``on_host`` is called through ``fastdiff.diffusers._base`` (one hook for every caller, which
the tests patch to treat CPU tensors as device tensors).

Example:
    >>> class FusedDDIMScheduler(TimestepRowsMixin, DDIMScheduler): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastdiff.diffusers import _base
from fastdiff.diffusers._base import FusedSchedulerMixin
from fastdiff.diffusers._common import device_index, host_index, promote, upload

__all__ = ["StepIndexMixin", "TimestepRowsMixin"]


class TimestepRowsMixin(FusedSchedulerMixin):
    """DDPM / DDIM: the table has one row per train timestep (row ``t + 1``; rows 0 and
    ``T + 1`` are poison), so the row of a step is the timestep itself: python ints, 0-d
    device tensors, per-sample tensors and plans that start mid-schedule all work. The tables
    are built from ``_alphas_cumprod64``, a CPU float64 copy of diffusers' ``alphas_cumprod``."""

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        # diffusers fixes alphas_cumprod at construction; keep a CPU float64 copy of its values
        self._alphas_cumprod64 = self.alphas_cumprod.detach().to("cpu", torch.float64)
        self._train_steps = len(self._alphas_cumprod64)
        super()._setup_fused(backend, noise)

    @staticmethod
    def _poison_ends(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-timestep ``columns`` (rows ``t``) as rows ``t + 1``, with the poison rows 0
        and ``T + 1`` around them: NaN (False in a bool column)."""

        def framed(v: torch.Tensor) -> torch.Tensor:
            end = torch.full_like(v[:1], False if v.dtype == torch.bool else float("nan"))
            return torch.cat([end, v, end])

        return {name: framed(v) for name, v in columns.items()}

    def _graph_side(self, advance: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the loop's timesteps (as ``_timestep_rows`` makes them on the device),
        advanced with the timestep."""
        rows = (advance.plan.long() + 1).clamp_(0, self._train_steps + 1)
        return rows, rows[:1].clone()

    def _vp_step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        rule: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        return_dict: bool,
        *,
        noise: torch.Tensor | None,
        seeds: torch.Tensor | None,
        by_row: dict[str, str] | None = None,
        variance_mode: str = "fixed",
        **options: Any,
    ):
        """The rest of a DDPM / DDIM step (``_fused``): the config's prediction type and
        x0 processing, the reference ``rule(x, m, ab_t, ab_next, **options)``, both outputs in
        ``promote(sample, model_output)`` as diffusers returns them."""
        clip_range, thresholding = self._processing_options  # (_begin_step checked config)
        prediction_type = self.config.prediction_type
        options["prediction_type"] = prediction_type
        options["clip_range"] = clip_range
        options["thresholding"] = thresholding
        reference_step = (tables, rows, rule, ("ab", "ab_next"), by_row, options)  # (_rule's)
        out_dtype = sample.dtype  # (promote_types(a, a) is a: no call for the common case)
        if out_dtype is not model_output.dtype:
            out_dtype = promote(out_dtype, model_output.dtype)
        x0_dtype = model_output.dtype if prediction_type == "sample" else out_dtype
        kernel_options = {
            "variance_mode": variance_mode,
            "clip_range": clip_range,
            "thresholding": thresholding,
        }
        return self._fused(
            x, model_output, tables, rows, reference_step, return_dict, out_dtype, x0_dtype,
            noise, seeds, None, kernel_options,
        )  # fmt: skip

    def _timestep_rows(
        self, timestep: Any, tables: dict[str, torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, int | torch.Tensor | None]:
        """(rows on x's device, the timestep on the host or None when it lives on a device)."""
        advance = self._graph_advance
        if advance is not None and timestep is advance.timestep and advance.side_dst is not None:
            return advance.side_dst, None  # a graphed loop's timestep: its row, advanced with it
        train_steps = self._train_steps
        value = self._host_value(timestep)
        if value is not None:
            t = int(value)
            if t != value or not 0 <= t < train_steps:
                raise ValueError(f"timestep must be an integer in [0, {train_steps}), got {value}")
            view = tables["row_views"].get(t + 1)  # (_row's common case, inline)
            return (view if view is not None else self._row(tables, t + 1)), t
        batch = x.shape[0]
        if timestep.is_floating_point() and _base.on_host(timestep):
            raise ValueError("per-sample timesteps must be an integer tensor")
        if timestep.dim() > 1 or timestep.numel() not in (1, batch):
            raise ValueError(
                f"timestep must be a scalar or one per sample ([{batch}]), got shape "
                f"{tuple(timestep.shape)}"
            )
        if _base.on_host(timestep):  # per-sample, known on the host
            if bool(((timestep < 0) | (timestep >= train_steps)).any()):
                raise ValueError(f"timesteps must be in [0, {train_steps})")
            return upload(timestep.long() + 1, x.device), timestep
        # On the device: no check (it would sync); anything outside maps to a poison row.
        rows = (timestep.to(x.device).long().reshape(-1) + 1).clamp_(0, train_steps + 1)
        return rows, None


class StepIndexMixin(FusedSchedulerMixin):
    """Euler / DPM: diffusers' step_index / begin_index bookkeeping without host syncs.

    The step index is a python int when the first timestep is known on the host (a python
    number or a CPU tensor) or when ``set_begin_index`` was called; for a timestep on a CUDA
    device it is found by a device-side lookup and stays a 0-d device tensor, advanced on
    the device.
    """

    _loop_index: torch.Tensor | None = None  # a graphed loop's counter (prepare_graph_step)
    _indexes_steps = True  # _begin_step finds the step index at a plan's first step

    # -- CUDA-graph hooks (see FusedSchedulerMixin) ------------------------------------------

    def check_capturable(self) -> None:
        """As ``FusedSchedulerMixin.check_capturable``; also refused: a ``begin_index``
        (``set_begin_index``), which a graph would freeze into every run."""
        super().check_capturable()
        if self.begin_index is not None:
            raise ValueError(
                "the scheduler has a begin_index (set_begin_index): its step index would be "
                "frozen into the graph; capture a loop over the plan's timesteps instead"
            )

    def prepare_graph_step(self, step_index: torch.Tensor | None = None, advance: Any = None):
        """The iteration's step index: the loop's own device counter (``step_index``, which
        the loop or the step's launch with ``advance`` advances in place: the step's own
        bookkeeping does not), or None, so that ``scale_model_input`` / ``step`` look it up
        on the device from the iteration's timestep (a host index would be frozen)."""
        self._step_index = self._loop_index = step_index
        self._graph_advance = advance

    # -- end of the CUDA-graph hooks ----------------------------------------------------------

    def _miss_index(self) -> int | None:
        """Index of a timestep not in the plan (None: an error, as in diffusers)."""
        return None

    def _plan_on(self, device: torch.device) -> torch.Tensor:
        plan = self._plan_device.get(device)
        if plan is None:
            plan = self._plan_device[device] = upload(self._plan_host, device)
        return plan

    def _lookup(self, timestep: Any) -> int | torch.Tensor:
        miss = self._miss_index()
        value = self._host_value(timestep)
        if value is not None:
            return host_index(self._plan_host, value, miss)
        if timestep.numel() != 1:
            raise ValueError(
                f"{type(self).__name__} takes one timestep for the whole batch, got shape "
                f"{tuple(timestep.shape)}"
            )
        n = self._plan_len
        plan = self._plan_on(timestep.device)
        return device_index(plan, timestep.reshape(()), n if miss is None else miss)

    def _init_step_index(self, timestep: Any) -> None:
        if self.begin_index is None:
            self._step_index = self._lookup(timestep)
        else:
            self._step_index = self._begin_index

    def _end_step(self, x0: torch.Tensor | None) -> None:
        """Advance the step index (on the device for a device index: it stays on the poison
        row once past the end)."""
        index = self._step_index
        if type(index) is int:  # (the host index, the common case, first)
            self._step_index = index + 1
            return
        if index is not None and index is self._loop_index:
            return  # a graphed loop's counter: the loop advances it
        if isinstance(index, torch.Tensor):
            self._step_index = torch.clamp(index + 1, max=self._plan_len)
        else:
            self._step_index = index + 1

    def _index_rows(self, tables: dict[str, torch.Tensor], offset: int = 0) -> torch.Tensor:
        """Table rows ``[1]`` of the current step index (shifted by ``offset``)."""
        index = self._step_index
        if isinstance(index, torch.Tensor):
            return (index + offset).reshape(1) if offset else index.reshape(1)
        n = self._plan_len
        if not 0 <= index < n:
            raise ValueError(
                f"step index {index} is outside the {n} steps of the plan: step was called "
                "more often than set_timesteps planned (call set_timesteps again)"
            )
        view = tables["row_views"].get(index + offset)  # (_row's common case, inline)
        return view if view is not None else self._row(tables, index + offset)

    def _add_noise_indices(self, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Step indices for add_noise (diffusers' rule), without a sync."""
        batch = timesteps.shape[0] if timesteps.dim() else 1
        if self.begin_index is None:
            miss = self._miss_index()
            if _base.on_host(timesteps):
                found = [host_index(self._plan_host, t, miss) for t in timesteps.reshape(-1)]
                return upload(torch.tensor(found, dtype=torch.int64), device)
            n = self._plan_len
            plan = self._plan_on(timesteps.device)
            # a timestep not in the plan reads the NaN appended to the sigmas
            return device_index(plan, timesteps.reshape(-1), n + 1 if miss is None else miss).to(
                device
            )
        index = self.step_index if self.step_index is not None else self.begin_index
        if isinstance(index, torch.Tensor):
            return index.reshape(1).expand(batch).to(device)
        return upload(torch.full((batch,), index, dtype=torch.int64), device)

    def _noise_sigma(self, original_samples: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' sigma at each sample's timestep for add_noise (diffusers' index rule,
        ``_add_noise_indices``; no sync).

        Args:
            original_samples: the clean samples ``[B, ...]``.
            timesteps: one timestep per sample.

        Returns:
            The sigmas in the samples' dtype and device, shaped ``[B, 1, ...]`` to broadcast
            over them; NaN for a timestep not in the plan.
        """
        indices = self._add_noise_indices(timesteps, original_samples.device)
        sigmas = torch.cat([self.sigmas, self.sigmas.new_full((1,), float("nan"))])
        sigmas = upload(sigmas.to(original_samples.dtype), original_samples.device)
        sigma = sigmas[indices].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma

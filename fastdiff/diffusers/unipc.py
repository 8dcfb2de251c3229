"""FusedUniPCMultistepScheduler: diffusers' UniPC (VP and flow sigmas) with the corrector of
each step and the predictor of the next as one fused kernel launch."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff import reference, unipc_tables
from fastdiff.backend import resolve_backend
from fastdiff.diffusers._rows import StepIndexMixin
from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler
from fastdiff.kernels.fused_step import COLUMNS

__all__ = ["FusedUniPCMultistepScheduler"]


class FusedUniPCMultistepScheduler(StepIndexMixin, UniPCMultistepScheduler):
    """Drop-in ``UniPCMultistepScheduler`` (Zhao et al. 2023) whose ``step`` is one fused
    kernel launch: the corrector UniC of the sample the last step predicted and the
    predictor UniP of the next sample (``fastdiff.unipc``). The model-output history lives in
    device buffers written by the kernel, and no step reads a value on the host.

    Supported: ``solver_type`` bh1 / bh2, ``solver_order`` 1 to 3, ``predict_x0`` on and off,
    ``lower_order_final``, ``disable_corrector``, thresholding (data prediction), every plan
    of diffusers (spacings, Karras / exponential / beta sigmas, ``final_sigmas_type``, zero
    terminal SNR) with epsilon / sample / v prediction, and flow matching as Wan uses it:
    ``use_flow_sigmas`` with ``flow_shift`` (or ``use_dynamic_shifting`` and ``mu``, or given
    ``sigmas``) and ``prediction_type="flow_prediction"``.

    Unsupported (ValueError at construction): ``solver_p`` (another predictor with UniC),
    ``solver_order`` above 3, ``flow_prediction`` without flow sigmas and the reverse,
    ``predict_x0=False`` with flow prediction (diffusers cannot convert it either), and
    ``lower_order_final=False`` above first order with ``final_sigmas_type="zero"`` (the last
    step then divides by a zero step ratio: diffusers returns inf).

    Where diffusers' float32 arithmetic multiplies infinity by zero on the step to sigma = 0
    (``solver_type="bh1"``, or ``predict_x0=False``: diffusers returns NaN there), the fused
    step takes the limit, ``x0`` (resp. ``(x - sigma eps) / alpha``), and stays finite.

    Example:
        >>> pipe.scheduler = FusedUniPCMultistepScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = SchedulerOutput
    _needs_plan = True
    _kernel_table = "unipc"  # the whole UniPC table ("table" holds its sampler columns)
    _history_on_device = True  # no Python model_outputs / last_sample are read by a step

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        self._history: unipc_tables.UniPCHistory | None = None
        self._history_order: int | None = None  # the solver order the ring was made for
        self._active: tuple | None = None  # (tables, table of the device-indexed chain)
        super()._setup_fused(backend, noise)

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        flow = bool(config.get("use_flow_sigmas", False))
        prediction = config.prediction_type
        return [
            (
                "solver_p",
                config.get("solver_p") is not None,
                "the fused step is UniPC's own predictor; another solver with UniC is not fused",
            ),
            (
                "solver_order",
                config.solver_order not in range(1, unipc_tables.MAX_ORDER + 1),
                f"the fused step keeps up to {unipc_tables.MAX_ORDER} earlier model outputs",
            ),
            (
                "prediction_type",
                prediction not in reference.UNIPC_PREDICTION_TYPES,
                f"the fused step supports {reference.UNIPC_PREDICTION_TYPES}",
            ),
            (
                "prediction_type",
                prediction == "flow_prediction" and not flow,
                "a flow_prediction (velocity) model needs use_flow_sigmas=True",
            ),
            (
                "use_flow_sigmas",
                flow and prediction != "flow_prediction",
                "flow sigmas (alpha = 1 - sigma) go with prediction_type='flow_prediction'",
            ),
            (
                "predict_x0",
                flow and not config.predict_x0,
                "a flow_prediction output converts to x0 only (diffusers raises too)",
            ),
            (
                "lower_order_final",
                not config.lower_order_final
                and config.solver_order > 1
                and config.final_sigmas_type == "zero",
                "above first order the last step to sigma = 0 divides by zero (diffusers "
                "returns inf); keep lower_order_final=True",
            ),
            *(c for c in self._thresholding_checks(config) if c[0] != "prediction_type"),
        ]

    def check_capturable(self) -> None:
        """Raise ValueError if a denoising loop stepping this scheduler cannot be replayed as a
        CUDA graph: only a ``begin_index`` (``set_begin_index``), which a graph would freeze
        into every run. The history is in device buffers (``model_outputs`` stays unused).

        Raises:
            ValueError: the reason.
        """
        if self.begin_index is not None:
            raise ValueError(
                "the scheduler has a begin_index (set_begin_index): its step index would be "
                "frozen into the graph; capture a loop over the plan's timesteps instead"
            )

    def graph_state(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The device buffers a kernel step on samples like ``latents`` reads and writes
        besides them (the ring of converted outputs and the last corrected samples, in the
        latents' dtype, allocated here if new): what a graphed loop saves and restores with
        the latents to re-run steps (its verification of several steps a graph)."""
        order = self.config.solver_order
        if self._history is None or self._history_order != order:
            self._history = unipc_tables.UniPCHistory(unipc_tables.ring_slots(order))
            self._history_order = order
        return list(self._history.buffers(latents, latents.dtype))

    def _miss_index(self) -> int:
        return len(self._plan_host) - 1  # diffusers: a timestep not in the plan -> last step

    def _planning_device(self, device):
        return device  # diffusers plans where the timesteps go (its sigmas stay on the CPU)

    def _check_plan(self, arguments: dict) -> None:
        """Before diffusers' set_timesteps (``fused_set_timesteps``): custom flow ``sigmas``
        (``use_flow_sigmas`` only, as diffusers) strictly decreasing in (0, 1]."""
        sigmas = arguments["sigmas"]
        if sigmas is None or not self.config.use_flow_sigmas:
            return
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        if (
            s.dim() != 1
            or len(s) == 0
            or not bool(torch.isfinite(s).all())
            or bool(((s <= 0) | (s > 1)).any())
            or bool((s[1:] >= s[:-1]).any())
        ):
            raise ValueError(
                f"sigmas must be a non-empty strictly decreasing list in (0, 1], got {sigmas}"
            )

    def _plan_changed(self, device) -> None:
        super()._plan_changed(device)
        self._active = None  # the device-indexed chain's table belongs to the old plan

    def _points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t of the plan's sigmas (diffusers' ``_sigma_to_alpha_sigma_t``),
        float64 [n + 1]."""
        s = self.sigmas.detach().to("cpu", torch.float64)
        if self.config.use_flow_sigmas:
            return 1.0 - s, s
        alpha = 1.0 / (s**2 + 1.0).sqrt()
        return alpha, s * alpha

    def _build(self, prediction_type: str, order: int, predict_x0: bool, processed: bool) -> dict:
        alpha, sigma = self._points()
        conversion = unipc_tables.conversion_coefficients(
            alpha[:-1], sigma[:-1], prediction_type, predict_x0
        )
        config = self.config
        try:
            table = unipc_tables.unipc_table(
                alpha,
                sigma,
                conversion,
                solver_order=order,
                solver_type=config.solver_type,
                predict_x0=predict_x0,
                lower_order_final=config.lower_order_final,
                disable_corrector=tuple(self.disable_corrector),
                processed=processed,
                poison_rows=True,
            )
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: {err}; diffusers' step gives NaN or inf there. With "
                "final_sigmas_type='sigma_min' the last step can have zero length: keep "
                "lower_order_final=True"
            ) from None
        # "table" (the sampler columns) is what _base checks and counts rows of; the kernel
        # reads "unipc", the whole table, uploaded in float32 as it is
        return {"table": table[:, : len(COLUMNS)], "unipc": table.float()}

    # ``alpha_t x0 + sigma_t noise`` at each sample's timestep (diffusers' rule, no sync): the
    # same step-index lookup and sigma-to-alpha rule (flow sigmas included) as DPM's
    add_noise = FusedDPMSolverMultistepScheduler.add_noise

    def _device_rows(self, tabs: dict, index: torch.Tensor, chain_start: bool, n: int):
        """Table and rows of a step index on the device: the rows of a table made on the device
        at the chain's first step (row k: step k of a chain that started there)."""
        if chain_start or self._active is None or self._active[0] is not tabs:
            k = tabs["arange"][: n + 1]
            order = self.config.solver_order
            w = torch.clamp(k - index.reshape(()), min=0, max=order)
            self._active = (tabs, {"unipc": tabs["unipc"].index_select(0, w * (n + 1) + k)})
        return self._active[1], index.reshape(1)

    def _step(self, model_output, timestep, sample, call: dict) -> SchedulerOutput | tuple:
        """One UniPC step: the corrector of ``sample`` (from the previous step's sample and
        model outputs), then the predictor of the next sample.

        Returns:
            ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        x = self._begin_step(timestep, sample)
        config = self.config
        n = self._plan_len
        order = config.solver_order
        prediction_type = config.prediction_type
        predict_x0 = bool(self.predict_x0)
        _, thresholding = self._processing(config)
        thresholding = thresholding if predict_x0 else None
        processed = thresholding is not None
        tabs = self._device_tables(
            ("unipc", prediction_type, order, predict_x0, processed),
            x.device,
            lambda: self._build(prediction_type, order, predict_x0, processed),
        )
        if self._history is None or self._history_order != order:
            self._history = unipc_tables.UniPCHistory(unipc_tables.ring_slots(order))
            self._history_order = order
        w = min(self.lower_order_nums, order)  # earlier steps of this chain (diffusers' count)
        if w == 0:
            self._history.clear()
        backend = self._backend
        if backend not in ("triton", "reference"):  # (an explicit backend needs no resolving)
            backend = resolve_backend(backend, x, (model_output.dtype, sample.dtype))
        use_kernel = backend == "triton"  # as run_step picks
        ring, last = self._history.buffers(x, x.dtype if use_kernel else torch.float64)
        index = self._step_index
        if isinstance(index, torch.Tensor):
            tables, rows = self._device_rows(tabs, index, w == 0, n)
        else:
            tables, rows = tabs, self._index_rows(tabs, offset=w * (n + 1))

        def reference_step(xr, m, _noise):  # UniPC is deterministic
            # the reference backend reads a device step index on the host (the kernel never)
            k = index if isinstance(index, int) else int(index)
            if k >= n:  # a device index past the plan: the kernel's poison row (NaN), as there
                nan = torch.full_like(xr, float("nan"))
                return nan, nan
            orders = unipc_tables.step_orders(
                k, w, n, order, config.lower_order_final, tuple(self.disable_corrector)
            )
            self.this_order = orders[1]
            return unipc_tables.reference_on_ring(
                xr,
                m,
                k,
                orders,
                *self._points(),
                ring,
                last,
                predict_x0=predict_x0,
                solver_type=config.solver_type,
                prediction_type=prediction_type,
                thresholding=thresholding,
            )

        # (write_x0 off: the step returns the sample only)
        kernel_options = {
            "thresholding": thresholding, "history": ring, "last_sample": last, "write_x0": False
        }  # fmt: skip
        return self._fused(
            x, model_output, tables, rows, reference_step, call["return_dict"], sample.dtype,
            sample.dtype, None, None, None, kernel_options,
        )  # fmt: skip

    def _end_step(self, x0: torch.Tensor | None) -> None:
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        super()._end_step(x0)

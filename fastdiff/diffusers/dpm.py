"""FusedDPMSolverMultistepScheduler: diffusers' DPM-Solver++ (orders 1-3, ODE and SDE) with
the step as one fused kernel."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff import reference, unipc_tables
from fastdiff.checks import PREDICTION_TYPES
from fastdiff.diffusers._common import dense, promote
from fastdiff.diffusers._rows import StepIndexMixin
from fastdiff.diffusers.dpm_ring import DPMRingMixin
from fastdiff.diffusers.dpm_rows import DPMRowsMixin

__all__ = ["FusedDPMSolverMultistepScheduler"]

_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class FusedDPMSolverMultistepScheduler(
    DPMRingMixin, DPMRowsMixin, StepIndexMixin, DPMSolverMultistepScheduler
):
    """Drop-in ``DPMSolverMultistepScheduler`` (Lu et al. 2022, DPM-Solver++) whose ``step`` is
    one fused kernel launch.

    Supported: ``algorithm_type="dpmsolver++"`` (and "deis", which diffusers maps to it) and
    ``"sde-dpmsolver++"`` (SDE-DPM-Solver++, "DPM++ 2M SDE": its noise drawn as diffusers
    draws it, ``randn_tensor`` float32 like x0 on every step from ``generator``, or
    ``variance_noise``), ``solver_order`` 1, 2 or 3, ``solver_type`` "midpoint" (and the
    UniPC / DEIS names diffusers maps to it) or "heun", every plan option of diffusers (spacings,
    Karras / exponential / beta sigmas, Lu lambdas, ``lambda_min_clipped``,
    ``final_sigmas_type``), ``lower_order_final``, ``euler_at_final``, thresholding, and
    ``variance_type`` learned / learned_range with epsilon prediction (the first 3 channels,
    as diffusers). The SDE and heun rows: ``flow_tables.dpmpp_2m_sde_table_as``; order 3:
    ``flow_tables.dpmpp_3m_table_as`` (diffusers' 3M update, its SDE coefficient included),
    the two previous x0s kept in a ring of three device slots that the kernel reads and
    writes through its UniPC history columns without corrector (``model_outputs`` holds
    views of the slots; the kernel reads x, the model output and the two slots, and writes
    the next sample and this step's x0 into the third slot: 6 passes, the contract's); the
    ring's phase follows the history where it lies (a step taken again reads the shifted
    list as it is, no copy); their reference: ``reference.dpmpp_multistep_step``. Where
    diffusers divides 0 by 0 (heun, a plan whose last level repeats) or takes the root of a
    negative variance (SDE, a final ``sigma_min`` above the last level), the step gives the
    limit / no noise, not NaN.

    Flow matching (Sana): ``use_flow_sigmas`` with ``flow_shift`` or dynamic shifting (``mu``),
    ``prediction_type="flow_prediction"`` (also epsilon / sample), on the flow path
    ``alpha = 1 - s``, ``sigma = s`` (``flow_tables.dpmpp_2m_table_as``), with every algorithm
    and solver type above.

    CUDA graphs (``capture_denoising_loop``): a step whose step index is on the device (a
    timestep tensor not taken from the plan, as in a graphed iteration) keeps the previous x0
    in a persistent device buffer (``graph_state``), overwritten in place by the kernel, and
    takes its order from the row alone; ``model_outputs[-1]`` is then that buffer. A step
    with a host index keeps diffusers' ``model_outputs`` list as diffusers does. The SDE draws
    noise on every step: a graph needs ``noise="philox"`` (in-kernel noise keyed by the row).
    ``solver_order=3`` keeps its x0 ring (``graph_state``) on the device as well, the slot
    taken from the row; with a device index ``model_outputs`` then holds None (the history is
    the ring's).

    Unsupported (ValueError at construction): the deprecated noise-prediction algorithms
    ``dpmsolver`` and ``sde-dpmsolver``; ``solver_order`` above 3; a flow_prediction model
    without flow sigmas and a v_prediction model with them; flow sigmas with Karras /
    exponential / beta sigmas or Lu lambdas (diffusers reads those VP sigmas as flow levels).

    Example:
        >>> pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = SchedulerOutput
    _needs_plan = True
    _history_on_device = True  # a step with a device step index keeps x0 in a device buffer

    @property
    def _draws_step_noise(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"  # every step draws z

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        # device-index steps: the previous x0 per sample layout, and per (device, n) the rows
        # of step k of the chain (first order at its first step); both kept for the
        # scheduler's lifetime and rewritten in place (a captured graph holds their pointers)
        self._x0_buffers: dict[tuple, torch.Tensor] = {}
        self._chain_rows: dict[tuple, torch.Tensor] = {}
        # solver_order=3: the x0 ring (slot (k + phase) % 3 holds the x0 of step k), its slot
        # views and its phase (0 at a chain's start; a device step keeps it)
        self._ring_history: unipc_tables.UniPCHistory | None = None
        self._ring_slots: dict[int, list[torch.Tensor]] = {}
        self._ring_phase = 0
        self._ring_x0: torch.Tensor | None = None  # the slot a host step writes its x0 to
        self._step_static: tuple | None = None  # (config, plan length, the tables' key)
        super()._setup_fused(backend, noise)

    # -- CUDA-graph hooks (see FusedSchedulerMixin; check_capturable: StepIndexMixin's) -----

    def graph_state(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The device buffer a step on samples like ``latents`` reads and writes besides them
        (the previous x0, allocated here if new, in the latents' dtype): what a graphed loop
        saves and restores with the latents to re-run a step (its verification).

        Args:
            latents: a sample like the loop's (shape, dtype, device, memory format).

        Returns:
            ``[x0_prev]``, ``[]`` for ``solver_order=1`` (no history), ``[ring]`` for
            ``solver_order=3`` (the x0 ring).
        """
        if self.config.solver_order == 1:
            return []
        if self.config.solver_order == 3:
            ring, _, _ = self._ring(dense(latents), latents.dtype)
            return [ring]
        return [self._x0_buffer(dense(latents), latents.dtype)]

    # -- end of the CUDA-graph hooks ----------------------------------------------------------

    def _x0_buffer(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The persistent previous-x0 buffer of samples laid out like ``x`` in ``dtype``
        (zeros when new: a first-order row multiplies it by 0)."""
        key = (x.device, x.shape, x.stride(), dtype)
        buffer = self._x0_buffers.get(key)
        if buffer is None:
            buffer = self._x0_buffers[key] = torch.zeros_like(x, dtype=dtype)
        return buffer

    def _device_chain_rows(self, tabs: dict, index: torch.Tensor, first: bool, n: int):
        """Rows ``[1]`` of a device step index: row k of a table made on the device at the
        chain's first step (k there: its first-order row ``n + 1 + k``; for
        ``solver_order=3`` also ``k + 1``: its at most second-order row ``2n + 2 + k + 1``;
        else row k), so that the index alone picks the order in a replayed graph (whose
        first iteration is always eager: a warm-up step)."""
        key = (index.device, n)
        chain = self._chain_rows.get(key)
        if chain is None:
            chain = self._chain_rows[key] = tabs["arange"][: n + 1].clone()
        if first:
            k = tabs["arange"][: n + 1]
            start = index.reshape(())
            later = k
            if self.config.solver_order == 3:
                later = torch.where(k == start + 1, k + (2 * n + 2), k)
            torch.where(k == start, k + (n + 1), later, out=chain)
        advance = self._graph_advance
        if not first and advance is not None and advance.side_src is chain:
            return advance.side_dst  # the row advanced with the loop's timestep (_graph_side)
        return chain.index_select(0, index.reshape(1))

    def _graph_side(self, advance) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The device chain's rows (``_device_chain_rows``), advanced with the loop's
        timestep: a graphed step after the chain's first gathers no row. Made here as a
        chain from step 0 makes them (the loop's chains start there), so that the value the
        loop sets at a run's start is step 0's row before any step ran."""
        order = self.config.solver_order
        if order == 1:
            return None
        device, n = advance.counter.device, self._plan_len
        k = torch.arange(n + 1, dtype=torch.int64, device=device)
        later = torch.where(k == 1, k + (2 * n + 2), k) if order == 3 else k
        chain = self._chain_rows.setdefault((device, n), torch.empty_like(k))
        torch.where(k == 0, k + (n + 1), later, out=chain)
        return chain, chain[:1].clone()

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "algorithm_type",
                config.algorithm_type not in _ALGORITHMS,
                f"the fused step implements {_ALGORITHMS} (the deprecated noise-prediction "
                "solvers dpmsolver and sde-dpmsolver are not supported)",
            ),
            (
                "solver_order",
                config.solver_order not in (1, 2, 3),
                "diffusers' orders are 1, 2 and 3",
            ),
            (
                "solver_type",
                config.solver_type not in reference.DPM_SOLVER_TYPES,
                f"the fused step implements {reference.DPM_SOLVER_TYPES}",
            ),
            (
                "prediction_type",
                config.prediction_type == "flow_prediction"
                and not config.get("use_flow_sigmas", False),
                "a flow_prediction model needs a flow schedule (use_flow_sigmas=True)",
            ),
            (
                "prediction_type",
                config.prediction_type == "v_prediction" and config.get("use_flow_sigmas", False),
                "v_prediction is the VP velocity; on flow sigmas a model predicts "
                "flow_prediction (eps - x0), epsilon or sample",
            ),
            *(
                (
                    option,
                    bool(config.get(option, False)) and config.get("use_flow_sigmas", False),
                    "diffusers computes these VP sigmas first and then reads them as flow "
                    "levels (alpha = 1 - sigma); use_flow_sigmas takes flow_shift",
                )
                for option in (
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "use_lu_lambdas",
                )
            ),
            (
                "use_dynamic_shifting",
                bool(config.get("use_dynamic_shifting", False))
                and not config.get("use_flow_sigmas", False),
                "dynamic shifting shifts flow sigmas (use_flow_sigmas=True)",
            ),
            (
                "time_shift_type",
                bool(config.get("use_dynamic_shifting", False))
                and config.get("time_shift_type", "exponential") != "exponential",
                "diffusers turns mu into flow_shift = exp(mu)",
            ),
            (
                "variance_type",
                config.get("variance_type") in ("learned", "learned_range")
                and config.prediction_type != "epsilon",
                "diffusers only strips the variance channels for epsilon prediction",
            ),
            *(c for c in self._thresholding_checks(config) if c[0] != "prediction_type"),
            (
                "prediction_type",
                config.prediction_type not in (*PREDICTION_TYPES, "flow_prediction"),
                f"the fused step supports {(*PREDICTION_TYPES, 'flow_prediction')}",
            ),
        ]

    def _miss_index(self) -> int:
        return len(self._plan_host) - 1  # diffusers: a timestep not in the plan -> last step

    def _check_plan(self, arguments: dict) -> None:
        """Before diffusers' set_timesteps (``fused_set_timesteps``): ``mu`` missing with
        ``use_dynamic_shifting`` (diffusers would ignore it) or given without it; custom
        timesteps on flow sigmas (diffusers builds them from ``num_inference_steps``)."""
        config, mu = self.config, arguments["mu"]
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
        if mu is not None and not config.use_dynamic_shifting:
            raise ValueError("mu (dynamic shifting) needs use_dynamic_shifting=True")
        if arguments["timesteps"] is not None and config.use_flow_sigmas:
            raise ValueError(
                "custom timesteps are not supported with use_flow_sigmas (diffusers builds "
                "flow sigmas from num_inference_steps)"
            )

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at each sample's timestep (the arguments of
        ``_noise_sigma``), as diffusers, without a host sync."""
        sigma = self._noise_sigma(original_samples, timesteps)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def _step(self, model_output, timestep, sample, call: dict) -> SchedulerOutput | tuple:
        """One DPM-Solver++ step.

        Args:
            model_output: the model output, like ``sample`` (learned variances: extra
                channels, of which the first 3 are used, as diffusers).
            generator: draws the SDE's noise as diffusers does (``sde-dpmsolver++``; unused
                by the ODE solver).
            variance_noise: explicit standard-normal noise like ``sample`` for the SDE
                (instead of ``generator``).

        Returns:
            ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        x = self._begin_step(timestep, sample)
        config = self.config
        prediction_type = config.prediction_type
        if config.get("variance_type") in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        n = self._plan_len
        static = self._step_static  # the step's options, read once per config and plan length
        if static is None or static[0] is not config or static[1] != n:
            final_first_order = bool(
                config.euler_at_final
                or (config.lower_order_final and n < 15)
                or config.final_sigmas_type == "zero"
            )
            order = config.solver_order
            sde = config.algorithm_type == "sde-dpmsolver++"
            solver_type = config.solver_type
            key = ("dpm", prediction_type, final_first_order, order, sde, solver_type)
            static = self._step_static = (config, n, key)
        key = static[2]
        _, prediction_type, final_first_order, order, sde, solver_type = key
        tabs = self._device_tables(
            key,
            x.device,
            lambda: self._build(prediction_type, final_first_order, order, sde, solver_type),
        )
        first = self.lower_order_nums < 1
        # diffusers converts the output to x0 first, then returns prev_sample in x0's dtype
        promoted = sample.dtype  # (promote_types(a, a) is a: no call for the common case)
        if promoted is not model_output.dtype:
            promoted = promote(promoted, model_output.dtype)
        x0_dtype = model_output.dtype if prediction_type == "sample" else promoted
        index = self._step_index
        x0_out = None
        history = {}  # order 3: the kernel's ring arguments
        store = None
        if order == 3:
            rows, kernel_rows, x0_prevs, self._ring_x0, history, store = self._third_order_state(
                tabs, x, x0_dtype, n
            )
            x0_prev = None
        elif isinstance(index, torch.Tensor) and order > 1:
            # a device step index (a graphed loop): the order comes from the row, the previous
            # x0 from the buffer the kernel overwrites with this step's x0 (after its loads)
            rows = self._device_chain_rows(tabs, index, first, n)
            x0_prev = x0_out = self._x0_buffer(x, x0_dtype)
            last = self.model_outputs[-1]
            if not first and last is not None and last is not x0_prev:
                x0_prev.copy_(last)  # the previous step kept x0 in model_outputs (host index)
        else:
            # (order 1: rows k, as a graph replays them; its first-order rows are the same)
            rows = self._index_rows(tabs, offset=n + 1 if first and order > 1 else 0)
            # the previous step's x0 (diffusers shifts the list first, then reads [-2])
            x0_prev = None if first or order == 1 else self.model_outputs[-1]
        if order < 3:
            kernel_rows = rows
            prevs = [] if x0_prev is None else [x0_prev]

            def x0_prevs():
                return prevs

        noise = seeds = None
        if sde:  # diffusers draws float32 noise like x0 on every step (x 0 on the last)
            variance_noise = call["variance_noise"]
            if variance_noise is not None:
                variance_noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            like = torch.empty((), device=model_output.device, dtype=torch.float32).expand(x.shape)
            noise, seeds = self._step_noise(like, x, call["generator"], variance_noise)
        _, thresholding = self._processing(config)
        if thresholding is not None and self._ring_x0 is not None and x0_dtype != x.dtype:
            x0_out = self._ring_x0  # order 3: the threshold's quantile reads x0 in x0's dtype
        midpoint = not (sde or solver_type == "heun" or order == 3)

        def reference_step(xr, m, noise):  # the reference backend's step
            if midpoint:
                return self._midpoint_reference(
                    xr, m, tabs, rows, x0_prev, prediction_type, thresholding
                )
            options = (prediction_type, thresholding, sde, solver_type, store)
            return self._multistep_reference(xr, m, noise, tabs, rows, x0_prevs(), *options)

        # order 3: the rows in the kernel's UniPC columns (the x0 ring)
        self._kernel_table = "history_table" if order == 3 else "table"
        kernel_options = {"x0_out": x0_out, "thresholding": thresholding, **history}
        return self._fused(
            x, model_output, tabs, kernel_rows, reference_step, call["return_dict"], x0_dtype,
            x0_dtype, noise, seeds, x0_prev, kernel_options,
        )  # fmt: skip

    def _midpoint_reference(self, xr, m, tabs, rows, x0_prev, prediction_type, thresholding):
        """The reference step of the ODE midpoint form: ``reference.dpmpp_multistep_step``
        (order 2 with ``x0_prev``), first order where the row is."""
        options = dict(prediction_type=prediction_type, thresholding=thresholding)
        if self.config.use_flow_sigmas:  # first-order rows have sigma_prev = 1 (r = inf)
            s, s_next, s_prev = self._values(tabs, rows, "sigma", "sigma_next", "sigma_prev")
            history = () if x0_prev is None else [(x0_prev.to(xr.dtype), s_prev)]
            step = reference.dpmpp_multistep_step
            return step(xr, m, s, s_next, history=history, space="flow", **options)
        ab, ab_next, ab_prev, first_order = self._values(
            tabs, rows, "ab", "ab_next", "ab_prev", "first"
        )
        prev, x0 = reference.dpmpp_multistep_step(xr, m, ab, ab_next, **options)
        if x0_prev is not None:
            history = [(x0_prev.to(xr.dtype), ab_prev)]
            second, _ = reference.dpmpp_multistep_step(
                xr, m, ab, ab_next, history=history, **options
            )
            mask = first_order.reshape(-1, *([1] * (xr.dim() - 1)))
            prev = torch.where(mask, prev, second)
        return prev, x0

    def _multistep_reference(
        self, xr, m, noise, tabs, rows, x0_prevs, prediction_type, thresholding, sde,
        solver_type, store,
    ):  # fmt: skip
        """The reference step of the SDE, heun and third-order forms:
        ``reference.dpmpp_multistep_step`` on the row's levels, with as many of the previous
        x0s (``x0_prevs``, newest first) as the row's order takes; then ``store(x0)`` (the x0
        ring of a device index) unless None."""
        flow = self.config.use_flow_sigmas
        prefix = "sigma" if flow else "ab"
        names = (prefix, f"{prefix}_next", f"{prefix}_prev", f"{prefix}_prev2")
        options = dict(
            space="flow" if flow else "vp",
            prediction_type=prediction_type,
            sde=sde,
            solver_type=solver_type,
            thresholding=thresholding,
            noise=noise,
        )
        *levels, order = self._values(tabs, rows, *names, "order")
        level, level_next = levels[:2]
        history = [(p.to(xr.dtype), lev) for p, lev in zip(x0_prevs, levels[2:])]
        step = reference.dpmpp_multistep_step
        prev, x0 = step(xr, m, level, level_next, **options)
        for k in range(1, len(history) + 1):  # the row's order picks one
            higher, _ = step(xr, m, level, level_next, history=history[:k], **options)
            mask = (order == k + 1).reshape(-1, *([1] * (xr.dim() - 1)))
            prev = torch.where(mask, higher, prev)
        if store is not None:
            store(x0)
        return prev, x0

    def _end_step(self, x0: torch.Tensor | None) -> None:
        """diffusers' history: the list shifted, this step's x0 last (order 3, a host index:
        the ring slot the step wrote, ``_ring_x0``; None after a device step); then the step
        index."""
        if x0 is None:  # order 3: the kernel wrote x0 once, as the ring's new slot
            x0 = self._ring_x0
        order = self.config.solver_order
        for i in range(order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        super()._end_step(x0)

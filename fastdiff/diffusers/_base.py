"""Machinery shared by the fused diffusers schedulers.

Each fused scheduler subclasses the diffusers scheduler it replaces, so configuration,
``set_timesteps`` (the plan: timesteps, sigmas, alphas_cumprod), ``save_pretrained`` /
``from_pretrained`` and every attribute a pipeline reads are diffusers' own. What the
subclass replaces is the reverse step: on ``set_timesteps`` nothing is computed, and the first
``step`` with a given set of step-time options builds a float64 coefficient table on the host
with ``fastdiff.tables`` (from diffusers' own schedule values and diffusers' own rules for the
next timestep), uploads it once per device in float32, and from then on every step is one
``fastdiff.kernels.fused_step`` launch that gathers its row on the device.

Rows and host syncs. A row is chosen either on the host (a python int step index or
timestep: a slice of a cached device ``arange``, no copy) or on the device (a timestep given
as a CUDA tensor: integer arithmetic or a gather on the device, never ``nonzero()`` or
``.item()``). Tables end in NaN "poison" rows that a timestep missing from the plan maps to,
so a device lookup that finds nothing gives NaN instead of a silently wrong step.

Noise (``noise=``, a keyword-only constructor option like ``backend``, not saved to the
config). "torch", the default: the noise is drawn exactly as the diffusers class draws it
(the same ``randn_tensor`` call, same shape, dtype and device, on the same steps), from the
``generator`` passed to ``step`` or, without one, from torch's global RNG, and passed to the
kernel: the same images as the stock scheduler for the same seed, and the global stream in
the same state afterwards. "philox": without a generator the kernel makes the noise itself,
Philox keyed by (per-sample seed, table row, element); the seeds come from one integer drawn
from torch's global CPU RNG at the first step that needs noise after ``set_timesteps`` (so
deterministic schedulers never touch the global RNG). A ``generator`` or ``variance_noise``
passed to ``step`` is used as diffusers uses it in both modes.

Backends. ``backend`` is "triton" (the kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), "reference" (``fastdiff.reference``, plain PyTorch on any device and
dtype) or "auto"/None (None reads ``FASTDIFF_BACKEND``): auto takes the kernels for CUDA
tensors in float32/float16/bfloat16 and the reference otherwise. The reference path calls
``fastdiff.reference`` with the schedule values of the row, not the table, so the two
backends check each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import philox
from fastdiff.backend import check_backend
from fastdiff.checks import PREDICTION_TYPES, check_choice
from fastdiff.diffusers._common import (
    dense,
    device_index,
    fused_init,
    fused_set_timesteps,
    make_output,
    step_output,
    upload,
)
from fastdiff.kernels.fused_step import COLUMNS
from fastdiff.stepping import run_step

# device_index and make_output: re-exported for the tests
__all__ = [
    "FusedSchedulerMixin",
    "device_index",
    "host_scalar",
    "make_output",
    "on_host",
]

# per diffusers class: (takes clip_sample, takes thresholding), read once from its __init__
_HONOURED: dict[type, tuple[bool, bool]] = {}
NOISE_SOURCES = ("torch", "philox")  # the step noise: drawn as diffusers draws it, or in-kernel


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync (a CPU tensor)."""
    return t.device.type == "cpu"


def host_scalar(timestep: Any) -> float | int | None:
    """The value of a timestep known on the host (python number, one-element CPU tensor),
    else None (a device tensor: reading it would sync)."""
    if isinstance(timestep, torch.Tensor):
        if on_host(timestep) and timestep.numel() == 1:
            return timestep.reshape(()).item()
        return None
    if isinstance(timestep, (int, float)):
        return timestep
    raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")


class FusedSchedulerMixin:
    """Mixed in before a diffusers scheduler class; see the module docstring.

    Subclasses provide ``_unsupported()`` (config checks) and their ``step``. The x0
    processing options read from the config are those the diffusers class honours, the ones
    its ``__init__`` takes (``clip_sample`` and ``thresholding`` for DDPM / DDIM,
    ``thresholding`` for DPM-Solver and UniPC, none for Euler and flow): such a key left over
    from another scheduler's JSON is ignored, as the diffusers class ignores it.
    """

    _diffusers_cls: type  # the diffusers class subclassed (set by __init_subclass__)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class with a diffusers scheduler among its bases gets ``_diffusers_cls`` (that
        class), the fused ``__init__`` (``fused_init``) and ``set_timesteps``
        (``fused_set_timesteps``), unless it or a fused base class defines them."""
        super().__init_subclass__(**kwargs)
        base = next(
            (
                b
                for b in cls.__mro__[1:]
                if issubclass(b, SchedulerMixin) and not issubclass(b, FusedSchedulerMixin)
            ),
            None,
        )
        if base is None:  # a mixin of the fused schedulers (no diffusers class yet)
            return
        if "_diffusers_cls" not in vars(cls):
            cls._diffusers_cls = base
        if cls.__init__ is base.__init__:
            cls.__init__ = fused_init(base)
        if cls.set_timesteps is base.set_timesteps:
            cls.set_timesteps = fused_set_timesteps(base)

    _kernel_table = "table"  # the key of the device table the kernel reads

    # -- setup and configuration ------------------------------------------------------------

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        self.backend = backend
        self._tables: dict = {}
        self._last_tables = None
        self._seeds_cache: dict = {}
        self._seed: int | None = None
        self.noise = noise
        self._plan_device: dict = {}
        self._plan_state = self._plan_sigmas = self._plan_tensor = None
        self._plan_changed(None)  # diffusers' default plan (CPU)
        self._checked_config = None
        self.check_config()

    @property
    def backend(self) -> str | None:
        """ "triton", "reference", "auto" or None (``FASTDIFF_BACKEND``, else auto)."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = check_backend(value)

    @property
    def noise(self) -> str:
        """ "torch" (the default: the step noise diffusers draws, from the generator or the
        global RNG) or "philox" (in-kernel noise when no generator is passed); settable, like
        ``backend``: a new Philox seed is drawn at the next step that adds noise."""
        return self._noise

    @noise.setter
    def noise(self, value: str) -> None:
        self._noise = check_choice("noise", value, NOISE_SOURCES)
        self._seed = None

    @property
    def uses_philox_noise(self) -> bool:
        """Whether a step without a generator makes its noise in the kernel (``noise="philox"``)
        rather than drawing it from torch's global RNG as diffusers does (``noise="torch"``)."""
        return self._noise == "philox"

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        """(option, is_unsupported, why) triples for the current config."""
        raise NotImplementedError

    def _x0_options(self, config) -> tuple[bool, bool]:
        """(clip, threshold): whether the config turns on clipping / dynamic thresholding of x0,
        counting only the options the diffusers class honours (see the class docstring);
        thresholding wins over clipping, as in diffusers."""
        cls = self._diffusers_cls
        honoured = _HONOURED.get(cls)
        if honoured is None:
            parameters = inspect.signature(cls.__init__).parameters
            honoured = _HONOURED[cls] = ("clip_sample" in parameters, "thresholding" in parameters)
        can_clip, can_threshold = honoured
        threshold = can_threshold and bool(config.get("thresholding", False))
        clip = not threshold and can_clip and bool(config.get("clip_sample", False))
        return clip, threshold

    def _thresholding_checks(self, config) -> list[tuple[str, bool, str]]:
        """The prediction type and the x0 processing options (those the class honours)."""
        clip, threshold = self._x0_options(config)
        ratio = config.get("dynamic_thresholding_ratio", 0.995)
        return [
            (
                "prediction_type",
                config.prediction_type not in PREDICTION_TYPES,
                f"the fused step supports {PREDICTION_TYPES}",
            ),
            (
                "dynamic_thresholding_ratio",
                threshold and not 0.0 < ratio <= 1.0,
                "the quantile ratio must be in (0, 1]",
            ),
            (
                "sample_max_value",
                threshold and not config.get("sample_max_value", 1.0) >= 1.0,
                "dynamic thresholding clamps the quantile to [1, sample_max_value]",
            ),
            (
                "clip_sample_range",
                clip and not config.get("clip_sample_range", 1.0) > 0,
                "the clip range must be positive",
            ),
        ]

    def check_config(self) -> None:
        """Raise ValueError naming the first option of ``self.config`` the fused step does not
        reproduce. Called at construction, by ``set_timesteps`` and by every ``step`` (the
        config may be patched after construction).

        Raises:
            ValueError: an unsupported option value.
        """
        config = self.config
        if config is self._checked_config:  # a patch replaces the FrozenDict: checked again
            return
        for option, bad, why in self._unsupported(config):
            if bad:
                value = config.get(option)
                raise ValueError(
                    f"{type(self).__name__} does not support {option}={value!r}: {why}. "
                    f"Use diffusers' {self._diffusers_cls.__name__} for this configuration."
                )
        self._checked_config = config
        self._processing_options = self._read_processing(config)

    def _check_planned(self) -> None:
        """Raise diffusers' ValueError for a step before ``set_timesteps`` (the schedulers
        whose diffusers step checks ``num_inference_steps``).

        Raises:
            ValueError: ``num_inference_steps`` is None.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after "
                "creating the scheduler"
            )

    def _processing(self, config) -> tuple[float | None, tuple[float, float] | None]:
        """(clip_range, thresholding) of the x0 prediction for the current config."""
        if config is not self._checked_config:
            self.check_config()
        return self._processing_options

    def _read_processing(self, config) -> tuple[float | None, tuple[float, float] | None]:
        clip, threshold = self._x0_options(config)
        if threshold:
            return None, (
                float(config.dynamic_thresholding_ratio),
                float(config.sample_max_value),
            )
        if clip:
            return float(config.clip_sample_range), None
        return None, None

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
            self._last_tables = None
            self._plan_device.clear()
        self._plan_state = state
        self._plan_host = host
        # diffusers' set_timesteps makes new sigmas each time (it never changes them in place)
        self._plan_sigmas = sigmas
        self._plan_values = values
        self._plan_len = len(values)
        plan = self._plan_tensor = self.timesteps  # the tensor the pipeline iterates
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

    def _plan_position(self, timestep: torch.Tensor) -> int | None:
        """The position of ``timestep`` in the plan when it is an element of the plan tensor
        handed out by set_timesteps (``for t in scheduler.timesteps``, also after slicing):
        found from its address (a live tensor whose data lies inside the plan's memory is a
        view of it), so its value is known on the host without reading the device. None for
        any other tensor."""
        start, stride, dtype, device = self._plan_address
        if timestep.dim() or timestep.dtype != dtype or stride <= 0:
            return None
        offset = timestep.data_ptr() - start
        position = offset // stride
        if offset % stride or not 0 <= position < self._plan_len or timestep.device != device:
            return None
        return position

    def _host_value(self, timestep: Any) -> float | int | None:
        """A timestep's value when it is known on the host: a python number, a CPU tensor, or
        an element of the plan tensor (its value is in the host copy of the plan); None for
        other device tensors (reading them would sync)."""
        if isinstance(timestep, torch.Tensor):
            position = self._plan_position(timestep)
            if position is not None:
                return self._plan_values[position]
        return host_scalar(timestep)

    # -- CUDA-graph hooks (fastdiff.diffusers.graph.capture_denoising_loop) -----------------

    def check_capturable(self) -> None:
        """Raise ValueError saying why a denoising loop stepping this scheduler cannot be
        replayed as a CUDA graph (``capture_denoising_loop`` calls it before capturing).

        Refused: a multistep history kept in Python (``model_outputs``), and a step that
        always adds noise drawn from torch's random generators instead of in-kernel Philox
        noise (``uses_philox_noise`` False): a replay would not draw it as the eager loop.
        (Noise asked for per call, DDIM's ``eta > 0``, is caught by the graph's check of its
        first replay, which refuses any draw from torch's generators.)

        Raises:
            ValueError: the reason, and what to use instead.
        """
        from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

        name = type(self).__name__
        if hasattr(self, "model_outputs"):
            raise ValueError(
                f"{name} keeps its multistep history in Python (model_outputs, "
                "lower_order_nums), which a replayed graph cannot update; use "
                "fastdiff.sample(model, DPMSolverPP2MSampler(...), cuda_graph=True) or the "
                "eager loop"
            )
        noisy = isinstance(self, (DDPMScheduler, EulerAncestralDiscreteScheduler))
        if noisy and not getattr(self, "uses_philox_noise", True):
            raise ValueError(
                f"{name} draws its step noise from torch's random generator (randn_tensor), "
                "which a replayed CUDA graph does not draw as the eager loop does; use the "
                "scheduler's in-kernel Philox noise for a graphed loop, or the eager loop"
            )

    def prepare_graph_step(self) -> None:
        """Called at the start of every iteration of a captured denoising loop, before the
        loop's ``scale_model_input`` / ``step`` (state kept on the host would otherwise be
        frozen at its captured value). Default: nothing (DDPM / DDIM: the row is the
        timestep itself)."""

    # -- end of the CUDA-graph hooks ----------------------------------------------------------

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

    # -- noise -------------------------------------------------------------------------------

    def _philox_seeds(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample Philox keys: one integer from torch's global RNG per set_timesteps."""
        if self._seed is None:
            self._seed = int(torch.randint(0, 2**31, (1,)).item())  # CPU RNG: no device sync
        key = (device, batch)
        seeds = self._seeds_cache.get(key)
        if seeds is None:
            seeds = self._seeds_cache[key] = philox.seeds_from(self._seed, batch, device)
        return seeds

    @staticmethod
    def _draw(shape, generator, device, dtype) -> torch.Tensor:
        """Noise drawn exactly as the diffusers schedulers draw it."""
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _step_noise(
        self,
        like: torch.Tensor,
        x: torch.Tensor,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The noise of a step that adds noise, as ``(noise, seeds)`` for ``_run_step``.

        Args:
            like: the tensor whose shape, device and dtype diffusers draws the noise like.
            x: the current sample (its batch size and device key the Philox seeds).
            generator: draws the noise as diffusers does (``randn_tensor``), or None.
            variance_noise: explicit standard-normal noise (taken as it is), or None.

        Returns:
            ``(variance_noise, None)`` when it is given; ``(None, seeds)``, per-sample Philox
            keys for in-kernel noise, with ``noise="philox"`` and no generator; else
            ``(noise, None)`` drawn as diffusers draws it (from ``generator``, or from torch's
            global RNG without one).
        """
        if variance_noise is not None:
            return variance_noise, None
        if generator is None and self._noise == "philox":
            return None, self._philox_seeds(x.shape[0], x.device)
        return self._draw(like.shape, generator, like.device, like.dtype), None

    # -- running a step: the template every drop-in's ``step`` follows ---------------------

    _needs_plan = False  # step raises diffusers' "run set_timesteps" error (DDIM, DPM, UniPC)

    def _begin_step(self, timestep: Any, sample: torch.Tensor, contiguous: bool = False):
        """The step's prologue: diffusers' check for a plan (``_needs_plan``), the config
        check, the step index (``_enter_step``); returns ``sample`` laid out for the kernel
        (``dense``)."""
        if self._needs_plan and self.num_inference_steps is None:
            self._check_planned()
        self.check_config()
        self._enter_step(timestep)
        return dense(sample, contiguous)

    def _enter_step(self, timestep: Any) -> None:
        """Step-index bookkeeping at the start of a step (none: the row is the timestep)."""

    def _end_step(self, x0: torch.Tensor | None) -> None:
        """State kept after a step (multistep history, the step index); none by default."""

    def _reference_rule(
        self,
        tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        levels: tuple[str, ...],
        by_row: dict[str, str] | None = None,
        **options: Any,
    ):
        """The reference path's step ``(xr, m, noise) -> (prev, x0)`` of a ``fastdiff.reference``
        function: ``fn(xr, m, *levels, noise=noise, **by_row, **options)``, the levels and
        ``by_row`` (keyword -> table name) read from ``tables`` at ``rows``; ``noise=`` only
        when the step has noise."""

        def reference_step(xr, m, noise):
            values = self._values(tables, rows, *levels, *(by_row.values() if by_row else ()))
            kwargs = dict(zip(by_row, values[len(levels) :])) if by_row else {}
            if noise is not None:
                kwargs["noise"] = noise
            return fn(xr, m, *values[: len(levels)], **kwargs, **options)

        return reference_step

    def _fused_step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        step_tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        reference_step: Callable,
        output_cls: type,
        return_dict: bool,
        *,
        out_dtype: torch.dtype,
        x0_dtype: torch.dtype,
        prediction_type: str | None = None,
        **run_kwargs: Any,
    ):
        """The step's body and epilogue: ``_run_step``, then ``_end_step(x0)``, then the
        diffusers output: ``output_cls(prev_sample[, pred_original_sample])`` (as many values
        as the class has fields), or the tuple without ``return_dict``.

        Args:
            x, model_output, step_tables, rows, reference_step: as ``_run_step`` takes them.
            output_cls: the diffusers output class of the step.
            return_dict: diffusers' ``return_dict``.
            out_dtype, x0_dtype: dtypes of the returned sample and x0 (x0 in the model
                output's dtype for ``prediction_type="sample"``, as diffusers).
            prediction_type: the config's prediction type, or None.
            **run_kwargs: further ``_run_step`` options (noise, seeds, x0_prev, kernel options).
        """
        if prediction_type == "sample":
            x0_dtype = model_output.dtype
        prev, x0 = self._run_step(
            x,
            model_output,
            step_tables,
            rows,
            reference_step,
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            **run_kwargs,
        )
        self._end_step(x0)
        return step_output(output_cls, return_dict, prev, x0)

    def _run_step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        step_tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        reference_step: Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
        ],
        *,
        out_dtype: torch.dtype,
        x0_dtype: torch.dtype,
        noise: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        x0_prev: torch.Tensor | None = None,
        **kernel_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step through ``fastdiff.stepping.run_step`` (the dispatch ``Sampler.step``
        uses), returned in the dtypes the diffusers class returns.

        The reference path runs ``reference_step(xr, m, noise)`` in float64 (it is the
        fallback and the check, not the fast path; float32 would lose digits where
        diffusers' own float32 formulas do not, e.g. ``sqrt(1 - beta')`` for ``beta'`` near
        1 at the end of a cosine schedule), with the in-kernel Philox noise of ``seeds``
        computed in PyTorch; it reads its schedule values of ``rows`` from ``step_tables``
        and takes its own x0_prev.

        Args:
            x: the current sample, as ``dense`` returns it.
            model_output: the model output the step reads.
            step_tables: the step's device tables (``_device_tables``).
            rows: the step's table rows.
            reference_step: the reference path's step; returns ``(prev, x0)``.
            out_dtype, x0_dtype: dtypes of the returned sample and x0 prediction.
            noise: explicit standard-normal noise like ``x``, or None.
            seeds: per-sample Philox keys for in-kernel noise, or None.
            x0_prev: the previous step's x0 for the kernel (multistep), or None.
            **kernel_kwargs: further ``fused_step`` options (clip_range, thresholding,
                variance_mode, write_x0, history, last_sample).

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        if noise is not None and noise.device != x.device:  # a generator on another device
            noise = noise.to(x.device)
        return run_step(
            self._backend,
            x,
            model_output,
            step_tables[self._kernel_table],
            rows,
            lambda xr, m, _x0_prev, z, _grad: reference_step(xr, m, z),
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            noise=noise,
            seeds=seeds,
            x0_prev=x0_prev,
            compute_dtype=torch.float64,
            **kernel_kwargs,
        )

    @staticmethod
    def _values(tables: dict[str, torch.Tensor], rows: torch.Tensor, *names: str):
        """Per-row schedule values for the reference: 0-d for one row, ``[B]`` per sample
        (gathered with a 1-D index: indexing with a 0-d tensor would read it on the host)."""
        shape = () if rows.numel() == 1 else (-1,)
        flat = rows.reshape(-1)
        return tuple(tables[name].index_select(0, flat).reshape(shape) for name in names)

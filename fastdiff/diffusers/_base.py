"""Machinery shared by the fused diffusers schedulers.

Each fused scheduler subclasses the diffusers scheduler it replaces, so configuration,
``set_timesteps`` (the plan: timesteps, sigmas, alphas_cumprod), ``save_pretrained`` /
``from_pretrained`` and every attribute a pipeline reads are diffusers' own. What the
subclass replaces is the reverse step: on ``set_timesteps`` nothing is computed, and the first
``step`` with a given set of step-time options builds a float64 coefficient table on the host
with ``fastdiff.tables`` (from diffusers' own schedule values and diffusers' own rules for the
next timestep), uploads it once per device in float32, and from then on every step is one
``fastdiff.kernels.fused_step`` launch that gathers its row on the device.

The mixin is assembled from three modules: this one (the diffusers wiring, the backend and
noise options, the config checks, the CUDA-graph hooks), ``_plan`` (the plan kept on the
host, the device tables and their rows) and ``_step`` (the step template every drop-in's
``step`` follows, and the step noise).

Backends. ``backend`` is "triton" (the kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), "reference" (``fastdiff.reference``, plain PyTorch on any device and
dtype) or "auto"/None (None reads ``FASTDIFF_BACKEND``): auto takes the kernels for CUDA
tensors in float32/float16/bfloat16 and the reference otherwise. The reference path calls
``fastdiff.reference`` with the schedule values of the row, not the table, so the two
backends check each other.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastdiff.backend import check_backend
from fastdiff.checks import PREDICTION_TYPES, check_choice
from fastdiff.diffusers._common import (
    device_index,
    fused_init,
    fused_set_timesteps,
    make_output,
    mirrored_step,
)
from fastdiff.diffusers._plan import PlanTablesMixin
from fastdiff.diffusers._step import LaunchCache, StepTemplateMixin

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
_STATE_OPTIONS = ("x0_out", "history", "last_sample")  # kernel buffers besides the inputs


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


class FusedSchedulerMixin(StepTemplateMixin, PlanTablesMixin):
    """Mixed in before a diffusers scheduler class; see the module docstring.

    Subclasses provide ``_unsupported()`` (config checks) and their ``step``. The x0
    processing options read from the config are those the diffusers class honours, the ones
    its ``__init__`` takes (``clip_sample`` and ``thresholding`` for DDPM / DDIM,
    ``thresholding`` for DPM-Solver and UniPC, none for Euler and flow): such a key left over
    from another scheduler's JSON is ignored, as the diffusers class ignores it.
    """

    # Whether every step adds fresh noise (DDPM, Euler ancestral, LCM / TCD, stochastic flow
    # matching): what check_capturable reads to refuse torch-drawn noise in a graph.
    _draws_step_noise = False

    _diffusers_cls: type  # the diffusers class subclassed (set by __init_subclass__)
    _step_extras: dict[str, Any] = {}  # keyword-only step arguments besides diffusers' ones
    _output_cls: type  # the diffusers output class of the step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class with a diffusers scheduler among its bases gets ``_diffusers_cls`` (that
        class), the fused ``__init__`` (``fused_init``) and ``set_timesteps``
        (``fused_set_timesteps``), unless it or a fused base class defines them, and, if it
        defines ``_step(model_output, timestep, sample, call)``, a ``step`` with diffusers'
        signature plus ``_step_extras`` (``mirrored_step``)."""
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
        if cls.step is base.step and getattr(cls, "_step", None) is not None:
            cls.step = mirrored_step(base, cls._step_extras, cls._step.__doc__)

    # -- setup and configuration ------------------------------------------------------------

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        self.backend = backend
        self._tables: dict = {}
        self._launches = LaunchCache()  # the kernel path's configurations (StepTemplateMixin)
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

    def _host_value(self, timestep: Any) -> float | int | None:
        """A timestep's value when it is known on the host: a python number, a CPU tensor, or
        an element of the plan tensor (its value is in the host copy of the plan); None for
        other device tensors (reading them would sync)."""
        if isinstance(timestep, torch.Tensor) and not timestep.dim():
            # An element of the plan tensor handed out by set_timesteps (``for t in
            # scheduler.timesteps``, also after slicing) is found from its address: a live
            # 0-d tensor of the plan's dtype and device whose data lies inside the plan's
            # memory, on an element boundary, is a view of it. (Inline: a call costs a
            # microsecond.)
            start, stride, dtype, device = self._plan_address
            if timestep.dtype == dtype and stride > 0:
                offset = timestep.data_ptr() - start
                position = offset // stride
                if not offset % stride and 0 <= position < self._plan_len:
                    if timestep.device == device:
                        return self._plan_values[position]
        return host_scalar(timestep)

    # -- CUDA-graph hooks (fastdiff.diffusers.graph.capture_denoising_loop) -----------------

    def check_capturable(self) -> None:
        """Raise ValueError saying why a denoising loop stepping this scheduler cannot be
        replayed as a CUDA graph (``capture_denoising_loop`` calls it before capturing).

        Refused: a multistep history kept in Python (``model_outputs``, unless the class sets
        ``_history_on_device``), and a step that
        always adds noise drawn from torch's random generators instead of in-kernel Philox
        noise (``uses_philox_noise`` False): a replay would not draw it as the eager loop.
        (Noise asked for per call, DDIM's ``eta > 0``, is caught by the graph's check of its
        first replay, which refuses any draw from torch's generators.)

        Raises:
            ValueError: the reason, and what to use instead.
        """
        name = type(self).__name__
        if hasattr(self, "model_outputs") and not getattr(self, "_history_on_device", False):
            raise ValueError(
                f"{name} keeps its multistep history in Python (model_outputs, "
                "lower_order_nums), which a replayed graph cannot update; use "
                "fastdiff.sample(model, DPMSolverPP2MSampler(...), cuda_graph=True) or the "
                "eager loop"
            )
        if self._draws_step_noise and not self.uses_philox_noise:
            raise ValueError(
                f"{name} draws its step noise from torch's random generator (randn_tensor), "
                "which a replayed CUDA graph does not draw as the eager loop does; use "
                'noise="philox" (in-kernel noise) for a graphed loop, or the eager loop'
            )

    # Whether a graphed step may advance the loop in its kernel (graph_advance): every step
    # that is one fused launch reading the loop's state before it and nothing after it.
    _graph_advances = True
    _graph_advance = None  # the loop's LoopAdvance during an iteration whose step advances it

    def graph_advance(self, advance: Any) -> bool:
        """Offered once by a graphed loop over this scheduler's own plan (its counter is the
        step index): whether this scheduler's step takes the loop's advance over, so that an
        iteration launches neither the timestep gather, the counter's increment nor the copy
        of the step's sample (``prepare_graph_step(advance=)``).

        Taken, the step's kernel launch writes ``prev_sample`` into the loop's latents
        (``advance.out``, where the layouts and dtypes match) and advances the counter and
        the timestep buffer ``advance.timestep`` (which the loop hands its ``step_fn`` as
        ``t``) after its stores; a per-step value the step reads besides (Euler's input
        scale, DDPM / DDIM's table row) is set here (``advance.set_side``) and read from
        ``advance.side_dst``. The loop checks that each iteration made exactly one advancing
        launch (else it takes its own path).

        Args:
            advance: the loop's ``fastdiff.kernels.fused_step.LoopAdvance``.

        Returns:
            Whether the step advances the loop (False: the reference backend, a step of
            more than one launch by design).
        """
        if not self._graph_advances or self._backend == "reference":
            return False
        side = self._graph_side(advance)
        if side is not None:
            advance.set_side(*side)
        return True

    def _graph_side(self, advance: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(src, dst)``: a per-step value the graphed step reads (``graph_advance``)."""
        return None

    def prepare_graph_step(self, step_index: torch.Tensor | None = None, advance: Any = None):
        """Called at the start of every iteration of a captured denoising loop, before the
        loop's ``scale_model_input`` / ``step`` (state kept on the host would otherwise be
        frozen at its captured value). Default: the advance (DDPM / DDIM: the row is the
        timestep itself).

        Args:
            step_index: the iteration's step index as a 0-d int64 device tensor that the loop
                advances in place after the iteration (its own counter, when it runs over the
                scheduler's own timesteps), or None: the index is looked up on the device
                from the iteration's timestep.
            advance: the loop's advance, which this iteration's step launch advances (one
                ``graph_advance`` took), or None: the loop advances itself.
        """
        self._graph_advance = advance

    def finish_graph_step(self) -> None:
        """Called at the end of every iteration of a captured denoising loop: a step called
        after it (outside the loop) advances nothing."""
        self._graph_advance = None

    def graph_kernel_options(self, x, model_output, out_dtype, noise, x0_prev, options: dict):
        """The kernel options of a step that advances a graphed loop: ``options`` with
        ``advance``, and ``out=`` the loop's latents where the step's sample fits them (same
        shape, strides and dtype; no other input in their memory, x itself or apart). The
        advance no longer writes the scaled model input (``set_scaled``) where the sample
        does not go into the latents, or where an input of the step is in its memory (the
        model's output may be a view of its input)."""
        advance = self._graph_advance
        options = {**options, "advance": advance}
        latents = advance.out
        others = (model_output, noise, x0_prev, *(options.get(k) for k in _STATE_OPTIONS))
        fits = "out" not in options and _fits(latents, x, out_dtype, others)
        if fits:
            options["out"] = latents
        scaled = advance.scaled
        if scaled is not None and (not fits or _shares(scaled, (x, *others))):
            advance.set_scaled(None)
        return options

    # -- end of the CUDA-graph hooks ----------------------------------------------------------


def _shares(buffer: torch.Tensor, tensors) -> bool:
    """Whether a tensor among ``tensors`` (None allowed) is in ``buffer``'s memory."""
    memory = buffer.untyped_storage().data_ptr()
    return any(
        isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == memory for t in tensors
    )


def _fits(latents, x, out_dtype, others) -> bool:
    """Whether a graphed step may store its sample into the loop's ``latents``: their
    dtype, shape and strides, none of the step's ``others`` inputs in their memory, and x
    either apart or the latents themselves (``graph_kernel_options``)."""
    if latents is None or latents.dtype != (out_dtype or x.dtype):
        return False
    if latents.shape != x.shape or latents.stride() != x.stride() or _shares(latents, others):
        return False
    memory = latents.untyped_storage().data_ptr()
    return x.untyped_storage().data_ptr() != memory or x.data_ptr() == latents.data_ptr()

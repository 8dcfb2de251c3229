"""Sampler, the base class: a sampling plan plus the per-step table the fused kernel applies.

A sampler visits a descending plan of train timesteps ``t_0 > ... > t_{n-1}``, then clean
data (``ab = 1``); its state is in VP space (``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``).
Each sampler is a rule that fills the table of ``fastdiff.kernels.fused_step`` once, on the
host, in float64 (``fastdiff.tables``). The reference backend does not read the table: it
calls ``fastdiff.reference`` with the step's schedule values, so the two check each other.
``Sampler.__init__`` and ``Sampler.step`` check their arguments (``fastdiff.checks``);
``fastdiff.stepping.run_step`` runs the step on the backend.

Example:
    >>> sampler = DDIMSampler(NoiseSchedule.create("linear", 1000), 50)
    >>> x = sampler.step(x, model(x, sampler.model_condition(0, 4, x.device)), 0).prev_sample
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdiff import reference
from fastdiff.backend import check_backend
from fastdiff.checks import (
    PREDICTION_TYPES,
    check_choice,
    check_finite_table,
    check_guidance,
    check_like,
    check_model_output,
    check_out,
    check_processing,
    check_seeds,
    check_tensor,
)
from fastdiff.kernels.fused_step import COLUMNS
from fastdiff.schedules import CONDITIONINGS, NoiseSchedule, make_plan
from fastdiff.stepping import run_step

__all__ = ["Sampler", "StepOutput", "broadcast_over"]


@dataclass
class StepOutput:
    """What a step returns (the names diffusers uses).

    Attributes:
        prev_sample: the next sample ``x_{t'}``.
        pred_original_sample: the step's (processed) prediction of x0.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None


def broadcast_over(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values [B] (or a scalar) shaped to broadcast over x's trailing dims."""
    return value.reshape(-1, *([1] * (x.dim() - 1))) if value.dim() == 1 else value


class Sampler:
    """Base class: the plan, the table, and one ``step`` for both backends.

    Args:
        schedule: the noise schedule the model was trained with.
        steps: number of sampling steps (spaced by ``timestep_spacing``), a respacing string
            (``"ddim50"``, ``"10,15,20"``) or an explicit descending list of train timesteps.
        timestep_spacing: "leading", "trailing" or "linspace" (with an int ``steps``).
        steps_offset: added to leading-spaced timesteps (diffusers' ``steps_offset``).
        prediction_type: what the model predicts: "epsilon", "sample" or "v_prediction".
        clip_sample_range: clamp the predicted x0 to ``[-r, r]`` (None: no clipping).
        thresholding: ``(ratio, max_value)`` for dynamic thresholding (Saharia et al. 2022).
        conditioning: what the model is conditioned on: "timestep", "alpha_bar", "sigma" or
            "log_snr" (see ``model_condition``).
        backend: "triton", "reference", "auto", or None (``FASTDIFF_BACKEND``, else auto).
    """

    stochastic = False
    multistep = False

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | str | Sequence[int] | torch.Tensor = 50,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float | None = None,
        thresholding: tuple[float, float] | None = None,
        conditioning: str = "timestep",
        backend: str | None = None,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self._set_options(schedule, prediction_type, conditioning, clip_sample_range,
                          thresholding, backend)  # fmt: skip
        self.timesteps = make_plan(
            schedule.num_train_timesteps, steps, timestep_spacing, steps_offset
        )
        nxt = torch.cat([self.timesteps[1:], torch.tensor([-1])])
        prv = torch.cat([torch.tensor([-1]), self.timesteps[:-1]])
        # Schedule values of each step, float64, CPU: ab at t_i, at t_{i+1} (1 after the
        # last step) and at t_{i-1} (the previous visited step; 1 before the first).
        self.alpha_bar = schedule.alpha_bar(self.timesteps)
        self.alpha_bar_next = schedule.alpha_bar(nxt)
        self.alpha_bar_prev = schedule.alpha_bar(prv)
        self._set_table()

    def _set_options(
        self, schedule, prediction_type, conditioning, clip_sample_range=None, thresholding=None,
        backend=None, *, prediction_types=PREDICTION_TYPES, conditionings=CONDITIONINGS,
    ) -> None:  # fmt: skip
        """Checks and sets the options every sampler family shares (its own choices of
        prediction type and conditioning)."""
        self.schedule = schedule
        self.prediction_type = check_choice("prediction_type", prediction_type, prediction_types)
        self.conditioning = check_choice("conditioning", conditioning, conditionings)
        self.clip_sample_range, self.thresholding = check_processing(
            clip_sample_range, thresholding, clip_name="clip_sample_range"
        )
        self.backend = check_backend(backend)
        # the x0 processing keywords of run_step, only those set
        processing = self._process_kwargs()
        self._processing = {k: v for k, v in processing.items() if v is not None}

    def _set_table(self) -> None:
        """Builds and checks the coefficient table of the plan (``timesteps``, ``alpha_bar``,
        ``alpha_bar_next``, ``alpha_bar_prev`` set); every sampler's ``__init__`` ends here."""
        n = self._num_steps = len(self.timesteps)
        self._check_prediction_at_zero_snr()
        table = self._build_table()
        if table.shape != (n, len(COLUMNS)) or table.dtype != torch.float64:
            raise AssertionError("internal: table has the wrong shape or dtype")
        check_finite_table(
            table,
            COLUMNS,
            lambda step: f"{type(self).__name__} step {step} (t={float(self.timesteps[step]):g})",
            "the schedule and prediction type do not fit (e.g. epsilon prediction at zero "
            "terminal SNR)",
        )
        self.table = table
        self._device_cache: dict = {}
        mode = self._variance_mode()
        self._learned = None if mode == "fixed" else mode  # the learned variance mode, if any

    # -- what subclasses provide -------------------------------------------------------------

    def _build_table(self) -> torch.Tensor:
        raise NotImplementedError

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_steps}, prediction_type="
            f"{self.prediction_type!r}, backend={self.backend!r})"
        )

    @property
    def num_steps(self) -> int:
        """Number of sampling steps (model calls)."""
        return self._num_steps

    def _check_prediction_at_zero_snr(self) -> None:
        if self.prediction_type == "epsilon" and bool((self.alpha_bar <= 0).any()):
            raise ValueError(
                "epsilon prediction cannot recover x0 where alpha_bar is 0 (zero terminal SNR); "
                "use v_prediction or a plan that avoids the last train timestep"
            )

    def device_tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Device copies of the table and the per-step schedule values (cached per device).

        Keys: ``table`` (float32), ``rows`` (int64 step indices 0..n-1) and ``row_views``
        (``rows[i:i+1]`` for each i, made once: a step then costs no tensor creation),
        ``timesteps``, ``alpha_bar``, ``alpha_bar_next``, ``alpha_bar_prev`` (float64).
        """
        cached = self._device_cache.get(device)  # fast path: a tensor's own device
        if cached is not None:
            return cached
        key = torch.device(device)
        if key.type == "cuda" and key.index is None:
            key = torch.device("cuda", torch.cuda.current_device())
        cached = self._device_cache.get(key)
        if cached is None:
            rows = torch.arange(self.num_steps, dtype=torch.int64, device=key)
            cached = {
                "row_views": [rows[i : i + 1] for i in range(self.num_steps)],
                "rows": rows,
                "timesteps": self.timesteps.to(key),
                "alpha_bar": self.alpha_bar.to(key),
                "alpha_bar_next": self.alpha_bar_next.to(key),
                "alpha_bar_prev": self.alpha_bar_prev.to(key),
            }
            cached["table"] = self.table.to(device=key, dtype=torch.float32).contiguous()
            self._device_cache[key] = cached
        self._device_cache[device] = cached
        return cached

    def _step_index(self, i, batch: int, device: torch.device) -> torch.Tensor | int:
        """A checked step index: an int in ``[0, num_steps)``, or an int64 tensor (0-d or
        ``[batch]``) on ``device`` (its range is checked on the CPU only: no sync)."""
        if isinstance(i, bool):
            raise TypeError("step index must be an int or an integer tensor, got a bool")
        if isinstance(i, int):
            if not 0 <= i < self.num_steps:
                raise IndexError(f"step index {i} outside [0, {self.num_steps})")
            return i
        if not isinstance(i, torch.Tensor) or i.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"step index must be an int or an integer tensor, got {i!r}")
        if i.dim() > 1 or (i.dim() == 1 and i.shape[0] != batch):
            raise ValueError(
                f"a per-sample step index must have shape [{batch}], got {tuple(i.shape)}"
            )
        if i.device != device:
            raise ValueError(f"step index is on {i.device} but x is on {device}")
        if i.device.type == "cpu" and bool(((i < 0) | (i >= self.num_steps)).any()):
            raise IndexError(f"step index outside [0, {self.num_steps})")
        return i.long()

    def model_condition(
        self, i: int | torch.Tensor, batch_size: int, device: torch.device | str
    ) -> torch.Tensor:
        """What the model is conditioned on at step ``i``, one float32 value per sample.

        ``conditioning="timestep"`` gives the train timestep ``t_i``; ``"alpha_bar"``,
        ``"sigma"`` and ``"log_snr"`` give the noise level, so a model conditioned on the noise
        level can be sampled on any plan.

        Args:
            i: step index (int, 0-d or per-sample [B] tensor on ``device``).
            batch_size: B.
            device: where the model runs.

        Returns:
            float32 tensor [B].
        """
        on_device = self.device_tables(device)
        i = self._step_index(i, batch_size, on_device["timesteps"].device)
        # an int indexes on the host side (a view); a tensor index goes through torch.take,
        # since indexing with a 0-d device tensor would read it back to the host (a sync)
        t = on_device["timesteps"][i] if isinstance(i, int) else on_device["timesteps"].take(i)
        value = self.schedule.conditioning(t, self.conditioning)
        return value.to(torch.float32).expand(batch_size) if value.dim() == 0 else value.float()

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
        """One reverse step from step index ``i`` to ``i + 1`` (or to clean after the last).

        Arguments are checked here, the same on both backends; the step then runs through
        ``fastdiff.stepping.run_step``. Differentiable on both backends (the kernel's
        backward treats the thresholding quantile as a constant, as the reference does).

        Args:
            x: the current sample ``[B, ...]``.
            model_output: ``[B, ...]``; ``[2B, ...]`` with guidance (unconditional half
                first); learned variances carry 2x channels.
            i: step index: int, 0-d int tensor on x's device, or per-sample ``[B]`` tensor.
            x0_prev: the previous step's x0 (multistep samplers; without it the step is
                first order).
            noise: explicit standard-normal noise like x; or ``seeds``, int64 ``[B]``:
                Philox noise keyed by (seed, i, element). Not both; deterministic samplers
                ignore them.
            guidance_scale: classifier-free guidance scale (None: no guidance);
                guidance_rescale: Lin et al. 2023 factor in [0, 1].
            grad: classifier guidance: the scaled gradient of log p(y | x_t), like x.
            return_x0: also return the predicted x0; False saves the kernel one pass over
                the tensor (``pred_original_sample`` is then None).
            out, x0_out: preallocated outputs with x's shape, device and strides (static
                buffers for CUDA graphs); they may alias ``x`` and ``x0_prev``.

        Returns:
            StepOutput(prev_sample, pred_original_sample).

        Example:
            >>> out = sampler.step(x, model(x, sampler.model_condition(0, 4, x.device)), 0,
            ...                    seeds=torch.arange(4))
        """
        i, guidance_scale, guidance_rescale = self._check_arguments(
            x, model_output, i, x0_prev, noise, seeds, grad, guidance_scale, guidance_rescale,
            out, x0_out,
        )  # fmt: skip
        table, rows, reference_step, options = self._step_inputs(
            x, i, x0_prev, noise, seeds, return_x0, x0_out
        )

        # run_step gets only what differs from its defaults (keywords cost time per call)
        if guidance_scale is not None:
            options["guidance_scale"] = guidance_scale
            options["guidance_rescale"] = guidance_rescale
        if self._processing:
            options.update(self._processing)
        if grad is not None:
            options["grad"] = grad
        if out is not None:
            options["out"] = out
        if x0_out is not None:
            options["x0_out"] = x0_out

        def check_tensors():
            """Shapes, devices and layouts: run_step calls this on the reference path, and on
            the kernel path where the kernel refuses a signature (so that both backends
            raise the same error)."""
            guided = guidance_scale is not None
            check_model_output(model_output, x, guided=guided, variance_type=self._learned)
            for name in ("x0_prev", "noise", "grad"):
                if name in options:
                    check_like(name, options[name], x)
            for name in ("out", "x0_out"):
                if name in options:
                    check_out(name, options[name], x)

        x_next, x0 = run_step(
            self.backend, x, model_output, table, rows, reference_step, check=check_tensors,
            **options,
        )  # fmt: skip
        return StepOutput(x_next, x0)

    def _step_inputs(self, x, i, x0_prev, noise, seeds, return_x0, x0_out):
        """What ``step`` hands ``run_step`` besides the arguments every sampler passes on:
        ``(table, rows, reference_step, options)``, options being run_step's keywords of
        this sampler kind (variance mode, x0_prev, noise, seeds, write_x0). UniPC overrides
        it (its history ring, its chain position)."""
        learned = self._learned is not None

        def reference_step(x, m, x0_prev, noise, grad):
            m, v = reference.split_learned_variance(m, self.variance_type) if learned else (m, None)
            return self._reference_step(x, m, v, i, x0_prev, noise, grad)

        on_device = self.device_tables(x.device)
        rows = on_device["row_views"][i] if isinstance(i, int) else i  # 0-d or [B]: as is
        options = {"write_x0": return_x0}  # only what differs from run_step's defaults
        if learned:
            options["variance_mode"] = self._learned
        if x0_prev is not None and self.multistep:
            options["x0_prev"] = x0_prev
        if self.stochastic:
            if noise is not None:
                options["noise"] = noise
            if seeds is not None:
                options["seeds"] = seeds
        return on_device["table"], rows, reference_step, options

    def _check_arguments(
        self, x, model_output, i, x0_prev, noise, seeds, grad, guidance_scale, guidance_rescale,
        out, x0_out,
    ) -> tuple[int | torch.Tensor, float | None, float]:  # fmt: skip
        """The checks of ``step`` that do not depend on the tensors' shapes (those are
        ``check_tensors`` in ``step``); returns the step index and the guidance scale and
        rescale as floats."""
        check_tensor("x", x)
        if x.dim() < 1:
            raise ValueError("x must have a leading batch dimension (got a 0-d tensor)")
        check_tensor("model_output", model_output)
        if guidance_scale is not None or guidance_rescale:
            guidance_scale, guidance_rescale = check_guidance(guidance_scale, guidance_rescale)
            if guidance_rescale and x[0].numel() < 2:
                raise ValueError(
                    "guidance rescale needs a per-sample std: x must have at least 2 elements "
                    f"per sample, got shape {tuple(x.shape)}"
                )
        if type(i) is not int or not 0 <= i < self._num_steps:  # (the common case is cheap)
            i = self._step_index(i, x.shape[0], x.device)
        if noise is not None and seeds is not None:
            raise ValueError("pass either noise or seeds, not both")
        if seeds is not None:
            check_seeds(seeds, x.shape[0], x.device)
        if noise is not None:
            check_tensor("noise", noise)
            if not self.stochastic:  # ignored by the step: checked here, not with the tensors
                check_like("noise", noise, x)
        elif self.stochastic and seeds is None:
            raise ValueError(f"{type(self).__name__} adds noise: pass noise= or seeds=")
        if grad is not None:
            check_tensor("grad", grad)
            if not self.stochastic:
                raise ValueError(
                    "classifier guidance shifts the mean by variance x gradient; "
                    f"{type(self).__name__}'s step has no variance (use DDPM, DDIM with "
                    "eta > 0 or Euler ancestral)"
                )
        if x0_prev is not None and self.multistep:
            check_tensor("x0_prev", x0_prev)
        if out is not None:
            check_tensor("out", out)
        if x0_out is not None:
            check_tensor("x0_out", x0_out)
        return i, guidance_scale, guidance_rescale

    def _variance_mode(self) -> str:
        return "fixed"

    def _values(self, x: torch.Tensor, i) -> dict[str, torch.Tensor]:
        """ab_t, ab_next, ab_prev of step i on x's device (per sample when i is a tensor)."""
        on_device = self.device_tables(x.device)
        names = ("alpha_bar", "alpha_bar_next", "alpha_bar_prev")
        if isinstance(i, torch.Tensor):  # take, not [i]: a 0-d index tensor would sync
            return {k: on_device[k].take(i) for k in names}
        return {k: on_device[k][i] for k in names}

    def _reference_call(self, step_fn, x, model_output, start, end, **kwargs):
        """``step_fn(x, model_output, start, end, ...)``: a ``fastdiff.reference`` step between
        two noise levels (``ab_t, ab_next`` or ``sigma, sigma_next``), with the sampler's
        prediction type and x0 processing."""
        return step_fn(
            x, model_output, start, end,
            prediction_type=self.prediction_type, **self._process_kwargs(), **kwargs,
        )  # fmt: skip

    def _ab(self, x: torch.Tensor, i) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ab_t, ab_next)`` of step i on x's device."""
        s = self._values(x, i)
        return s["alpha_bar"], s["alpha_bar_next"]

    def _process_kwargs(self) -> dict:
        return {"clip_range": self.clip_sample_range, "thresholding": self.thresholding}

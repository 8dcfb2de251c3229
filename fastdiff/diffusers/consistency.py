"""FusedLCMScheduler and FusedTCDScheduler: diffusers' consistency-model schedulers (LCM,
LCM-LoRA, TCD: few-step distilled models) with each step as one fused kernel launch.

Both steps predict ``y = c_skip x + c_out x_s`` and re-noise it to the next level (the rule
and its equations: ``fastdiff.tables.consistency_tables``, ``reference.consistency_step``):
LCM's ``denoised`` (``x_s = x0``) and TCD's ``pred_noised_sample`` (``x_s`` at TCD's
intermediate timestep ``s = floor((1 - gamma) t_next)``, ``c_skip = 0``, ``c_out = 1``). ``y``
is linear in x and the model output, so the kernel writes it as its x0 output and the next
sample from it in the same launch. LCM's ``clip_sample`` / ``thresholding`` process x0 before
``c_out``: then a second launch of the same kernel re-noises ``y``.

Example:
    >>> pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)
"""

from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_lcm import LCMScheduler, LCMSchedulerOutput
from diffusers.schedulers.scheduling_tcd import TCDScheduler, TCDSchedulerOutput

from fastdiff import tables
from fastdiff.checks import PREDICTION_TYPES, is_number
from fastdiff.diffusers._common import nan_row, promote, step_output
from fastdiff.diffusers._rows import StepIndexMixin
from fastdiff.reference import consistency_step, renoise

__all__ = ["FusedLCMScheduler", "FusedTCDScheduler"]

_SIGMA_DATA = 0.5  # diffusers' get_scalings_for_boundary_condition_discrete


class _ConsistencyBase(StepIndexMixin):
    """Shared by LCM and TCD: the per-plan-step table (row i: step i of ``self.timesteps``,
    then a poison row), ``set_timesteps`` and the step. Subclasses give ``_levels`` (the
    per-step ``c_skip``, ``c_out``, ``t_s``) and the output class."""

    _needs_plan = True  # diffusers' step raises "run set_timesteps" without a plan
    _last_next_is_self: bool  # LCM: the last step's "next" timestep is itself; TCD: 0

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        # diffusers fixes these at construction (add_noise later moves alphas_cumprod)
        self._alphas_cumprod64 = self.alphas_cumprod.detach().to("cpu", torch.float64)
        self._final_alpha_cumprod64 = float(self.final_alpha_cumprod)
        super()._setup_fused(backend, noise)

    _draws_step_noise = True  # every step but the last (check_capturable refuses torch noise)

    # -- plan --------------------------------------------------------------------------------

    def _check_plan(self, arguments: dict) -> None:
        """Before diffusers' set_timesteps (``fused_set_timesteps``): custom ``timesteps``
        integers in [0, num_train_timesteps)."""
        timesteps = arguments["timesteps"]
        if timesteps is not None:
            train = self.config.num_train_timesteps
            values = list(timesteps)
            if not all(is_number(t) and t == int(t) and 0 <= t < train for t in values):
                raise ValueError(f"timesteps must be integers in [0, {train}), got {values}")

    def _levels(self, t: torch.Tensor, t_next: torch.Tensor, eta: float | None, level):
        """Per step: ``(c_skip, c_out, ab_s)`` (float64 [n]) from the plan's timesteps ``t``,
        the next ones ``t_next`` and ``level`` (alpha_bar of int64 train timesteps)."""
        raise NotImplementedError

    def _adds_noise(self, index: int | torch.Tensor, eta: float | None):
        """diffusers' rule: every step whose index is not ``num_inference_steps - 1`` adds
        noise (TCD: only with eta > 0; LCM passes eta None); ``index``: an int or an int64
        tensor."""
        return (index != self.num_inference_steps - 1) & (eta is None or eta > 0)

    def _build(self, prediction_type: str, eta: float | None, processed: bool):
        ab_all, final = self._alphas_cumprod64, self._final_alpha_cumprod64
        t = self._plan_host.long()
        n = len(t)
        last = t[-1:] if self._last_next_is_self else torch.zeros(1, dtype=torch.long)
        t_next = torch.cat([t[1:], last])

        def level(ts):
            return torch.where(ts >= 0, ab_all[ts.clamp(min=0)], final)

        c_skip, c_out, ab_s = self._levels(t, t_next, eta, level)
        ab = level(t)
        noisy = self._adds_noise(torch.arange(n), eta)
        ab_next = torch.where(noisy, level(t_next), ab_s)  # ab_s: no noise, x' = y
        values = {"ab": ab, "ab_s": ab_s, "ab_next": ab_next, "c_skip": c_skip, "c_out": c_out}
        nan = torch.full((1,), math.nan, dtype=torch.float64)
        out = {name: torch.cat([v, nan]) for name, v in values.items()}
        table, renoised = tables.consistency_tables(
            ab, ab_s, ab_next, c_skip, c_out, prediction_type, processed
        )
        out["table"] = torch.cat([table, nan_row()])
        if renoised is not None:  # uploaded as it is: only "table" is cast to float32 then
            out["renoise"] = torch.cat([renoised, nan_row()]).float()
        return out

    # -- step --------------------------------------------------------------------------------

    def _is_noisy(self, eta: float | None) -> bool:
        """Whether this step draws noise: ``_adds_noise`` of a host step index; with a device
        index whenever eta > 0 (the row's std is 0 where it adds none: an unused draw)."""
        index = self._step_index
        if isinstance(index, torch.Tensor):
            return eta is None or eta > 0
        return self._adds_noise(index, eta)

    def _step(self, model_output, timestep, sample, call: dict):
        """One LCM / TCD step (TCD's ``eta`` is the stochasticity gamma in [0, 1]; 0:
        deterministic).

        Returns:
            ``LCMSchedulerOutput(prev_sample, denoised)`` / ``TCDSchedulerOutput(prev_sample,
            pred_noised_sample)``, or the tuple.
        """
        eta, generator, return_dict = call.get("eta"), call["generator"], call["return_dict"]
        if eta is not None:  # TCD
            if isinstance(eta, torch.Tensor) and eta.device.type == "cpu" and eta.numel() == 1:
                eta = eta.item()
            if not is_number(eta):
                raise TypeError(f"eta must be a python number, got {type(eta).__name__}")
            if not 0.0 <= eta <= 1.0:
                raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta}")
            eta = float(eta)
        x = self._begin_step(timestep, sample)
        config = self.config
        prediction_type = config.prediction_type
        clip_range, thresholding = self._processing(config)
        processed = clip_range is not None or thresholding is not None
        key = ("consistency", prediction_type, self._scaling(config), eta, processed)
        build = lambda: self._build(prediction_type, eta, processed)  # noqa: E731
        tabs = self._device_tables(key, x.device, build)
        rows = self._index_rows(tabs)
        out_dtype = promote(sample.dtype, model_output.dtype)
        noise = seeds = None
        if self._is_noisy(eta):
            # as diffusers draws it: like the model output, in denoised's dtype
            noise, seeds = self._step_noise(model_output, x, generator, None, out_dtype)
        if not processed:
            reference_step = self._rule(
                tabs,
                rows,
                consistency_step,
                ("ab", "ab_s", "ab_next"),
                {"c_skip": "c_skip", "c_out": "c_out"},
                {"prediction_type": prediction_type},
            )
            return self._fused(
                x, model_output, tabs, rows, reference_step, return_dict, out_dtype, out_dtype,
                noise, seeds, None, {},
            )  # fmt: skip
        # x0 processed before c_out: y first, then a second launch re-noises it

        def denoise_step(xr, m, _z):
            ab, ab_s, c_skip, c_out = self._values(tabs, rows, "ab", "ab_s", "c_skip", "c_out")
            y = consistency_step(
                xr, m, ab, ab_s, ab_s, c_skip=c_skip, c_out=c_out,
                prediction_type=prediction_type, clip_range=clip_range,
                thresholding=thresholding,
            )[1]  # fmt: skip
            return y, y

        def renoise_step(yr, _m, z):
            ab_s, ab_next = self._values(tabs, rows, "ab_s", "ab_next")
            return renoise(yr, ab_s, ab_next, z), yr

        y, _ = self._step_once(
            x, model_output, tabs, rows, denoise_step, out_dtype, out_dtype, None, None, None,
            {"clip_range": clip_range, "thresholding": thresholding, "write_x0": False},
        )  # fmt: skip
        prev, _ = self._step_once(
            y, y, {"table": tabs["renoise"]}, rows, renoise_step, out_dtype, out_dtype, noise,
            seeds, None, {"write_x0": False},
        )  # fmt: skip
        self._end_step(y)
        return step_output(self._output_cls, return_dict, prev, y)

    def _scaling(self, config) -> float:
        return 0.0

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return self._thresholding_checks(config)


class FusedLCMScheduler(_ConsistencyBase, LCMScheduler):
    """Drop-in ``LCMScheduler`` (Latent Consistency Models, Luo et al. 2023) whose ``step`` is
    one fused kernel launch (two with ``clip_sample`` or ``thresholding``).

    Same config, plan (``original_inference_steps``, custom ``timesteps``, ``strength``) and
    outputs (``prev_sample``, ``denoised``) as diffusers: ``denoised = c_skip x + c_out x0``
    with the boundary scalings of ``timestep_scaling``, then ``x' = sqrt(ab') denoised +
    sqrt(1 - ab') z`` on every step but the last.

    Noise: ``noise="torch"`` (default) draws it as diffusers does (``generator`` or the
    global RNG), so the same images for the same seed; ``noise="philox"`` makes it in the
    kernel when no generator is passed (needed for ``capture_denoising_loop``). With a step
    index on the device (a timestep that is a CUDA tensor other than an element of
    ``self.timesteps``), ``noise="torch"`` draws on the last step too (unused).

    Example:
        >>> pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = LCMSchedulerOutput
    _last_next_is_self = True

    def _scaling(self, config) -> float:
        return float(config.timestep_scaling)

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        scaling = config.get("timestep_scaling", 10.0)
        return [
            *self._thresholding_checks(config),
            (
                "timestep_scaling",
                not (is_number(scaling) and math.isfinite(scaling) and scaling >= 0),
                "the boundary scalings need a finite timestep_scaling >= 0",
            ),
        ]

    def _levels(self, t, t_next, eta, level):
        u = t.to(torch.float64) * self._scaling(self.config)
        c_skip = _SIGMA_DATA**2 / (u**2 + _SIGMA_DATA**2)
        c_out = u / (u**2 + _SIGMA_DATA**2).sqrt()
        return c_skip, c_out, torch.ones_like(u)  # ab_s = 1: x_s = x0


class FusedTCDScheduler(_ConsistencyBase, TCDScheduler):
    """Drop-in ``TCDScheduler`` (Trajectory Consistency Distillation, Zheng et al. 2024) whose
    ``step`` is one fused kernel launch: ``x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps`` at
    ``s = floor((1 - eta) t_next)`` (``eta`` is the paper's gamma), then, for ``eta > 0`` on
    every step but the last, ``x' = sqrt(ab'/ab_s) x_s + sqrt(1 - ab'/ab_s) z``.

    Same config, plan and outputs (``prev_sample``, ``pred_noised_sample``) as diffusers; like
    diffusers it ignores ``clip_sample`` / ``thresholding`` and ``timestep_scaling``. Noise as
    for ``FusedLCMScheduler``.

    Example:
        >>> pipe.scheduler = FusedTCDScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = TCDSchedulerOutput
    _last_next_is_self = False

    def _x0_options(self, config) -> tuple[bool, bool]:
        """Neither: TCD's ``__init__`` takes clip_sample / thresholding, its step ignores them."""
        return False, False

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "prediction_type",
                config.prediction_type not in PREDICTION_TYPES,
                f"the fused step supports {PREDICTION_TYPES}",
            )
        ]

    def _levels(self, t, t_next, eta, level):
        # diffusers' own float32 arithmetic: torch.floor((1 - eta) * prev_timestep)
        t_s = torch.floor((1 - eta) * t_next).to(torch.long)
        ones = torch.ones(len(t), dtype=torch.float64)
        return torch.zeros_like(ones), ones, level(t_s)

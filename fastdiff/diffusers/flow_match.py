"""FusedFlowMatchEulerDiscreteScheduler: diffusers' flow-matching Euler scheduler (SD3, Flux,
HunyuanVideo, LTX, QwenImage, ...) with the step as one fused kernel."""

from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)

from fastdiff import flow_tables, reference
from fastdiff.diffusers._common import nan_row, upload
from fastdiff.diffusers._rows import StepIndexMixin
from fastdiff.flow import check_flow_sigmas

__all__ = ["FusedFlowMatchEulerDiscreteScheduler"]

_NO_X0 = {"write_x0": False}  # diffusers returns no x0: 3 passes over the tensor


class FusedFlowMatchEulerDiscreteScheduler(StepIndexMixin, FlowMatchEulerDiscreteScheduler):
    """Drop-in ``FlowMatchEulerDiscreteScheduler`` whose ``step`` is one fused kernel launch:
    ``x' = x + (s' - s) v`` (or, with ``stochastic_sampling``, ``x' = (1 - s') x0 + s' z``).

    Every config option of diffusers is supported (shift, dynamic shifting with ``mu``,
    ``time_shift_type``, ``shift_terminal``, Karras / exponential / beta sigmas,
    ``invert_sigmas``, ``stochastic_sampling``): the plan is diffusers' own ``set_timesteps``.
    Refused at ``step``: ``per_token_timesteps`` (one level per token, not per sample).
    Custom ``sigmas`` must be strictly decreasing in [0, 1] (custom ``timesteps`` in [0, T]).

    Noise of the stochastic form: drawn as diffusers draws it (``randn_tensor`` from the
    ``generator``, or from torch's global stream without one); ``noise="philox"`` (constructor
    or attribute) for in-kernel Philox noise without a generator (faster, but not diffusers'
    random stream).

    Also: ``init_noise_sigma`` (1) and an identity ``scale_model_input``, which the diffusers
    class lacks, so that generic loops run unchanged.

    Example:
        >>> pipe.scheduler = FusedFlowMatchEulerDiscreteScheduler.from_config(
        ...     pipe.scheduler.config)
    """

    _output_cls = FlowMatchEulerDiscreteSchedulerOutput

    @property
    def _draws_step_noise(self) -> bool:
        return bool(self.config.stochastic_sampling)  # x' = (1 - s') x0 + s' z

    init_noise_sigma = 1.0

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "time_shift_type",
                config.get("time_shift_type", "exponential") not in ("exponential", "linear"),
                "the time shift is exponential or linear",
            )
        ]

    def _plan_signature(self) -> tuple:
        return (getattr(self, "num_inference_steps", None), self.shift)

    def _plan_changed(self, device) -> None:
        # diffusers keeps these sigmas where the timesteps are; the base compares and keeps
        # plans on the host, and the tables are built from a float64 host copy.
        sigmas = self.sigmas
        self.sigmas = sigmas.cpu()
        try:
            super()._plan_changed(device)
        finally:
            self.sigmas = sigmas

    def _planning_device(self, device):
        return device  # diffusers keeps its sigmas where the timesteps go

    def _check_plan(self, arguments: dict) -> None:
        """Before diffusers' set_timesteps (``fused_set_timesteps``, as ``retrieve_timesteps``
        calls it): ``mu`` with dynamic shifting, custom ``sigmas`` strictly decreasing in
        [0, 1], custom ``timesteps`` in [0, num_train_timesteps]."""
        config = self.config
        if config.use_dynamic_shifting and arguments["mu"] is None:
            raise ValueError(
                "mu must be passed to set_timesteps when use_dynamic_shifting is True (Flux "
                "pipelines compute it from the image's sequence length: calculate_shift)"
            )
        if arguments["sigmas"] is not None:
            check_flow_sigmas(arguments["sigmas"], "sigmas")
        if arguments["timesteps"] is not None:
            check_flow_sigmas(arguments["timesteps"], "timesteps", high=config.num_train_timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The flow model takes the state as it is: returns ``sample``."""
        return sample

    def scale_noise(
        self,
        sample: torch.Tensor,
        timestep: reference.ScheduleValue,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The flow path ``s noise + (1 - s) sample`` at each sample's timestep, as diffusers
        computes it (img2img / inpainting), without a host sync for device timesteps.

        Args:
            sample: clean samples ``[B, ...]``.
            timestep: one timestep per sample (from ``self.timesteps``).
            noise: standard-normal noise like ``sample``.

        Returns:
            The noisy samples, in ``sample``'s dtype.
        """
        timestep = torch.as_tensor(timestep).reshape(-1)
        indices = self._add_noise_indices(timestep, sample.device)
        key = ("noise_sigmas", sample.device, sample.dtype)
        sigmas = self._plan_device.get(key)
        if sigmas is None:  # with a NaN for a timestep not in the plan
            host = torch.cat([self._plan_sigmas, torch.full((1,), math.nan)]).to(sample.dtype)
            sigmas = self._plan_device[key] = upload(host, sample.device)
        sigma = sigmas[indices].flatten()
        while sigma.dim() < sample.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def _build(self, stochastic: bool) -> dict[str, torch.Tensor]:
        sigmas = self._plan_sigmas.to(torch.float64)
        steps = len(self._plan_host)
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        table = flow_tables.flow_euler_table(sigma, sigma_next, "flow_prediction", stochastic)
        pad = steps + 1 - len(table)  # poison rows past the plan (and past the sigmas)
        nan = torch.full((pad,), math.nan, dtype=torch.float64)
        return {
            "table": torch.cat([table, nan_row().expand(pad, -1)]),
            "sigma": torch.cat([sigma, nan]),
            "sigma_next": torch.cat([sigma_next, nan]),
        }

    def _noise_of_step(self, sample: torch.Tensor, generator) -> tuple:
        """(noise, seeds) of ``stochastic_sampling``: diffusers' ``randn_tensor`` draw in
        float32 (like the upcast sample), or in-kernel Philox with ``noise="philox"``."""
        return self._step_noise(sample, sample, generator, None, torch.float32)

    def _step(
        self, model_output, timestep, sample, call: dict
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One flow Euler step.

        Args:
            model_output: the velocity ``v``, like ``sample``.
            sample: the current state.
            s_churn, s_tmin, s_tmax, s_noise: accepted and unused, as in diffusers.
            generator: draws the noise of ``stochastic_sampling`` as diffusers does.
            per_token_timesteps: not supported (ValueError).

        Returns:
            ``FlowMatchEulerDiscreteSchedulerOutput(prev_sample)`` or ``(prev_sample,)``, in
            the model output's dtype.
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of "
                "the `scheduler.timesteps` as a timestep."
            )
        if call["per_token_timesteps"] is not None:
            raise ValueError(
                f"{type(self).__name__} does not support per_token_timesteps (one noise level "
                "per token); use diffusers' FlowMatchEulerDiscreteScheduler for it"
            )
        x = self._begin_step(timestep, sample)
        stochastic = bool(self.config.get("stochastic_sampling", False))
        tabs = self._device_tables(
            ("flow_euler", stochastic), x.device, lambda: self._build(stochastic)
        )
        rows = self._index_rows(tabs)
        noise = seeds = None
        if stochastic:
            noise, seeds = self._noise_of_step(sample, call["generator"])
        rule = reference.flow_stochastic_step if stochastic else reference.flow_euler_step
        reference_step = (tabs, rows, rule, ("sigma", "sigma_next"), None, {})  # (_rule's)
        return self._fused(
            x, model_output, tabs, rows, reference_step, call["return_dict"], model_output.dtype,
            torch.float32, noise, seeds, None, _NO_X0,
        )  # fmt: skip

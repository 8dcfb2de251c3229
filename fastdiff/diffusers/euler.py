"""FusedEulerDiscreteScheduler and FusedEulerAncestralDiscreteScheduler: diffusers' Euler
schedulers (sigma-space state, Karras et al. 2022 / k-diffusion) with the step as one fused
kernel."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_discrete import (
    EulerDiscreteScheduler,
    EulerDiscreteSchedulerOutput,
)
from diffusers.utils import logging

from fastdiff import reference, tables
from fastdiff.diffusers._common import nan_row, promote, upload
from fastdiff.diffusers._rows import StepIndexMixin

__all__ = ["FusedEulerAncestralDiscreteScheduler", "FusedEulerDiscreteScheduler"]

logger = logging.get_logger(__name__)


class _EulerBase(StepIndexMixin):
    """Shared by both Euler schedulers: the sigma-space table (``tables.euler_table`` with
    ``space="sigma"``: the state is diffusers' ``x0 + sigma eps``), scale_model_input and
    add_noise without host syncs."""

    _eta = 0.0
    _output_cls: type

    def _build(self, prediction_type: str) -> dict[str, torch.Tensor]:
        sigmas = self.sigmas.to(torch.float64)
        table = tables.euler_table(sigmas[:-1], sigmas[1:], prediction_type, self._eta, "sigma")
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        return {
            "table": torch.cat([table, nan_row()]),
            "sigma": torch.cat([sigmas[:-1], nan]),
            "sigma_next": torch.cat([sigmas[1:], nan]),
        }

    def _input_divisor(self) -> torch.Tensor:
        """``sqrt(sigma^2 + 1)`` per sigma (CPU float32, the bits diffusers' scale_model_input
        computes on each 0-d sigma: every operation is correctly rounded), then a NaN."""
        divisor = self._plan_device.get("divisor")
        if divisor is None:
            nan = self.sigmas.new_full((1,), float("nan"))
            divisor = torch.cat([(self.sigmas**2 + 1) ** 0.5, nan])
            self._plan_device["divisor"] = divisor
            self._plan_device["divisors"] = divisor.unbind()  # 0-d CPU scalars
        return divisor

    def _input_scale(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """What the device path of ``scale_model_input`` applies to a ``dtype`` sample: on the
        CPU the divisor itself; on CUDA the reciprocal ``1 / divisor`` in ``dtype``'s compute
        precision (float64 for float64, else float32), the number CUDA multiplies by when a
        sample is divided by a CPU scalar, as diffusers' scale_model_input does."""
        cuda = device.type == "cuda"
        dtype = torch.float64 if cuda and dtype == torch.float64 else torch.float32
        key = ("scale", device, dtype)
        scale = self._plan_device.get(key)
        if scale is None:
            divisor = self._input_divisor()
            if cuda:
                divisor = 1.0 / divisor.to(dtype)  # correctly rounded, as the C++ host division
            scale = upload(divisor, device)
            self._plan_device[key] = scale
        return scale

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor):
        """``sample / sqrt(sigma^2 + 1)``, bitwise as diffusers computes it, whether the step
        index lives on the host or on the device (no host sync for a CUDA timestep).

        diffusers divides the sample by a CPU float32 scalar. On a CUDA sample PyTorch runs
        that as ``sample * r`` with ``r = 1 / divisor`` computed on the host in the compute
        precision (float32 for 16-bit samples) and the product rounded once to the sample's
        dtype. With the step index on the host we do the same division. With the index on
        the device (a captured CUDA graph) ``r`` is gathered from a device table and the
        product is computed in that precision and rounded once (``torch.mul`` with a 1-D
        ``r``, so ``r`` is not first rounded to the sample's dtype, as a 0-d tensor would be).

        Args:
            sample: the current sample (sigma-space state).
            timestep: the current timestep (sets the step index on the first call).

        Returns:
            The scaled model input, in ``sample``'s dtype.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if not isinstance(index, torch.Tensor):
            divisors = self._plan_device.get("divisors")
            if divisors is None:
                self._input_divisor()
                divisors = self._plan_device["divisors"]
            sample = sample / divisors[index]  # a 0-d CPU tensor, as in diffusers
        elif index.device.type != "cuda":
            scale = self._input_scale(index.device, sample.dtype)
            sample = sample / scale.index_select(0, index.reshape(1)).reshape(())  # as above
        else:
            scale = self._input_scale(index.device, sample.dtype).index_select(0, index.reshape(1))
            if sample.requires_grad and torch.is_grad_enabled():
                sample = (sample * scale).to(sample.dtype)  # same bits, differentiable
            else:
                sample = torch.mul(sample, scale, out=torch.empty_like(sample))
        self.is_scale_input_called = True
        return sample

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``x0 + sigma noise`` at each sample's timestep (the arguments of ``_noise_sigma``), as
        diffusers, without a host sync."""
        return original_samples + noise * self._noise_sigma(original_samples, timesteps)

    def _euler_step(self, model_output, timestep, sample, generator, return_dict, prediction_type):
        if isinstance(timestep, int) or (
            isinstance(timestep, torch.Tensor)
            and timestep.dtype in (torch.int32, torch.int64)
            and timestep.device.type == "cpu"
        ):  # diffusers' isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of "
                "the `scheduler.timesteps` as a timestep."
            )
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure "
                "correct denoising. See `StableDiffusionPipeline` for a usage example."
            )
        x = self._begin_step(timestep, sample)
        tabs = self._device_tables(
            ("euler", prediction_type, self._eta),
            x.device,
            lambda: self._build(prediction_type),
        )
        rows = self._index_rows(tabs)
        noise = seeds = None
        if self._eta > 0:
            noise, seeds = self._step_noise(model_output, x, generator)
            rule, options = reference.euler_ancestral_step, {"eta": self._eta}
        else:
            rule, options = reference.euler_step, {}
        reference_step = self._reference_rule(
            tabs, rows, rule, ("sigma", "sigma_next"), prediction_type=prediction_type, **options
        )
        # diffusers computes in float32 and returns prev_sample in the model output's dtype
        return self._fused_step(
            x,
            model_output,
            tabs,
            rows,
            reference_step,
            self._output_cls,
            return_dict,
            out_dtype=model_output.dtype,
            x0_dtype=promote(torch.float32, model_output.dtype),
            prediction_type=prediction_type,
            noise=noise,
            seeds=seeds,
        )


class FusedEulerDiscreteScheduler(_EulerBase, EulerDiscreteScheduler):
    """Drop-in ``EulerDiscreteScheduler`` whose ``step`` is one fused kernel launch.

    The plan is diffusers' own (every spacing, ``interpolation_type``, Karras / exponential /
    beta sigmas, ``sigma_min`` / ``sigma_max``, ``final_sigmas_type``, ``timestep_type``,
    custom ``timesteps`` / ``sigmas``); the step is Euler in sigma space. ``s_churn > 0``
    (stochastic churn) is not supported: ``step`` raises ValueError.

    Example:
        >>> pipe.scheduler = FusedEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = EulerDiscreteSchedulerOutput

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "prediction_type",
                config.prediction_type
                not in ("epsilon", "v_prediction", "sample", "original_sample"),
                "the fused Euler step supports epsilon, v_prediction and sample",
            )
        ]

    def _planning_device(self, device):
        # continuous timesteps of a v-prediction model: diffusers takes the log of the sigmas
        # on the device (the device's log may differ from the CPU's in the last bit)
        config = self.config
        continuous = (
            config.timestep_type == "continuous" and config.prediction_type == "v_prediction"
        )
        return device if continuous else None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step, as diffusers' ``EulerDiscreteScheduler.step`` (without churn).

        Args:
            s_churn: must be 0 (churn is not supported).
            s_tmin, s_tmax, s_noise: churn parameters (unused without churn).
            generator: unused (the step is deterministic without churn).

        Returns:
            ``EulerDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.
        """
        if s_churn != 0:
            raise ValueError(
                f"{type(self).__name__} does not support s_churn={s_churn!r} (stochastic churn); "
                "use diffusers' EulerDiscreteScheduler for churn"
            )
        prediction_type = self.config.prediction_type
        if prediction_type == "original_sample":
            prediction_type = "sample"
        return self._euler_step(
            model_output, timestep, sample, generator, return_dict, prediction_type
        )


class FusedEulerAncestralDiscreteScheduler(_EulerBase, EulerAncestralDiscreteScheduler):
    """Drop-in ``EulerAncestralDiscreteScheduler`` (k-diffusion's ``sample_euler_ancestral``)
    whose ``step`` is one fused kernel launch.

    Noise: ``noise="torch"`` (default) draws it as diffusers does, the stock images for the
    same seed; ``noise="philox"`` makes it in the kernel: faster and CUDA-graph capturable,
    other images (the trade-off: ``fastdiff.diffusers``).

    Unsupported: ``prediction_type="sample"`` (diffusers raises NotImplementedError too).

    Example:
        >>> pipe.scheduler = FusedEulerAncestralDiscreteScheduler.from_config(
        ...     pipe.scheduler.config)
    """

    _output_cls = EulerAncestralDiscreteSchedulerOutput
    _eta = 1.0
    _draws_step_noise = True

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "prediction_type",
                config.prediction_type not in ("epsilon", "v_prediction"),
                "diffusers' Euler ancestral step supports epsilon and v_prediction",
            )
        ]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """One Euler ancestral step, as diffusers' ``EulerAncestralDiscreteScheduler.step``.

        Returns:
            ``EulerAncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or
            the tuple.
        """
        return self._euler_step(
            model_output, timestep, sample, generator, return_dict, self.config.prediction_type
        )

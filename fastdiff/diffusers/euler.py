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
from fastdiff.checks import check_churn
from fastdiff.diffusers._common import nan_row, promote, step_output, upload
from fastdiff.diffusers._rows import StepIndexMixin

__all__ = ["FusedEulerAncestralDiscreteScheduler", "FusedEulerDiscreteScheduler"]

logger = logging.get_logger(__name__)

# promote_types(float32, dtype) of the usual model output dtypes (no call on the hot path)
_WITH_FLOAT32 = dict.fromkeys((torch.float16, torch.bfloat16, torch.float32), torch.float32)


class EulerBase(StepIndexMixin):
    """Shared by both Euler schedulers: the sigma-space table (``tables.euler_table`` with
    ``space="sigma"``: the state is diffusers' ``x0 + sigma eps``), scale_model_input and
    add_noise without host syncs."""

    _eta = 0.0

    def _build(self, prediction_type: str, churn: tuple | None) -> dict[str, torch.Tensor]:
        sigmas = self.sigmas.to(torch.float64)
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        if churn is None:
            table = tables.euler_table(sigma, sigma_next, prediction_type, self._eta, "sigma")
            return {
                "table": torch.cat([table, nan_row()]),
                "sigma": torch.cat([sigma, nan]),
                "sigma_next": torch.cat([sigma_next, nan]),
            }
        hat = self._churn_plan(churn)[0].to(torch.float64)
        table = tables.euler_churn_table(sigma, hat, sigma_next, prediction_type, churn[3])
        return {
            "table": torch.cat([table, nan_row()]),
            "sigma": torch.cat([sigma, nan]),
            "sigma_hat": torch.cat([hat, nan]),
            "sigma_next": torch.cat([sigma_next, nan]),
        }

    def _churn_plan(self, churn: tuple) -> tuple[torch.Tensor, list[bool], bool, bool]:
        """Per step of the plan, as diffusers' step computes them on its CPU float32 sigmas
        (host values, once per plan and churn options): ``sigma_hat = sigma (gamma + 1)`` in
        float32 (``reference.churn_gamma``), whether the step churns (``gamma > 0``: diffusers
        draws its noise then only), and whether every / some step does."""
        key = ("churn", churn)
        plan = self._plan_device.get(key)
        if plan is None:
            s_churn, s_tmin, s_tmax, _ = churn
            n = len(self.sigmas) - 1
            sigmas = self.sigmas[:-1].unbind()  # 0-d float32 CPU tensors, as diffusers reads
            gammas = [reference.churn_gamma(s, n, s_churn, s_tmin, s_tmax) for s in sigmas]
            hat = torch.stack([s * (g + 1) for s, g in zip(sigmas, gammas)])
            churned = [g > 0 for g in gammas]
            plan = self._plan_device[key] = (hat, churned, all(churned), any(churned))
        return plan

    def _churn_noise(self, model_output, x, generator, churn):
        """The churn noise of this step as ``(noise, seeds)`` for ``_step_once``: drawn as
        diffusers draws it (only where gamma > 0), or with ``noise="philox"`` and no generator
        the seeds of the kernel's Philox noise; ``(None, None)``: the step does not churn.
        With the step index on the device, whether this step churns is not known on the host:
        every step draws (Philox), or the plan's steps must all churn or none (torch's
        noise)."""
        _, churned, every, some = self._churn_plan(churn)
        index = self._step_index
        philox_keys = generator is None and self.uses_philox_noise
        if not isinstance(index, torch.Tensor):
            draws = churned[index]
        elif some and not every and not philox_keys:
            raise ValueError(
                f"s_tmin={churn[1]!r} / s_tmax={churn[2]!r} churn some steps of the plan and "
                "not others: with the step index on the device (a CUDA timestep not taken from "
                "scheduler.timesteps, or a CUDA graph), whether diffusers draws this step's "
                "noise is not known without a host sync; pass scheduler.timesteps' own "
                'elements, or use noise="philox"'
            )
        else:
            draws = some
        if not draws:
            return None, None
        return self._step_noise(model_output, x, generator)

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

    def _graph_side(self, advance) -> tuple[torch.Tensor, torch.Tensor]:
        """The input scale of every step (``_input_scale``), advanced with the loop's timestep
        by the step's launch (``graph_advance``): scale_model_input gathers nothing."""
        scale = self._input_scale(advance.counter.device, torch.float32)
        return scale, scale[:1].clone()

    def graph_advance(self, advance) -> bool:
        """The base class's (the input scale advanced with the loop, ``_graph_side``); on
        CUDA the step's launch also writes the next step's model input, the loop's latents
        times that scale (``LoopAdvance.set_scaled``: the same product, float32 and rounded
        once), so that ``scale_model_input`` of the loop's latents launches nothing."""
        taken = super().graph_advance(advance)
        out = advance.out
        if taken and out is not None and out.is_cuda and out.dtype != torch.float64:
            advance.set_scaled(torch.empty_like(out))
        return taken

    def _graph_scaled(self, sample: torch.Tensor) -> torch.Tensor:
        """scale_model_input's device path with the step's scale read from the loop's
        per-step value (``_graph_side``): the same number and operation as there; of the
        loop's latents themselves the input the previous step's launch wrote."""
        advance = self._graph_advance
        if advance.scaled is not None and sample is advance.out:
            advance.scaled_reads += 1
            return advance.scaled
        scale = advance.side_dst
        if scale.device.type != "cuda":
            return sample / scale.reshape(())
        if sample.requires_grad and torch.is_grad_enabled():
            return (sample * scale).to(sample.dtype)
        return torch.mul(sample, scale, out=torch.empty_like(sample))

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
        elif self._graph_advance is not None and sample.dtype != torch.float64:
            sample = self._graph_scaled(sample)  # a graphed loop's step that advances it
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

    def _euler_step(self, model_output, timestep, sample, call, prediction_type, churn=None):
        """One Euler (ancestral) step; ``call``: the step's other arguments (``generator``,
        ``return_dict``), ``churn``: ``(s_churn, s_tmin, s_tmax, s_noise)``, or None (no
        churn)."""
        generator, return_dict = call["generator"], call["return_dict"]
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
            ("euler", prediction_type, self._eta, churn),
            x.device,
            lambda: self._build(prediction_type, churn),
        )
        rows = self._index_rows(tabs)
        noise = seeds = None
        levels = ("sigma", "sigma_next")
        options = {}
        kernel_options = {}
        if churn is not None:
            noise, seeds = self._churn_noise(model_output, x, generator, churn)
            rule, levels = reference.euler_churn_step, ("sigma", "sigma_hat", "sigma_next")
            options["s_noise"] = churn[3]
            # diffusers' x0 is that of the churned x + c z (but x0 = m for a sample model)
            drawn = noise is not None or seeds is not None
            kernel_options["x0_noise"] = drawn and prediction_type != "sample"
        elif self._eta > 0:
            noise, seeds = self._step_noise(model_output, x, generator)
            rule, options["eta"] = reference.euler_ancestral_step, self._eta
        else:
            rule = reference.euler_step
        options["prediction_type"] = prediction_type
        reference_step = (tabs, rows, rule, levels, None, options)  # (_rule's arguments)
        # diffusers computes in float32 and returns prev_sample in the model output's dtype
        out_dtype = model_output.dtype
        x0_dtype = out_dtype
        if prediction_type != "sample":
            x0_dtype = _WITH_FLOAT32.get(out_dtype) or promote(torch.float32, out_dtype)
        prev, x0 = self._step_once(
            x, model_output, tabs, rows, reference_step, out_dtype, x0_dtype, noise, seeds,
            None, kernel_options,
        )  # fmt: skip
        self._end_step(x0)
        return step_output(self._output_cls, return_dict, prev, x0)


class FusedEulerDiscreteScheduler(EulerBase, EulerDiscreteScheduler):
    """Drop-in ``EulerDiscreteScheduler`` whose ``step`` is one fused kernel launch.

    The plan is diffusers' own (every spacing, ``interpolation_type``, Karras / exponential /
    beta sigmas, ``sigma_min`` / ``sigma_max``, ``final_sigmas_type``, ``timestep_type``,
    custom ``timesteps`` / ``sigmas``); the step is Euler in sigma space, with diffusers'
    churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``; see ``step``).

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

    def _step(
        self, model_output, timestep, sample, call: dict
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step, churn included
        (Karras et al. 2022 Alg. 2): ``gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)``
        where ``s_tmin <= sigma <= s_tmax`` (else 0), ``sigma_hat = sigma (gamma + 1)`` and,
        where gamma > 0, ``sample + s_noise sqrt(sigma_hat^2 - sigma^2) z`` before the Euler
        step from sigma_hat (``tables.euler_churn_table``: one launch, which also writes
        ``pred_original_sample`` with the churn noise diffusers' x0 carries; with
        ``noise="philox"`` the noise is made in the kernel).

        Args:
            s_churn: the churn (>= 0; 0: the deterministic step).
            s_tmin, s_tmax: the sigma window that churns (numbers, inf allowed).
            s_noise: the churn noise's scale (finite).
            generator: draws the churn noise as diffusers does (``randn_tensor`` on the steps
                with gamma > 0); without one, torch's global RNG, or with ``noise="philox"``
                Philox noise.

        Returns:
            ``EulerDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.

        Raises:
            ValueError: a churn option out of range, named (diffusers would step with a
                negative gamma or NaN silently); a plan that churns some steps but not others
                stepped with a device step index and torch's noise (see ``_churn_noise``).
        """
        churn = None
        if call["s_churn"] != 0:
            churn = check_churn(call["s_churn"], call["s_tmin"], call["s_tmax"], call["s_noise"])
        prediction_type = self.config.prediction_type
        if prediction_type == "original_sample":
            prediction_type = "sample"
        return self._euler_step(model_output, timestep, sample, call, prediction_type, churn)


class FusedEulerAncestralDiscreteScheduler(EulerBase, EulerAncestralDiscreteScheduler):
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

    def _step(self, model_output, timestep, sample, call: dict):
        """One Euler ancestral step.

        Returns:
            ``EulerAncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or
            the tuple.
        """
        return self._euler_step(model_output, timestep, sample, call, self.config.prediction_type)

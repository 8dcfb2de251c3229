"""FusedDPMSolverMultistepScheduler: diffusers' DPM-Solver++ (2M) with the step as one fused
kernel."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff import reference, tables
from fastdiff.diffusers._base import (
    StepIndexMixin,
    dense,
    fused_init,
    make_output,
    nan_row,
    promote,
)

__all__ = ["FusedDPMSolverMultistepScheduler"]


class FusedDPMSolverMultistepScheduler(StepIndexMixin, DPMSolverMultistepScheduler):
    """Drop-in ``DPMSolverMultistepScheduler`` (Lu et al. 2022, DPM-Solver++) whose ``step`` is
    one fused kernel launch.

    Supported: ``algorithm_type="dpmsolver++"`` (and "deis", which diffusers maps to it),
    ``solver_order`` 1 or 2, ``solver_type="midpoint"`` (and the UniPC / DEIS names diffusers
    maps to it), every plan option of diffusers (spacings, Karras / exponential / beta sigmas,
    Lu lambdas, ``lambda_min_clipped``, ``final_sigmas_type``), ``lower_order_final``,
    ``euler_at_final``, thresholding, and ``variance_type`` learned / learned_range with
    epsilon prediction (the first 3 channels, as diffusers).

    Unsupported (ValueError at construction): SDE and the deprecated non-++ algorithms,
    ``solver_order=3`` and the "heun" solver (the kernel keeps one previous x0 and the
    reference has the midpoint form), flow sigmas / flow prediction / dynamic shifting.

    Example:
        >>> pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    """

    _diffusers_cls = DPMSolverMultistepScheduler
    _x0_processing = ("threshold",)  # diffusers' DPM-Solver has no clip_sample
    __init__ = fused_init(DPMSolverMultistepScheduler)

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return [
            (
                "algorithm_type",
                config.algorithm_type != "dpmsolver++",
                "the fused step implements DPM-Solver++ (the SDE variants and the deprecated "
                "dpmsolver are not supported)",
            ),
            (
                "solver_order",
                config.solver_order not in (1, 2),
                "the fused step keeps one previous x0 (orders 1 and 2)",
            ),
            ("solver_type", config.solver_type != "midpoint", "only the midpoint form is fused"),
            (
                "use_flow_sigmas",
                bool(config.get("use_flow_sigmas", False)),
                "flow-matching sigmas are not a VP schedule",
            ),
            (
                "use_dynamic_shifting",
                bool(config.get("use_dynamic_shifting", False)),
                "dynamic shifting is for flow-matching schedules",
            ),
            (
                "variance_type",
                config.get("variance_type") in ("learned", "learned_range")
                and config.prediction_type != "epsilon",
                "diffusers only strips the variance channels for epsilon prediction",
            ),
            *self._thresholding_checks(config),
        ]

    def _miss_index(self) -> int:
        return len(self._plan_host) - 1  # diffusers: a timestep not in the plan -> last step

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """diffusers' ``DPMSolverMultistepScheduler.set_timesteps``; tables are built at the
        next step.

        Args:
            num_inference_steps: number of steps.
            device: where ``self.timesteps`` goes.
            mu: dynamic shifting (flow schedules only: not supported).
            timesteps: custom timesteps.
        """
        self.check_config()
        if mu is not None:
            raise ValueError("mu (dynamic shifting of flow schedules) is not supported")
        super().set_timesteps(num_inference_steps, self._planning_device(device), None, timesteps)
        self._plan_changed(device)

    def _build(self, prediction_type: str, final_first_order: bool, order: int):
        """Rows ``0..n-1``: the step at that index after a previous step (second order except
        where diffusers drops to first order); row n: poison; rows ``n+1..2n``: the same steps
        at first order (the first step after set_timesteps / set_begin_index); row 2n+1: poison.
        """
        sigmas = self.sigmas.to(torch.float64)
        ab = 1.0 / (1.0 + sigmas**2)  # alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t
        n = len(sigmas) - 1
        ab_t, ab_next = ab[:-1], ab[1:]
        ab_prev = torch.cat([ab.new_full((1,), 0.5), ab[:-2]])  # row 0 has no previous step
        first = torch.zeros(n, dtype=torch.bool)
        first[0] = True
        first[-1] |= final_first_order
        if order == 1:
            first[:] = True
        all_first = torch.ones(n, dtype=torch.bool)
        main = tables.dpmpp_2m_table(ab_t, ab_next, ab_prev, prediction_type, first)
        lower = tables.dpmpp_2m_table(ab_t, ab_next, ab_prev, prediction_type, all_first)
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        no = torch.zeros(1, dtype=torch.bool)
        return {
            "table": torch.cat([main, nan_row(), lower, nan_row()]),
            "ab": torch.cat([ab_t, nan, ab_t, nan]),
            "ab_next": torch.cat([ab_next, nan, ab_next, nan]),
            "ab_prev": torch.cat([ab_prev, nan, ab_prev, nan]),
            "first": torch.cat([first, no, all_first, no]),
        }

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at each sample's timestep, as diffusers (no sync).

        Args:
            original_samples: clean samples ``[B, ...]``.
            noise: standard-normal noise like them.
            timesteps: one timestep per sample.

        Returns:
            The noisy samples.
        """
        sigma = self._noise_sigma(original_samples, timesteps)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DPM-Solver++ step, as diffusers' ``DPMSolverMultistepScheduler.step``.

        Args:
            model_output: the model output, like ``sample`` (learned variances: extra
                channels, of which the first 3 are used, as diffusers).
            timestep: the current timestep (one of ``self.timesteps``).
            sample: the current sample.
            generator: unused (DPM-Solver++ is deterministic).
            variance_noise: unused (SDE variants only).
            return_dict: return a ``SchedulerOutput`` (else a tuple).

        Returns:
            ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        self._check_planned()
        self.check_config()
        config = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        n = self._plan_len
        prediction_type = config.prediction_type
        if config.get("variance_type") in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        final_first_order = bool(
            config.euler_at_final
            or (config.lower_order_final and n < 15)
            or config.final_sigmas_type == "zero"
        )
        order = config.solver_order
        x = dense(sample)
        tabs = self._device_tables(
            ("dpm", prediction_type, final_first_order, order),
            x.device,
            lambda: self._build(prediction_type, final_first_order, order),
        )
        first = self.lower_order_nums < 1
        rows = self._index_rows(tabs, offset=n + 1 if first else 0)
        # the previous step's x0 (diffusers shifts the list first, then reads [-2])
        x0_prev = None if first or order == 1 else self.model_outputs[-1]
        # diffusers converts the output to x0 first, then returns prev_sample in x0's dtype
        x0_dtype = (
            model_output.dtype
            if prediction_type == "sample"
            else promote(sample.dtype, model_output.dtype)
        )
        out_dtype = x0_dtype
        _, thresholding = self._processing(config)

        def reference_step(xr, m, _noise):  # no noise: DPM-Solver++ is deterministic
            ab, ab_next, ab_prev, first_order = self._values(
                tabs, rows, "ab", "ab_next", "ab_prev", "first"
            )
            kwargs = dict(prediction_type=prediction_type, thresholding=thresholding)
            prev, x0 = reference.dpmpp_2m_step(xr, m, ab, ab_next, **kwargs)
            if x0_prev is not None:
                second, _ = reference.dpmpp_2m_step(
                    xr, m, ab, ab_next, x0_prev=x0_prev.to(xr.dtype), ab_prev=ab_prev, **kwargs
                )
                mask = first_order.reshape(-1, *([1] * (x.dim() - 1)))
                prev = torch.where(mask, prev, second)
            return prev, x0

        prev, x0 = self._run_step(
            x,
            model_output,
            tabs,
            rows,
            reference_step,
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            x0_prev=x0_prev,
            thresholding=thresholding,
        )

        for i in range(order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._advance()
        if not return_dict:
            return (prev,)
        return make_output(SchedulerOutput, prev)

"""FusedDDIMScheduler: diffusers' DDIMScheduler with the reverse step as one fused kernel."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput

from fastdiff import reference, tables
from fastdiff.checks import is_number
from fastdiff.diffusers._rows import TimestepRowsMixin

__all__ = ["FusedDDIMScheduler"]


class FusedDDIMScheduler(TimestepRowsMixin, DDIMScheduler):
    """Drop-in ``DDIMScheduler`` (Song et al. 2021) whose ``step`` is one fused kernel launch.

    Same config, plan and results as diffusers' ``DDIMScheduler``: the step goes from ``t`` to
    ``t - num_train_timesteps // num_inference_steps`` (``final_alpha_cumprod`` below 0, 1 with
    ``set_alpha_to_one``), with diffusers' ``eta``, ``use_clipped_model_output``,
    ``variance_noise`` and ``generator`` semantics (noise only when ``eta > 0``). ``eta`` must
    be in [0, 1]: above 1 diffusers' direction coefficient is the square root of a negative
    number on some steps.

    Noise: ``noise="torch"`` (default) draws it as diffusers does, the stock images for the
    same seed; ``noise="philox"`` makes it in the kernel: faster and CUDA-graph capturable,
    other images (the trade-off: ``fastdiff.diffusers``).

    Example:
        >>> pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = DDIMSchedulerOutput
    _needs_plan = True

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        # fixed at construction in diffusers (alphas_cumprod: see TimestepRowsMixin)
        self._final_alpha_cumprod64 = float(self.final_alpha_cumprod)
        super()._setup_fused(backend, noise)

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        return self._thresholding_checks(config)

    def _build(
        self, prediction_type: str, eta: float, use_clipped: bool, stride: int
    ) -> dict[str, torch.Tensor]:
        ab = self._alphas_cumprod64
        prev = torch.arange(len(ab)) - stride
        ab_next = torch.where(prev >= 0, ab[prev.clamp(min=0)], self._final_alpha_cumprod64)
        table = tables.ddim_table(ab, ab_next, prediction_type, eta, use_clipped)
        return self._poison_ends({"table": table, "ab": ab, "ab_next": ab_next})

    def _step(self, model_output, timestep, sample, call: dict) -> DDIMSchedulerOutput | tuple:
        """One DDIM step x_t -> x_prev.

        Args:
            timestep: the current timestep: int, 0-d tensor, or one per sample ``[B]``.
            sample: x_t ``[B, ...]``.
            eta: noise scale in [0, 1] (0: deterministic DDIM).
            use_clipped_model_output: re-derive eps from the clipped / thresholded x0.
            variance_noise: explicit standard-normal noise like ``sample``.

        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.
        """
        x = self._begin_step(timestep, sample)
        config = self.config
        eta, generator, variance_noise = call["eta"], call["generator"], call["variance_noise"]
        if type(eta) is not float:  # a python float is the common case: checked below
            if isinstance(eta, torch.Tensor) and eta.device.type == "cpu" and eta.numel() == 1:
                eta = eta.item()
            if not is_number(eta):
                raise TypeError(f"eta must be a python number, got {type(eta).__name__}")
            eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"eta must be in [0, 1], got {eta}: above 1 diffusers' DDIM direction "
                "coefficient is the square root of a negative number on some steps"
            )
        use_clipped = bool(call["use_clipped_model_output"])
        prediction_type = config.prediction_type
        stride = config.num_train_timesteps // self.num_inference_steps
        tabs = self._device_tables(
            ("ddim", prediction_type, eta, use_clipped, stride),
            x.device,
            lambda: self._build(prediction_type, eta, use_clipped, stride),
        )
        rows, _ = self._timestep_rows(timestep, tabs, x)
        noise = seeds = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that "
                    "either `generator` or `variance_noise` stays `None`."
                )
            noise, seeds = self._step_noise(model_output, x, generator, variance_noise)
        return self._vp_step(
            x, model_output, sample, tabs, rows, reference.ddim_step, call["return_dict"],
            noise=noise, seeds=seeds, eta=eta, use_clipped_model_output=use_clipped,
        )  # fmt: skip

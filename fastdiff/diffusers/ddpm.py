"""FusedDDPMScheduler: diffusers' DDPMScheduler with the reverse step as one fused kernel."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

from fastdiff import reference, tables
from fastdiff.diffusers._rows import TimestepRowsMixin

__all__ = ["FusedDDPMScheduler"]

_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")


class FusedDDPMScheduler(TimestepRowsMixin, DDPMScheduler):
    """Drop-in ``DDPMScheduler`` (Ho et al. 2020) whose ``step`` is one fused kernel launch.

    Same config, plan and results as diffusers' ``DDPMScheduler``: the next timestep is the
    next one of ``timesteps`` (``t - 1`` before ``set_timesteps``), the posterior uses the
    respaced ``beta' = 1 - ab_t / ab_prev``, and noise is added where ``t > 0``.

    Noise: ``noise="torch"`` (default) draws it as diffusers does, the stock images for the
    same seed; ``noise="philox"`` makes it in the kernel: faster and CUDA-graph capturable,
    other images (the trade-off: ``fastdiff.diffusers``).

    Unsupported (ValueError at construction): ``variance_type="learned"`` (diffusers reads the
    model's extra channels as a variance, the kernel as a log variance) and
    ``"fixed_large_log"`` (diffusers takes the square root of a log variance: NaN).

    ``step`` also takes ``variance_noise=`` (explicit standard-normal noise, as DDIM's step
    does). A timestep given as a CUDA tensor is not read on the host; with a ``generator``
    the noise is then drawn on every step, also at ``t = 0`` where diffusers draws none (the
    table multiplies it by 0 there, so the result is the same; only the generator advances).

    Example:
        >>> pipe.scheduler = FusedDDPMScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = DDPMSchedulerOutput
    _draws_step_noise = True

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        variance_type = config.variance_type
        return [
            (
                "variance_type",
                variance_type == "learned",
                "diffusers reads 'learned' model channels as the variance itself, the fused "
                "kernel as a log variance (use 'learned_range')",
            ),
            (
                "variance_type",
                variance_type == "fixed_large_log",
                "diffusers takes the square root of a log variance there (NaN)",
            ),
            (
                "variance_type",
                variance_type not in _VARIANCE_TYPES + ("learned", "fixed_large_log"),
                f"the fused step supports {_VARIANCE_TYPES}",
            ),
            (
                "variance_type",
                variance_type != self.variance_type,
                f"diffusers fixes it at construction ({self.variance_type!r}); build a new "
                "scheduler with from_config to change it",
            ),
            *self._thresholding_checks(config),
        ]

    def _build(self, prediction_type: str, variance_type: str) -> dict[str, torch.Tensor]:
        ab = self._alphas_cumprod64
        train_steps = len(ab)
        t = torch.arange(train_steps)
        if self.custom_timesteps or self.num_inference_steps:
            # the next timestep of the plan; -2 marks timesteps outside the plan
            plan = self._plan_host.long()
            nxt = torch.full((train_steps,), -2, dtype=torch.long)
            nxt[plan] = torch.cat([plan[1:], plan.new_full((1,), -1)])
        else:
            nxt = t - 1
        valid = nxt >= -1
        ab_next = torch.where(nxt >= 0, ab[nxt.clamp(min=0)], 1.0)
        noisy = t > 0  # diffusers adds noise where t > 0
        table = tables.ddpm_table(ab, ab_next, prediction_type, variance_type, noisy)
        table[~valid] = float("nan")
        return self._poison_ends(
            {
                "table": table,
                "ab": torch.where(valid, ab, float("nan")),
                "ab_next": torch.where(valid, ab_next, float("nan")),
                "noisy": noisy,
            }
        )

    _step_extras = {"variance_noise": None}

    def _step(self, model_output, timestep, sample, call: dict) -> DDPMSchedulerOutput | tuple:
        """One DDPM step x_t -> x_prev.

        Args:
            model_output: the model output ``[B, C, ...]`` (``[B, 2C, ...]`` for
                ``learned_range``: prediction, then variance values).
            timestep: the current timestep: int, 0-d tensor, or one per sample ``[B]``.
            sample: x_t ``[B, C, ...]``.
            variance_noise: explicit standard-normal noise like ``sample`` (instead of
                ``generator``).

        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.
        """
        config = self.config
        learned = config.variance_type == "learned_range"
        x = self._begin_step(timestep, sample, contiguous=learned)
        generator, variance_noise = call["generator"], call["variance_noise"]
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        prediction_type = config.prediction_type
        variance_type = config.variance_type
        prediction = model_output
        if learned:
            channels = sample.shape[1] if sample.dim() > 1 else None
            if channels is None or model_output.shape[1] != 2 * channels:
                raise ValueError(
                    "variance_type='learned_range' needs a model output with twice the "
                    "sample's channels (prediction, then variance values), got "
                    f"{tuple(model_output.shape)} for a sample of shape {tuple(sample.shape)}"
                )
            prediction = model_output[:, :channels]
        tabs = self._device_tables(
            ("ddpm", prediction_type, variance_type),
            x.device,
            lambda: self._build(prediction_type, variance_type),
        )
        rows, t_host = self._timestep_rows(timestep, tabs, x)
        if t_host is not None and (self.custom_timesteps or self.num_inference_steps):
            plan = tabs.get("plan_set")
            if plan is None:
                plan = tabs["plan_set"] = frozenset(self._plan_host.tolist())
            if type(t_host) is int:  # (one host timestep, the common case)
                missing = () if t_host in plan else (t_host,)
            else:
                given = (t_host,) if isinstance(t_host, int) else t_host.tolist()
                missing = () if given[0] in plan and len(given) == 1 else set(given) - plan
            if missing:
                raise ValueError(f"timesteps {sorted(missing)} are not in scheduler.timesteps")
        # diffusers draws noise only where t > 0 (a device timestep: always, see the class doc)
        if t_host is None:
            needs_noise = True
        elif isinstance(t_host, int):
            needs_noise = t_host > 0
        else:
            needs_noise = bool((t_host > 0).any())
        noise = seeds = None
        if needs_noise:
            noise, seeds = self._step_noise(prediction, x, generator, variance_noise)
        # learned_range: x is contiguous (see above), so the kernel gets the [B, 2C, ...] model
        # output contiguous too
        variance_mode = "learned_range" if learned else "fixed"
        return self._vp_step(
            x, model_output, sample, tabs, rows, reference.ddpm_step, call["return_dict"],
            noise=noise, seeds=seeds, by_row={"add_noise": "noisy"}, variance_mode=variance_mode,
            variance_type=variance_type,
        )  # fmt: skip

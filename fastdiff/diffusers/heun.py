"""FusedHeunDiscreteScheduler: diffusers' HeunDiscreteScheduler (Karras et al. 2022 Alg. 1,
sigma space) with each half of the step as one fused kernel launch."""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.schedulers.scheduling_heun_discrete import (
    HeunDiscreteScheduler,
    HeunDiscreteSchedulerOutput,
)

from fastdiff import tables
from fastdiff.checks import PREDICTION_TYPES
from fastdiff.diffusers._common import nan_row, promote, step_output
from fastdiff.diffusers.euler import _EulerBase
from fastdiff.reference import euler_step, heun_correction_step

__all__ = ["FusedHeunDiscreteScheduler"]


class _FirstHalf(NamedTuple):
    """What the second half of a Heun step reads: the step's start ``x_s``, the first half's
    x0 ``D``, the step index it left, and its prediction (with its version counter: a sample
    changed in place or replaced between the halves takes the midpoint form)."""

    start: torch.Tensor
    x0: torch.Tensor
    index: int | torch.Tensor
    prev: torch.Tensor
    version: int


class FusedHeunDiscreteScheduler(_EulerBase, HeunDiscreteScheduler):
    """Drop-in ``HeunDiscreteScheduler`` (Karras et al. 2022 Alg. 1): the model is called
    twice per step and each half is one fused kernel launch.

    ``timesteps`` / ``sigmas`` are diffusers' own (interleaved: every inner timestep twice;
    Karras / exponential / beta sigmas, every spacing, custom ``timesteps``). The first half
    (``state_in_first_order``) is Euler from ``sigma`` to ``sigma_next`` with ``D = x0`` at
    ``sigma``; the second, at the Euler-predicted ``x`` with ``x0`` at ``sigma_next``, is
    ``x_next = x + (sigma_next - sigma) / (2 sigma_next) (D - x0)``
    (``tables.heun_correction_table``): the first half's x0 is the kernel's ``x0_prev``. Two
    cases take ``x_next = P + (sigma_next - sigma) / (2 sigma_next) (x - x0)`` from the
    midpoint ``P = lerp(x_s, D, (sigma - sigma_next) / (2 sigma))`` instead, one more launch:
    a sample changed between the halves (an inpainting loop blends it after every step;
    diffusers computes from the step's start), and a long step, ``sigma > 3 sigma_next``
    (few-step plans; there float32 would lose ``(sigma - sigma_next) / (2 sigma_next)`` ulps
    of x and D; with a device step index: when the plan has one). State between the halves is
    device tensors (x0, the start), no host sync.

    A step whose timestep is not the plan's at the step index, or a second half whose step
    index is not the one its first half left, is refused: ValueError when both are known on
    the host, NaN (the poison row) when either lives on the device. ``set_timesteps`` resets
    the scheduler to the first half, as diffusers does.

    Example:
        >>> pipe.scheduler = FusedHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = HeunDiscreteSchedulerOutput

    def _unsupported(self, config) -> list[tuple[str, bool, str]]:
        clip, _ = self._x0_options(config)
        return [
            (
                "prediction_type",
                config.prediction_type not in PREDICTION_TYPES,
                f"diffusers' Heun step supports {PREDICTION_TYPES}",
            ),
            (
                "clip_sample_range",
                clip and not config.get("clip_sample_range", 1.0) > 0,
                "the clip range must be positive",
            ),
        ]

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` is the first half of a Heun step (diffusers' property)."""
        return vars(self).get("_heun") is None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """diffusers' ``HeunDiscreteScheduler.set_timesteps``; tables are built at the next
        step, and the scheduler is back in the first half.

        Args:
            num_inference_steps: number of (two-evaluation) steps.
            device: where ``self.timesteps`` goes.
            num_train_timesteps: the training steps (default: the config's).
            timesteps: custom timesteps.
        """
        if "_plan_state" not in vars(self):  # diffusers' __init__ plans before the fused setup
            super().set_timesteps(num_inference_steps, device, num_train_timesteps, timesteps)
            return
        self.check_config()
        super().set_timesteps(num_inference_steps, None, num_train_timesteps, timesteps)
        self._plan_changed(device)
        self._heun = self.sample = None
        self._short(0)  # the step lengths, read on the host here rather than in a step

    def _build_heun(self, prediction_type: str, processed: bool) -> dict[str, torch.Tensor]:
        """Three blocks of ``n + 1`` rows (n: the plan's length), the last row of each poison:
        block 0, row i: the first half at step index i (Euler from ``sigmas[i]`` to
        ``sigmas[i + 1]``); blocks 1 and 2, row i: the second half at step index i (from
        ``sigmas[i - 1]`` to ``sigmas[i]``; i = 0 is poison), with ``x0_prev`` the first
        half's x0 (block 1) or the midpoint (block 2; ``midpoint_weight``: its lerp weight)."""
        sigmas = self.sigmas.to(torch.float64)
        s, s_next = sigmas[:-2], sigmas[1:-1]
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        blocks = [
            tables.euler_table(sigmas[:-1], sigmas[1:], prediction_type, 0.0, "sigma"),
            tables.heun_correction_table(s, s_next, prediction_type),
            tables.heun_correction_table(s, s_next, prediction_type, True, processed),
        ]
        poison = nan_row()
        second_sigma = torch.cat([nan, s, nan])
        second_next = torch.cat([nan, s_next, nan])
        weight = torch.cat([nan, (s - s_next) / (2.0 * s), nan])
        return {
            "table": torch.cat(
                [blocks[0], poison, poison, blocks[1], poison, poison, blocks[2], poison]
            ),
            "sigma": torch.cat([sigmas[:-1], nan, second_sigma, second_sigma]),
            "sigma_next": torch.cat([sigmas[1:], nan, second_next, second_next]),
            "midpoint_weight": torch.cat([torch.zeros(len(sigmas)), weight, weight]),
        }

    def _short(self, index: int | torch.Tensor) -> bool:
        """Whether the second half at step index ``index`` (every one, for a device index) has
        ``|c| = (sigma - sigma_next) / (2 sigma_next) <= 1``, where the one-launch form
        ``x + c (D - x0)`` loses at most a few float32 ulps (a long step, e.g. 2e4 -> 6e-3
        with a cosine schedule, takes the midpoint form). Host values, once per plan."""
        short = self._plan_device.get("heun_short")
        if short is None:
            s, s_next = self.sigmas[:-2].double(), self.sigmas[1:-1].double()
            flags = [True, *((s - s_next) <= 2.0 * s_next).tolist()]  # host tensors
            short = self._plan_device["heun_short"] = (flags, all(flags))
        if isinstance(index, torch.Tensor):
            return short[1]
        return 0 <= index < len(short[0]) and short[0][index]

    def _guard(self, timestep, rows: torch.Tensor, offset: int, expected) -> torch.Tensor:
        """The step's rows, checked against a stale state: the timestep must be the plan's at
        the step index and (second half) the index the first half left. Known on the host: a
        ValueError; else the rows become the poison row on the device (no sync)."""
        index = self._step_index
        value = self._host_value(timestep)
        on_host = not isinstance(index, torch.Tensor)
        if on_host and value is not None and not isinstance(expected, torch.Tensor):
            if expected is not None and index != expected:
                raise ValueError(
                    f"{type(self).__name__}: stale state_in_first_order: the second half of "
                    f"a Heun step is at step index {index}, its first half left {expected}"
                )
            if value != self._plan_values[index]:
                raise ValueError(
                    f"{type(self).__name__}: timestep {value} is not the plan's timestep "
                    f"{self._plan_values[index]} at step index {index} (state_in_first_order="
                    f"{self.state_in_first_order}); pass the scheduler's timesteps in order, "
                    "or call set_timesteps to start again"
                )
            return rows
        n = self._plan_len
        device = rows.device
        if value is None and timestep.numel() != 1:
            raise ValueError(
                f"{type(self).__name__} takes one timestep for the whole batch, got shape "
                f"{tuple(timestep.shape)}"
            )
        at = self._plan_on(device).index_select(0, (rows - offset).clamp(0, n - 1))
        t = timestep.reshape(1).to(device) if value is None else value
        ok = at == t
        if expected is not None:
            ok = ok & (rows - offset == expected)
        return torch.where(ok, rows, offset + n)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> HeunDiscreteSchedulerOutput | tuple:
        """One half of a Heun step, as diffusers' ``HeunDiscreteScheduler.step``: the Euler
        predictor when ``state_in_first_order``, else the trapezoidal corrector.

        Args:
            timestep: the current timestep (one of ``self.timesteps``, in order).
            sample: the current sample (sigma-space state; in the second half the first
                half's ``prev_sample``).

        Returns:
            ``HeunDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple.

        Raises:
            ValueError: a stale state (see the class docstring), a timestep not in the plan.
        """
        x = self._begin_step(timestep, sample)
        prediction_type = self.config.prediction_type
        clip_range, _ = self._processing(self.config)
        processed = clip_range is not None
        tabs = self._device_tables(
            ("heun", prediction_type, processed),
            x.device,
            lambda: self._build_heun(prediction_type, processed),
        )
        state = self._heun
        n1 = self._plan_len + 1
        if state is None:
            offset = 0
        elif sample is state.prev and sample._version == state.version and self._short(state.index):
            offset = n1  # the first half's own prediction, a short step: x0_prev = D
        else:  # changed between the halves (inpainting), or a long step: x0_prev = the midpoint
            offset = 2 * n1
        if state is not None and state.start.shape != sample.shape:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}, but the first half of this Heun "
                f"step was taken on {tuple(state.start.shape)} (stale state_in_first_order)"
            )
        rows = self._index_rows(tabs, offset)
        rows = self._guard(timestep, rows, offset, None if state is None else state.index)
        out_dtype = promote(sample.dtype, model_output.dtype)
        x0_dtype = model_output.dtype if prediction_type == "sample" else out_dtype
        x0_prev = None if state is None else state.x0
        if offset == 2 * n1:  # P = x_s + (s' - s) d / 2 = lerp(x_s, D, (s - s') / (2 s))
            dtype = promote(promote(state.start.dtype, state.x0.dtype), torch.float32)
            weight = tabs["midpoint_weight"].index_select(0, rows).to(dtype)
            x0_prev = torch.lerp(state.start.to(dtype), state.x0.to(dtype), weight)

        options = {"prediction_type": prediction_type, "clip_range": clip_range}
        rule = euler_step
        if state is not None:
            rule = heun_correction_step
            options.update(x_start=state.start, x0_start=state.x0)
        reference_step = self._reference_rule(tabs, rows, rule, ("sigma", "sigma_next"), **options)

        prev, x0 = self._run_step(
            x,
            model_output,
            tabs,
            rows,
            reference_step,
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            x0_prev=x0_prev,
            clip_range=clip_range,
        )
        self._end_step(x0)
        if state is None:  # what the second half reads
            self._heun = _FirstHalf(sample, x0, self._step_index, prev, prev._version)
            self.sample = sample
        else:
            self._heun = self.sample = None
        return step_output(self._output_cls, return_dict, prev, x0)

    def check_capturable(self) -> None:
        """Refused: the two halves alternate on the host (``state_in_first_order``) and the
        second finds its step index from the first's, which a graph of one iteration replayed
        for every timestep would freeze (the timestep alone does not tell the halves apart:
        diffusers' plan repeats it).

        Raises:
            ValueError: always.
        """
        raise ValueError(
            f"{type(self).__name__} alternates its two half steps on the host "
            "(state_in_first_order), which a replayed CUDA graph of one iteration cannot "
            "follow; use the eager loop (its steps have no host sync)"
        )

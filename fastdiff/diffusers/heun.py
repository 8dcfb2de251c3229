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
from fastdiff.diffusers._common import dense, nan_row, promote, step_output, upload
from fastdiff.diffusers.euler import EulerBase
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


class FusedHeunDiscreteScheduler(EulerBase, HeunDiscreteScheduler):
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

    Traffic, in passes over the sample (tests/test_heun.py pins it): the first half reads
    x_s and m and writes x and D (4); the second, given the first half's ``prev_sample``
    (recognised by identity and version counter: no compare, no copy), reads x, m and D and
    writes x_next and x0 (5): one launch each and no other tensor-sized op. The midpoint
    form adds the lerp in float32 (float32 samples: 3 passes; bfloat16: 13, the operands
    widened first).

    A step whose timestep is not the plan's at the step index, or a second half whose step
    index is not the one its first half left, is refused: ValueError when both are known on
    the host, NaN (the poison row) when either lives on the device. ``set_timesteps`` resets
    the scheduler to the first half, as diffusers does.

    CUDA graphs (``capture_denoising_loop``): in a graphed iteration (``prepare_graph_step``)
    the state between the halves (which half is next, at which step index; the first half's
    sample, x0 and prediction) lives in device buffers (``graph_state``) written in place,
    and the form of the second half is chosen by comparing the sample with the first half's
    prediction on the device, so the graphed loop gives the eager loop's bits. Every graphed
    half runs the same ops: the compare (2.5 passes; 3 in bfloat16), keeping the start
    (``where`` into the start buffer, 3; 5 in bfloat16, whose start is kept in float32),
    ``x0_prev = lerp(x_s, D, w)`` in float32 (3; bfloat16: 9, D widened first) and the
    launch reading it: 13.5 passes a half in float32, 23 in bfloat16. There ``prev_sample`` and
    ``pred_original_sample`` are those buffers, rewritten every half.

    Example:
        >>> pipe.scheduler = FusedHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    """

    _output_cls = HeunDiscreteSchedulerOutput
    # a graphed half step updates its device state with ops after its launch: the loop
    # advances itself (graph_advance)
    _graph_advances = False

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

    def _plan_changed(self, device) -> None:
        """After diffusers' set_timesteps: the plan's tables (``_plan_changed``), and the
        scheduler back in the first half (on the device too: no sync)."""
        super()._plan_changed(device)
        self._heun = self.sample = None
        self._short(0)  # the step lengths, read on the host here rather than in a step
        self._graph_step = self._state_on_device = False
        for buffers in self._graph_buffers.values():
            buffers[0].zero_()  # the first half next

    def _setup_fused(self, backend: str | None, noise: str) -> None:
        # graphed halves: per layout, the device state between them (kept for the scheduler's
        # lifetime and rewritten in place: a captured graph holds their pointers)
        self._graph_buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._graph_step = self._state_on_device = False
        super()._setup_fused(backend, noise)

    def _build_heun(self, prediction_type: str, processed: bool) -> dict[str, torch.Tensor]:
        """Three blocks of ``n + 1`` rows (n: the plan's length), the last row of each poison:
        block 0, row i: the first half at step index i (Euler from ``sigmas[i]`` to
        ``sigmas[i + 1]``); blocks 1 and 2, row i: the second half at step index i (from
        ``sigmas[i - 1]`` to ``sigmas[i]``; i = 0 is poison), with ``x0_prev`` the first
        half's x0 (block 1) or the midpoint (block 2; ``midpoint_weight``: its lerp weight;
        ``prev_weight`` and ``next_half``: for ``_device_half``)."""
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
        ones = torch.ones(len(sigmas), dtype=torch.float64)
        goes_on = torch.cat([sigmas[1:] > 0, torch.tensor([False])]).long()
        zeros = torch.zeros(2 * len(sigmas), dtype=torch.int64)
        return {
            "table": torch.cat(
                [blocks[0], poison, poison, blocks[1], poison, poison, blocks[2], poison]
            ),
            "sigma": torch.cat([sigmas[:-1], nan, second_sigma, second_sigma]),
            "sigma_next": torch.cat([sigmas[1:], nan, second_next, second_next]),
            "midpoint_weight": torch.cat([torch.zeros(len(sigmas)), weight, weight]),
            # the graphed halves (``_device_half``): x0_prev = lerp(x_s, D, prev_weight) (D
            # itself in the first blocks), and whether a second half follows the row
            "prev_weight": torch.cat([ones, ones, weight]),
            "next_half": torch.cat([goes_on, zeros]),
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

    def _short_on(self, device: torch.device) -> torch.Tensor:
        """``_short`` of every step index, a bool tensor on ``device`` (uploaded once)."""
        key = ("heun_short", device)
        short = self._plan_device.get(key)
        if short is None:
            self._short(0)
            flags = self._plan_device["heun_short"][0]
            short = self._plan_device[key] = upload(torch.tensor(flags), device)
        return short

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

    def _step(
        self, model_output, timestep, sample, call: dict
    ) -> HeunDiscreteSchedulerOutput | tuple:
        """One half of a Heun step: the Euler predictor when ``state_in_first_order``, else
        the trapezoidal corrector.

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
        out_dtype = promote(sample.dtype, model_output.dtype)
        x0_dtype = model_output.dtype if prediction_type == "sample" else out_dtype
        state = self._heun
        if self._graph_step:  # a graphed iteration (prepare_graph_step): state on the device
            self._graph_step = False
            rows, x0_prev, reference_step, outputs = self._device_half(
                x, timestep, tabs, prediction_type, clip_range, out_dtype, x0_dtype
            )
        else:
            rows, x0_prev, reference_step = self._host_half(
                sample, timestep, tabs, state, prediction_type, clip_range
            )
            outputs = {}
        prev, x0 = self._step_once(
            x, model_output, tabs, rows, reference_step, out_dtype, x0_dtype, None, None,
            x0_prev, {"clip_range": clip_range, **outputs},
        )  # fmt: skip
        self._end_step(x0)
        if outputs:
            self._state_on_device = True
        elif state is None:  # what the second half reads
            self._heun = _FirstHalf(sample, x0, self._step_index, prev, prev._version)
            self.sample = sample
        else:
            self._heun = self.sample = None
        return step_output(self._output_cls, call["return_dict"], prev, x0)

    def _host_half(self, sample, timestep, tabs, state, prediction_type, clip_range):
        """The rows, ``x0_prev`` and reference step of a half whose state is on the host:
        ``state`` is the first half's (``_FirstHalf``) or None (a first half next)."""
        if self._state_on_device:
            raise ValueError(
                f"{type(self).__name__}: the previous half step ran in a graphed loop "
                "(prepare_graph_step), whose state_in_first_order lives on the device; call "
                "set_timesteps to start again"
            )
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
        x0_prev = None if state is None else state.x0
        if offset == 2 * n1:  # P = x_s + (s' - s) d / 2 = lerp(x_s, D, (s - s') / (2 s))
            dtype = self._midpoint_dtype(state.start.dtype, state.x0.dtype)
            weight = tabs["midpoint_weight"].index_select(0, rows).to(dtype)
            x0_prev = torch.lerp(state.start.to(dtype), state.x0.to(dtype), weight)
        options = {"prediction_type": prediction_type, "clip_range": clip_range}
        rule = euler_step
        if state is not None:
            rule = heun_correction_step
            options.update(x_start=state.start, x0_start=state.x0)
        reference_step = self._rule(tabs, rows, rule, ("sigma", "sigma_next"), None, options)
        return rows, x0_prev, reference_step

    # -- CUDA-graph hooks (see FusedSchedulerMixin; check_capturable: StepIndexMixin's) -----

    def prepare_graph_step(self, step_index: torch.Tensor | None = None) -> None:
        """A graphed iteration follows: its step takes the half and the step index from the
        device state (``_device_half``), and a first half's index from ``step_index`` (the
        loop's counter) or a device lookup of the timestep."""
        super().prepare_graph_step(step_index)
        self._graph_step = True

    def graph_state(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The device buffers a graphed half step on samples like ``latents`` reads and
        writes besides them (allocated here if new; x0 and the prediction in the latents'
        dtype, the start in the midpoint's: float32, float64 for float64): which half is next,
        the step's start, the first half's x0 and prediction.

        Args:
            latents: a sample like the loop's (shape, dtype, device, memory format).

        Returns:
            ``[pending, start, x0, prediction]`` (``_buffers``).
        """
        x = dense(latents)
        return list(self._buffers(x, latents.dtype, latents.dtype))

    # -- end of the CUDA-graph hooks ----------------------------------------------------------

    def _buffers(self, x: torch.Tensor, out_dtype: torch.dtype, x0_dtype: torch.dtype):
        """``(pending, start, x0, prev)`` of samples laid out like ``x``: int64 ``[1]``, 0 or
        the step index + 1 of the second half next; the first half's sample (in the
        midpoint's dtype, ``_midpoint_dtype``: the lerp reads it without a cast), x0 and
        prediction (zeros when new)."""
        key = (x.device, x.shape, x.stride(), x.dtype, out_dtype, x0_dtype)
        buffers = self._graph_buffers.get(key)
        if buffers is None:
            buffers = self._graph_buffers[key] = (
                torch.zeros(1, dtype=torch.int64, device=x.device),
                torch.zeros_like(x, dtype=self._midpoint_dtype(x.dtype, x0_dtype)),
                torch.zeros_like(x, dtype=x0_dtype),
                torch.zeros_like(x, dtype=out_dtype),
            )
        return buffers

    @staticmethod
    def _midpoint_dtype(sample_dtype: torch.dtype, x0_dtype: torch.dtype) -> torch.dtype:
        """The dtype the midpoint ``lerp(x_s, D, w)`` is computed in: float32, or float64
        when the sample or x0 is."""
        return promote(promote(sample_dtype, x0_dtype), torch.float32)

    def _device_half(self, x, timestep, tabs, prediction_type, clip_range, out_dtype, x0_dtype):
        """One half step whose choices are all made on the device, the same arithmetic as
        the host path's (so a graphed loop gives the eager loop's bits). ``pending`` is 0
        (a first half next: at the timestep's index, found on the device) or the index + 1 of
        the second half next (the one after the first half's); the second half takes the
        one-launch form where the sample equals the first half's prediction (the eager
        loop's ``sample is prev``) and the step is short, else the midpoint form;
        ``x0_prev = lerp(x_s, D, w)``, ``w = 1`` (D, exactly) but in the midpoint form. A
        timestep that is not the plan's at that index gives the poison row (NaN), and a
        first half next. Returns the rows, ``x0_prev``, the reference step and the outputs
        (the prediction and x0 buffers) of the half's ``_step_once``; ``pending`` is already
        the next half's."""
        n = self._plan_len
        n1 = n + 1
        pending, start, d, prev = self._buffers(x, out_dtype, x0_dtype)
        second = pending > 0
        lookup = self._step_index
        if not isinstance(lookup, torch.Tensor):  # a plan element: its index, on the device
            lookup = tabs["arange"][lookup : lookup + 1]
        index = torch.where(second, pending - 1, lookup.reshape(1))
        at = index.clamp(0, n - 1)
        same = (x == prev).all()  # read before the kernel overwrites prev
        one_launch = self._short_on(x.device).index_select(0, at) & same
        rows = index + second.long() * n1 * (2 - one_launch.long())
        plan = self._plan_on(x.device).index_select(0, at)
        t = timestep.reshape(1).to(x.device) if isinstance(timestep, torch.Tensor) else timestep
        rows = torch.where((plan == t) & (index >= 0) & (index < n), rows, n)  # n: poison
        # a first half keeps its sample as x_s (before the step: prev_sample may alias it),
        # widened exactly to the midpoint's dtype (the host path's start.to(dtype))
        torch.where(second, start, x, out=start)
        weight = tabs["prev_weight"].index_select(0, rows).to(start.dtype)
        x0_prev = torch.lerp(start, d.to(start.dtype), weight)

        def reference_step(xr, m, _noise):
            s, s_next = self._values(tabs, rows, "sigma", "sigma_next")
            options = {"prediction_type": prediction_type, "clip_range": clip_range}
            first = euler_step(xr, m, s, s_next, **options)
            halves = heun_correction_step(
                xr, m, s, s_next, x_start=start.to(xr.dtype), x0_start=d.to(xr.dtype), **options
            )
            return tuple(torch.where(second, b, a) for a, b in zip(first, halves))

        pending.copy_(tabs["next_half"].index_select(0, rows) * (index + 2))
        return rows, x0_prev, reference_step, {"out": prev, "x0_out": d}

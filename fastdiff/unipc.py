"""The native ``UniPCSampler`` (Zhao et al. 2023) on the fused step; its coefficient tables
and device history ring are in ``fastdiff.unipc_tables``.

Example:
    >>> sampler = UniPCSampler(schedule, 10, timestep_spacing="trailing")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import checks, reference, unipc_tables
from fastdiff.kernels.fused_step import COLUMNS
from fastdiff.samplers import Sampler

__all__ = ["UniPCMixin", "UniPCSampler"]


class UniPCMixin:
    """UniPC (Zhao et al. 2023) on a ``fastdiff.Sampler``'s plan: the corrector of each step
    and the predictor of the next in one fused launch, with the multistep history in device
    buffers that the sampler owns (see the module docstring). Mixed in before a sampler base
    that provides the plan; the class provides :meth:`noise_levels` (the plan's alpha_t and
    sigma_t), e.g. ``UniPCSampler`` (VP).

    Drive it as any sampler (``fastdiff.sample``, ``SamplingGraph``): ``step(x, m, i)`` (the
    contract of ``Sampler.step``: x0_prev, noise and seeds are ignored, grad is refused,
    ``pred_original_sample`` is x0 with ``predict_x0`` and ``return_x0``, else None). With a
    python int ``i``, a step that does not follow the previous one (``i != previous + 1``)
    starts a new chain there (first order, no corrector), so full and truncated chains need
    nothing more. With a tensor ``i`` (captured loops, per-sample steps) the sampler cannot
    see where a chain starts: it is the step given to :meth:`begin_chain` (default 0).

    Args:
        *args: the sampler base's (schedule, steps).
        solver_order: 1 to 3 (the predictor's order; the corrector adds one).
        solver_type: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).
        predict_x0: keep data predictions (True: the data-prediction UniPC, with clipping and
            thresholding available) or noise predictions.
        lower_order_final: lower the order on the last steps (the last one is first order).
        disable_corrector: step indices whose correction, applied at the next step, is off.
        **kwargs: the sampler base's (prediction_type, clip_sample_range, thresholding,
            conditioning, backend, ...).
    """

    multistep = False  # the loop passes no x0_prev: the history is the sampler's own
    _history_on_device = True  # no Python-side history is read by a step

    def __init__(
        self,
        *args,
        solver_order: int = 2,
        solver_type: str = "bh2",
        predict_x0: bool = True,
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        **kwargs,
    ) -> None:
        max_order = unipc_tables.MAX_ORDER
        if isinstance(solver_order, bool) or solver_order not in range(1, max_order + 1):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        self.solver_order = int(solver_order)
        self.solver_type = checks.check_choice(
            "solver_type", solver_type, reference.UNIPC_SOLVER_TYPES
        )
        self.predict_x0 = bool(predict_x0)
        self.lower_order_final = bool(lower_order_final)
        if not all(isinstance(j, int) and not isinstance(j, bool) for j in disable_corrector):
            raise TypeError(f"disable_corrector must be step indices, got {disable_corrector!r}")
        self.disable_corrector = tuple(disable_corrector)
        if not self.lower_order_final and self.solver_order > 1:
            raise ValueError(
                "lower_order_final=False with solver_order > 1: the last step, to clean data, "
                "has an infinite log-SNR length and diverges above first order"
            )
        if not self.predict_x0 and (
            kwargs.get("clip_sample_range") is not None or kwargs.get("thresholding") is not None
        ):
            raise ValueError(
                "clip_sample_range / thresholding process x0: they need predict_x0=True"
            )
        self._history = unipc_tables.UniPCHistory(unipc_tables.ring_slots(self.solver_order))
        self._next: int | None = None  # the step index that continues the chain
        self._done = 0  # steps of the current chain (capped at solver_order)
        self._chain_start = 0  # where chains of tensor-indexed steps start
        self._unipc_cache: dict = {}
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_steps}, solver_order={self.solver_order}, "
            f"solver_type={self.solver_type!r}, predict_x0={self.predict_x0}, "
            f"prediction_type={self.prediction_type!r}, backend={self.backend!r})"
        )

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` of the plan's steps and of the clean end (sigma 0): float64
        CPU tensors ``[num_steps + 1]``, the points of ``unipc_table``."""
        raise NotImplementedError

    # -- the table --------------------------------------------------------------------------

    def _build_table(self) -> torch.Tensor:
        alpha, sigma = self.noise_levels()
        conversion = unipc_tables.conversion_coefficients(
            alpha[:-1], sigma[:-1], self.prediction_type, self.predict_x0
        )
        try:
            self.unipc_table = unipc_tables.unipc_table(
                alpha,
                sigma,
                conversion,
                solver_order=self.solver_order,
                solver_type=self.solver_type,
                predict_x0=self.predict_x0,
                lower_order_final=self.lower_order_final,
                disable_corrector=self.disable_corrector,
                processed=self.predict_x0
                and (self.clip_sample_range is not None or self.thresholding is not None),
            )
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: {err} (a plan that starts at alpha_bar = 0, zero "
                "terminal SNR, needs solver_type='bh2' and solver_order <= 2)"
            ) from None
        # The base table: the sampler's own columns of a chain started at step 0.
        n = len(alpha) - 1
        rows = torch.arange(n) + n * torch.clamp(torch.arange(n), max=self.solver_order)
        return self.unipc_table[rows, : len(COLUMNS)].clone()

    def _unipc_tables(self, device: torch.device) -> dict:
        """Device copies (float32) of the UniPC table: ``full`` with its ``row_views``, and the
        ``active`` table of tensor-indexed steps (row k: step k of a chain started at
        ``begin_chain``'s step)."""
        cached = self._unipc_cache.get(device)
        if cached is None:
            full = self.unipc_table.to(device=device, dtype=torch.float32).contiguous()
            rows = torch.arange(len(full), dtype=torch.int64, device=device)
            cached = self._unipc_cache[device] = {
                "full": full,
                "row_views": [rows[j : j + 1] for j in range(len(full))],
                "active": {},
            }
        start = self._chain_start
        if start not in cached["active"]:
            n = self.num_steps
            k = torch.arange(n)
            w = torch.clamp(k - start, min=0, max=self.solver_order)
            cached["active"][start] = cached["full"][(w * n + k).to(device)].contiguous()
        return cached

    # -- the chain ---------------------------------------------------------------------------

    def begin_chain(self, start: int = 0) -> None:
        """Start a new chain at step ``start``: its history is cleared, its first step is first
        order without corrector. Steps with a python int index call it themselves when they
        do not follow the previous step; a loop over tensor step indices (a CUDA graph)
        calls it before its first step.

        Args:
            start: the chain's first step index.
        """
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int, got {type(start).__name__}")
        if not 0 <= start < self.num_steps:
            raise IndexError(f"start {start} outside [0, {self.num_steps})")
        self._history.clear()
        self._chain_start = start
        self._next, self._done = start, 0

    def graph_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The device buffers a step on samples like ``x`` reads and writes besides x (the
        ring and the last corrected samples, allocated here if new): what a CUDA graph of
        several steps must save and restore with x to re-run them (its verification).

        Args:
            x: a sample like the loop's (shape, dtype, device, memory format).

        Returns:
            ``[ring, last]``.
        """
        return list(self._history.buffers(x, x.dtype))

    def _host_position(self, i) -> tuple[int, int]:
        """(k, w) of a step whose index is a python int: the chain bookkeeping on the host."""
        if i != self._next:
            self._history.clear()
            self._next, self._done = i, 0
        w = self._done
        self._next, self._done = i + 1, min(w + 1, self.solver_order)
        return i, w

    def _tensor_position(self, i: torch.Tensor) -> tuple[int, int]:
        """(k, w) of a tensor step index on the reference backend (reads it on the host; the
        kernel path never does): one index for the whole batch."""
        values = i.reshape(-1).tolist()
        if len(set(values)) != 1:
            raise ValueError(
                f"the reference backend of {type(self).__name__} takes one step index a batch"
            )
        k = values[0]
        if k < self._chain_start:
            raise ValueError(f"step {k} is before the chain's start {self._chain_start}")
        return k, min(k - self._chain_start, self.solver_order)

    # -- the step ----------------------------------------------------------------------------

    def _check_arguments(self, *arguments):
        checked = super()._check_arguments(*arguments)
        x0_out = arguments[-1]
        if x0_out is not None and not self.predict_x0:
            raise ValueError("predict_x0=False keeps noise predictions: there is no x0 to write")
        return checked

    def _step_inputs(self, x, i, x0_prev, noise, seeds, return_x0, x0_out):
        """Step ``i`` (``Sampler.step``'s contract): the corrector of the sample the last
        step made and the predictor to step ``i + 1``, on the table row of the chain's
        position, with the history ring; x0 (data prediction only) when asked."""
        on_device = self._unipc_tables(x.device)
        if isinstance(i, int):
            position = self._host_position(i)
            k, w = position
            table, rows = on_device["full"], on_device["row_views"][w * self.num_steps + k]
        else:
            position = None  # the kernel reads it from the device; the reference on the host
            table, rows = on_device["active"][self._chain_start], i
        ring, last = self._history.buffers(x, x.dtype)

        def reference_step(xr, m, _x0_prev, _noise, _grad):
            self._position = position if position is not None else self._tensor_position(i)
            x_next, x0 = self._reference_step(xr, m, None, i, None, None, None)
            return x_next.to(x.dtype), x0.to(x.dtype)  # the ring is written in x's dtype

        options = {
            "write_x0": self.predict_x0 and (return_x0 or x0_out is not None),
            "history": ring,
            "last_sample": last,
        }
        return table, rows, reference_step, options

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        """The reference path: ``fastdiff.reference.unipc_step`` on this step's schedule values,
        with the history in the same ring and slots as the kernel's (compute dtype)."""
        k, w = self._position
        orders = unipc_tables.step_orders(
            k, w, self.num_steps, self.solver_order, self.lower_order_final, self.disable_corrector
        )
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return unipc_tables.reference_on_ring(
            x,
            m,
            k,
            orders,
            *self.noise_levels(),
            *self._history.buffers(x, dtype),
            predict_x0=self.predict_x0,
            solver_type=self.solver_type,
            prediction_type=self.prediction_type,
            clip_range=self.clip_sample_range if self.predict_x0 else None,
            thresholding=self.thresholding if self.predict_x0 else None,
        )


class UniPCSampler(UniPCMixin, Sampler):
    """UniPC (Zhao et al. 2023) in VP space (``UniPCMixin`` on a ``Sampler`` plan):
    ``alpha_t = sqrt(ab_t)``, ``sigma_t = sqrt(1 - ab_t)``, then clean data.

    Args:
        schedule: the model's noise schedule.
        steps: see ``Sampler`` (trailing or linspace spacing suit it best).
        solver_order, solver_type, predict_x0, lower_order_final, disable_corrector: see
            ``UniPCMixin``.
        **kwargs: ``Sampler``'s (prediction_type, timestep_spacing, clip_sample_range,
            thresholding, conditioning, backend, ...).

    Example:
        >>> sampler = UniPCSampler(schedule, 10, timestep_spacing="trailing")
        >>> x = fastdiff.sample(model, sampler, shape=(4, 3, 32, 32), seed=0)
    """

    def __init__(self, schedule, steps=20, **kwargs) -> None:
        super().__init__(schedule, steps, **kwargs)

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        ab = torch.cat([self.alpha_bar, self.alpha_bar_next[-1:]])
        return ab.sqrt(), (1.0 - ab).sqrt()

"""A diffusers-style denoising loop ``for t in timesteps: latents = step_fn(latents, t)`` as
a CUDA graph of one iteration, replayed for every timestep.

The scheduler takes part through public methods of every fused scheduler
(``FusedSchedulerMixin``): ``check_capturable()`` raises ValueError saying why its loop cannot
be replayed, and ``prepare_graph_step(step_index, advance)`` runs at the start of every
captured iteration (``step_index``: the loop's device counter over the scheduler's own plan,
else None), ``finish_graph_step()`` at its end; a scheduler with ``graph_state(latents)``
(device buffers its step reads and writes) has them saved and restored with the latents by
the graph's verification. Over its own plan the loop offers the scheduler its advance
(``graph_advance``): the step's one kernel launch then writes the next latents into the
loop's buffer and advances the counter and the timestep itself, so that an iteration
launches nothing else of the loop's (the first iteration checks that the step made exactly
one such launch; otherwise the loop gathers the timestep, copies the latents and increments
the counter itself, as for any other scheduler).
diffusers' own schedulers are refused (they read the timestep on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import capture, philox
from fastdiff.capture import (
    GraphedLoop,
    GraphEngine,
    GraphMismatchError,
    GraphRuntime,
)
from fastdiff.kernels.fused_step import LoopAdvance

__all__ = ["ADVANCE_HELP", "DenoisingLoopGraph", "capture_denoising_loop", "check_scheduler"]

ADVANCE_HELP = (
    "The scheduler's step advanced the loop in its kernel launch (the loop's latents, its "
    "timestep t and the step index hold the next step's values once the step has run): a "
    "step_fn that reads t, the step index or its input latents after scheduler.step sees "
    "the next step's. Read them before the step, or pass advance=False to "
    "capture_denoising_loop (the loop then advances itself, a few launches more a step)."
)


def check_scheduler(scheduler: Any) -> None:
    """Raises ValueError if a loop stepping ``scheduler`` cannot be replayed as a CUDA graph:
    its own ``check_capturable()`` says why, and diffusers' own schedulers (timestep and step
    index read on the host) are refused. None, or any other object, passes.

    Raises:
        ValueError: the scheduler cannot be replayed; the message says why and what to use.
    """
    if scheduler is None:
        return
    check = getattr(scheduler, "check_capturable", None)
    if callable(check):
        check()
        return
    if hasattr(scheduler, "model_outputs") or hasattr(scheduler, "lower_order_nums"):
        raise ValueError(
            f"{type(scheduler).__name__} keeps its multistep history in Python "
            "(model_outputs, lower_order_nums), which a replayed graph cannot update; use "
            "fastdiff.sample(model, DPMSolverPP2MSampler(...), cuda_graph=True) or the eager loop"
        )
    if (type(scheduler).__module__ or "").startswith("diffusers."):
        raise ValueError(
            f"diffusers' {type(scheduler).__name__} reads the timestep and its step index on "
            "the host (a CUDA graph would freeze them at their captured values); use the "
            "drop-in fastdiff.diffusers.Fused* scheduler of the same name"
        )


class DenoisingLoopGraph(GraphedLoop):
    """``for t in timesteps: latents = step_fn(latents, t)`` captured as a CUDA graph of one
    iteration and replayed for every timestep.

    ``step_fn(latents, t)`` is one iteration of your loop (model call, guidance, the
    scheduler's step) and returns the next latents. In the graph ``latents`` is a static
    buffer and ``t`` a 0-d device tensor holding the current timestep (gathered from the plan
    by a device counter, or, where the scheduler's step advances the loop, a buffer the
    step's launch rewrites with the next timestep: read ``t`` before the scheduler's step;
    the graph's verification, against the loop's own path, catches a step_fn that reads it
    after). Capture happens in the first run (warm-up, capture, a bitwise check
    of the first replay, as :class:`fastdiff.SamplingGraph`).

    Schedulers: the fastdiff.diffusers ``Fused*`` ones pass ``scheduler=`` (checked by its
    ``check_capturable()``, prepared by ``prepare_graph_step(step_index)`` every iteration:
    over its own plan the loop's counter is its step index). A stochastic one keys its
    in-kernel noise by a seed drawn once per ``set_timesteps``, so every run
    replays the step noise of the capture; for per-run seeds use ``SamplingGraph``.

    Args:
        step_fn: ``step_fn(latents, t) -> latents`` (same shape and dtype).
        latents: a tensor like the loop's latents (shape, dtype, device, memory format).
        timesteps: the plan (default: ``scheduler.timesteps``).
        scheduler: the loop's scheduler.
        steps_per_graph, warmup_steps, verify: as for ``fastdiff.SamplingGraph``.
        runtime: the device runtime (default: ``fastdiff.capture.make_runtime``).
        advance: offer the scheduler the loop's advance (``graph_advance``; False: the loop
            gathers the timestep, copies the latents and increments its counter itself).

    Raises:
        ValueError: a scheduler that cannot be replayed, a step_fn calling a model
            ``torch.compile``d with CUDA graphs of its own (``"reduce-overhead"``: compile
            in the default or ``"max-autotune-no-cudagraphs"`` mode, the fastest path).

    Example::

        scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(50, device="cuda")

        def step_fn(latents, t):
            eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=emb).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + 7.5 * (eps_c - eps_u)
            return scheduler.step(eps, t, latents).prev_sample

        loop = capture_denoising_loop(step_fn, latents, scheduler=scheduler)
        images = vae.decode(loop.run(latents) / vae.config.scaling_factor).sample
    """

    def __init__(
        self,
        step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latents: torch.Tensor,
        timesteps: torch.Tensor | Sequence[int] | None = None,
        *,
        scheduler: Any = None,
        steps_per_graph: int = 1,
        warmup_steps: int = 2,
        verify: bool = True,
        runtime: GraphRuntime | None = None,
        advance: bool = True,
    ) -> None:
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor")
        own_plan = timesteps is None
        if own_plan:
            if scheduler is None or getattr(scheduler, "timesteps", None) is None:
                raise ValueError("pass timesteps, or a scheduler after set_timesteps")
            timesteps = scheduler.timesteps
        plan = torch.as_tensor(timesteps)
        if plan.dim() != 1 or plan.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence, got {tuple(plan.shape)}")
        check_scheduler(scheduler)
        capture.check_graphable(step_fn, "step_fn")
        prepare = getattr(scheduler, "prepare_graph_step", None)
        self._prepare = prepare if callable(prepare) else None
        finish = getattr(scheduler, "finish_graph_step", None)
        self._finish = finish if callable(finish) else None
        self.scheduler = scheduler
        self.step_fn = step_fn
        device = latents.device
        runtime = runtime if runtime is not None else capture.make_runtime(device)
        self.device = device
        self.num_steps = plan.numel()
        self.plan = plan.to(device).contiguous()
        self.latents = torch.zeros_like(latents, memory_format=philox.memory_format_of(latents))
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        # over the scheduler's own plan, iteration k is its step k (diffusers' lookup of the
        # first timestep gives 0 unless that timestep repeats): the counter is the step index
        own_index = own_plan and int((plan == plan[0]).sum()) == 1
        self._step_index = self.counter if own_index else None
        # device buffers the scheduler's step reads and writes (DPM-Solver++'s previous x0)
        graph_state = getattr(scheduler, "graph_state", None)
        extra = list(graph_state(self.latents)) if callable(graph_state) else []
        self.timestep = self.plan[0].clone()  # the iteration's t where the step advances
        self.advance = self._offer_advance(own_index and advance)
        self._probed = False  # whether an iteration checked the step's advancing launch
        if self.advance is not None:
            extra += [self.timestep, self.advance.ticket]
            extra += [t for t in (self.advance.side_dst, self.advance.scaled) if t is not None]
        self.engine = GraphEngine(
            runtime,
            self._body,
            [self.latents, self.counter, *extra],
            reference=self._loop_body if self.advance is not None else None,
            steps_per_graph=steps_per_graph,
            warmup_steps=warmup_steps,
            verify=verify,
            device=device,
        )

    def _offer_advance(self, offer: bool) -> LoopAdvance | None:
        """The loop's advance, if offered and the scheduler's step takes it over."""
        take = getattr(self.scheduler, "graph_advance", None)
        if not offer or not callable(take):
            return None
        ticket = torch.zeros(1, dtype=torch.int32, device=self.device)
        advance = LoopAdvance(self.counter, ticket, self.plan, self.timestep, out=self.latents)
        return advance if take(advance) else None

    def _body(self) -> None:
        """One iteration: the scheduler's step advances the loop (its launch), else the
        loop's own (``_loop_body``)."""
        advance = self.advance
        if advance is None:
            self._loop_body()
            return
        saved = None if self._probed else [t.clone() for t in self.engine.state]
        advance.launches = advance.scaled_reads = 0
        new = self._iterate(self.timestep, advance)
        if advance.launches != 1:
            self._fall_back(saved, advance.launches, new)
            return
        if not self._probed and advance.scaled is not None:
            if not advance.scaled_reads or not self._is_latents(new):
                # the scaled model input the launch writes is not read (scale_model_input of
                # another tensor), or would not be the next input's (the step_fn changes the
                # step's sample): not written from now on (scale_model_input computes it)
                advance.set_scaled(None)
        self._probed = True
        self._store(new)

    def _iterate(self, t: torch.Tensor, advance: LoopAdvance | None = None) -> Any:
        """The step_fn of this iteration between the scheduler's prepare and finish hooks."""
        if advance is not None:
            self._prepare(self._step_index, advance=advance)
        elif self._prepare is not None:
            self._prepare(self._step_index)
        try:
            return self.step_fn(self.latents, t)
        finally:
            if self._finish is not None:
                self._finish()

    def _is_latents(self, new: Any) -> bool:
        """Whether ``new`` is the latents buffer itself (the step wrote its sample there)."""
        return isinstance(new, torch.Tensor) and new.data_ptr() == self.latents.data_ptr()

    def _fall_back(self, saved: list[torch.Tensor] | None, launches: int, new: Any) -> None:
        """The first iteration's step did not make exactly one advancing launch: from now on
        the loop advances itself (this iteration finished so, or, where the counter moved
        more than once, taken again from the saved state)."""
        if saved is None:  # a later iteration did otherwise than the first one checked
            raise RuntimeError(
                f"step_fn made {launches} advancing scheduler step launches in an iteration "
                "after the first made one: a step_fn must call scheduler.step the same way in "
                "every iteration (or pass advance=False)"
            )
        self.advance = None
        self.engine.reference = self.engine.body
        if launches == 0:  # nothing advanced: this iteration is the loop's own so far
            self._store(new)
            self.counter.add_(1)
            return
        for t, s in zip(self.engine.state, saved):
            t.copy_(s)
        self._loop_body()

    def _loop_body(self) -> None:
        """One iteration the loop advances itself: the timestep gathered from the plan, the
        step's latents copied into the buffer, the counter incremented (the reference of the
        graph's verification where the step advances the loop: its buffers as there)."""
        new = self._iterate(torch.take(self.plan, self.counter))
        self._store(new)
        self.counter.add_(1)
        if self.advance is not None:  # what the advancing launch leaves in its buffers
            self.advance.leave(self.latents)

    def _store(self, new: Any) -> None:
        """The step_fn's result into the latents buffer (nothing to copy where it is it)."""
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"step_fn must return the next latents, got {type(new).__name__}")
        if new.shape != self.latents.shape or new.dtype != self.latents.dtype:
            raise ValueError(
                f"step_fn returned {new.dtype} {tuple(new.shape)}; the loop's latents are "
                f"{self.latents.dtype} {tuple(self.latents.shape)} (cast inside step_fn)"
            )
        if new.data_ptr() != self.latents.data_ptr():
            self.latents.copy_(new)

    def run(self, latents: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
        """Runs the loop from ``latents`` over every timestep (the first run captures).

        Args:
            latents: the initial latents (copied into the static buffer).
            progress: tqdm progress bar.

        Returns:
            A new tensor with the final latents.
        """
        if not isinstance(latents, torch.Tensor) or latents.shape != self.latents.shape:
            raise ValueError(f"latents must be a tensor of shape {tuple(self.latents.shape)}")
        self.latents.copy_(latents)
        self.counter.zero_()
        if self.advance is not None:
            self.advance.restart()
        with tqdm(total=self.num_steps, disable=not progress, leave=False) as bar:
            try:
                self.engine.run(self.num_steps, lambda done: bar.update(1))
            except GraphMismatchError as err:
                if self.advance is None:
                    raise
                raise GraphMismatchError(f"{err}\n{ADVANCE_HELP}") from err  # (the likely why)
        return self.latents.clone()


def capture_denoising_loop(
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int] | None = None,
    **options: Any,
) -> DenoisingLoopGraph:
    """A :class:`DenoisingLoopGraph` of ``step_fn`` (captured at its first run).

    Args:
        step_fn: ``step_fn(latents, t) -> latents``: one iteration of a diffusers-style loop.
        latents: a tensor like the loop's latents.
        timesteps: the plan (default: ``scheduler.timesteps``).
        **options: ``scheduler``, ``steps_per_graph``, ``warmup_steps``, ``verify``,
            ``runtime``, ``advance`` (see there).

    Returns:
        The loop; ``loop.run(latents)`` returns the final latents.
    """
    return DenoisingLoopGraph(step_fn, latents, timesteps, **options)

"""A diffusers-style denoising loop ``for t in timesteps: latents = step_fn(latents, t)`` as
a CUDA graph of one iteration, replayed for every timestep.

The scheduler takes part through two public methods of every fused scheduler
(``FusedSchedulerMixin``): ``check_capturable()`` raises ValueError saying why its loop cannot
be replayed, and ``prepare_graph_step(step_index)`` runs at the start of every captured
iteration (``step_index``: the loop's device counter over the scheduler's own plan, else
None); a
scheduler with ``graph_state(latents)`` (device buffers its step reads and writes) has them
saved and restored with the latents by the graph's verification.
diffusers' own schedulers are refused (they read the timestep on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import capture, philox
from fastdiff.capture import GraphedLoop, GraphEngine, GraphRuntime

__all__ = ["DenoisingLoopGraph", "capture_denoising_loop", "check_scheduler"]


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
    by a device counter). Capture happens in the first run (warm-up, capture, a bitwise check
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
        self.engine = GraphEngine(
            runtime,
            self._body,
            [self.latents, self.counter, *extra],
            steps_per_graph=steps_per_graph,
            warmup_steps=warmup_steps,
            verify=verify,
            device=device,
        )

    def _body(self) -> None:
        t = torch.take(self.plan, self.counter)
        if self._prepare is not None:
            self._prepare(self._step_index)
        new = self.step_fn(self.latents, t)
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"step_fn must return the next latents, got {type(new).__name__}")
        if new.shape != self.latents.shape or new.dtype != self.latents.dtype:
            raise ValueError(
                f"step_fn returned {new.dtype} {tuple(new.shape)}; the loop's latents are "
                f"{self.latents.dtype} {tuple(self.latents.shape)} (cast inside step_fn)"
            )
        if new.data_ptr() != self.latents.data_ptr():
            self.latents.copy_(new)
        self.counter.add_(1)

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
        with tqdm(total=self.num_steps, disable=not progress, leave=False) as bar:
            self.engine.run(self.num_steps, lambda done: bar.update(1))
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
            ``runtime`` (see there).

    Returns:
        The loop; ``loop.run(latents)`` returns the final latents.
    """
    return DenoisingLoopGraph(step_fn, latents, timesteps, **options)

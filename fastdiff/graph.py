"""A fastdiff sampling chain as a CUDA graph: one step captured once, replayed every step.

The captured step is the eager loop's :class:`fastdiff.loop.SamplingStep` on static buffers,
its step index a device counter, so the samples are bitwise those of :func:`fastdiff.sample`.
Design notes (warm-up, verification, ``torch.compile``): ``docs/graphs.md``.

Example::

    graph = SamplingGraph(model, DDIMSampler(schedule, 50), (16, 4, 64, 64), device="cuda")
    for k in range(100):                       # captured once, then replayed
        seeds = philox.seeds_from(k, 16, "cuda")
        x = graph.run(initial_noise(seeds, (16, 4, 64, 64)), seeds)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import capture, philox
from fastdiff.capture import GraphCaptureError, GraphedLoop, GraphEngine, GraphRuntime
from fastdiff.loop import Model, SamplingStep

# Also here, lazily: capture_denoising_loop and DenoisingLoopGraph (fastdiff.diffusers.graph).
__all__ = ["GraphCaptureError", "SamplingGraph", "sample_graphed"]


def __getattr__(name: str) -> Any:
    """``capture_denoising_loop`` / ``DenoisingLoopGraph`` live in ``fastdiff.diffusers.graph``
    (they need diffusers, which this module does not import)."""
    if name in ("capture_denoising_loop", "DenoisingLoopGraph"):
        from fastdiff.diffusers import graph as diffusers_graph

        return getattr(diffusers_graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    return tuple(shape)


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if _has_cuda() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _has_cuda() -> bool:
    return torch.cuda.is_available()


class SamplingGraph(GraphedLoop):
    """A fastdiff sampler's reverse chain with ``model``, captured once as a CUDA graph of one
    step (or ``steps_per_graph`` steps) and replayed for every step of every run.

    Each :meth:`run` gives bitwise the samples of :func:`fastdiff.sample` for the same initial
    noise and seeds. The model may be ``torch.compile``d (default or
    ``"max-autotune-no-cudagraphs"`` mode; the fastest path): it compiles and autotunes in the
    warm-up, at the captured shapes, before the capture. A model compiled with CUDA graphs of
    its own (``"reduce-overhead"``) is refused (``fastdiff.capture.check_graphable``).

    Args:
        model: ``model(x, cond) -> output``; must be capturable (see ``GraphCaptureError``).
        sampler: a ``fastdiff.Sampler``.
        shape: the batch's shape, batch first (fixed: a graph replays fixed shapes).
        device: a CUDA device (default: the current one).
        dtype: dtype of the samples (the model's input).
        memory_format: of the static buffers (``torch.channels_last`` for 4-D).
        guidance_scale, guidance_rescale, cond_fn: as for :func:`fastdiff.sample`.
        steps_per_graph: steps recorded in one graph (more: fewer launches, no per-step
            callback); steps left over at the end run eagerly.
        warmup_steps: real steps run eagerly on the side stream before the capture (>= 1).
        verify: check once, right after the capture, that a replay reproduces the eager step
            (with outputs that alias nothing) bitwise; costs ``steps_per_graph`` steps, once.
        with_x0: also write each step's x0 into :attr:`x0` (for callbacks).
        runtime: the device runtime (default: ``fastdiff.capture.make_runtime(device)``,
            looked up at call time).

    Raises:
        ValueError: a device that is not CUDA, bad counts or shape, guidance_rescale alone, a
            model or cond_fn compiled with CUDA graphs of its own.
        TypeError: a non-callable model or cond_fn, not a sampler, a non-float dtype.

    Example::

        graph = SamplingGraph(unet_fn, DDIMSampler(schedule, 50), (8, 4, 64, 64),
                              dtype=torch.float16, guidance_scale=5.0)
        x = graph.run(noise)                      # noise: [8, 4, 64, 64] N(0, I)
    """

    def __init__(
        self,
        model: Model,
        sampler: Any,
        shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        cond_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        steps_per_graph: int = 1,
        warmup_steps: int = 2,
        verify: bool = True,
        with_x0: bool = False,
        runtime: GraphRuntime | None = None,
    ) -> None:
        body = SamplingStep(
            model,
            sampler,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            cond_fn=cond_fn,
            with_x0=with_x0,
        )
        self._setup(
            body,
            _check_shape(shape),
            _default_device(device),
            dtype,
            memory_format,
            runtime,
            steps_per_graph=steps_per_graph,
            warmup_steps=warmup_steps,
            verify=verify,
        )

    @classmethod
    def from_step(
        cls,
        body: SamplingStep,
        x: torch.Tensor,
        *,
        runtime: GraphRuntime | None = None,
        **options: Any,
    ) -> SamplingGraph:
        """A graph of ``body`` for samples like ``x`` (shape, dtype, device, memory format).

        Args:
            body: the step (model, sampler, guidance) the eager loop runs.
            x: a tensor like the samples.
            runtime: as in the constructor.
            **options: ``steps_per_graph``, ``warmup_steps``, ``verify``.

        Returns:
            The graph (captured at its first run).
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor like the samples")
        graph = cls.__new__(cls)
        fmt = philox.memory_format_of(x)
        device = _default_device(x.device)
        graph._setup(body, tuple(x.shape), device, x.dtype, fmt, runtime, **options)
        return graph

    def _setup(self, body, shape, device, dtype, memory_format, runtime, **options) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        capture.check_graphable(body.model, "model")
        if body.cond_fn is not None:
            capture.check_graphable(body.cond_fn, "cond_fn")
        runtime = runtime if runtime is not None else capture.make_runtime(device)
        self.body = body
        self.model = body.model
        self.sampler = body.sampler
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.num_steps = int(body.sampler.num_steps)
        self.stochastic = body.stochastic
        self.multistep = body.multistep
        batch = shape[0]
        # Static state: the sample, x0 (multistep history / callbacks), seeds, step counter
        # (a 0-d int64 device tensor: the step index the fused step reads its row from).
        self.x = torch.zeros(shape, dtype=dtype, device=device).contiguous(
            memory_format=memory_format
        )
        self.x0 = torch.zeros_like(self.x) if body.returns_x0 else None
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        body.condition_table(batch, device)  # built (and uploaded) before any capture
        state = [self.x, self.counter] + ([self.x0] if self.x0 is not None else [])
        self.engine = GraphEngine(
            runtime, self._step, state, reference=self._unaliased_step, device=device, **options
        )
        self.steps_per_graph = self.engine.steps_per_graph

    # -- one step on the static buffers ------------------------------------------------------

    def _step(self) -> None:
        """The captured step: in place (``out=x``, ``x0_out=x0``), then the counter."""
        self.body(
            self.x, self.counter, seeds=self.seeds, x0_prev=self.x0, out=self.x, x0_out=self.x0
        )
        self.counter.add_(1)

    def _unaliased_step(self, first: bool = False) -> None:
        """The step with fresh outputs (the eager loop's), copied into the buffers."""
        out = self.body(self.x, self.counter, seeds=self.seeds, x0_prev=self.x0, first=first)
        self.x.copy_(out.prev_sample)
        if self.x0 is not None:
            self.x0.copy_(out.pred_original_sample)
        self.counter.add_(1)

    # -- running a chain -------------------------------------------------------------------

    def run(
        self,
        x: torch.Tensor,
        seeds: torch.Tensor | None = None,
        *,
        start: int = 0,
        progress: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor | None], Any] | None = None,
        copy: bool = True,
    ) -> torch.Tensor:
        """Runs the chain from ``x`` (the first run captures; later runs only replay).

        Args:
            x: the initial sample (noise ``x_T``, or the noised image of a truncated chain),
                of the graph's shape; copied into the static buffer.
            seeds: int64 ``[B]`` per-sample seeds (stochastic samplers: required).
            start: first step index (truncated chains: ``fastdiff.sampling.start_index``).
            progress: show a tqdm progress bar.
            callback: ``callback(i, x, x0)`` after every step with the static buffers (the
                next step overwrites them; x0 is None unless ``with_x0``). Needs
                ``steps_per_graph == 1``.
            copy: return a new tensor; False returns the static buffer :attr:`x` itself
                (no copy; the next run overwrites it).

        Returns:
            The samples.
        """
        self._load(x, seeds, start, callback)
        n = self.num_steps
        first = start
        with tqdm(
            total=n - start, disable=not progress, desc=type(self.sampler).__name__, leave=False
        ) as bar:
            if self.multistep and start > 0:
                # Row `start` of a multistep table is second order: a chain started there
                # takes its first step outside the graph, with no previous x0.
                with self.runtime.side_stream():
                    self._unaliased_step(first=True)
                bar.update(1)
                if callback is not None:
                    callback(start, self.x, self.x0)
                first = start + 1

            def on_step(done: int) -> None:
                bar.update(1)
                if callback is not None:
                    callback(first + done - 1, self.x, self.x0)

            self.engine.run(n - first, on_step)
        return self.x.clone() if copy else self.x

    def _load(self, x, seeds, start, callback) -> None:
        """Checks a run's arguments and loads them into the static buffers."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != self.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape {self.shape}, got {got}")
        n = self.num_steps
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n:
            raise ValueError(f"start must be an int in [0, {n}), got {start!r}")
        if callback is not None:
            if not callable(callback):
                raise TypeError(f"callback must be callable, got {type(callback).__name__}")
            if self.steps_per_graph != 1:
                raise ValueError("a per-step callback needs steps_per_graph=1")
        if self.stochastic:
            if seeds is None:
                raise ValueError(f"{type(self.sampler).__name__} adds noise: pass seeds")
            if not isinstance(seeds, torch.Tensor) or tuple(seeds.shape) != (self.shape[0],):
                raise ValueError(f"seeds must be an integer tensor [{self.shape[0]}]")
            if seeds.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"seeds must be an integer tensor, got dtype {seeds.dtype}")
            self.seeds.copy_(seeds)
        self.x.copy_(x)
        self.counter.fill_(start)
        if self.x0 is not None:
            self.x0.zero_()


def sample_graphed(
    body: SamplingStep,
    x: torch.Tensor,
    *,
    seeds: torch.Tensor | None = None,
    start: int = 0,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor | None], Any] | None = None,
) -> torch.Tensor:
    """One chain of ``body`` through a fresh :class:`SamplingGraph` (what
    ``fastdiff.sample(..., cuda_graph=True)`` runs once it has drawn ``x`` and the seeds).

    Args:
        body: the chain's step.
        x: the initial sample (a CUDA tensor).
        seeds: int64 ``[B]`` per-sample seeds (stochastic samplers).
        start: first step index.
        progress: tqdm progress bar.
        callback: ``callback(i, x, x0)`` after every step (static buffers: clone to keep).

    Returns:
        The samples (x's shape, dtype and device).

    Raises:
        ValueError: x is not on a CUDA device.
        GraphCaptureError: the model cannot be captured (the message says why).
    """
    graph = SamplingGraph.from_step(body, x)
    try:
        return graph.run(x, seeds, start=start, progress=progress, callback=callback, copy=False)
    finally:
        graph.runtime.finish()  # the graph may still be running: let it end before its release
        graph.reset()

"""Capture one loop iteration as a CUDA graph, check it, replay it: the engine under
:class:`fastdiff.SamplingGraph` and ``fastdiff.diffusers.capture_denoising_loop``.

A loop hands the engine its step (a function advancing static device buffers, step counter
included) and the same step with outputs that alias nothing; the engine warms up, captures,
verifies the first replay bitwise against the un-aliased step and replays. The device work
goes through a runtime (:class:`CudaRuntime`; ``runtime=`` injects another, e.g. an eager
stand-in for tests on the CPU). Design notes: ``docs/graphs.md``.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "CAPTURE_HELP",
    "CudaRuntime",
    "GraphCaptureError",
    "GraphEngine",
    "GraphRuntime",
    "GraphedLoop",
    "bits_equal",
    "check_graphable",
    "make_runtime",
]

CAPTURE_HELP = (
    "With cuda_graph=True the model (and cond_fn) must be capturable in a CUDA graph: no host "
    "synchronization (.item(), .cpu(), .tolist(), .numpy(), printing tensors, torch.nonzero, "
    "boolean-mask indexing, Python control flow on tensor values, torch.cuda.synchronize()), "
    "no CPU tensors created and copied to the GPU on every call, and the same work on every "
    "call with only tensor contents changing. A torch.compile'd model works in the default "
    "and 'max-autotune-no-cudagraphs' modes ('reduce-overhead' makes CUDA graphs of its own), "
    "best with dynamic=False (fixed shapes: no recompilation in the capture). "
    "The fused (triton) step is capturable; the reference backend (float64 samples, "
    "backend='reference') reads the step index on the host and is not. Run with "
    "cuda_graph=False, or make the model capturable "
    "(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs)."
)


class GraphCaptureError(RuntimeError):
    """A loop iteration could not be captured in a CUDA graph, or the captured graph did not
    reproduce the eager iteration; the message says why and what to do."""


class GraphMismatchError(GraphCaptureError):
    """The captured graph's replay did not reproduce the loop's reference iterations bitwise
    (the verification)."""


class GraphRuntime(Protocol):
    """What the engine needs from a device: a side stream, capture and replay."""

    def side_stream(self) -> contextlib.AbstractContextManager: ...

    def finish(self) -> None: ...

    def capture(self, fn: Callable[[], None], state: Sequence[torch.Tensor]) -> Any:
        """A graph of ``fn`` (an object with ``replay()`` and ``reset()``); raises the error
        that stopped the capture, after ending it."""
        ...


class CudaRuntime:
    """Side stream, capture and replay on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Runs the block on the side stream, ordered after and before the current stream.

        Under CUDA autocast the block runs without autocast's weight-cast cache: casts cached
        during a capture would be referenced by the graph and freed when the autocast region
        ends (PyTorch asks for ``cache_enabled=False`` in captures), and the warm-up runs in
        the same state as the capture (a ``torch.compile``d model is not recompiled in it).
        """
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with (
                torch.cuda.device(self.device),
                torch.cuda.stream(self.stream),
                _no_autocast_cache(),
            ):
                yield
        finally:
            current.wait_stream(self.stream)

    def finish(self) -> None:
        """Waits for the side stream (before a graph that may still run is destroyed)."""
        self.stream.synchronize()

    def capture(self, fn: Callable[[], None], state: Sequence[torch.Tensor]) -> Any:
        """A ``torch.cuda.CUDAGraph`` of ``fn`` captured on the side stream (call inside
        ``side_stream``); on failure the capture is ended, the half-made graph dropped and
        the error re-raised."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="global")
        error: BaseException | None = None
        try:
            fn()
        except BaseException as err:  # noqa: B036 - the capture must be ended whatever happened
            error = err
        finally:
            try:
                graph.capture_end()
            except Exception as err:  # an invalidated capture fails here too
                error = error or err
        if error is not None:
            with contextlib.suppress(Exception):
                graph.reset()
            del graph
            with contextlib.suppress(Exception):  # give the half-made graph's pool back
                torch.cuda.empty_cache()
            raise error
        return graph


def _no_autocast_cache() -> contextlib.AbstractContextManager:
    """Under CUDA autocast, the same autocast without its weight-cast cache."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


COMPILED_GRAPHS_HELP = (
    "mode='reduce-overhead' and 'max-autotune' (inductor's triton.cudagraphs=True) and the "
    "'cudagraphs' backend record CUDA graphs of their own, which cannot be recorded again "
    "inside fastdiff's graph of the whole step. Compile with the default mode or "
    "mode='max-autotune-no-cudagraphs' (fastdiff's graph then replays the model, guidance and "
    "the fused step as one graph: the faster path), or keep reduce-overhead and run with "
    "cuda_graph=False."
)


def _makes_own_graphs(fn: Any) -> bool:
    """Whether ``fn`` is a ``torch.compile``d callable whose inductor config records CUDA
    graphs (``triton.cudagraphs``)."""
    try:
        get = getattr(fn, "get_compiler_config", None)
        if get is not None:
            config = get()
        else:  # an OptimizedModule of a torch without get_compiler_config on modules
            config = getattr(getattr(fn, "dynamo_ctx", None), "compiler_config", None)
        return isinstance(config, dict) and bool(config.get("triton.cudagraphs"))
    except Exception:  # a look-up never breaks a run: the capture still checks
        return False


def _reachable(fn: Any, depth: int = 3) -> Iterator[Any]:
    """``fn`` and the callables it is made of: an ``nn.Module``'s submodules, a partial's or
    bound method's target, a function's closure cells and the globals it names (a model
    written ``lambda x, c: unet(x, c).sample``)."""
    seen: set[int] = set()
    todo = [(fn, depth)]
    while todo:
        obj, left = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        yield obj
        if left == 0:
            continue
        inner: list[Any] = []
        if isinstance(obj, torch.nn.Module):
            inner += list(obj.modules())[1:]
        elif isinstance(obj, functools.partial):
            inner += [obj.func, *obj.args, *obj.keywords.values()]
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method
            inner += [obj.__self__, obj.__func__]
        code = getattr(obj, "__code__", None)
        if code is not None and not isinstance(obj, torch.nn.Module):
            for cell in getattr(obj, "__closure__", None) or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    inner.append(cell.cell_contents)
            names = getattr(obj, "__globals__", {})
            inner += [names[n] for n in code.co_names if n in names]
        inner.append(getattr(obj, "__wrapped__", None))
        todo += [(o, left - 1) for o in inner if callable(o)]


def check_graphable(fn: Any, name: str = "model") -> None:
    """Refuses a callable that is, or calls, a ``torch.compile``d model which records CUDA
    graphs of its own (``mode="reduce-overhead"`` or ``"max-autotune"``): it cannot be
    captured inside fastdiff's graph of the whole step.

    What it finds: ``fn`` itself, its submodules, and what a wrapper function, partial or bound
    method refers to (closure and globals). A model hidden deeper still fails at the capture,
    with the same advice (:class:`GraphCaptureError`).

    Args:
        fn: the model, ``cond_fn`` or ``step_fn`` to be captured.
        name: the argument's name, for the message.

    Raises:
        ValueError: a compiled model with CUDA graphs of its own was found.

    Example:
        >>> check_graphable(torch.compile(unet, mode="max-autotune-no-cudagraphs"))  # fine
    """
    for obj in _reachable(fn):
        if _makes_own_graphs(obj):
            what = "is" if obj is fn else f"calls {type(obj).__name__}, which is"
            raise ValueError(
                f"{name} {what} torch.compile'd with CUDA graphs of its own: {COMPILED_GRAPHS_HELP}"
            )


def _from_compiled_graphs(err: BaseException) -> bool:
    """Whether ``err`` was raised inside inductor's or dynamo's CUDA-graph code."""
    frames = traceback.extract_tb(err.__traceback__)
    return any("cudagraph" in frame.filename for frame in frames)


def make_runtime(device: torch.device) -> GraphRuntime:
    """The runtime of ``device`` (the default of every graph's ``runtime=``): a
    :class:`CudaRuntime`; CUDA graphs need a CUDA device.

    Raises:
        ValueError: ``device`` is not CUDA, or no CUDA device is available.
    """
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs a CUDA device, but the samples are on {device}: CUDA graphs "
            "record GPU kernels; on the CPU use cuda_graph=False"
        )
    if not torch.cuda.is_available():
        raise ValueError("cuda_graph=True needs a CUDA device, and none is available")
    return CudaRuntime(device)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs included) of two tensors of one shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _rng_state(device: torch.device) -> tuple:
    """Host-side state of torch's generators a step could draw from (no device sync)."""
    cpu = torch.random.get_rng_state()
    if device.type != "cuda":
        return (cpu,)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = torch.cuda.default_generators[index]
    return (cpu, cuda.initial_seed(), cuda.get_offset())


def _same_rng_state(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


class GraphEngine:
    """Runs ``body`` (one iteration on static state, counter included) ``n`` times: warm-up
    iterations eagerly, then a captured graph of ``steps_per_graph`` of them, verified once
    against ``reference`` and replayed.

    Args:
        runtime: the device runtime (:func:`make_runtime`).
        body: one iteration, in place on ``state`` (what is captured).
        state: every tensor the iteration reads or writes across iterations.
        reference: one iteration whose outputs alias nothing, then copied into ``state``
            (default: ``body``); the captured graph must reproduce it bitwise.
        steps_per_graph: iterations recorded in one graph.
        warmup_steps: iterations run eagerly on the side stream before the capture (a
            ``torch.compile``d model compiles and autotunes in the first).
        verify: check the first replay against ``reference`` (one extra iteration, once), and
            that the reference draws nothing from torch's random generators.
        device: the state's device (for the random-generator check).

    Raises:
        ValueError: ``steps_per_graph`` or ``warmup_steps`` is not an int >= 1.
    """

    def __init__(
        self,
        runtime: GraphRuntime,
        body: Callable[[], None],
        state: Sequence[torch.Tensor],
        *,
        reference: Callable[[], None] | None = None,
        steps_per_graph: int = 1,
        warmup_steps: int = 2,
        verify: bool = True,
        device: torch.device | None = None,
    ) -> None:
        self.steps_per_graph = _check_count("steps_per_graph", steps_per_graph)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps)
        self.runtime = runtime
        self.body = body
        self.reference = reference or body
        self.state = list(state)
        self.verify = verify
        self.device = device if device is not None else self.state[0].device
        self.graph: Any = None

    def reset(self) -> None:
        """Drops the captured graph; the next run captures again."""
        if self.graph is not None:
            with contextlib.suppress(Exception):
                self.graph.reset()
        self.graph = None

    def replay(self) -> None:
        """One replay of the captured graph on the static state (``steps_per_graph``
        iterations), on the current stream.

        Raises:
            RuntimeError: nothing is captured yet.
        """
        if self.graph is None:
            raise RuntimeError("no graph captured yet: run the loop once first")
        self.graph.replay()

    def _repeat(self, fn: Callable[[], None]) -> None:
        for _ in range(self.steps_per_graph):
            fn()

    def _saved(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.state]

    def _restore(self, saved: Sequence[torch.Tensor]) -> None:
        for t, s in zip(self.state, saved):
            t.copy_(s)

    def _capture(self) -> None:
        try:
            self.graph = self.runtime.capture(lambda: self._repeat(self.body), self.state)
        except Exception as err:
            help_ = COMPILED_GRAPHS_HELP if _from_compiled_graphs(err) else CAPTURE_HELP
            raise GraphCaptureError(
                f"capturing the sampling step in a CUDA graph failed: {type(err).__name__}: "
                f"{err}\n{help_}"
            ) from err

    def _verify(self) -> None:
        """``steps_per_graph`` reference iterations from a saved state vs one replay from it:
        bitwise equal, with torch's generators untouched, or GraphCaptureError."""
        saved = self._saved()
        rng = _rng_state(self.device)
        self._repeat(self.reference)
        draws = not _same_rng_state(rng, _rng_state(self.device))
        expected = self._saved()
        self._restore(saved)
        self.graph.replay()
        if draws:
            self.reset()
            raise GraphCaptureError(
                "the loop step draws random numbers from torch's generators (torch.randn, "
                "dropout, a scheduler's noise from randn_tensor): a replayed graph would not "
                "draw them as the eager loop does. Use in-kernel Philox noise (fastdiff's "
                "samplers, or the fused scheduler's Philox option), or the eager loop."
            )
        if not all(bits_equal(t, e) for t, e in zip(self.state, expected)):
            diff = max(
                (t.double() - e.double()).abs().max().item()
                for t, e in zip(self.state, expected)
                if t.is_floating_point() and t.numel()
            )
            self.reset()
            raise GraphMismatchError(
                "the captured CUDA graph does not reproduce the eager step (max abs difference "
                f"{diff:.3g}): the step depends on something a replayed graph cannot see (a "
                "Python-side counter or cache, host random numbers, dropout in training mode), "
                "is not deterministic, or writes an output before it has read an input the "
                "output aliases. A graph replays the GPU work recorded once, so it would "
                "silently give wrong samples: run with cuda_graph=False (or, for a "
                "nondeterministic but otherwise capturable model, verify=False)."
            )

    def run(self, n: int, on_step: Callable[[int], None] | None = None) -> None:
        """Advances the state by ``n`` iterations; ``on_step(k)`` after each (k done)."""
        done = 0
        k = self.steps_per_graph

        def stepped(count: int) -> None:
            nonlocal done
            for _ in range(count):
                done += 1
                if on_step is not None:
                    on_step(done)

        with self.runtime.side_stream():
            if self.graph is None:
                warmup = min(self.warmup_steps, n)
                if n - warmup >= k:  # real iterations as the warm-up
                    for _ in range(warmup):
                        self.body()
                        stepped(1)
                elif n >= k:  # too few left after it: warm up on a copy of the state
                    saved = self._saved()
                    for _ in range(warmup):
                        self.body()
                    self._restore(saved)
                if n - done >= k:
                    self._capture()
                    if self.verify:
                        self._verify()
                        stepped(k)
            while self.graph is not None and n - done >= k:
                self.graph.replay()
                stepped(k)
            while done < n:
                self.body()
                stepped(1)


class GraphedLoop:
    """What the graphed loops share: their :class:`GraphEngine` (``self.engine``, set by
    their ``__init__``) and the accessors over it."""

    engine: GraphEngine

    @property
    def runtime(self) -> GraphRuntime:
        """The device runtime (stream, capture)."""
        return self.engine.runtime

    @property
    def captured(self) -> bool:
        """Whether the iteration has been captured (after the first run of enough steps)."""
        return self.engine.graph is not None

    def replay(self) -> None:
        """One replay of the captured graph on the static buffers, nothing else (no reset
        of the buffers or the counter): for benchmarks of the replay alone."""
        self.engine.replay()

    def reset(self) -> None:
        """Drops the captured graph (its memory pool is freed); the next run captures again."""
        self.engine.reset()

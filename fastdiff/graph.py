"""Whole sampling loops as CUDA graphs: capture one step (model + fused update), replay it.

fastdiff's step gathers its coefficients on the device from a step index that lives in a
device tensor, and never synchronizes with the host. So one iteration of a sampling loop
(the model call, classifier-free guidance, the fused update) can be recorded once as a CUDA
graph and replayed for every step: the launch overhead of every kernel of the model
disappears, which is what dominates small and distilled models.

How it works (:class:`SamplingGraph`):

* **Static buffers.** The sample ``x``, the previous x0 (multistep samplers), the per-sample
  seeds and a step counter (a 0-d int64 device tensor) are allocated once. The captured step
  reads the model's conditioning for the current step from a device table
  (``sampler.model_condition`` evaluated for every step beforehand), calls the model on
  ``x`` (on ``cat([x, x])`` with guidance), takes the fused step *in place*
  (``out=x``, ``x0_out=x0``: the kernel reads every element before it writes it) with the
  step index read from the counter, and increments the counter, all inside the graph.
* **Warm-up.** The first ``warmup_steps`` steps of the first run are real steps run eagerly
  on a side stream, as PyTorch requires before a capture (lazy initialization, cuBLAS
  workspaces, Triton compilation); when too few steps would be left to capture (a graph of
  the whole loop), they run on a copy of the state instead. Then the step is captured on
  that stream.
* **Verification.** Right after the capture, one step (``steps_per_graph`` steps) is run
  eagerly from a saved state, the state is restored and the graph replayed: the two results
  must be bitwise identical, or the model depends on something a graph cannot see (a Python
  counter, host-side random numbers, dropout in training mode) and a clear error is raised
  instead of a wrong result. ``verify=False`` skips it (and its one extra step of compute).
* **Replay.** Every remaining step is one ``graph.replay()``; a later run of the same
  ``SamplingGraph`` copies its noise and seeds into the static buffers and only replays.
* **Errors.** A model that cannot be captured (``.item()``, ``.cpu()``, ``print`` of a
  tensor, ``torch.nonzero``, boolean-mask indexing, a CPU tensor made per call,
  ``torch.cuda.synchronize()``) makes CUDA refuse the capture; the capture is ended, the
  half-made graph dropped, and :class:`GraphCaptureError` (a RuntimeError) says why.

The result is bitwise the result of the eager loop :func:`fastdiff.sample` for the same
seeds: the same kernels run on the same values (the step index is a device tensor in both).

For diffusers-style loops (a UNet and a scheduler from :mod:`fastdiff.diffusers`),
:func:`capture_denoising_loop` does the same with a user's ``step_fn(latents, t)``.

Example::

    graph = SamplingGraph(model, DDIMSampler(schedule, 50), (16, 4, 64, 64), device="cuda")
    for k in range(100):                       # captured once, then replayed
        seeds = philox.seeds_from(k, 16, "cuda")
        x = graph.run(philox.randn(seeds, 0, (16, 4, 64, 64), stream=1), seeds)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import philox

__all__ = [
    "DenoisingLoopGraph",
    "GraphCaptureError",
    "SamplingGraph",
    "capture_denoising_loop",
    "sample_graphed",
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CAPTURE_HELP = (
    "With cuda_graph=True the model (and cond_fn) must be capturable in a CUDA graph: no host "
    "synchronization (.item(), .cpu(), .tolist(), .numpy(), printing tensors, torch.nonzero, "
    "boolean-mask indexing, Python control flow on tensor values, torch.cuda.synchronize()), "
    "no CPU tensors created and copied to the GPU on every call, and the same work on every "
    "call with only tensor contents changing. The fused (triton) step is capturable; the "
    "reference backend (float64 samples, backend='reference') reads the step index on the "
    "host and is not. Run with cuda_graph=False, or make the model capturable "
    "(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs)."
)


class GraphCaptureError(RuntimeError):
    """A sampling step could not be captured in a CUDA graph, or the captured graph did not
    reproduce the eager step; the message says why and what to do."""


# -- runtimes: the CUDA one, and an eager stand-in the CPU tests use ---------------------------


class _CudaRuntime:
    """Side stream, capture and replay on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Runs the block on the side stream, ordered after and before the current stream."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def finish(self) -> None:
        """Waits for the side stream (before a graph that may still run is destroyed)."""
        self.stream.synchronize()

    def capture(self, fn: Callable[[], None], state: Sequence[torch.Tensor]) -> Any:
        """A CUDA graph of ``fn`` captured on the side stream (call inside ``side_stream``).

        Raises:
            _CaptureFailed: the capture failed (the graph is dropped, the capture ended).
        """
        self.synchronize()
        graph = torch.cuda.CUDAGraph()
        error: BaseException | None = None
        try:
            graph.capture_begin(capture_error_mode="global")
        except Exception as err:  # no capture support at all
            raise _CaptureFailed(err) from err
        try:
            with _no_autocast_cache():
                fn()
        except BaseException as err:  # noqa: B036 - the capture must be ended whatever happened
            error = err
        finally:
            try:
                graph.capture_end()
            except Exception as err:  # an invalidated capture fails here too
                if error is None:
                    error = err
        if error is not None:
            with contextlib.suppress(Exception):
                graph.reset()
            del graph
            with contextlib.suppress(Exception):  # give the half-made graph's pool back
                torch.cuda.empty_cache()
            if not isinstance(error, Exception):  # KeyboardInterrupt and friends
                raise error
            raise _CaptureFailed(error) from error
        return graph


def _no_autocast_cache() -> contextlib.AbstractContextManager:
    """Under CUDA autocast, a context without its weight-cast cache: casts cached during a
    capture would be referenced by the graph and freed when the autocast region ends (PyTorch
    asks for ``cache_enabled=False`` in captures)."""
    try:
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):  # older PyTorch
        enabled = torch.is_autocast_enabled()
        dtype = torch.get_autocast_gpu_dtype()
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


class _CaptureFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _EagerGraph:
    """What _EagerRuntime.capture returns: ``replay`` runs the Python step again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()

    def reset(self) -> None:
        self.fn = None


class _EagerRuntime:
    """A stand-in for _CudaRuntime on the CPU (tests of the control flow).

    Its "capture" runs the step's Python once, like a real capture, but on a copy of the
    state (a real capture executes nothing), and sets ``capturing`` meanwhile; its "replay"
    runs the step eagerly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capturing = False
        self.captures = 0
        self.replays = 0

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def capture(self, fn: Callable[[], None], state: Sequence[torch.Tensor]) -> _EagerGraph:
        saved = [t.clone() for t in state]
        self.capturing = True
        try:
            fn()
        except Exception as err:
            raise _CaptureFailed(err) from err
        finally:
            self.capturing = False
            for t, s in zip(state, saved):
                t.copy_(s)
        self.captures += 1
        runtime = self

        def replay() -> None:
            runtime.replays += 1
            fn()

        return _EagerGraph(replay)


def _make_runtime(device: torch.device) -> Any:
    """The runtime of ``device``; CUDA graphs need a CUDA device (tests patch this)."""
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs a CUDA device, but the samples are on {device}: CUDA graphs "
            "record GPU kernels; on the CPU use cuda_graph=False"
        )
    if not torch.cuda.is_available():
        raise ValueError("cuda_graph=True needs a CUDA device, and none is available")
    return _CudaRuntime(device)


# -- the capture / replay engine ---------------------------------------------------------------


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs included) of two tensors of one shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


class _Engine:
    """Runs ``body`` (one step on static state, counter included) ``n`` times: warm-up steps
    eagerly, then a captured graph of ``steps_per_graph`` bodies, verified and replayed."""

    def __init__(
        self,
        runtime: Any,
        body: Callable[[], None],
        state: Sequence[torch.Tensor],
        *,
        steps_per_graph: int,
        warmup_steps: int,
        verify: bool,
    ) -> None:
        self.runtime = runtime
        self.body = body
        self.state = list(state)
        self.steps_per_graph = steps_per_graph
        self.warmup_steps = warmup_steps
        self.verify = verify
        self.graph: Any = None

    def reset(self) -> None:
        if self.graph is not None:
            with contextlib.suppress(Exception):
                self.graph.reset()
        self.graph = None

    def _body_k(self) -> None:
        for _ in range(self.steps_per_graph):
            self.body()

    def _capture(self) -> None:
        try:
            graph = self.runtime.capture(self._body_k, self.state)
        except _CaptureFailed as failed:
            err = failed.error
            raise GraphCaptureError(
                f"capturing the sampling step in a CUDA graph failed: {type(err).__name__}: "
                f"{err}\n{_CAPTURE_HELP}"
            ) from err
        self.graph = graph

    def _verify(self) -> None:
        """k steps eagerly from a saved state vs one replay from it: bitwise equal or error."""
        saved = [t.clone() for t in self.state]
        self._body_k()
        expected = [t.clone() for t in self.state]
        for t, s in zip(self.state, saved):
            t.copy_(s)
        self.graph.replay()
        same = all(_bits_equal(t, e) for t, e in zip(self.state, expected))
        if not same:
            diff = max(
                (t.double() - e.double()).abs().max().item()
                for t, e in zip(self.state, expected)
                if t.is_floating_point() and t.numel()
            )
            self.reset()
            raise GraphCaptureError(
                "the captured CUDA graph does not reproduce the eager step (max abs difference "
                f"{diff:.3g}): the model depends on something a replayed graph cannot see (a "
                "Python-side counter or cache, host random numbers, dropout in training mode) or "
                "is not deterministic. A graph replays the GPU work recorded once, so such a "
                "model would silently give wrong samples: run with cuda_graph=False (or, for a "
                "nondeterministic but otherwise capturable model, "
                "SamplingGraph(..., verify=False))."
            )

    def run(self, n: int, on_step: Callable[[int], None] | None = None) -> None:
        """Advances the state by ``n`` steps; ``on_step(k)`` after every step (k steps done)."""
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
                if n - warmup >= k:  # real steps as the warm-up
                    for _ in range(warmup):
                        self.body()
                        stepped(1)
                elif n >= k:  # too few steps left after it: warm up on a copy of the state
                    saved = [t.clone() for t in self.state]
                    for _ in range(warmup):
                        self.body()
                    for t, s in zip(self.state, saved):
                        t.copy_(s)
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


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_sampler(sampler: Any) -> None:
    for attr in ("num_steps", "model_condition", "step"):
        if not hasattr(sampler, attr):
            raise TypeError(
                f"sampler must be a fastdiff sampler (missing {attr!r}), "
                f"got {type(sampler).__name__}"
            )


class _GraphedLoop:
    """What :class:`SamplingGraph` and :class:`DenoisingLoopGraph` share: the ``_Engine``
    (set up by their ``__init__``) that runs their step, and the accessors over it."""

    _engine: _Engine

    @property
    def runtime(self) -> Any:
        """The device runtime (stream, capture)."""
        return self._engine.runtime

    @property
    def captured(self) -> bool:
        """Whether the step (one iteration of the loop) has been captured (it is, after the
        first run of enough steps)."""
        return self._engine.graph is not None

    def reset(self) -> None:
        """Drops the captured graph (its memory pool is freed); the next run captures again."""
        self._engine.reset()


# -- the native sampling loop --------------------------------------------------------------------


class SamplingGraph(_GraphedLoop):
    """A fastdiff sampler's reverse chain with ``model``, captured once as a CUDA graph of one
    step (or ``steps_per_graph`` steps) and replayed for every step of every run.

    Each :meth:`run` gives bitwise the samples :func:`fastdiff.sample` gives for the same
    initial noise and seeds (see the module docstring for how).

    Args:
        model: ``model(x, cond) -> output`` in the sampler's prediction type; must be
            capturable (see :class:`GraphCaptureError`).
        sampler: a ``fastdiff.samplers.Sampler``.
        shape: the batch's shape, batch first (fixed: a graph replays fixed shapes).
        device: a CUDA device (default: the current one).
        dtype: dtype of the samples (the model's input).
        memory_format: of the static sample buffer (``torch.channels_last`` for 4-D).
        guidance_scale: classifier-free guidance: the model gets ``cat([x, x])`` and
            ``cat([cond, cond])`` and returns ``[2B, ...]``, unconditional half first.
        guidance_rescale: Lin et al. 2023 rescale in [0, 1] (needs guidance_scale).
        cond_fn: classifier guidance ``cond_fn(x, cond) -> grad`` (stochastic samplers),
            captured too.
        steps_per_graph: steps recorded in one graph (1: one replay a step; more: fewer
            launches, no per-step callback). Steps left over at the end run eagerly.
        warmup_steps: real steps run eagerly on the side stream before the capture (>= 1).
        verify: check once, right after the capture, that a replay reproduces the eager
            step bitwise (costs ``steps_per_graph`` extra steps of compute, once).
        with_x0: also write each step's predicted x0 into the static buffer :attr:`x0`
            (needed for callbacks that look at x0; one more pass over the tensor a step).

    Raises:
        ValueError: a device that is not CUDA, bad counts, guidance_rescale without scale.
        TypeError: a non-callable model or cond_fn, or not a sampler.

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
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, cond), got {type(model)}")
        _check_sampler(sampler)
        if cond_fn is not None and not callable(cond_fn):
            raise TypeError(f"cond_fn must be callable, got {type(cond_fn).__name__}")
        if guidance_scale is None and guidance_rescale:
            raise ValueError("guidance_rescale needs guidance_scale")
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if (
            not isinstance(shape, (tuple, list))
            or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.steps_per_graph = _check_int("steps_per_graph", steps_per_graph, 1)
        _check_int("warmup_steps", warmup_steps, 1)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if _has_cuda() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        runtime = _make_runtime(device)

        self.model = model
        self.sampler = sampler
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.cond_fn = cond_fn
        self.stochastic = bool(getattr(sampler, "stochastic", False))
        self.multistep = bool(getattr(sampler, "multistep", False))
        self.with_x0 = bool(with_x0)
        batch = self.shape[0]
        self.num_steps = int(sampler.num_steps)

        # Static state: the sample, x0 (multistep history / callbacks), seeds, step counter.
        self.x = torch.zeros(self.shape, dtype=dtype, device=device).contiguous(
            memory_format=memory_format
        )
        self.x0 = torch.zeros_like(self.x) if (self.multistep or self.with_x0) else None
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self._counter_1 = self.counter.view(1)
        # The step gets the counter itself (a 0-d device tensor, the eager loop's int i
        # on the device): the fused kernel reads its table row from it.
        self._index = self.counter
        # What the model is conditioned on at every step, gathered by the counter in-graph.
        self._cond_table = torch.stack(
            [
                torch.as_tensor(sampler.model_condition(i, batch, device)).reshape(batch)
                for i in range(self.num_steps)
            ]
        ).to(device)
        self._step_kwargs: dict[str, Any] = {}
        if self.stochastic:
            self._step_kwargs["seeds"] = self.seeds
        if guidance_scale is not None:
            self._step_kwargs["guidance_scale"] = guidance_scale
            self._step_kwargs["guidance_rescale"] = guidance_rescale
        state = [self.x, self.counter] + ([self.x0] if self.x0 is not None else [])
        self._engine = _Engine(
            runtime,
            self._body,
            state,
            steps_per_graph=self.steps_per_graph,
            warmup_steps=warmup_steps,
            verify=verify,
        )

    # -- one step on the static buffers ----------------------------------------------------

    def _model_output(self, cond: torch.Tensor) -> torch.Tensor:
        x = self.x
        batch = self.shape[0]
        if self.guidance_scale is not None:
            out = self.model(torch.cat([x, x]), torch.cat([cond, cond]))
            expected = 2 * batch
        else:
            out = self.model(x, cond)
            expected = batch
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        if out.shape[0] != expected:
            raise ValueError(
                f"the model returned batch {out.shape[0]}, expected {expected}"
                + (
                    " (guidance doubles the batch, unconditional half first)"
                    if expected > batch
                    else ""
                )
            )
        return out

    def _cond(self) -> torch.Tensor:
        return torch.index_select(self._cond_table, 0, self._counter_1)[0]

    def _body(self) -> None:
        cond = self._cond()
        out = self._model_output(cond)
        grad = self.cond_fn(self.x, cond) if self.cond_fn is not None else None
        self.sampler.step(
            self.x,
            out,
            self._index,
            x0_prev=self.x0 if self.multistep else None,
            grad=grad,
            return_x0=self.x0 is not None,
            out=self.x,
            x0_out=self.x0,
            **self._step_kwargs,
        )
        self.counter.add_(1)

    def _first_of_truncated_multistep(self) -> None:
        """The first step of a multistep chain started mid-plan, as the eager loop takes it:
        x0_prev is the step's own x0 (from a first pass), which makes it first order."""
        cond = self._cond()
        out = self._model_output(cond)
        grad = self.cond_fn(self.x, cond) if self.cond_fn is not None else None
        self.sampler.step(
            self.x, out, self._index, x0_prev=self.x0, x0_out=self.x0, **self._step_kwargs
        )
        self.sampler.step(
            self.x,
            out,
            self._index,
            x0_prev=self.x0,
            grad=grad,
            out=self.x,
            x0_out=self.x0,
            **self._step_kwargs,
        )
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
    ) -> torch.Tensor:
        """Runs the chain from ``x`` (the first run captures; later runs only replay).

        Args:
            x: the initial sample (noise ``x_T``, or the noised image of a truncated chain),
                of the graph's shape; copied into the static buffer.
            seeds: int64 ``[B]`` per-sample seeds (stochastic samplers: required).
            start: first step index (truncated chains: ``fastdiff.sampling.start_index``).
            progress: show a tqdm progress bar.
            callback: ``callback(i, x, x0)`` after every step with the static buffers (they
                are overwritten by the next step: clone what you keep; x0 is None unless
                ``with_x0``). Needs ``steps_per_graph == 1``.

        Returns:
            A new tensor with the samples.
        """
        return self._run(x, seeds, start=start, progress=progress, callback=callback).clone()

    def _run(self, x, seeds, *, start, progress, callback) -> torch.Tensor:
        """``run`` without the final copy: returns the static buffer itself."""
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

        bar = tqdm(
            total=n - start,
            disable=not progress,
            desc=type(self.sampler).__name__,
            leave=False,
        )
        first = start
        with bar:
            if self.multistep and start > 0:
                with self.runtime.side_stream():
                    self._first_of_truncated_multistep()
                bar.update(1)
                if callback is not None:
                    callback(start, self.x, self.x0)
                first = start + 1

            def on_step(done: int) -> None:
                bar.update(1)
                if callback is not None:
                    callback(first + done - 1, self.x, self.x0)

            self._engine.run(n - first, on_step)
        return self.x


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def sample_graphed(
    model: Model,
    sampler: Any,
    x: torch.Tensor,
    *,
    seeds: torch.Tensor | None = None,
    start: int = 0,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    cond_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor | None], Any] | None = None,
) -> torch.Tensor:
    """One chain through a fresh :class:`SamplingGraph` (what ``fastdiff.sample(...,
    cuda_graph=True)`` runs once it has drawn the initial ``x`` and the seeds).

    Args:
        model, sampler, guidance_scale, guidance_rescale, cond_fn: as for ``sample``.
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
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    graph = SamplingGraph(
        model,
        sampler,
        tuple(x.shape),
        device=x.device,
        dtype=x.dtype,
        memory_format=philox.memory_format_of(x),
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        cond_fn=cond_fn,
        with_x0=callback is not None,
    )
    try:
        return graph._run(x, seeds, start=start, progress=progress, callback=callback)
    finally:
        graph.runtime.finish()  # the graph may still be running: let it end before its release
        graph.reset()


# -- diffusers-style loops ----------------------------------------------------------------------


def _scheduler_policy(scheduler: Any) -> bool:
    """Checks that a scheduler's step can be replayed; True if its step index must be
    re-derived from the timestep on every step (fastdiff's fused Euler schedulers)."""
    if scheduler is None:
        return False
    if hasattr(scheduler, "model_outputs") or hasattr(scheduler, "lower_order_nums"):
        raise ValueError(
            f"{type(scheduler).__name__} keeps its multistep history in Python "
            "(model_outputs, lower_order_nums), which a replayed graph cannot update; use "
            "fastdiff.sample(model, DPMSolverPP2MSampler(...), cuda_graph=True) or the eager loop"
        )
    module = type(scheduler).__module__ or ""
    if not module.startswith("fastdiff."):
        if module.startswith("diffusers."):
            raise ValueError(
                f"diffusers' {type(scheduler).__name__} reads the timestep and its step index on "
                "the host (a CUDA graph would freeze them at their captured values); use the "
                "drop-in fastdiff.diffusers.Fused* scheduler of the same name"
            )
        return False
    if getattr(scheduler, "begin_index", None) is not None:
        raise ValueError(
            "the scheduler has a begin_index (set_begin_index): its step index would be "
            "frozen into the graph; capture a loop over the plan's timesteps instead"
        )
    return hasattr(scheduler, "_init_step_index")


class DenoisingLoopGraph(_GraphedLoop):
    """A diffusers-style denoising loop ``for t in timesteps: latents = step_fn(latents, t)``
    captured as a CUDA graph of one iteration and replayed for every timestep.

    ``step_fn(latents, t)`` is one iteration of your loop: the model call (with guidance, if
    you use it) and the scheduler's step; it returns the next latents. In the graph,
    ``latents`` is a static buffer and ``t`` a 0-d tensor on the device holding the current
    timestep (gathered from the plan by a device counter); the returned latents are copied
    into the buffer. Capture happens in the first run (see :class:`SamplingGraph`: warm-up
    steps, capture, verification, replay).

    Schedulers that work: ``fastdiff.diffusers.FusedDDIMScheduler`` and
    ``FusedDDPMScheduler`` (their row is the timestep itself), ``FusedEulerDiscreteScheduler``
    and ``FusedEulerAncestralDiscreteScheduler`` (pass ``scheduler=``: their step index is
    then looked up from ``t`` on the device every step), all with ``generator=None`` (in-kernel
    Philox noise). diffusers' own schedulers read the timestep on the host and DPM-Solver
    keeps its history in Python: they are refused with an explanation.

    Noise: a stochastic fused scheduler keys its in-kernel noise by a seed it draws once per
    ``set_timesteps``; the graph keeps the seed of its capture, so every run replays the same
    step noise (runs still differ by their initial latents). For per-sample seeds that change
    from run to run, use :class:`SamplingGraph` (``run(x, seeds)``).

    Args:
        step_fn: ``step_fn(latents, t) -> latents`` (same shape and dtype).
        latents: a tensor like the loop's latents (shape, dtype, device, memory format).
        timesteps: the plan (default: ``scheduler.timesteps``).
        scheduler: the loop's scheduler, for the checks above.
        steps_per_graph, warmup_steps, verify: as for :class:`SamplingGraph`.

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
    ) -> None:
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor")
        if timesteps is None:
            if scheduler is None or getattr(scheduler, "timesteps", None) is None:
                raise ValueError("pass timesteps, or a scheduler after set_timesteps")
            timesteps = scheduler.timesteps
        plan = torch.as_tensor(timesteps)
        if plan.dim() != 1 or plan.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D sequence, got {tuple(plan.shape)}")
        self._reset_step_index = _scheduler_policy(scheduler)
        self.scheduler = scheduler
        self.step_fn = step_fn
        steps_per_graph = _check_int("steps_per_graph", steps_per_graph, 1)
        _check_int("warmup_steps", warmup_steps, 1)
        device = latents.device
        runtime = _make_runtime(device)
        self.device = device
        self.num_steps = plan.numel()
        self.plan = plan.to(device).contiguous()
        self.latents = torch.zeros_like(latents, memory_format=philox.memory_format_of(latents))
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self._engine = _Engine(
            runtime,
            self._body,
            [self.latents, self.counter],
            steps_per_graph=steps_per_graph,
            warmup_steps=warmup_steps,
            verify=verify,
        )

    def _body(self) -> None:
        t = torch.take(self.plan, self.counter)
        if self._reset_step_index:
            self.scheduler._step_index = None  # looked up from t on the device
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
            self._engine.run(self.num_steps, lambda done: bar.update(1))
        return self.latents.clone()


def capture_denoising_loop(
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int] | None = None,
    *,
    scheduler: Any = None,
    steps_per_graph: int = 1,
    warmup_steps: int = 2,
    verify: bool = True,
) -> DenoisingLoopGraph:
    """A :class:`DenoisingLoopGraph` of ``step_fn`` (see there; captured on its first run).

    Args:
        step_fn: ``step_fn(latents, t) -> latents``: one iteration of a diffusers-style loop.
        latents: a tensor like the loop's latents.
        timesteps: the plan (default: ``scheduler.timesteps``).
        scheduler: the scheduler ``step_fn`` uses (checked; Euler's step index handled).
        steps_per_graph, warmup_steps, verify: as for :class:`SamplingGraph`.

    Returns:
        The loop; ``loop.run(latents)`` returns the final latents.
    """
    return DenoisingLoopGraph(
        step_fn,
        latents,
        timesteps,
        scheduler=scheduler,
        steps_per_graph=steps_per_graph,
        warmup_steps=warmup_steps,
        verify=verify,
    )

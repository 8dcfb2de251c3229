"""One reverse step, side by side: eager reference, torch.compile, diffusers, fused Triton.

Group ``"{sampler} {shape} {dtype}[ cfg]"``, one entry per implementation:

* ``reference``: the sampler's eager PyTorch reference backend (``fastdiff.reference``);
  stochastic samplers draw fresh noise with ``torch.randn_like`` inside the timed call.
* ``compile``: ``torch.compile`` (default mode) of that same reference step, noise included
  (inductor fuses the random draw), warmed up before timing.
* ``diffusers``: the matching diffusers scheduler's ``step`` (its own ``randn_tensor``), with
  the step index reset before every call so each call is the same valid step.
* ``fused``: the Triton backend; stochastic samplers make their noise in the kernel (Philox,
  ``seeds=``); ``fused-noise-tensor`` (DDPM) reads a pre-generated noise tensor instead.

With ``cfg`` the model output has 2B samples and guidance scale 7.5: ``fused`` combines the
halves inside the kernel; the others combine them first with a separate torch op, as
pipelines do. Every step is step 25 of a 50-step plan (noise added; DPM++(2M) second order).

``extra_info`` of each entry: ``passes`` (tensor-sized reads + writes this implementation
makes at least) and ``bytes``, the time they are divided by (``do_bench`` median for
``fused`` and ``compile``, else the wall median), ``gbps``, ``frac_copy_bw`` (of the
session's measured copy bandwidth, ``copy_bw_gbps``), and the floor of PERFORMANCE.md
(``floor_passes``: 3, +1 with CFG, +1 for DPM++(2M)'s x0_prev; ``floor_us`` at copy
bandwidth; ``x_floor`` = time / floor).

``test_python_loop``: wall time per step of 50 ``step`` calls in a Python loop (fused vs
diffusers, small latents, synchronized once at the end): the host-overhead figure.

Without CUDA every benchmark runs once on tiny shapes (a smoke test; conftest.py).

Run::

    bash benchmarks/gpu_run.sh                                   # the whole GPU run
    python -m pytest benchmarks -k "ddpm and 256x3x256x256" --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json

Test ids: ``test_step[{sampler}-{shape}-{dtype}-{cfg|plain}-{impl}]`` and
``test_python_loop[{sampler}-{shape}-{dtype}-{impl}]`` (``-k "fused and not noise"``: the
in-kernel-noise fused step only).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fastdiff.samplers import SAMPLERS, Sampler
from fastdiff.schedules import NoiseSchedule

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Stable Diffusion's schedule; the step's cost does not depend on it.
BETA_START, BETA_END, TRAIN_STEPS = 0.00085, 0.012, 1000
SCHEDULE = NoiseSchedule.create("scaled_linear", TRAIN_STEPS, BETA_START, BETA_END)
NUM_STEPS = 50
STEP = 25  # mid-plan: DDPM adds noise, DPM++(2M) is second order
GUIDANCE_SCALE = 7.5
L2_BYTES = 50e6  # H100 / H200 L2

if HAS_CUDA:
    CASES = [
        ((1, 4, 64, 64), torch.float16),
        ((8, 4, 128, 128), torch.bfloat16),
        ((64, 3, 256, 256), torch.float32),
        ((256, 3, 256, 256), torch.float32),
        ((256, 3, 256, 256), torch.bfloat16),  # 16-bit I/O: the Philox step's compute shows
    ]
    LOOP_STEPS = 50
else:
    # Smoke run under the Triton interpreter (~10 ms a launch): tiny shapes, every dtype.
    CASES = [
        ((2, 4, 8, 8), torch.float16),
        ((2, 4, 8, 8), torch.bfloat16),
        ((2, 4, 8, 8), torch.float32),
    ]
    LOOP_STEPS = 4
LOOP_CASES = CASES[:2]  # small latents: launch-bound, the host overhead is the figure

# Timing (CUDA): rounds chosen so each entry takes about ROUND_SECONDS of timed calls.
ROUND_SECONDS = 0.25
MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 20, 500, 3

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# fastdiff sampler options and the diffusers scheduler with the same configuration.
SAMPLER_OPTIONS = {
    "ddpm": dict(variance_type="fixed_small", clip_sample_range=1.0),
    "ddim": dict(eta=0.0),
    "euler_ancestral": dict(),
    "dpmpp_2m": dict(),
}
DIFFUSERS = {
    "ddpm": (
        "DDPMScheduler",
        dict(variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0),
    ),
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict()),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint"),
    ),
}
# Schedulers whose step advances an internal step index (and DPM's model-output history).
STATEFUL = ("euler_ancestral", "dpmpp_2m")
SAMPLER_NAMES = tuple(SAMPLER_OPTIONS)

# The kernel can skip writing x0 where the sampler build supports it (one pass fewer).
_HAS_RETURN_X0 = "return_x0" in inspect.signature(Sampler.step).parameters


@dataclass(frozen=True)
class Case:
    """One benchmark group: sampler, latent shape and dtype, with or without CFG."""

    sampler: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    cfg: bool

    @property
    def group(self) -> str:
        return f"{self.sampler} {self.shape} {DTYPE_NAMES[self.dtype]}{' cfg' if self.cfg else ''}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def floor_passes(self) -> int:
        """PERFORMANCE.md's floor: read x and the model output, write x_next; +1 with CFG
        (two model outputs), +1 for a multistep sampler's x0_prev; noise made in-kernel."""
        return 3 + int(self.cfg) + int(SAMPLERS[self.sampler].multistep)


def _shape_id(shape, dtype) -> str:
    return "x".join(map(str, shape)) + "-" + DTYPE_NAMES[dtype]


def _impls(sampler: str) -> list[str]:
    impls = ["reference", "compile", "diffusers", "fused"]
    if sampler == "ddpm":
        impls.append("fused-noise-tensor")
    return impls


STEP_PARAMS = [
    pytest.param(
        Case(name, shape, dtype, cfg),
        impl,
        id=f"{name}-{_shape_id(shape, dtype)}-{'cfg' if cfg else 'plain'}-{impl}",
    )
    for name in SAMPLER_NAMES
    for shape, dtype in CASES
    for cfg in (False, True)
    for impl in _impls(name)
]


# -- building blocks --------------------------------------------------------------------------


@functools.cache
def _sampler(name: str, backend: str, steps: int = NUM_STEPS) -> Sampler:
    sampler = SAMPLERS[name](SCHEDULE, steps, backend=backend, **SAMPLER_OPTIONS[name])
    sampler.device_tables(DEVICE)  # the host-to-device copy of the tables is setup, not step
    return sampler


def _diffusers_scheduler(name: str, steps: int = NUM_STEPS):
    """A fresh diffusers scheduler configured like ``_sampler(name, ...)``, timesteps set."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    cls_name, options = DIFFUSERS[name]
    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="scaled_linear",
        beta_start=BETA_START,
        beta_end=BETA_END,
        prediction_type="epsilon",
        timestep_spacing="leading",
        **options,
    )
    _set_timesteps(scheduler, name, steps)
    if name == "euler_ancestral":
        # The pipeline calls scale_model_input (the model's input, not part of the step);
        # without it every step logs a warning.
        scheduler.is_scale_input_called = True
    return scheduler


def _set_timesteps(scheduler, name: str, steps: int) -> None:
    # As diffusers' pipelines do: DDPM/DDIM pipelines keep timesteps on the host, the
    # Stable Diffusion ones (Euler, DPM) pass the device.
    if name in STATEFUL:
        scheduler.set_timesteps(steps, device=DEVICE)
    else:
        scheduler.set_timesteps(steps)


def _cfg_combine(m: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as a separate op, as pipelines do (uncond half first)."""
    m_uncond, m_cond = m.chunk(2)
    return m_uncond + GUIDANCE_SCALE * (m_cond - m_uncond)


def _set_compile_cache_limit(limit: int = 64) -> None:
    # One compiled code object serves 4 samplers x 4 shape/dtype cases; the default limit of
    # 8 recompiles would silently fall back to eager for the rest.
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), limit))


@functools.cache
def _compiled_step(name: str) -> Callable:
    """torch.compile of the reference step of sampler ``name`` at step ``STEP`` (fresh noise
    drawn inside, so inductor can fuse it); returns what the next step needs: x_next, plus x0
    for a multistep sampler."""
    _set_compile_cache_limit()
    sampler = _sampler(name, "reference")

    def step(x, m, x0_prev):
        noise = torch.randn_like(x) if sampler.stochastic else None
        out = sampler.step(x, m, STEP, noise=noise, x0_prev=x0_prev)
        if sampler.multistep:
            return out.prev_sample, out.pred_original_sample
        return out.prev_sample

    # Static shapes: each case gets kernels specialized to it (the best case for compile).
    return torch.compile(step, dynamic=False)


def _fused_kwargs(sampler: Sampler) -> dict:
    """Only a multistep sampler needs x0 from the step; skip writing it when the build can."""
    return {"return_x0": sampler.multistep} if _HAS_RETURN_X0 else {}


def _seeds(batch: int) -> torch.Tensor:
    return torch.arange(batch, dtype=torch.int64, device=DEVICE) + 1234


def _make_step(case: Case, impl: str):
    """The step callable of ``impl`` (no synchronization) and facts for extra_info.

    Returns:
        ``(fn, passes_of, noise)``: ``passes_of(result)`` counts the tensor-sized passes the
        call made at least (for the fused kernel: exactly what it reads and writes), and
        ``noise`` says where the step's noise comes from.
    """
    batch = case.shape[0]
    gen = dict(device=DEVICE, dtype=case.dtype)
    x = torch.randn(case.shape, **gen)
    m = torch.randn((2 * batch if case.cfg else batch, *case.shape[1:]), **gen)
    multistep = SAMPLERS[case.sampler].multistep
    stochastic = _sampler(case.sampler, "reference").stochastic
    x0_prev = torch.randn(case.shape, **gen) if multistep else None
    combine_passes = 3 if case.cfg else 0  # read both halves, write the guided output
    prev_passes = int(multistep)

    if impl == "reference":
        sampler = _sampler(case.sampler, "reference")

        def fn():
            mm = _cfg_combine(m) if case.cfg else m
            noise = torch.randn_like(x) if stochastic else None
            return sampler.step(x, mm, STEP, noise=noise, x0_prev=x0_prev)

        # x, m in; x_next, x0 out; the noise is written by randn then read by the step.
        passes = combine_passes + 4 + prev_passes + (2 if stochastic else 0)
        return fn, lambda _: passes, "torch.randn_like per call" if stochastic else "none"

    if impl == "compile":
        compiled = _compiled_step(case.sampler)

        def fn():
            return compiled(x, _cfg_combine(m) if case.cfg else m, x0_prev)

        # x, m in; x_next out (+ x0 out and x0_prev in for DPM); randn fused by inductor.
        passes = combine_passes + 3 + 2 * prev_passes
        return fn, lambda _: passes, "torch.randn_like, compiled" if stochastic else "none"

    if impl == "diffusers":
        scheduler = _diffusers_scheduler(case.sampler)
        timestep = scheduler.timesteps[STEP]
        kwargs = {"eta": 0.0} if case.sampler == "ddim" else {}
        if case.sampler == "dpmpp_2m":
            # Fill the model-output history with one step first, so STEP is second order.
            scheduler._step_index = STEP - 1
            scheduler.step(m[:batch], scheduler.timesteps[STEP - 1], x)

        def fn():
            mm = _cfg_combine(m) if case.cfg else m
            if case.sampler in STATEFUL:
                scheduler._step_index = STEP  # step() advances it: make every call step STEP
            return scheduler.step(mm, timestep, x, **kwargs)

        # x, m in; prev_sample and pred_original_sample (DPM: its history entry) out.
        passes = combine_passes + 4 + prev_passes + (2 if stochastic else 0)
        return fn, lambda _: passes, "diffusers randn_tensor per call" if stochastic else "none"

    sampler = _sampler(case.sampler, "triton")
    noise_kw: dict = {}
    noise_passes = 0
    noise = "none"
    if stochastic and impl == "fused":
        noise_kw = {"seeds": _seeds(batch)}
        noise = "in-kernel Philox (seeds=)"
    elif stochastic:
        noise_kw = {"noise": torch.randn(case.shape, **gen)}
        noise_passes = 1
        noise = "pre-generated tensor read by the kernel (its randn is not timed)"
    kwargs = dict(
        x0_prev=x0_prev,
        guidance_scale=GUIDANCE_SCALE if case.cfg else None,
        **noise_kw,
        **_fused_kwargs(sampler),
    )

    def fn():
        return sampler.step(x, m, STEP, **kwargs)

    def passes_of(out) -> int:
        # Exactly the kernel's traffic: x, the model output (both halves), x0_prev, the noise
        # tensor in; x_next and, when the step returned it, x0 out.
        x0_written = out.pred_original_sample is not None
        return 2 + int(case.cfg) + prev_passes + noise_passes + 1 + int(x0_written)

    return fn, passes_of, noise


def _measure(benchmark, fn: Callable, *, precise: bool, setup: Callable | None = None):
    """Time ``fn`` with pytest-benchmark (synchronized inside the timed call).

    Returns:
        ``(result, wall_s, do_bench_s)``: the result of one call, the wall-time median in
        seconds (None without CUDA) and, with ``precise``, the ``triton.testing.do_bench``
        median in seconds (CUDA events, L2 flushed between calls).
    """
    if not HAS_CUDA:  # smoke run: benchmark_disable, the call runs once
        if setup is not None:
            setup()
        return benchmark.pedantic(fn, rounds=1), None, None

    def timed():
        result = fn()
        torch.cuda.synchronize()
        return result

    def once() -> float:
        if setup is not None:
            setup()
        start = time.perf_counter()
        timed()
        return time.perf_counter() - start

    # Warm up first (Triton JIT, torch.compile, allocator): compilation is not speed.
    estimate = min(once() for _ in range(3))
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_SECONDS / max(estimate, 1e-6))))
    pedantic_setup = None if setup is None else (lambda: (setup(), ((), {}))[1])
    result = benchmark.pedantic(
        timed, setup=pedantic_setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )
    wall = benchmark.stats.stats.median if benchmark.stats is not None else None  # disabled
    do_bench_s = None
    if precise:
        import triton.testing

        do_bench_s = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    return result, wall, do_bench_s


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def bandwidth_figures(
    wall: float | None, do_bench_s: float | None, nbytes: int, floor_bytes: int, copy_bandwidth
) -> dict:
    """The ``extra_info`` figures of one step: its time (``do_bench`` median where there is
    one, else the wall median), GB/s over ``nbytes``, the fraction of the session's copy
    bandwidth, and the floor (``floor_bytes`` at copy bandwidth) with the time over it."""
    seconds = do_bench_s if do_bench_s is not None else wall
    gbps = nbytes / seconds / 1e9 if seconds else None
    floor_us = floor_bytes / (copy_bandwidth * 1e9) * 1e6 if copy_bandwidth else None
    return dict(
        time_source="do_bench median" if do_bench_s is not None else "wall median",
        time_us=_round(seconds * 1e6 if seconds else None),
        wall_us=_round(wall * 1e6 if wall else None),
        gbps=_round(gbps),
        copy_bw_gbps=_round(copy_bandwidth),
        frac_copy_bw=_round(gbps / copy_bandwidth if gbps and copy_bandwidth else None, 3),
        floor_us=_round(floor_us),
        x_floor=_round(seconds * 1e6 / floor_us if seconds and floor_us else None, 3),
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (smoke run)",
    )


def measure_loop(
    benchmark, run: Callable, setup: Callable, *, steps: int, target_us: float, **info
) -> torch.Tensor:
    """Time a Python loop of ``steps`` steps (``run()``, a fresh ``setup()`` before each) and
    record ``per_step_us`` beside ``info`` (impl, sampler or config, shape, dtype) in
    ``benchmark.extra_info``; returns the loop's result."""
    result, wall, _ = _measure(benchmark, run, precise=False, setup=setup)
    benchmark.extra_info.update(
        **info,
        steps=steps,
        per_step_us=_round(wall / steps * 1e6 if wall else None),
        target_per_step_us=target_us,
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (smoke run)",
    )
    return result


# -- benchmarks -------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "impl"), STEP_PARAMS)
def test_step(benchmark, copy_bandwidth, case: Case, impl: str) -> None:
    """One step of ``case`` by ``impl``; bandwidth figures in extra_info."""
    if impl == "compile" and not HAS_CUDA:
        pytest.skip(
            "torch.compile on the CPU needs a C compiler and takes minutes: the smoke run "
            "skips it (it is timed on CUDA)"
        )
    benchmark.group = case.group
    fn, passes_of, noise = _make_step(case, impl)
    precise = impl in ("fused", "fused-noise-tensor", "compile")
    result, wall, do_bench_s = _measure(benchmark, fn, precise=precise)

    passes = passes_of(result)
    nbytes = passes * case.numel * case.itemsize
    floor_bytes = case.floor_passes * case.numel * case.itemsize
    info = dict(
        impl=impl,
        sampler=case.sampler,
        shape=list(case.shape),
        dtype=DTYPE_NAMES[case.dtype],
        cfg=case.cfg,
        noise=noise,
        passes=passes,
        bytes=nbytes,
        floor_passes=case.floor_passes,
        floor_bytes=floor_bytes,
        do_bench_us=_round(do_bench_s * 1e6 if do_bench_s else None),
        **bandwidth_figures(wall, do_bench_s, nbytes, floor_bytes, copy_bandwidth),
    )
    if 3 * case.numel * case.itemsize < L2_BYTES:
        info["note"] = (
            "fits in L2 (50 MB): launch-bound, so the wall figure is host overhead; inputs are "
            "not rotated (do_bench flushes L2 between its calls)"
        )
    benchmark.extra_info.update(info)

    out = result.prev_sample if hasattr(result, "prev_sample") else result
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == case.shape


@pytest.mark.parametrize("impl", ["fused", "diffusers"])
@pytest.mark.parametrize(
    ("shape", "dtype"), LOOP_CASES, ids=[_shape_id(s, d) for s, d in LOOP_CASES]
)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_python_loop(benchmark, name: str, shape, dtype, impl: str) -> None:
    """Wall time per step of a whole plan driven from Python (synchronized once at the end)."""
    benchmark.group = f"python-loop {name} {shape} {DTYPE_NAMES[dtype]}"
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    m = torch.randn(shape, device=DEVICE, dtype=dtype)
    setup = None
    if impl == "fused":
        sampler = _sampler(name, "triton", LOOP_STEPS)
        seeds = _seeds(shape[0]) if sampler.stochastic else None
        kwargs = _fused_kwargs(sampler)

        def run():
            xi, x0_prev = x, None
            for i in range(LOOP_STEPS):
                out = sampler.step(xi, m, i, x0_prev=x0_prev, seeds=seeds, **kwargs)
                xi = out.prev_sample
                x0_prev = out.pred_original_sample if sampler.multistep else None
            return xi

    else:
        scheduler = _diffusers_scheduler(name, LOOP_STEPS)
        kwargs = {"eta": 0.0} if name == "ddim" else {}

        def setup():  # a fresh plan (and DPM history) for every loop, as a pipeline does
            _set_timesteps(scheduler, name, LOOP_STEPS)

        def run():
            xi = x
            for t in scheduler.timesteps:
                xi = scheduler.step(m, t, xi, **kwargs).prev_sample
            return xi

    result = measure_loop(
        benchmark, run, setup, steps=LOOP_STEPS, target_us=25.0,
        impl=impl, sampler=name, shape=list(shape), dtype=DTYPE_NAMES[dtype],
    )  # fmt: skip
    assert result.shape == shape

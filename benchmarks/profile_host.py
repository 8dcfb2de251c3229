"""Host cost of the diffusers drop-ins' eager loop: microseconds of Python per step of
``scale_model_input`` + ``step``, and where they go.

Each case of ``bench_dropin_graph.SCHEDULERS`` (same drop-ins, configs and step counts) is
stepped in a loop over its own ``scheduler.timesteps`` with the triton backend; each
iteration is timed on its own (``perf_counter_ns``, host time: nothing waits for the
device). Loops of the cases are interleaved (case A loop, case B loop, ..., again) so that a
drift of the machine hits every case alike; the figure is the median over every timed
iteration.

Launch (``--launch``):

* ``stub`` (the default without CUDA; the only one there): warm-up loops launch for real
  (the Triton interpreter on the CPU: launch configurations cached, outputs computed), then
  the compiled kernel is a stand-in whose ``run`` does nothing and the driver's stream a
  stand-in too, so every Python line of ``fused_step`` / ``_launch`` / ``_fast_launch``
  still runs and only the C launcher (``kernel.run``, ~3-5 us on the H200) is left out:
  the figure is the Python of the adapter layers.
* ``real`` (CUDA only): the real launches; a loop's wall (synchronized at its end) per step
  is printed beside the host median.

Shapes: the benchmark's on CUDA ((1,4,64,64) fp16 for VP, (1,16,64,64) bf16 for flow); on
the CPU (1,4,8,8) / (1,16,8,8) (torch ops there cost their dispatch, not their arithmetic,
as on a card); ``--shape`` overrides.

``--profile NAME`` prints a cProfile table of ``--iterations`` steady-state iterations of
one case (own time by function, and by file: the layers), instead of the timing table.

Run::

    TRITON_INTERPRET=1 python -m benchmarks.profile_host            # CPU, stubbed launch
    TRITON_INTERPRET=1 python -m benchmarks.profile_host --profile ddim
    python -m benchmarks.profile_host --launch real                   # on the GPU machine
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections import defaultdict

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import triton  # noqa: E402

import fastdiff.kernels.fused_step as fused_step_module  # noqa: E402
from benchmarks.bench_dropin_graph import SCHEDULERS  # noqa: E402
from fastdiff import diffusers as fused  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


class _StubKernel:
    """A compiled kernel whose launch does nothing (the attributes ``_fast_launch`` reads)."""

    function = packed_metadata = None

    def run(self, *args):
        return None

    def launch_metadata(self, *args):
        return None


class _StubDriver:
    """Triton's active driver, as far as ``_fast_launch`` reads it (the current stream)."""

    def get_current_stream(self, index=None):
        return 0


class _StubLaunches:
    """Within the block: every launch goes through ``_launch``'s cached path and
    ``_fast_launch`` (their Python runs), to the stub kernel and stream."""

    def __enter__(self):
        module = fused_step_module
        driver = triton.runtime.driver
        self._saved = (module._interpreting, module._fused_step_kernel, driver._active)
        real_kernel = module._fused_step_kernel

        class _JIT:  # only reached at a flags key's first launch: it "compiles" the stub
            arg_names = real_kernel.arg_names

            def __getitem__(self, grid):
                return lambda **kwargs: _StubKernel()

        _forget_kernels()  # (a real compiled kernel would launch on the stub's stream)
        module._interpreting = lambda: False  # (configs are cached by the warm-up already)
        module._fused_step_kernel = _JIT()
        triton.runtime.driver.set_active(_StubDriver())
        return self

    def __exit__(self, *exc):
        module = fused_step_module
        module._interpreting, module._fused_step_kernel, triton.runtime.driver._active = self._saved
        _forget_kernels()


def _forget_kernels() -> None:
    """Drop the compiled kernels of every cached launch configuration (``_launch`` compiles
    or looks them up again at its next call)."""
    for config in fused_step_module._LAUNCH_CONFIGS.values():
        config.kernels.clear()
        config.arg_lists.clear()


def make_case(name: str, shape: tuple | None):
    """(scheduler, loop function, steps) of a bench_dropin_graph case."""
    cls_name, config, steps, bench_shape, dtype = SCHEDULERS[name]
    if shape is None:
        shape = bench_shape if HAS_CUDA else (bench_shape[0], bench_shape[1], 8, 8)
    scheduler = getattr(fused, cls_name)(backend="triton", **config)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    m = torch.randn(shape, device=DEVICE, dtype=dtype)

    def loop(times: list | None):
        """One loop over a fresh plan; appends each iteration's host ns to ``times``."""
        scheduler.set_timesteps(steps, device=DEVICE)
        clock = time.perf_counter_ns
        latents = x
        for t in scheduler.timesteps:
            start = clock()
            scheduler.scale_model_input(latents, t)
            latents = scheduler.step(m, t, latents).prev_sample
            if times is not None:
                times.append(clock() - start)
        return latents

    return scheduler, loop, steps


def time_cases(names, shape, rounds: int, stub: bool) -> dict[str, dict]:
    cases = {name: make_case(name, shape) for name in names}
    for _, loop, _ in cases.values():  # warm-up: real launches (configs cached, compiled)
        loop(None)
        loop(None)
    times = {name: [] for name in names}
    walls = {name: [] for name in names}
    context = _StubLaunches() if stub else None
    if context:
        context.__enter__()
    try:
        for _, loop, _ in cases.values():
            loop(None)  # the stub's first launch per flags key
        for _ in range(rounds):
            for name, (_, loop, steps) in cases.items():
                start = time.perf_counter_ns()
                loop(times[name])
                if HAS_CUDA:
                    torch.cuda.synchronize()
                walls[name].append((time.perf_counter_ns() - start) / steps / 1e3)
    finally:
        if context:
            context.__exit__()
    return {
        name: {
            "median_us": statistics.median(times[name]) / 1e3,
            "p10_us": sorted(times[name])[len(times[name]) // 10] / 1e3,
            "loop_us": statistics.median(walls[name]),
        }
        for name in names
    }


def profile_case(name: str, shape, iterations: int, stub: bool, top: int) -> None:
    _, loop, steps = make_case(name, shape)
    loop(None)
    loop(None)
    context = _StubLaunches() if stub else None
    if context:
        context.__enter__()
    try:
        loop(None)
        profiler = cProfile.Profile()
        done = 0
        while done < iterations:
            profiler.enable()
            loop(None)
            profiler.disable()
            done += steps
    finally:
        if context:
            context.__exit__()
    stats = pstats.Stats(profiler)
    per_file: dict[str, float] = defaultdict(float)
    rows = []
    for (file, line, fn), (_, calls, own, cumulative, _) in stats.stats.items():
        short = _short(file)
        per_file[short] += own
        rows.append((own, cumulative, calls, f"{short}:{line}({fn})"))
    print(f"{name}: {done} iterations under cProfile (us per iteration; profiled, so inflated)")
    print(f"{'own':>8} {'cumul':>8} {'calls/it':>8}  function")
    for own, cumulative, calls, where in sorted(rows, reverse=True)[:top]:
        us, cumulative_us = own / done * 1e6, cumulative / done * 1e6
        print(f"{us:8.2f} {cumulative_us:8.2f} {calls / done:8.2f}  {where}")
    print(f"\n{'own':>8}  file (layer)")
    for file, own in sorted(per_file.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{own / done * 1e6:8.2f}  {file}")


def _short(file: str) -> str:
    for marker in ("fastdiff/", "kernels/", "diffusers/", "torch/", "triton/", "benchmarks/"):
        at = file.rfind(marker)
        if at >= 0:
            return file[at:]
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(SCHEDULERS), help="cases (default all)")
    default_launch = "real" if HAS_CUDA else "stub"
    parser.add_argument("--launch", choices=("stub", "real"), default=default_launch)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved loops per case")
    parser.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")))
    parser.add_argument("--profile", metavar="NAME", help="cProfile one case instead")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if args.launch == "real" and not HAS_CUDA:
        parser.error("--launch real needs CUDA (the interpreter's launch is not a launch)")
    stub = args.launch == "stub"
    if args.profile:
        profile_case(args.profile, args.shape, args.iterations, stub, args.top)
        return
    results = time_cases(args.names, args.shape, args.rounds, stub)
    device = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"# {device}, launch={args.launch}, {versions}")
    print(f"{'case':<24} {'median us':>10} {'p10 us':>8} {'loop us':>8}")
    for name, r in results.items():
        print(f"{name:<24} {r['median_us']:10.1f} {r['p10_us']:8.1f} {r['loop_us']:8.1f}")


if __name__ == "__main__":
    main()

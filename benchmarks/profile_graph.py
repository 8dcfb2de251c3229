"""What a graphed drop-in iteration runs on the card: the kernels of one replay of each
``bench_dropin_graph.SCHEDULERS`` case's whole loop (``capture_denoising_loop`` with
``steps_per_graph=steps``), with their count and device time a step (``torch.profiler``).

Each loop is captured and replayed once untimed, then one replay runs under the profiler;
the table gives, per kernel name, the launches a step and the mean device microseconds a
launch; the line above it the replay's wall time a step (synchronized, ``loop.run``'s resets
and Python included), the graph's period a step (the first step kernel's start to the last
one's end on the device timeline, / steps: the in-graph figure, no host time in it) and the
kernels' own time a step.

Run (on the GPU machine)::

    python -m benchmarks.profile_graph              # every case
    python -m benchmarks.profile_graph flow_euler ddim
    python -m benchmarks.profile_graph --no-advance   # the loop's own path, to compare
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_dropin_graph import SCHEDULERS, STOCHASTIC
from fastdiff import diffusers as fused
from fastdiff.diffusers.graph import capture_denoising_loop


def graphed_loop(name: str, advance: bool = True):
    """``(run, steps)``: one replay of the case's whole loop, captured."""
    cls_name, config, steps, shape, dtype = SCHEDULERS[name]
    options = {"backend": "triton", **config}
    if name in STOCHASTIC:
        options["noise"] = "philox"
    scheduler = getattr(fused, cls_name)(**options)
    scheduler.set_timesteps(steps, device="cuda")
    x = torch.randn(shape, device="cuda", dtype=dtype)
    m = torch.randn(shape, device="cuda", dtype=dtype)

    def step_fn(latents, t):
        scheduler.scale_model_input(latents, t)
        return scheduler.step(m, t, latents).prev_sample

    loop = capture_denoising_loop(
        step_fn, x, scheduler=scheduler, steps_per_graph=steps, advance=advance
    )
    loop.run(x)  # capture and verification
    loop.run(x)
    advancing = loop.advance is not None and loop.advance.launches > 0
    return (lambda: loop.run(x)), steps, advancing


def report(name: str, advance: bool = True) -> None:
    run, steps, advancing = graphed_loop(name, advance)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    count, total, steps_at = defaultdict(int), defaultdict(float), []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count[event.name] += 1
            total[event.name] += event.device_time
            if event.name.startswith("_fused_step_kernel"):
                steps_at.append((event.time_range.start, event.time_range.end))
    kernel_us = sum(total.values()) / steps
    steps_at.sort()
    # the graph's period: first step kernel's start to the last one's end, a step
    period_us = (steps_at[-1][1] - steps_at[0][0]) / len(steps_at)
    label = name if advance else f"{name} (advance=False)"
    print(f"{label}: replay wall {wall_us:.2f} us a step, in the graph {period_us:.2f} us a "
          f"step, kernels {kernel_us:.2f} us a step, advancing step: {advancing}")  # fmt: skip
    for kernel in sorted(total, key=total.get, reverse=True):
        print(f"    {count[kernel] / steps:6.2f} a step  {total[kernel] / count[kernel]:7.2f} us"
              f"  {kernel[:90]}")  # fmt: skip


if __name__ == "__main__":
    no_advance = "--no-advance" in sys.argv  # the loop's own gather, copy and add instead
    for case in [a for a in sys.argv[1:] if not a.startswith("--")] or list(SCHEDULERS):
        report(case, advance=not no_advance)

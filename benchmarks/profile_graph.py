"""What a graphed drop-in iteration runs on the card: the kernels of one replay of each
``bench_dropin_graph.SCHEDULERS`` case's whole loop (``capture_denoising_loop`` with
``steps_per_graph=steps``), with their count and device time a step (``torch.profiler``).

Each loop is captured and replayed once untimed, then one replay runs under the profiler;
the table gives, per kernel name, the launches a step and the mean device microseconds a
launch, and the replay's wall time a step (synchronized), so that the graph's figure can be
split into the kernels' own time and the gaps between them.

Run (on the GPU machine)::

    python -m benchmarks.profile_graph              # every case
    python -m benchmarks.profile_graph flow_euler ddim
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


def graphed_loop(name: str):
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

    loop = capture_denoising_loop(step_fn, x, scheduler=scheduler, steps_per_graph=steps)
    loop.run(x)  # capture and verification
    loop.run(x)
    advancing = loop.advance is not None and loop.advance.launches > 0
    return (lambda: loop.run(x)), steps, advancing


def report(name: str) -> None:
    run, steps, advancing = graphed_loop(name)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    count, total = defaultdict(int), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count[event.name] += 1
            total[event.name] += event.device_time
    kernel_us = sum(total.values()) / steps
    print(f"{name}: replay wall {wall_us:.2f} us a step, kernels {kernel_us:.2f} us a step, "
          f"advancing step: {advancing}")  # fmt: skip
    for kernel in sorted(total, key=total.get, reverse=True):
        print(f"    {count[kernel] / steps:6.2f} a step  {total[kernel] / count[kernel]:7.2f} us"
              f"  {kernel[:90]}")  # fmt: skip


if __name__ == "__main__":
    for case in sys.argv[1:] or list(SCHEDULERS):
        report(case)

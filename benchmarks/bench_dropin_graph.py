"""Every fastdiff.diffusers drop-in's loop, eager and inside ``capture_denoising_loop``.

``test_dropin_loop``: a 50-step (28 for the flow schedulers) loop of ``scale_model_input`` +
``step`` with a trivial model (a preallocated output: no kernel of its own), per drop-in, at
(1,4,64,64) float16 for the VP schedulers and (1,16,64,64) bfloat16 for the flow ones.
Implementations:

* ``eager``: the Python loop (synchronized once at the end);
* ``graph``: the same loop captured once by ``capture_denoising_loop`` (one replay a step);
  the stochastic schedulers with ``noise="philox"`` (torch's generator cannot be replayed);
* ``graph-whole``: the same, the whole loop one graph (``steps_per_graph=steps``): no Python
  between the steps, so the figure is the graph's kernels alone.

``extra_info``: ``per_step_us`` (median wall of a whole loop, synchronized, / steps; for
``graph`` the captured loop's ``run``, whose replays are launched from Python). A scheduler
whose ``check_capturable()`` refuses is skipped with its reason. Targets: eager <= 30 us a
step, in the graph <= 5 us a step.

Run (on the GPU machine)::

    python -m pytest benchmarks/bench_dropin_graph.py --benchmark-json=out/dropin_graph.json
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_step import DTYPE_NAMES, measure_loop

pytest.importorskip("diffusers", reason="diffusers is not installed")

from fastdiff import diffusers as fused  # noqa: E402
from fastdiff.diffusers.graph import capture_denoising_loop  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
VP_SHAPE, FLOW_SHAPE = ((1, 4, 64, 64), (1, 16, 64, 64)) if HAS_CUDA else ((1, 4, 4, 4),) * 2
# flow sigmas on the multistep schedulers, as Sana (DPM) and Wan (UniPC) configure them
FLOW_SIGMAS = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
# name -> (drop-in class name, config, steps, shape, dtype)
SCHEDULERS = {
    "ddpm": ("FusedDDPMScheduler", {}, 50, VP_SHAPE, torch.float16),
    "ddim": ("FusedDDIMScheduler", {}, 50, VP_SHAPE, torch.float16),
    "euler": ("FusedEulerDiscreteScheduler", {}, 50, VP_SHAPE, torch.float16),
    "euler_a": ("FusedEulerAncestralDiscreteScheduler", {}, 50, VP_SHAPE, torch.float16),
    "dpmpp_2m": ("FusedDPMSolverMultistepScheduler", {}, 50, VP_SHAPE, torch.float16),
    "unipc": ("FusedUniPCMultistepScheduler", {}, 50, VP_SHAPE, torch.float16),
    "flow_euler": (
        "FusedFlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 28, FLOW_SHAPE, torch.bfloat16
    ),
    "flow_euler_stochastic": (
        "FusedFlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "stochastic_sampling": True},
        28,
        FLOW_SHAPE,
        torch.bfloat16,
    ),
    "flow_dpmpp_2m": (
        "FusedDPMSolverMultistepScheduler", FLOW_SIGMAS, 28, FLOW_SHAPE, torch.bfloat16
    ),
    "flow_unipc": ("FusedUniPCMultistepScheduler", FLOW_SIGMAS, 28, FLOW_SHAPE, torch.bfloat16),
}  # fmt: skip
STOCHASTIC = ("ddpm", "euler_a", "flow_euler_stochastic")  # graphed with noise="philox"


@pytest.mark.parametrize("impl", ["eager", "graph", "graph-whole"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_dropin_loop(benchmark, name: str, impl: str) -> None:
    """Wall time per step of one drop-in's whole loop, eager or replayed as a CUDA graph."""
    cls_name, config, steps, shape, dtype = SCHEDULERS[name]
    if impl != "eager" and not HAS_CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    benchmark.group = f"dropin-loop {name} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}"
    cls = getattr(fused, cls_name)
    options = {"backend": "triton", **config}
    if impl != "eager" and name in STOCHASTIC:  # torch's RNG cannot be replayed: the opt-in
        options["noise"] = "philox"
    scheduler = cls(**options)
    scheduler.set_timesteps(steps, device=DEVICE)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    m = torch.randn(shape, device=DEVICE, dtype=dtype)

    def step_fn(latents, t):
        scheduler.scale_model_input(latents, t)  # the model's input (unused by the trivial model)
        return scheduler.step(m, t, latents).prev_sample

    def setup():  # a fresh plan (and multistep history) for every loop, as a pipeline does
        scheduler.set_timesteps(steps, device=DEVICE)

    info = dict(impl=impl, scheduler=cls_name, config=config, shape=list(shape))
    info["noise"] = options.get("noise", "torch")
    if impl == "eager":

        def run():
            xi = x
            for t in scheduler.timesteps:
                xi = step_fn(xi, t)
            return xi

        result = measure_loop(
            benchmark, run, setup, steps=steps, target_us=30.0, dtype=DTYPE_NAMES[dtype], **info
        )
        assert result.shape == shape
        return
    try:
        scheduler.check_capturable()
    except ValueError as refused:
        pytest.skip(f"{cls_name} is not capturable: {refused}")
    per_graph = steps if impl == "graph-whole" else 1
    loop = capture_denoising_loop(step_fn, x, scheduler=scheduler, steps_per_graph=per_graph)
    loop.run(x)  # capture (and the bitwise check of the first replay)

    def run():
        return loop.run(x)

    result = measure_loop(
        benchmark, run, setup, steps=steps, target_us=5.0, dtype=DTYPE_NAMES[dtype], **info
    )
    assert result.shape == shape

"""Flow-matching steps, side by side: fused (native sampler and diffusers drop-in) vs diffusers.

``test_flow_step``: one step at large latents, group ``"{sampler} {shape} {dtype}"``:

* ``fused``: the native sampler's step (``FlowMatchEulerSampler`` / ``FlowDPMSolverPP2MSampler``;
  x0 written only where the multistep history needs it; stochastic noise in-kernel Philox);
* ``fused-dropin``: ``FusedFlowMatchEulerDiscreteScheduler`` / ``FusedDPMSolverMultistepScheduler
  (use_flow_sigmas=True)``'s ``step`` (step index reset before every call);
* ``diffusers``: ``FlowMatchEulerDiscreteScheduler`` / ``DPMSolverMultistepScheduler``'s ``step``.

``extra_info``: ``passes`` (tensor-sized reads + writes at least), ``bytes``, ``gbps``,
``frac_copy_bw`` of the session's copy bandwidth, the floor of PERFORMANCE.md
(``floor_passes``: 3, +1 for DPM's x0_prev) and ``x_floor``. Every step is step 14 of a
28-step plan (DPM second order).

``test_flow_python_loop``: an eager Python loop of ``scale_model_input`` (where the class has
it) + ``step`` over a 28-step plan at small latents (packed Flux tokens, an image latent, a
video latent), wall time per step, synchronized once at the end: the host-overhead figure
(target <= 30 us a step through a drop-in).

Without CUDA every benchmark runs once on tiny shapes (a smoke test; conftest.py).

Run::

    python -m pytest benchmarks/bench_flow.py --benchmark-json=flow.json
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from benchmarks.bench_step import DTYPE_NAMES, _measure, bandwidth_figures, measure_loop
from fastdiff.flow import FlowSchedule
from fastdiff.flow_samplers import FlowDPMSolverPP2MSampler, FlowMatchEulerSampler

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler  # noqa: E402
from fastdiff.diffusers.flow_match import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
NUM_STEPS = 28
STEP = 14

if HAS_CUDA:
    STEP_SHAPES = [(256, 16, 128, 128), (8, 16, 21, 90, 160)]
    LOOP_SHAPES = [(1, 4096, 64), (1, 16, 64, 64), (1, 16, 21, 60, 104)]
else:  # smoke run under the Triton interpreter
    STEP_SHAPES = [(2, 4, 8, 8)]
    LOOP_SHAPES = [(1, 16, 8), (1, 4, 3, 5, 7)]
DTYPE = torch.bfloat16

FLOW = (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler)
DPM = (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler)
SANA = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
# sampler -> (native sampler, its options, (diffusers class, fused drop-in), their config)
SAMPLERS = {
    "flow_euler": (FlowMatchEulerSampler, {"shift": 3.0}, FLOW, {"shift": 3.0}),
    "flow_euler_stochastic": (
        FlowMatchEulerSampler,
        {"shift": 3.0, "stochastic": True},
        FLOW,
        {"shift": 3.0, "stochastic_sampling": True},
    ),
    "flow_dpmpp_2m": (FlowDPMSolverPP2MSampler, {"shift": 3.0}, DPM, SANA),
}
IMPLS = ["fused", "fused-dropin", "diffusers"]


@dataclass(frozen=True)
class Case:
    sampler: str
    shape: tuple[int, ...]

    @property
    def group(self) -> str:
        return f"{self.sampler} {self.shape} {DTYPE_NAMES[DTYPE]}"

    @property
    def multistep(self) -> bool:
        return SAMPLERS[self.sampler][0].multistep

    @property
    def tensor_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPE).element_size()


def _scheduler(case_sampler: str, impl: str, steps: int = NUM_STEPS):
    _, _, (d_cls, f_cls), config = SAMPLERS[case_sampler]
    scheduler = f_cls(backend="triton", **config) if impl.startswith("fused") else d_cls(**config)
    if impl.startswith("fused") and config.get("stochastic_sampling"):
        scheduler.noise = "philox"  # the fast path: no generator, in-kernel noise
    scheduler.set_timesteps(steps, device=DEVICE)
    return scheduler


def _make_step(case: Case, impl: str):
    """``(fn, passes)``: the step callable (no synchronization) and its tensor passes."""
    x = torch.randn(case.shape, device=DEVICE, dtype=DTYPE)
    m = torch.randn(case.shape, device=DEVICE, dtype=DTYPE)
    batch = case.shape[0]
    stochastic = "stochastic" in case.sampler
    if impl == "fused":
        cls, options, _, _ = SAMPLERS[case.sampler]
        sampler = cls(FlowSchedule(), NUM_STEPS, backend="triton", **options)
        sampler.device_tables(DEVICE)
        kwargs = {"return_x0": case.multistep}
        if case.multistep:
            kwargs["x0_prev"] = torch.randn_like(x)
        if stochastic:
            kwargs["seeds"] = torch.arange(batch, dtype=torch.int64, device=DEVICE)

        def fn():
            return sampler.step(x, m, STEP, **kwargs)

        return fn, 3 + 2 * int(case.multistep)  # x, m in, x' out (+ x0_prev in, x0 out)
    scheduler = _scheduler(case.sampler, impl)
    timestep = scheduler.timesteps[STEP]
    if case.multistep:  # one step first: the history holds an x0, the timed step is 2nd order
        scheduler._step_index = STEP - 1
        scheduler.step(m, scheduler.timesteps[STEP - 1], x)

    def fn():
        scheduler._step_index = STEP  # step() advances it: every call is the same step
        return scheduler.step(m, timestep, x)

    if impl == "fused-dropin":
        return fn, 3 + 2 * int(case.multistep)
    # diffusers: x, m in, x' out; the float32 upcast of x (+2), DPM's x0 (+2) and x0_prev
    # (+1), the stochastic noise drawn (+1 write, +1 read)
    return fn, 3 + 2 + 3 * int(case.multistep) + 2 * int(stochastic)


STEP_PARAMS = [
    pytest.param(Case(name, shape), impl, id=f"{name}-{'x'.join(map(str, shape))}-{impl}")
    for name in SAMPLERS
    for shape in STEP_SHAPES
    for impl in IMPLS
]


@pytest.mark.parametrize(("case", "impl"), STEP_PARAMS)
def test_flow_step(benchmark, copy_bandwidth, case: Case, impl: str) -> None:
    """One flow step by ``impl``; GB/s and the fraction of copy bandwidth in extra_info."""
    benchmark.group = case.group
    fn, passes = _make_step(case, impl)
    result, wall, do_bench_s = _measure(benchmark, fn, precise=impl != "diffusers")
    nbytes = passes * case.tensor_bytes
    floor_passes = 3 + int(case.multistep)
    benchmark.extra_info.update(
        impl=impl,
        sampler=case.sampler,
        shape=list(case.shape),
        dtype=DTYPE_NAMES[DTYPE],
        passes=passes,
        bytes=nbytes,
        floor_passes=floor_passes,
        **bandwidth_figures(
            wall, do_bench_s, nbytes, floor_passes * case.tensor_bytes, copy_bandwidth
        ),
    )
    out = result.prev_sample
    assert out.shape == case.shape


LOOP_IMPLS = ["fused", "fused-dropin", "diffusers"]


@pytest.mark.parametrize("impl", LOOP_IMPLS)
@pytest.mark.parametrize("shape", LOOP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_flow_python_loop(benchmark, name: str, shape, impl: str) -> None:
    """Wall time per step of a 28-step loop of scale_model_input + step from Python."""
    benchmark.group = f"python-loop {name} {shape} {DTYPE_NAMES[DTYPE]}"
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    m = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    setup = None
    if impl == "fused":
        cls, options, _, _ = SAMPLERS[name]
        sampler = cls(FlowSchedule(), NUM_STEPS, backend="triton", **options)
        sampler.device_tables(DEVICE)
        seeds = torch.arange(shape[0], dtype=torch.int64, device=DEVICE)
        kwargs = {"seeds": seeds} if sampler.stochastic else {}

        def run():
            xi, x0 = x, None
            for i in range(NUM_STEPS):
                out = sampler.step(xi, m, i, x0_prev=x0, return_x0=sampler.multistep, **kwargs)
                xi, x0 = out.prev_sample, out.pred_original_sample
            return xi

    else:
        scheduler = _scheduler(name, impl)
        scale = getattr(scheduler, "scale_model_input", None)  # FlowMatchEuler has none

        def setup():  # a fresh plan (and DPM history) for every loop, as a pipeline does
            scheduler.set_timesteps(NUM_STEPS, device=DEVICE)

        def run():
            xi = x
            for t in scheduler.timesteps:
                if scale is not None:
                    scale(xi, t)
                xi = scheduler.step(m, t, xi).prev_sample
            return xi

    result = measure_loop(
        benchmark, run, setup, steps=NUM_STEPS, target_us=30.0,
        impl=impl, sampler=name, shape=list(shape), dtype=DTYPE_NAMES[DTYPE],
    )  # fmt: skip
    assert result.shape == shape

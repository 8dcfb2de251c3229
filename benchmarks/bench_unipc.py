"""UniPC side by side: diffusers' UniPCMultistepScheduler and fastdiff's fused UniPC.

Wan's scheduler config (flow matching on UniPC: ``use_flow_sigmas``, ``flow_shift=3``,
``flow_prediction``, order 2, bh2, data prediction), bfloat16 latents.

* ``test_loop``: wall time per step of an eager Python loop of ``scale_model_input`` +
  ``step`` over a 50-step plan (synchronized once at the end), for ``diffusers``, the fused
  drop-in ``fused`` (``FusedUniPCMultistepScheduler``) and the native ``UniPCSampler``
  (``native``, VP space, same order and solver) at (1,16,64,64) and a video latent
  (1,16,21,60,104). diffusers' UniPC in flow mode costs ~1.8 ms a step on an H200; the target
  for a drop-in is <= 30 us (issue 8).
* ``test_step``: one steady-state step (step 25 of 50: corrector of order 2 and predictor of
  order 2) at (256,16,128,128). ``extra_info``: ``passes``, the tensor-sized reads + writes of
  the step's contract (x, the model output, the last corrected sample and the two history
  entries it reads; the next sample, the corrected sample and the new history entry it
  writes: 8), ``gbps`` and ``frac_copy_bw`` (of the session's copy bandwidth). The fused time
  is the ``do_bench`` median, diffusers' the wall median.

Without CUDA every benchmark runs once on tiny shapes (a smoke test; conftest.py).

Run::

    python -m pytest benchmarks/bench_unipc.py --benchmark-json=unipc.json
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_step import DTYPE_NAMES, _measure, bandwidth_figures, measure_loop
from fastdiff.schedules import NoiseSchedule
from fastdiff.unipc import UniPCSampler

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

from fastdiff.diffusers.unipc import FusedUniPCMultistepScheduler  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
WAN = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
)
STEPS, STEP = 50, 25
if HAS_CUDA:
    LOOP_SHAPES = [(1, 16, 64, 64), (1, 16, 21, 60, 104)]
    STEP_SHAPES = [(256, 16, 128, 128)]
else:  # smoke run under the Triton interpreter
    LOOP_SHAPES = [(1, 4, 8, 8)]
    STEP_SHAPES = [(2, 4, 8, 8)]
    STEPS, STEP = 4, 2
DTYPE = torch.bfloat16
PASSES = 8  # order 2: reads x, m, last, 2 history entries; writes x_next, last, history


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _scheduler(impl: str):
    cls = FusedUniPCMultistepScheduler if impl == "fused" else diffusers.UniPCMultistepScheduler
    kwargs = {"backend": "triton"} if impl == "fused" else {}
    scheduler = cls(**WAN, **kwargs)
    scheduler.set_timesteps(STEPS, device=DEVICE)
    return scheduler


@pytest.mark.parametrize("impl", ["fused", "native", "diffusers"])
@pytest.mark.parametrize("shape", LOOP_SHAPES, ids=_shape_id)
def test_loop(benchmark, shape, impl: str) -> None:
    """Wall time per step of a whole plan driven from Python (synchronized once at the end)."""
    benchmark.group = f"unipc-loop {shape} {DTYPE_NAMES[DTYPE]}"
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    m = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    setup = None
    if impl == "native":
        schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
        sampler = UniPCSampler(schedule, STEPS, timestep_spacing="trailing", backend="triton")

        def run():
            xi = x
            for i in range(STEPS):
                xi = sampler.step(xi, m, i, return_x0=False).prev_sample
            return xi

    else:
        scheduler = _scheduler(impl)

        def setup():  # a fresh plan (and history) for every loop, as a pipeline does
            scheduler.set_timesteps(STEPS, device=DEVICE)

        def run():
            xi = x
            for t in scheduler.timesteps:
                scheduler.scale_model_input(xi, t)  # the model's input (identity for UniPC)
                xi = scheduler.step(m, t, xi).prev_sample
            return xi

    config = "Wan (flow, order 2, bh2)" if impl != "native" else "VP, order 2, bh2"
    result = measure_loop(
        benchmark, run, setup, steps=STEPS, target_us=30.0,
        impl=impl, config=config, shape=list(shape), dtype=DTYPE_NAMES[DTYPE],
    )  # fmt: skip
    assert result.shape == shape


@pytest.mark.parametrize("impl", ["fused", "diffusers"])
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_shape_id)
def test_step(benchmark, copy_bandwidth, shape, impl: str) -> None:
    """One steady-state step (corrector and predictor of order 2); GB/s in extra_info."""
    benchmark.group = f"unipc-step {shape} {DTYPE_NAMES[DTYPE]}"
    scheduler = _scheduler(impl)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    m = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    for t in scheduler.timesteps[: STEP - 1]:  # fill the history: order 2 from here on
        scheduler.step(m, t, x)
    timestep = scheduler.timesteps[STEP]

    def fn():
        scheduler._step_index = STEP  # step() advances it: every call is the same step
        return scheduler.step(m, timestep, x)

    result, wall, do_bench_s = _measure(benchmark, fn, precise=impl == "fused")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    nbytes = PASSES * numel * itemsize
    benchmark.extra_info.update(
        impl=impl,
        shape=list(shape),
        dtype=DTYPE_NAMES[DTYPE],
        passes=PASSES,
        bytes=nbytes,
        **bandwidth_figures(wall, do_bench_s, nbytes, nbytes, copy_bandwidth),
    )
    assert result.prev_sample.shape == shape

"""The drop-ins of issue 12 at large latents, side by side with diffusers: one step's time
against the floor set by the bytes its contract moves.

``test_dropin_step``: one ``step`` of a mid-plan timestep (the step index set before every
call, so every call is the same step; for Heun a call is both halves, the predictor and the
corrector of one step, the corrector given the predictor's ``prev_sample`` as a pipeline's
loop gives it), group ``"dropin-step {name} {shape} {dtype}"``:

* ``fused``: the ``Fused*Scheduler``'s step; stochastic steps with ``noise="philox"`` (in
  kernel, no noise tensor);
* ``fused-torch-noise``: the same with the stock noise (diffusers' ``randn_tensor``): a noise
  tensor written and read (stochastic cases only);
* ``diffusers``: the stock scheduler's step.

``extra_info``: ``floor_passes``, the tensor-sized reads and writes the step's contract needs
(the sample and model output read; the history read where the step has one; the new sample,
and the x0 where diffusers returns or keeps it, written; +2 for a noise tensor), and the
step's time over that floor at the session's copy bandwidth (``x_floor``; 1/x_floor is the
fraction of the floor reached: the target is >= 0.85).

Without CUDA every case runs once on tiny shapes (a smoke test; conftest.py).

Run::

    python -m pytest benchmarks/bench_dropin_step.py --benchmark-json=dropin_step.json
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_step import DTYPE_NAMES, _measure, bandwidth_figures

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

from fastdiff import diffusers as fused  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The flow issue's large latents: at (64,16,128,128) a step's floor (~32 us for 4 passes)
# is below the drop-in's host path, and do_bench would time the Python, not the step.
SHAPE = (256, 16, 128, 128) if HAS_CUDA else (2, 4, 8, 8)
DTYPE = torch.bfloat16
NUM_STEPS, STEP = 20, 10
KARRAS = {"use_karras_sigmas": True}
# name -> (diffusers class name, config, step kwargs, floor passes, stochastic)
CASES = {
    # both halves, 4 + 5: the first reads x_s and m, writes its prediction x and its x0 D
    # (diffusers returns both; D is also the state the second half reads); the second reads
    # x (the first half's prev_sample, as a pipeline passes it), m and D, writes x_next, x0
    "heun": ("HeunDiscreteScheduler", KARRAS, {}, 9, False),
    "lcm": ("LCMScheduler", {}, {}, 4, True),
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}, 4, True),
    "euler_churn": ("EulerDiscreteScheduler", KARRAS, {"s_churn": 1.0}, 4, True),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **KARRAS}, {}, 5, True
    ),
    "dpmpp_2m_heun": ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, {}, 5, False),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}, 6, False),
}  # fmt: skip
IMPLS = ["fused", "fused-torch-noise", "diffusers"]


def _scheduler(name: str, impl: str):
    cls_name, config, _, _, _ = CASES[name]
    if impl == "diffusers":
        return getattr(diffusers, cls_name)(**config)
    noise = "philox" if impl == "fused" else "torch"
    return getattr(fused, f"Fused{cls_name}")(**config, backend="triton", noise=noise)


PARAMS = [
    pytest.param(name, impl, id=f"{name}-{impl}")
    for name, case in CASES.items()
    for impl in IMPLS
    if case[4] or impl != "fused-torch-noise"
]


@pytest.mark.parametrize(("name", "impl"), PARAMS)
def test_dropin_step(benchmark, copy_bandwidth, name: str, impl: str) -> None:
    """One mid-plan step of a drop-in or its stock scheduler; the floor figures in extra_info."""
    _, config, step_kwargs, floor_passes, stochastic = CASES[name]
    benchmark.group = f"dropin-step {name} {'x'.join(map(str, SHAPE))} {DTYPE_NAMES[DTYPE]}"
    scheduler = _scheduler(name, impl)
    scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE) * float(scheduler.init_noise_sigma)
    m = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE)
    timesteps = scheduler.timesteps
    for k in range(STEP):  # the history of a mid-plan step (multistep solvers: full order)
        scheduler.step(m, timesteps[k], x, **step_kwargs)
    assert getattr(scheduler, "state_in_first_order", True)  # Heun: a whole step next
    index = scheduler.step_index
    calls = range(STEP, STEP + scheduler.order)  # Heun (order 2): both halves of a step

    def fn():
        # step() advances the index: every call is the same step. Heun: a call ends after
        # the second half, where the scheduler is back in its first half (its own state),
        # and the second half gets the first half's prev_sample, as a pipeline's loop
        # passes it (another sample would be "changed between the halves": the midpoint form)
        scheduler._step_index = index
        sample = x
        for k in calls:
            out = scheduler.step(m, timesteps[k], sample, **step_kwargs)
            sample = out.prev_sample
        return out

    result, wall, do_bench_s = _measure(benchmark, fn, precise=impl != "diffusers")
    tensor_bytes = math.prod(SHAPE) * torch.empty((), dtype=DTYPE).element_size()
    floor = floor_passes + (2 if stochastic and impl != "fused" else 0)
    benchmark.extra_info.update(
        impl=impl,
        scheduler=type(scheduler).__name__,
        config=config,
        step_kwargs=step_kwargs,
        shape=list(SHAPE),
        dtype=DTYPE_NAMES[DTYPE],
        floor_passes=floor,
        **bandwidth_figures(
            wall, do_bench_s, floor * tensor_bytes, floor * tensor_bytes, copy_bandwidth
        ),
    )
    assert result.prev_sample.shape == SHAPE

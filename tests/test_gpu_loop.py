"""On the card: a whole sampling loop never syncs with the host and can be captured in a
CUDA graph (skipped without CUDA)."""

import pytest
import torch

from fastdiff.loop import SamplingStep
from fastdiff.philox import seeds_from
from fastdiff.samplers import SAMPLERS
from fastdiff.schedules import NoiseSchedule

pytestmark = pytest.mark.gpu
SCHEDULE = NoiseSchedule.create("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


def _model(x, cond):
    """A cheap, capturable stand-in for a network: depends on x and the condition."""
    return torch.tanh(x) * (cond.view(-1, *[1] * (x.dim() - 1)) / 1000.0)


def _guided_model(x, cond):
    """Both CFG halves in one call; the conditional half sees half the condition."""
    b = x.shape[0] // 2
    return torch.cat([_model(x[:b], cond[:b]), _model(x[b:], cond[b:] * 0.5)])


def _loop(step, x, x0, seeds):
    """A chain of the library's step body (fastdiff.loop.SamplingStep), in place."""
    for i in range(step.sampler.num_steps):
        step(x, i, seeds=seeds, x0_prev=x0, out=x, x0_out=x0)
    return x


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("guided", [False, True])
def test_loop_has_no_host_sync_and_replays_in_a_cuda_graph(name, guided):
    sampler = SAMPLERS[name](SCHEDULE, 12, backend="triton")
    step = SamplingStep(
        _guided_model if guided else _model, sampler, guidance_scale=5.0 if guided else None
    )
    shape = (2, 4, 16, 16)
    seeds = seeds_from(3, 2, "cuda")
    start = torch.randn(shape, device="cuda", dtype=torch.float16)

    x, x0 = start.clone(), torch.zeros_like(start)
    _loop(step, x, x0, seeds)  # compile and warm up outside the checks
    eager, eager_x0 = start.clone(), torch.zeros_like(start)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(step, eager, eager_x0, seeds)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    static, static_x0 = start.clone(), torch.zeros_like(start)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loop(step, static.clone(), static_x0.clone(), seeds)  # warm-up on the stream
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        _loop(step, static, static_x0, seeds)
    static.copy_(start)
    static_x0.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, eager)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_device_step_index_does_not_sync(backend):
    """A 0-d device step index (what a one-step graph replays) never reads back to the host."""
    sampler = SAMPLERS["dpmpp_2m"](SCHEDULE, 12, backend=backend)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    m, x0 = torch.randn_like(x), torch.randn_like(x)
    i = torch.tensor(5, device="cuda")
    sampler.step(x, m, i, x0_prev=x0)  # first call: compile, upload tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cond = sampler.model_condition(i, 2, x.device)
        out = sampler.step(x, m, i, x0_prev=x0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cond.shape == (2,)
    want = sampler.step(x, m, 5, x0_prev=x0)
    torch.testing.assert_close(out.prev_sample, want.prev_sample, rtol=0, atol=0)

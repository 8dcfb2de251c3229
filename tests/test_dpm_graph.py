"""FusedDPMSolverMultistepScheduler in a graphed denoising loop: with a device step index the
previous x0 lives in a device buffer the kernel overwrites and the row alone picks the order,
so ``capture_denoising_loop`` takes it and gives the eager loop's result bit for bit (the
eager stand-in runtime with timesteps treated as device tensors, on the CPU or the card;
on the card also real CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fastdiff.diffusers import FusedDPMSolverMultistepScheduler  # noqa: E402
from fastdiff.diffusers.graph import capture_denoising_loop  # noqa: E402

SHAPE = (2, 3, 5, 7)
VP = {"solver_order": 2}
SANA = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
CONFIGS = pytest.mark.parametrize(
    "config",
    [VP, SANA, {**VP, "lower_order_final": False, "final_sigmas_type": "sigma_min"}],
    ids=["vp", "flow", "vp-no-lower-final"],
)


def _randn(seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(device, dtype)


def _loop(scheduler, weight):
    def step_fn(latents, t):
        m = torch.tanh(latents * weight) * (t.float() / 1000 + 0.5)
        return scheduler.step(m.to(latents.dtype), t, latents).prev_sample

    return step_fn


def _eager(scheduler, step_fn, x, timesteps=None, device_index=False):
    """The eager loop over the plan (host step index), or with a device step index every
    step (``prepare_graph_step`` and a fresh timestep tensor, as a graphed iteration)."""
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    indices = torch.arange(len(timesteps), device=timesteps.device)  # no host-to-device copy
    for k in range(len(timesteps)):
        if device_index:
            scheduler.prepare_graph_step()
            t = torch.take(timesteps, indices[k])
        else:
            t = timesteps[k]
        x = step_fn(x, t)
    return x


@CONFIGS
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_graphed_loop_is_the_eager_loop(config, backend, as_device, device):
    f = FusedDPMSolverMultistepScheduler(**config, backend=backend)
    f.check_capturable()
    f.set_timesteps(6, device=device)
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)
    eager = _eager(f, step_fn, x)
    f.set_timesteps(6, device=device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert torch.equal(loop.run(x), eager)
    assert torch.equal(loop.run(x), eager)  # replayed only (the chain's rows are kept)
    assert loop.captured


@CONFIGS
def test_device_index_loop_is_the_host_index_loop(config, as_device, device):
    """The device path (buffer, chain rows) against diffusers' list path: a whole plan, a
    chain started mid-plan (first order there), and a loop switching paths midway."""
    f = FusedDPMSolverMultistepScheduler(**config, backend="triton")
    f.set_timesteps(7, device=device)
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)
    for timesteps in (f.timesteps, f.timesteps[2:]):
        f.set_timesteps(7, device=device)
        host = _eager(f, step_fn, x, timesteps)
        f.set_timesteps(7, device=device)
        on_device = _eager(f, step_fn, x, timesteps, device_index=True)
        assert torch.equal(on_device, host)
        assert f.model_outputs[-1] is f.graph_state(x)[0]  # the buffer holds the last x0
    f.set_timesteps(7, device=device)
    whole = _eager(f, step_fn, x)
    f.set_timesteps(7, device=device)
    half = _eager(f, step_fn, x, f.timesteps[:3])  # host index: x0 kept in model_outputs
    assert torch.equal(_eager(f, step_fn, half, f.timesteps[3:], device_index=True), whole)


def test_hooks(as_device):
    f = FusedDPMSolverMultistepScheduler()
    f.set_timesteps(5)
    f.check_capturable()
    x = torch.zeros(SHAPE)
    (buffer,) = f.graph_state(x)
    assert buffer.shape == x.shape and buffer.dtype == x.dtype
    assert f.graph_state(x)[0] is buffer  # one buffer per layout, kept
    assert FusedDPMSolverMultistepScheduler(solver_order=1).graph_state(x) == []
    f.set_begin_index(2)
    with pytest.raises(ValueError, match="begin_index"):
        capture_denoising_loop(lambda x, t: x, x, scheduler=f)


def test_first_order_graphed_loop(as_device, device):
    f = FusedDPMSolverMultistepScheduler(solver_order=1, backend="triton")
    f.set_timesteps(5, device=device)
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)
    eager = _eager(f, step_fn, x)
    f.set_timesteps(5, device=device)
    assert torch.equal(capture_denoising_loop(step_fn, x, scheduler=f).run(x), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [VP, SANA], ids=["vp", "flow"])
def test_gpu_captured_loop_is_bitwise_eager_and_eager_never_syncs(config, dtype):
    device = torch.device("cuda")
    f = FusedDPMSolverMultistepScheduler(**config, backend="triton")
    f.set_timesteps(10, device=device)
    step_fn = _loop(f, _randn(1, device, dtype))
    x = _randn(0, device, dtype)
    eager = _eager(f, step_fn, x)  # tables built and uploaded, kernels compiled
    f.set_timesteps(10, device=device)
    device_index = _eager(f, step_fn, x, device_index=True)
    assert torch.equal(device_index, eager)
    for index in (False, True):
        f.set_timesteps(10, device=device)  # same plan: tables kept
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = _eager(f, step_fn, x, device_index=index)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(again, eager)
    f.set_timesteps(10, device=device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    graphed = loop.run(x)
    again = loop.run(x)  # replayed only
    torch.cuda.synchronize()
    assert loop.captured and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager) and torch.equal(again, eager)

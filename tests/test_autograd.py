"""Gradients through a step: gradcheck of the reference (float64), and the fused kernel's
backward (float32) against the reference's gradients, for x, the model output (both CFG
halves, the learned-variance channels), x0_prev, the noise and the classifier gradient,
with clipping and thresholding (whose quantile s is a constant for autograd)."""

import pytest
import torch
from conftest import TOLERANCES

from fastdiff.philox import seeds_from
from fastdiff.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
)
from fastdiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
SHAPE = (2, 2, 3, 5)

SAMPLERS = {
    "ddpm": lambda **kw: DDPMSampler(SCHEDULE, 10, **kw),
    "ddpm_learned_range": lambda **kw: DDPMSampler(
        SCHEDULE, 10, variance_type="learned_range", **kw
    ),
    "ddim_eta": lambda **kw: DDIMSampler(SCHEDULE, 10, eta=0.6, **kw),
    "euler": lambda **kw: EulerSampler(SCHEDULE, 10, **kw),
    "euler_a": lambda **kw: EulerAncestralSampler(SCHEDULE, 10, **kw),
    "dpmpp_2m": lambda **kw: DPMSolverPP2MSampler(SCHEDULE, 10, **kw),
}
PROCESSING = {
    "none": {},
    "clip": {"clip_sample_range": 1.2},
    "threshold": {"thresholding": (0.8, 30.0)},  # s ~ 10 here: inside [1, 30], not clamped
}


def _inputs(sampler, guided, dtype, shape=SHAPE):
    """Leaf inputs of a step (requires_grad), scaled so that clipping / thresholding act."""
    g = torch.Generator().manual_seed(0)
    m_shape = list(shape)
    if getattr(sampler, "variance_type", "").startswith("learned"):
        m_shape[1] *= 2
    if guided:
        m_shape[0] *= 2
    tensors = {
        "x": 2 * torch.randn(shape, generator=g),
        "model_output": 2 * torch.randn(m_shape, generator=g),
    }
    if m_shape[1] != shape[1]:  # learned_range values in [-1, 1]
        tensors["model_output"][:, shape[1] :] = torch.rand(
            (m_shape[0], shape[1], *shape[2:]), generator=g
        ) * 2 - 1  # fmt: skip
    if sampler.multistep:
        tensors["x0_prev"] = torch.randn(shape, generator=g)
    if sampler.stochastic:
        tensors["noise"] = torch.randn(shape, generator=g)
        tensors["grad"] = 0.3 * torch.randn(shape, generator=g)
    return {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}


def _step(sampler, tensors, i, guided, rescale, **extra):
    kwargs = {k: v for k, v in tensors.items() if k not in ("x", "model_output")}
    if guided:
        kwargs.update(guidance_scale=3.0, guidance_rescale=rescale)
    out = sampler.step(tensors["x"], tensors["model_output"], i, **kwargs, **extra)
    return out.prev_sample, out.pred_original_sample


def _grads(sampler, tensors, i, guided, rescale, weights, **extra):
    x_next, x0 = _step(sampler, tensors, i, guided, rescale, **extra)
    loss = (x_next.double() * weights[0]).sum() + (x0.double() * weights[1]).sum()
    names = list(tensors)
    grads = torch.autograd.grad(loss, [tensors[k] for k in names])
    return dict(zip(names, grads))


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("process", ["none", "clip", "threshold_clamped"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reference_gradcheck(name, process, guided):
    """The reference is differentiable; in float64, its gradients are the finite
    differences (thresholding with s clamped at max_value, where s is locally constant)."""
    kwargs = {"thresholding": (0.8, 1.1)} if process == "threshold_clamped" else {}
    kwargs.update(PROCESSING.get(process, {}))
    sampler = SAMPLERS[name](backend="reference", **kwargs)
    tensors = _inputs(sampler, guided, torch.float64, shape=(2, 1, 2, 3))
    names = list(tensors)

    def f(*values):
        return _step(sampler, dict(zip(names, values)), 4, guided, 0.5 if guided else 0.0)

    inputs = [tensors[k] for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


KERNEL_CASES = [(name, process, False, 0.0) for name in SAMPLERS for process in PROCESSING] + [
    (name, process, True, rescale)
    for name in ("ddpm_learned_range", "dpmpp_2m")
    for process in PROCESSING
    for rescale in (0.0, 0.7)
]


@pytest.mark.parametrize("name,process,guided,rescale", KERNEL_CASES)
def test_kernel_gradients_match_the_reference(name, process, guided, rescale, device):
    fused = SAMPLERS[name](backend="triton", **PROCESSING[process])
    ref = SAMPLERS[name](backend="reference", **PROCESSING[process])
    tensors = _inputs(fused, guided, torch.float32)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2)]
    i = 4
    got = _grads(fused, {k: v.to(device) for k, v in tensors.items()}, i, guided, rescale,
                 [w.to(device) for w in weights])  # fmt: skip
    ref64 = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    want = _grads(ref, ref64, i, guided, rescale, weights)
    for k in want:
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k].double().cpu(), want[k], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["ddpm_learned_range", "euler_a"])
def test_kernel_gradients_with_in_kernel_noise(name, device):
    """The backward recomputes the Philox noise (it scales the learned-variance gradient)."""
    fused, ref = SAMPLERS[name](backend="triton"), SAMPLERS[name](backend="reference")
    tensors = _inputs(fused, False, torch.float32)
    del tensors["noise"]
    seeds = seeds_from(3, SHAPE[0], device)
    weights = [torch.ones(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)]
    got = _grads(fused, {k: v.to(device) for k, v in tensors.items()}, 2, False, 0.0,
                 [w.to(device) for w in weights], seeds=seeds)  # fmt: skip
    ref64 = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    want = _grads(ref, ref64, 2, False, 0.0, weights, seeds=seeds.cpu())
    for k in want:
        torch.testing.assert_close(got[k].double().cpu(), want[k], **TOLERANCES[torch.float32])


def test_gradients_of_one_output_and_into_out(device):
    """Only x0 used (no gradient for x_next), and a step written into out=: still the
    reference's gradients."""
    fused, ref = DDIMSampler(SCHEDULE, 10, backend="triton"), DDIMSampler(SCHEDULE, 10)
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    m = torch.randn(SHAPE, device=device)
    (gx,) = torch.autograd.grad(fused.step(x, m, 3).pred_original_sample.sum(), [x])
    (want,) = torch.autograd.grad(ref.step(x, m, 3).pred_original_sample.sum(), [x])
    torch.testing.assert_close(gx, want, **TOLERANCES[torch.float32])
    out = torch.empty_like(x)
    got = fused.step(x, m, 3, out=out)
    assert got.prev_sample.data_ptr() == out.data_ptr() and got.prev_sample.requires_grad
    (gx,) = torch.autograd.grad(got.prev_sample.sum(), [x])
    (want,) = torch.autograd.grad(ref.step(x, m, 3).prev_sample.sum(), [x])
    torch.testing.assert_close(gx, want, **TOLERANCES[torch.float32])


def test_no_grad_path_is_the_plain_launch(device, monkeypatch):
    """Without grad (nothing requires it, or torch.no_grad) the step does not go through
    the autograd Function: the same single launch as before."""
    import fastdiff.kernels.fused_step as fs

    def refuse(*args):
        raise AssertionError("the autograd Function ran")

    monkeypatch.setattr(fs._FusedStep, "apply", refuse)
    sampler = DDIMSampler(SCHEDULE, 10, backend="triton")
    x = torch.randn(SHAPE, device=device)
    out = sampler.step(x, torch.randn_like(x), 3)
    assert out.prev_sample.grad_fn is None
    with torch.no_grad():
        out = sampler.step(x.requires_grad_(), torch.randn_like(x), 3)
    assert out.prev_sample.grad_fn is None

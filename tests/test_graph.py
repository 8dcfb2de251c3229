"""fastdiff.graph: the sampling loop captured as a CUDA graph and replayed.

On the CPU: argument errors, the clear error for cuda_graph=True without CUDA, and the
whole capture / verify / replay control flow run through an eager stand-in for the CUDA
runtime (``graph_fakes.EagerRuntime``: its "capture" runs the step's Python once on a copy
of the state, its "replay" runs the step again), which must give exactly the eager loop's
samples. On a GPU (marker ``gpu``): real captures, bitwise equal to the eager loop, and the
errors for models that cannot be captured. Comparisons are exact (torch.equal): the graph
runs the same kernels on the same values as the eager loop.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import random_mixture
from graph_fakes import EagerRuntime, TinyMLP

from fastdiff import capture, philox
from fastdiff.graph import GraphCaptureError, SamplingGraph
from fastdiff.samplers import SAMPLERS, DPMSolverPP2MSampler
from fastdiff.sampling import guidance_pair, sample
from fastdiff.schedules import NoiseSchedule

try:
    from fastdiff.diffusers.graph import DenoisingLoopGraph, capture_denoising_loop
except ImportError:  # no diffusers
    DenoisingLoopGraph = capture_denoising_loop = None
needs_diffusers = pytest.mark.skipif(DenoisingLoopGraph is None, reason="needs diffusers")

SCHEDULE = NoiseSchedule.create("linear", 1000)
HAS_CUDA = torch.cuda.is_available()
D = 3

GMM = random_mixture(seed=7, dim=D)
MODEL = GMM.denoiser(SCHEDULE)
GUIDED_MODEL = guidance_pair(MODEL, GMM.denoiser(SCHEDULE, component=1))


@pytest.fixture
def eager_runtime(monkeypatch):
    """Routes every graph through the eager stand-in runtime (CPU tensors allowed), by
    replacing the documented runtime factory ``fastdiff.capture.make_runtime``."""
    runtimes = []

    def make(device):
        runtime = EagerRuntime(device)
        runtimes.append(runtime)
        return runtime

    monkeypatch.setattr(capture, "make_runtime", make)
    return runtimes


def _sampler(name, steps=7, backend="reference", **kwargs):
    return SAMPLERS[name](SCHEDULE, steps, backend=backend, **kwargs)


# -- CPU: errors ---------------------------------------------------------------------------------


def test_cuda_graph_on_the_cpu_is_a_clear_error():
    sampler = _sampler("ddim")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sample(MODEL, sampler, shape=(2, D), device="cpu", cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="CUDA device"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu")


@needs_diffusers
def test_denoising_loop_on_the_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA device"):
        capture_denoising_loop(lambda x, t: x, torch.zeros(2, D), [3, 2, 1])


def test_argument_errors(eager_runtime):
    sampler = _sampler("ddpm")
    with pytest.raises(TypeError, match="model"):
        SamplingGraph("not a model", sampler, (2, D), device="cpu")
    with pytest.raises(TypeError, match="sampler"):
        SamplingGraph(MODEL, object(), (2, D), device="cpu")
    with pytest.raises(TypeError, match="cond_fn"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu", cond_fn=3)
    with pytest.raises(ValueError, match="shape"):
        SamplingGraph(MODEL, sampler, (0, D), device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu", dtype=torch.int32)
    with pytest.raises(ValueError, match="steps_per_graph"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu", steps_per_graph=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu", warmup_steps=0)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        SamplingGraph(MODEL, sampler, (2, D), device="cpu", guidance_rescale=0.5)
    g = SamplingGraph(MODEL, sampler, (2, D), device="cpu", steps_per_graph=2)
    seeds = philox.seeds_from(0, 2)
    with pytest.raises(ValueError, match="shape"):
        g.run(torch.zeros(3, D), seeds)
    with pytest.raises(ValueError, match="adds noise: pass seeds"):
        g.run(torch.zeros(2, D))
    with pytest.raises(ValueError, match="seeds"):
        g.run(torch.zeros(2, D), philox.seeds_from(0, 3))
    with pytest.raises(ValueError, match="start"):
        g.run(torch.zeros(2, D), seeds, start=7)
    with pytest.raises(ValueError, match="steps_per_graph=1"):
        g.run(torch.zeros(2, D), seeds, callback=lambda i, x, x0: None)


@needs_diffusers
def test_denoising_loop_argument_errors(eager_runtime):
    with pytest.raises(ValueError, match="timesteps"):
        DenoisingLoopGraph(lambda x, t: x, torch.zeros(2, D))
    with pytest.raises(TypeError, match="step_fn"):
        DenoisingLoopGraph(None, torch.zeros(2, D), [2, 1])
    loop = DenoisingLoopGraph(lambda x, t: x.double(), torch.zeros(2, D), [2, 1])
    with pytest.raises(ValueError, match="cast inside step_fn"):
        loop.run(torch.zeros(2, D))


def test_schedulers_that_cannot_be_replayed_are_refused():
    diffusers = pytest.importorskip("diffusers")

    latents = torch.zeros(1, 4, 8, 8)
    dpm = diffusers.DPMSolverMultistepScheduler()  # the fused one keeps it on the device
    dpm.set_timesteps(10)
    with pytest.raises(ValueError, match="multistep history in Python"):
        capture_denoising_loop(lambda x, t: x, latents, scheduler=dpm)
    plain = diffusers.EulerDiscreteScheduler()
    plain.set_timesteps(10)
    with pytest.raises(ValueError, match="Fused"):
        capture_denoising_loop(lambda x, t: x, latents, scheduler=plain)


# -- CPU: control flow through the eager stand-in --------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("guided", [False, True])
def test_graph_loop_equals_eager_loop(eager_runtime, name, guided):
    sampler = _sampler(name)
    model = GUIDED_MODEL if guided else MODEL
    kwargs = {"guidance_scale": 3.0} if guided else {}
    eager = sample(model, sampler, shape=(5, D), seed=4, progress=False, **kwargs)
    graphed = sample(
        model, sampler, shape=(5, D), seed=4, progress=False, cuda_graph=True, **kwargs
    )
    assert torch.equal(graphed, eager)
    runtime = eager_runtime[-1]
    # 2 warm-up steps, a capture, a verified replay, then one replay a step
    assert runtime.captures == 1 and runtime.replays == sampler.num_steps - 2


def test_whole_loop_in_one_graph(eager_runtime):
    sampler = _sampler("ddpm", steps=6)
    g = SamplingGraph(MODEL, sampler, (3, D), device="cpu", steps_per_graph=6)
    for seed in (1, 2):
        seeds = philox.seeds_from(seed, 3)
        x = philox.randn(seeds, 0, (3, D), stream=1)
        ref = sample(MODEL, sampler, shape=(3, D), seed=seed, progress=False, device="cpu")
        assert torch.equal(g.run(x, seeds), ref)
    assert eager_runtime[-1].captures == 1 and eager_runtime[-1].replays == 2


@pytest.mark.parametrize("steps_per_graph", [1, 2, 3])
def test_reused_graph_and_steps_per_graph(eager_runtime, steps_per_graph):
    sampler = _sampler("dpmpp_2m", steps=8)
    g = SamplingGraph(MODEL, sampler, (4, D), device="cpu", steps_per_graph=steps_per_graph)
    for seed in (1, 2, 3):
        seeds = philox.seeds_from(seed, 4)
        x = philox.randn(seeds, 0, (4, D), stream=1)
        assert torch.equal(
            g.run(x, seeds),
            sample(MODEL, sampler, shape=(4, D), seed=seed, progress=False, device="cpu"),
        )
    runtime = eager_runtime[-1]
    assert runtime.captures == 1 and g.captured
    # run 1: 2 warm-up steps, then (8 - 2) // k replays (the first one verified), tail eager
    per_run = 8 // steps_per_graph
    assert runtime.replays == (8 - 2) // steps_per_graph + 2 * per_run
    g.reset()
    assert not g.captured


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m", "euler_ancestral"])
def test_truncated_chain_callback_and_progress(eager_runtime, name, capsys):
    sampler = _sampler(name, steps=9)
    image = GMM.sample(4, torch.Generator().manual_seed(3)).float()
    seen = {True: [], False: []}

    def callback(graphed):
        def record(i, x, x0):
            seen[graphed].append((i, x.clone(), x0.clone()))

        return record

    out = {}
    for graphed in (False, True):
        out[graphed] = sample(
            MODEL,
            sampler,
            init_image=image,
            strength=0.6,
            seed=2,
            progress=graphed,
            callback=callback(graphed),
            cuda_graph=graphed,
        )
    assert torch.equal(out[True], out[False])
    assert [i for i, _, _ in seen[True]] == [i for i, _, _ in seen[False]] == list(range(4, 9))
    for (_, xa, x0a), (_, xb, x0b) in zip(seen[True], seen[False]):
        assert torch.equal(xa, xb) and torch.equal(x0a, x0b)
    assert type(sampler).__name__ in capsys.readouterr().err  # the graphed run's progress bar


def test_classifier_guidance_is_captured(eager_runtime):
    sampler = _sampler("ddpm", steps=6)

    def cond_fn(x, cond):
        return -0.1 * x  # a gradient pulling towards 0

    eager = sample(MODEL, sampler, shape=(3, D), seed=9, cond_fn=cond_fn, progress=False)
    graphed = sample(
        MODEL, sampler, shape=(3, D), seed=9, cond_fn=cond_fn, progress=False, cuda_graph=True
    )
    assert torch.equal(graphed, eager)
    plain = sample(MODEL, sampler, shape=(3, D), seed=9, progress=False)
    assert not torch.equal(graphed, plain)


def test_capture_failure_is_a_clear_error_and_cleans_up(eager_runtime):
    sampler = _sampler("ddim")

    def model(x, cond):
        if eager_runtime[-1].capturing:  # what CUDA says when a model syncs during a capture
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return MODEL(x, cond)

    g = SamplingGraph(model, sampler, (2, D), device="cpu")
    with pytest.raises(GraphCaptureError, match="operation not permitted") as info:
        g.run(torch.randn(2, D))
    message = str(info.value)
    assert "must be capturable" in message and ".item()" in message
    assert "cuda_graph=False" in message
    assert isinstance(info.value, RuntimeError)
    assert not g.captured


def test_model_with_python_state_is_caught_by_the_verification(eager_runtime):
    sampler = _sampler("ddim")
    calls = [0]

    def model(x, cond):  # output depends on a Python counter a graph would freeze
        calls[0] += 1
        return MODEL(x, cond) * (1.0 + 1e-3 * calls[0])

    with pytest.raises(GraphCaptureError, match="does not reproduce the eager step"):
        sample(model, sampler, shape=(2, D), seed=0, progress=False, cuda_graph=True)
    # without the check it runs (what a real graph would then silently get wrong)
    g = SamplingGraph(model, sampler, (2, D), device="cpu", verify=False)
    assert g.run(torch.randn(2, D)).shape == (2, D)


class WritesBeforeReads(DPMSolverPP2MSampler):
    """A step that writes ``x0_out`` before it reads ``x0_prev``: correct with separate
    buffers, wrong when they alias (the kind of bug the graph's in-place step would hide)."""

    def step(self, x, model_output, i, *, x0_prev=None, out=None, x0_out=None, **kwargs):
        if x0_prev is not None and x0_out is not None:
            early = super().step(x, model_output, i, x0_prev=x0_prev, **kwargs)
            x0_out.copy_(early.pred_original_sample)  # clobbers x0_prev when they alias
        return super().step(x, model_output, i, x0_prev=x0_prev, out=out, x0_out=x0_out, **kwargs)


def test_verification_compares_against_an_unaliased_step(eager_runtime):
    sampler = WritesBeforeReads(SCHEDULE, 7, backend="reference")
    eager = sample(MODEL, sampler, shape=(3, D), seed=1, progress=False, device="cpu")
    assert torch.equal(
        eager, sample(MODEL, _sampler("dpmpp_2m"), shape=(3, D), seed=1, device="cpu")
    )
    # The captured step runs in place (x0_out is x0_prev): the check must see the difference.
    with pytest.raises(GraphCaptureError, match="aliases"):
        sample(MODEL, sampler, shape=(3, D), seed=1, progress=False, cuda_graph=True, device="cpu")
    g = SamplingGraph(MODEL, sampler, (3, D), device="cpu", verify=False)
    seeds = philox.seeds_from(1, 3)
    assert not torch.equal(g.run(philox.randn(seeds, 0, (3, D), stream=1), seeds), eager)


def test_verification_catches_draws_from_torch_rng(eager_runtime):
    def model(x, cond):  # draws from torch's generator (the draw does not change the output)
        return MODEL(x, cond) + 0.0 * torch.randn_like(x)

    with pytest.raises(GraphCaptureError, match="random numbers from torch's generators"):
        sample(model, _sampler("ddim"), shape=(2, D), progress=False, cuda_graph=True)


def test_runtime_argument_and_static_result():
    runtime = EagerRuntime(torch.device("cpu"))
    sampler = _sampler("euler_ancestral")
    g = SamplingGraph(MODEL, sampler, (2, D), device="cpu", runtime=runtime)
    seeds = philox.seeds_from(3, 2)
    x = philox.randn(seeds, 0, (2, D), stream=1)
    static = g.run(x, seeds, copy=False)
    assert static is g.x and runtime.captures == 1
    assert torch.equal(
        static, sample(MODEL, sampler, shape=(2, D), seed=3, progress=False, device="cpu")
    )
    fresh = g.run(x, seeds)
    assert fresh is not g.x and torch.equal(fresh, static)
    # replay() alone: one more step of the chain on the buffers, nothing reset
    g.x.copy_(x)
    g.counter.zero_()
    g.replay()
    ref = sample(MODEL, _sampler("euler_ancestral", steps=7), x=x, seeds=seeds, progress=False)
    assert int(g.counter) == 1 and not torch.equal(g.x, x) and ref.shape == g.x.shape


@needs_diffusers
def test_denoising_loop_names_stay_importable_from_fastdiff_graph():
    import fastdiff.graph
    from fastdiff.diffusers import graph as diffusers_graph

    assert fastdiff.graph.capture_denoising_loop is diffusers_graph.capture_denoising_loop
    assert fastdiff.graph.DenoisingLoopGraph is diffusers_graph.DenoisingLoopGraph
    with pytest.raises(AttributeError):
        fastdiff.graph.no_such_name  # noqa: B018
    code = "import sys, fastdiff.graph; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_diffusers
def test_scheduler_hooks_decide_and_prepare(eager_runtime):
    from fastdiff.diffusers import (
        FusedDDIMScheduler,
        FusedDDPMScheduler,
        FusedEulerAncestralDiscreteScheduler,
        FusedEulerDiscreteScheduler,
    )

    latents = torch.zeros(1, 4, 5, 5)
    for cls in (FusedDDPMScheduler, FusedEulerAncestralDiscreteScheduler):
        scheduler = cls(noise="philox")
        scheduler.set_timesteps(5)
        scheduler.check_capturable()  # in-kernel Philox noise (the opt-in)
        scheduler.noise = "torch"  # noise from torch's generator (the default): refused
        with pytest.raises(ValueError, match="torch's random generator"):
            capture_denoising_loop(lambda x, t: x, latents, scheduler=scheduler)
    for cls in (FusedDDIMScheduler, FusedEulerDiscreteScheduler):
        scheduler = cls()  # deterministic: the noise source does not matter
        scheduler.set_timesteps(5)
        scheduler.check_capturable()
    euler = FusedEulerDiscreteScheduler()
    euler.set_timesteps(5)
    euler.set_begin_index(2)
    with pytest.raises(ValueError, match="begin_index"):
        capture_denoising_loop(lambda x, t: x, latents, scheduler=euler)
    euler = FusedEulerDiscreteScheduler()
    euler.set_timesteps(5)
    euler.scale_model_input(latents, euler.timesteps[0])
    assert euler.step_index == 0
    euler.prepare_graph_step()
    assert euler.step_index is None  # looked up again from the next timestep

    class Custom:  # any object with the hooks takes part
        def __init__(self):
            self.prepared = 0

        def check_capturable(self):
            pass

        def prepare_graph_step(self, step_index):
            assert step_index is None  # a plan of its own: no step index to give
            self.prepared += 1

    custom = Custom()
    loop = capture_denoising_loop(lambda x, t: x + 1, latents, [3, 2, 1, 0], scheduler=custom)
    assert torch.equal(loop.run(latents), latents + 4)
    # before every iteration's Python: 2 warm-ups, the capture, the check's reference and the
    # stand-in's 2 replays (the verified one and the last step)
    assert custom.prepared == 2 + 1 + 1 + 2


@needs_diffusers
def test_denoising_loop_equals_eager_loop(eager_runtime):
    timesteps = torch.tensor([900, 700, 500, 300, 100])
    weights = torch.randn(D, D, dtype=torch.float64) * 0.1

    def step_fn(latents, t):
        return latents * 0.9 + (latents @ weights) * (t.double() / 1000)

    x = torch.randn(3, D, dtype=torch.float64)
    eager = x.clone()
    for t in timesteps:
        eager = step_fn(eager, t)
    loop = capture_denoising_loop(step_fn, x, timesteps)
    assert torch.equal(loop.run(x), eager)
    assert torch.equal(loop.run(x), eager)  # replayed only
    assert eager_runtime[-1].captures == 1 and loop.captured


LOOP_SCHEDULERS = {
    "ddim": ("FusedDDIMScheduler", {}),
    "euler": ("FusedEulerDiscreteScheduler", {}),
    "euler_a": ("FusedEulerAncestralDiscreteScheduler", {"noise": "philox"}),
    "dpm": ("FusedDPMSolverMultistepScheduler", {}),
    "unipc": ("FusedUniPCMultistepScheduler", {}),
    "flow": ("FusedFlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "heun": ("FusedHeunDiscreteScheduler", {}),
    "euler_churn": ("FusedEulerDiscreteScheduler", {"noise": "philox"}),
}


STEP_KWARGS = {"euler_churn": {"s_churn": 2.0}}


@pytest.mark.parametrize("plan", ["own", "slice"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(LOOP_SCHEDULERS))
def test_fused_schedulers_in_a_denoising_loop(as_device, device, name, backend, plan):
    """The graphed loop is the eager loop, over the scheduler's own plan (its step index is
    the loop's counter, advanced by the loop alone) and over a slice of it (the step index
    looked up on the device from each timestep; eager: from the first, as diffusers' img2img
    loop). The graph's timestep reads as a device tensor (no host value), as on a card."""
    pytest.importorskip("diffusers")
    from fastdiff import diffusers as fused

    cls_name, options = LOOP_SCHEDULERS[name]
    scheduler = getattr(fused, cls_name)(backend=backend, **options)
    x = torch.randn(2, 4, 5, 5, device=device)
    indices = []

    def step_fn(latents, t):
        model_input = scheduler.scale_model_input(latents, t)
        eps = torch.tanh(model_input) * (t.float() / 1000.0 + 0.5)
        out = scheduler.step(eps, t, latents, **STEP_KWARGS.get(name, {})).prev_sample
        indices.append(getattr(scheduler, "step_index", None))
        return out

    torch.manual_seed(1)  # Euler a's Philox seed, drawn at its first step after set_timesteps
    scheduler.set_timesteps(6, device=device)
    timesteps = scheduler.timesteps if plan == "own" else scheduler.timesteps[2:]
    eager = x.clone()
    for t in timesteps:
        eager = step_fn(eager, t)
    torch.manual_seed(1)
    scheduler.set_timesteps(6, device=device)
    loop = capture_denoising_loop(
        step_fn, x, None if plan == "own" else timesteps, scheduler=scheduler
    )
    indices.clear()
    assert torch.equal(loop.run(x), eager), name
    if plan == "own" and name != "ddim":  # DDIM's row is the timestep: no step index
        assert all(index is loop.counter for index in indices)


# -- GPU -----------------------------------------------------------------------------------------


class SmallNet(torch.nn.Module):
    """A small conv net conditioned on the timestep: stands in for a UNet."""

    def __init__(self, channels: int = 4, width: int = 32) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.emb = torch.nn.Linear(1, width)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, cond):
        h = self.inp(x) + self.emb(cond.to(x.dtype)[:, None] / 1000)[:, :, None, None]
        h = self.mid(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return SmallNet().to("cuda", dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("guided", [False, True])
def test_gpu_graph_equals_eager(name, dtype, guided):
    sampler = SAMPLERS[name](SCHEDULE, 10)
    net = _net(dtype)
    kwargs = {"guidance_scale": 4.0, "guidance_rescale": 0.5} if guided else {}
    shape = (3, 4, 16, 16)
    with torch.no_grad():
        eager = sample(net, sampler, shape=shape, seed=1, dtype=dtype, progress=False, **kwargs)
        graphed = sample(
            net,
            sampler,
            shape=shape,
            seed=1,
            dtype=dtype,
            progress=False,
            cuda_graph=True,
            **kwargs,
        )
    torch.cuda.synchronize()
    assert graphed.is_cuda and graphed.dtype == dtype and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
def test_gpu_exact_model_truncated_multistep_and_reuse():
    model = GMM.denoiser(SCHEDULE, "v_prediction")
    sampler = SAMPLERS["dpmpp_2m"](SCHEDULE, 12, prediction_type="v_prediction")
    image = GMM.sample(64, torch.Generator().manual_seed(0)).float().cuda()
    eager = sample(model, sampler, init_image=image, strength=0.5, seed=3, progress=False)
    graphed = sample(
        model, sampler, init_image=image, strength=0.5, seed=3, progress=False, cuda_graph=True
    )
    assert torch.equal(graphed, eager)
    g = SamplingGraph(model, sampler, (64, D), device="cuda", steps_per_graph=4)
    for seed in (5, 6):
        seeds = philox.seeds_from(seed, 64, "cuda")
        x = philox.randn(seeds, 0, (64, D), stream=1)
        ref = sample(model, sampler, shape=(64, D), seed=seed, device="cuda", progress=False)
        assert torch.equal(g.run(x, seeds), ref)
    assert g.captured


@pytest.mark.gpu
def test_gpu_uncapturable_models_give_clear_errors_and_leave_cuda_usable():
    sampler = SAMPLERS["ddim"](SCHEDULE, 8)
    net = _net()

    def syncs(x, cond):
        scale = float(cond[0].item())  # a host sync: not capturable
        return net(x, cond) * (1 + scale * 0)

    calls = [0]

    def cpu_tensor(x, cond):
        calls[0] += 1
        bias = torch.tensor([0.5 * calls[0]]).to(x.device)  # a host-to-device copy a call
        return net(x, cond) + bias

    shape = (2, 4, 8, 8)
    with torch.no_grad():
        for bad in (syncs, cpu_tensor):
            # refused by CUDA during the capture (or, should a copy get recorded, by the check
            # that the replay reproduces the eager step)
            with pytest.raises(GraphCaptureError, match="cuda_graph=False"):
                sample(bad, sampler, shape=shape, seed=0, progress=False, cuda_graph=True)
            assert torch.cuda.current_stream() == torch.cuda.default_stream()
        # the device still works: random numbers, eager sampling and a new capture
        assert torch.isfinite(torch.randn(16, device="cuda")).all()
        eager = sample(net, sampler, shape=shape, seed=0, progress=False)
        graphed = sample(net, sampler, shape=shape, seed=0, progress=False, cuda_graph=True)
    torch.cuda.synchronize()
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
def test_gpu_python_state_is_caught():
    sampler = SAMPLERS["euler"](SCHEDULE, 8)
    net = _net()
    calls = [0]

    def counting(x, cond):
        calls[0] += 1
        return net(x, cond) * (1.0 + 0.01 * calls[0])  # frozen at its captured value in a graph

    with torch.no_grad(), pytest.raises(GraphCaptureError, match="does not reproduce"):
        sample(counting, sampler, shape=(2, 4, 8, 8), seed=0, progress=False, cuda_graph=True)


def _philox_noise(scheduler):
    """The scheduler with in-kernel Philox step noise, what a graphed loop needs (the
    drop-ins' opt-in: ``noise="philox"``)."""
    scheduler.noise = "philox"
    return scheduler


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler_name", ["ddim", "ddpm", "euler", "euler_ancestral"])
def test_gpu_diffusers_unet_loop_equals_eager(scheduler_name):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import (
        FusedDDIMScheduler,
        FusedDDPMScheduler,
        FusedEulerAncestralDiscreteScheduler,
        FusedEulerDiscreteScheduler,
    )

    cls = {
        "ddim": FusedDDIMScheduler,
        "ddpm": FusedDDPMScheduler,
        "euler": FusedEulerDiscreteScheduler,
        "euler_ancestral": FusedEulerAncestralDiscreteScheduler,
    }[scheduler_name]
    torch.manual_seed(0)
    unet = (
        diffusers.UNet2DModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
        )
        .to("cuda", torch.float16)
        .eval()
    )
    scheduler = _philox_noise(cls())

    def step_fn(latents, t):
        model_input = scheduler.scale_model_input(latents, t)
        eps = unet(model_input, t).sample
        return scheduler.step(eps, t, latents).prev_sample

    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.manual_seed(1)  # the in-kernel noise seed comes from the global RNG
        scheduler.set_timesteps(10, device="cuda")
        eager = x.clone()
        for t in scheduler.timesteps:
            eager = step_fn(eager, t)
        torch.manual_seed(1)
        scheduler.set_timesteps(10, device="cuda")
        loop = capture_denoising_loop(step_fn, x, scheduler=scheduler)
        graphed = loop.run(x)
    torch.cuda.synchronize()
    assert loop.captured and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
def test_gpu_euler_scale_model_input_same_for_host_and_device_index(name, dtype):
    # The eager loop (`for t in scheduler.timesteps`) finds the step index on the host; a
    # graphed loop (prepare_graph_step, a fresh device timestep) finds it on the device.
    # Both must scale the model input with the same arithmetic, bit for bit.
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import (
        FusedEulerAncestralDiscreteScheduler,
        FusedEulerDiscreteScheduler,
    )

    cls = FusedEulerDiscreteScheduler if name == "euler" else FusedEulerAncestralDiscreteScheduler
    scheduler = cls()
    scheduler.set_timesteps(10, device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=dtype) * 14
    for k, t in enumerate(scheduler.timesteps):
        scheduler.prepare_graph_step()
        on_host = scheduler.scale_model_input(x, t)
        scheduler.prepare_graph_step()
        t_device = torch.take(scheduler.timesteps, torch.tensor(k, device="cuda"))
        on_device = scheduler.scale_model_input(x, t_device)
        assert torch.equal(on_host, on_device), k


@pytest.mark.gpu
def test_gpu_channels_last_graph():
    sampler = SAMPLERS["dpmpp_2m"](SCHEDULE, 8)
    net = _net().to(memory_format=torch.channels_last)
    seeds = philox.seeds_from(2, 3, "cuda")
    noise = philox.randn(seeds, 0, (3, 4, 16, 16), stream=1)
    with torch.no_grad():
        for x in (noise, noise.contiguous(memory_format=torch.channels_last)):
            eager = sample(net, sampler, x=x, seeds=seeds, progress=False)
            graphed = sample(net, sampler, x=x, seeds=seeds, progress=False, cuda_graph=True)
            assert torch.equal(graphed, eager)
        g = SamplingGraph(net, sampler, (3, 4, 16, 16), memory_format=torch.channels_last)
        assert g.x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(g.run(noise, seeds), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m"])
def test_gpu_torch_compiled_model_in_a_graph(mode, name):
    # The user compiles; fastdiff's warm-up (on the graph's side stream) compiles and
    # autotunes before the capture. The graph comes first here, so the model is compiled
    # inside it; the eager loop then reuses the compiled model and must agree bitwise.
    torch.compiler.reset()
    torch.manual_seed(0)
    net = TinyMLP().cuda().eval()
    compiled = torch.compile(net, mode=mode)
    sampler = SAMPLERS[name](SCHEDULE, 8)
    shape = (4, 64)
    with torch.no_grad():
        graphed = sample(compiled, sampler, shape=shape, seed=5, progress=False, cuda_graph=True)
        eager = sample(compiled, sampler, shape=shape, seed=5, progress=False)
        assert torch.equal(graphed, eager)
        g = SamplingGraph(compiled, sampler, shape, steps_per_graph=4, guidance_scale=2.0)
        seeds = philox.seeds_from(6, 4, "cuda")
        x = philox.randn(seeds, 0, shape, stream=1)
        ref = sample(compiled, sampler, x=x, seeds=seeds, guidance_scale=2.0, progress=False)
        assert torch.equal(g.run(x, seeds), ref) and torch.equal(g.run(x, seeds), ref)
    assert g.captured and torch.isfinite(ref).all()
    torch.compiler.reset()

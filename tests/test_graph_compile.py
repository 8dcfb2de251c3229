"""torch.compile'd models in SamplingGraph, sample(cuda_graph=True) and capture_denoising_loop:
CPU tests of the checks and of the control flow (an eager stand-in runtime, dynamo with a
counting backend), and GPU tests that a compiled model in a graph gives the eager compiled
model's samples."""

from __future__ import annotations

import functools

import pytest
import torch
from graph_fakes import EagerRuntime, TinyMLP

from fastdiff import capture, philox
from fastdiff.capture import COMPILED_GRAPHS_HELP, GraphCaptureError, check_graphable
from fastdiff.graph import SamplingGraph
from fastdiff.samplers import SAMPLERS
from fastdiff.sampling import sample
from fastdiff.schedules import NoiseSchedule

try:
    from fastdiff.diffusers.graph import DenoisingLoopGraph
except ImportError:  # diffusers not installed
    DenoisingLoopGraph = None

SCHEDULE = NoiseSchedule.create("linear", 1000)
D = 8


def _net() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(D, 32).eval()


@pytest.fixture
def eager_runtime(monkeypatch):
    """Every graph through the eager stand-in runtime (``fastdiff.capture.make_runtime``)."""
    runtimes = []

    def make(device):
        runtimes.append(EagerRuntime(device))
        return runtimes[-1]

    monkeypatch.setattr(capture, "make_runtime", make)
    return runtimes


# -- CPU: what is refused, and where -------------------------------------------------------

OWN_GRAPHS = [
    {"mode": "reduce-overhead"},
    {"mode": "max-autotune"},
    {"options": {"triton.cudagraphs": True}},
]
NO_OWN_GRAPHS = [
    {},
    {"mode": "default"},
    {"mode": "max-autotune-no-cudagraphs"},
    {"dynamic": False},
]

COMPILED_UNET = None  # a global that a wrapper function names (set in the test)


def _calls_global(x, cond):
    return COMPILED_UNET(x, cond)


@pytest.mark.parametrize("kwargs", OWN_GRAPHS, ids=lambda k: str(k))
def test_a_model_compiled_with_its_own_cuda_graphs_is_refused(kwargs, monkeypatch):
    # torch.compile is lazy: nothing compiles here, the config alone is read.
    compiled = torch.compile(_net(), **kwargs)
    compiled_fn = torch.compile(lambda x, cond: x, **kwargs)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = compiled

        def forward(self, x, cond):
            return self.unet(x, cond)

    monkeypatch.setitem(globals(), "COMPILED_UNET", compiled)
    found = [
        compiled,  # the compiled module itself
        compiled_fn,  # a compiled function
        lambda x, cond: compiled(x, cond) * 2,  # a closure over it
        _calls_global,  # a function naming a global
        functools.partial(lambda m, x, cond: m(x, cond), compiled),
        Wrapper(),  # a module holding it
        Wrapper().forward,  # a bound method
    ]
    for model in found:
        with pytest.raises(ValueError, match="model .*CUDA graphs of its own") as info:
            check_graphable(model)
        assert "max-autotune-no-cudagraphs" in str(info.value)
        assert "cuda_graph=False" in str(info.value)
    with pytest.raises(ValueError, match="^cond_fn"):
        check_graphable(found[2], "cond_fn")


@pytest.mark.parametrize("kwargs", NO_OWN_GRAPHS, ids=lambda k: str(k))
def test_a_model_compiled_without_cuda_graphs_passes(kwargs):
    compiled = torch.compile(_net(), **kwargs)
    wrapped = lambda x, cond: compiled(x, cond)  # noqa: E731
    for model in (compiled, wrapped, _net(), torch.compile(_net().forward)):
        check_graphable(model)  # no error
    check_graphable(torch.compile(_net(), backend="eager"))


def test_graphs_refuse_it_at_construction(eager_runtime):
    compiled = torch.compile(_net(), mode="reduce-overhead")
    sampler = SAMPLERS["ddim"](SCHEDULE, 4, backend="reference")
    with pytest.raises(ValueError, match="^model is torch.compile'd"):
        SamplingGraph(compiled, sampler, (2, D), device="cpu")
    with pytest.raises(ValueError, match="^cond_fn is torch.compile'd"):
        SamplingGraph(_net(), SAMPLERS["ddpm"](SCHEDULE, 4), (2, D), device="cpu", cond_fn=compiled)
    with pytest.raises(ValueError, match="^model is torch.compile'd"):
        sample(compiled, sampler, shape=(2, D), device="cpu", cuda_graph=True, progress=False)
    assert not eager_runtime  # refused before any runtime was made
    # The eager loop takes it: reduce-overhead's own graphs are its business there.
    plain = sample(_net(), sampler, shape=(2, D), device="cpu", seed=1, progress=False)
    assert plain.shape == (2, D)


@pytest.mark.skipif(DenoisingLoopGraph is None, reason="needs diffusers")
def test_denoising_loop_refuses_it_at_construction(eager_runtime):
    compiled = torch.compile(_net(), mode="reduce-overhead")

    def step_fn(latents, t):
        return latents - 0.01 * compiled(latents, t.reshape(1).expand(latents.shape[0]))

    with pytest.raises(ValueError, match="^step_fn calls OptimizedModule, which is torch"):
        DenoisingLoopGraph(step_fn, torch.zeros(2, D), [3, 2, 1])
    assert not eager_runtime


def test_a_capture_failing_in_compiled_graph_code_says_so(eager_runtime):
    # A compiled model hidden where the check cannot see it fails in the capture; an error
    # raised from CUDA-graph code (inductor's cudagraph_trees) gets the compile advice.
    namespace: dict = {}
    code = "def record(runtime):\n    if runtime.capturing:\n        raise RuntimeError('nested')\n"
    exec(compile(code, "/torch/_inductor/cudagraph_trees.py", "exec"), namespace)
    net = _net()

    class Hidden:
        def __call__(self, x, cond):
            namespace["record"](eager_runtime[-1])
            return net(x, cond)

    sampler = SAMPLERS["ddim"](SCHEDULE, 4, backend="reference")
    g = SamplingGraph(Hidden(), sampler, (2, D), device="cpu")
    with pytest.raises(GraphCaptureError, match="nested") as info:
        g.run(torch.randn(2, D))
    assert COMPILED_GRAPHS_HELP in str(info.value)
    assert not g.captured


# -- CPU: a compiled model through the loops ------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_compiled_model_compiles_once_and_is_graphed_bitwise(name, eager_runtime):
    # dynamo with a backend that counts its compilations (inductor would take a minute on this
    # CPU; the GPU tests below use it): the model compiles once, in the warm-up, and the
    # capture, the verification, the replays and the eager loop all reuse that compilation
    # (the conditioning is the same kind of tensor in each).
    torch.compiler.reset()
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(tuple(t.shape for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    net = _net()
    compiled = torch.compile(net, backend=counting, dynamic=False)
    sampler = SAMPLERS[name](SCHEDULE, 6, backend="reference")
    with torch.no_grad():
        run = dict(shape=(3, D), seed=2, device="cpu", progress=False)
        graphed = sample(compiled, sampler, cuda_graph=True, **run)
        assert len(compiles) == 1 and eager_runtime[-1].captures == 1
        eager = sample(compiled, sampler, **run)
        plain = sample(net, sampler, **run)
        g = SamplingGraph(compiled, sampler, (3, D), device="cpu", steps_per_graph=2)
        seeds = philox.seeds_from(2, 3)
        again = g.run(philox.randn(seeds, 0, (3, D), stream=1), seeds)
    assert len(compiles) == 1, compiles
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    torch.testing.assert_close(eager, plain)  # the same ops, traced
    torch.compiler.reset()


# -- GPU ----------------------------------------------------------------------------------------


class TinyConvNet(torch.nn.Module):
    """A small conv denoiser on [B, 4, 16, 16] (convolutions, group norm, a timestep MLP):
    the kernels inductor generates and autotunes for a UNet, at a test's size."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(4, width, 3, padding=1)
        self.emb = torch.nn.Linear(1, width)
        self.norm = torch.nn.GroupNorm(8, width)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, x, cond):
        h = self.inp(x) + self.emb(cond.to(x.dtype)[:, None] / 1000)[:, :, None, None]
        h = self.mid(torch.nn.functional.silu(self.norm(h)))
        return self.out(torch.nn.functional.silu(h))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_compiled_conv_model_in_a_graph_is_bitwise_the_eager_compiled_model(mode, dtype):
    # Bitwise: a replay launches the kernels the compiled model launched in the warm-up, with
    # the same inputs (the model compiles once, at the captured shapes, before the capture;
    # autotuning, when it runs, picks its kernels then), so no tolerance is needed.
    torch.compiler.reset()
    torch.manual_seed(0)
    net = TinyConvNet().cuda().to(dtype).eval()
    compiled = torch.compile(net, mode=mode, dynamic=False)
    shape = (2, 4, 16, 16)
    for name, guidance in (("ddim", None), ("dpmpp_2m", 3.0), ("euler_ancestral", 2.0)):
        sampler = SAMPLERS[name](SCHEDULE, 6)
        seeds = philox.seeds_from(3, 2, "cuda")
        x = philox.randn(seeds, 0, shape, stream=1).to(dtype)
        with torch.no_grad():
            g = SamplingGraph(compiled, sampler, shape, dtype=dtype, guidance_scale=guidance)
            graphed = g.run(x, seeds)
            eager = sample(
                compiled,
                sampler,
                x=x,
                seeds=seeds,
                dtype=dtype,
                guidance_scale=guidance,
                progress=False,
            )
            assert g.captured and torch.equal(graphed, eager), name
            assert torch.equal(g.run(x, seeds), eager), name  # a second run only replays
            via_sample = sample(
                compiled,
                sampler,
                x=x,
                seeds=seeds,
                dtype=dtype,
                guidance_scale=guidance,
                cuda_graph=True,
                progress=False,
            )
            assert torch.equal(via_sample, eager), name
        assert torch.isfinite(eager).all()
    torch.compiler.reset()


@pytest.mark.gpu
def test_gpu_reduce_overhead_is_refused_and_runs_eagerly():
    torch.compiler.reset()
    net = TinyConvNet().cuda().eval()
    compiled = torch.compile(net, mode="reduce-overhead")
    sampler = SAMPLERS["ddim"](SCHEDULE, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="^model is torch.compile'd"):
            sample(compiled, sampler, shape=(2, 4, 16, 16), seed=0, cuda_graph=True)
        x = sample(compiled, sampler, shape=(2, 4, 16, 16), seed=0, progress=False)
    assert torch.isfinite(x).all()
    torch.compiler.reset()

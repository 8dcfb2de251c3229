"""Whole sampling loops as CUDA graphs (fastdiff.graph, fastdiff.diffusers.graph) against
eager loops.

Two suites (CUDA only; without CUDA only ``test_models_smoke`` runs, a one-pass check that
the benchmark's models and loops work, on tiny sizes):

* ``test_graph_step`` — the sampler's own per-step cost inside a captured graph: a trivial
  model (it returns a preallocated tensor: no kernel of its own), 50 steps, per shape /
  dtype. Each step is then the conditioning gather, the fused step and the counter
  increment. Implementations: ``eager`` (``fastdiff.sample``'s Python loop), ``graph``
  (``SamplingGraph``, one replay a step), ``graph-x50`` (all 50 steps in one graph).
  ``extra_info``: ``us_per_step`` (median wall of a whole 50-step run, synchronized, / 50),
  ``replay_us_per_step`` (CUDA events around the replays alone), ``kernel_us`` (one fused
  step alone, ``do_bench``) and ``overhead_us_per_step = replay_us_per_step - kernel_us``.
* ``test_end_to_end`` — 50 DDIM steps at batch 1, float16, with a small diffusers
  ``UNet2DModel`` (35.7M parameters, 4x64x64 latents) and a small DiT-like transformer
  written here (``SmallDiT``: patch 2 over 4x32x32 latents, 256 tokens, width 384, 12
  adaLN-zero blocks, 6 heads, sinusoidal timestep embedding; ~33M parameters, DiT-S/2's
  shape). Implementations: ``diffusers-eager`` (diffusers' DDIMScheduler in the usual
  loop), ``fused-scheduler-eager`` (fastdiff.diffusers.FusedDDIMScheduler in that loop),
  ``fastdiff-eager`` (``fastdiff.sample``), ``fastdiff-graph`` (a ``SamplingGraph``
  captured once, timed per run), ``fastdiff-graph-oneshot`` (``sample(cuda_graph=True)``,
  capture included), ``fused-scheduler-graph`` (``capture_denoising_loop`` around the
  FusedDDIMScheduler loop). ``extra_info``: ``us_per_step``, ``params_m``.
* ``test_expert_baseline`` — against what an expert does today, fp16, batch 1: the UNet and
  the DiT at 50 DDIM steps, and ``flux`` (``FluxLatents``: a 70.8M-parameter diffusers
  ``FluxTransformer2DModel``, 16x64x64 latents packed 2x2 into 1024 tokens of 64) at 4 flow
  Euler steps, shift 3 (diffusers' ``FlowMatchEulerDiscreteScheduler`` / fastdiff's
  ``FusedFlowMatchEulerDiscreteScheduler`` / ``FlowMatchEulerSampler``). Rows
  (``EXPERT_IMPLS``): ``diffusers-compiled-ro`` (the expert baseline: diffusers' scheduler,
  the net under ``torch.compile(net, mode="reduce-overhead")``), ``diffusers-eager``,
  ``fused-scheduler-compiled-ro`` (the drop-in, the same compiled net), ``fastdiff-graph``
  (``SamplingGraph``, eager net), ``fastdiff-graph-compiled`` (``SamplingGraph``, net under
  ``torch.compile`` default mode: the fastest documented path), ``fused-scheduler-graph-
  compiled`` (``capture_denoising_loop`` of the drop-in loop, default-mode net), and
  ``model-graph-limit`` (the default-mode net alone in a CUDA graph, replayed x steps: the
  limit). Every loop runs twice before any timing (compilation, autotuning, cudagraph-tree
  recording, captures); the baseline and the limit are then timed in the same run (median
  of 10, synchronized) and every row records ``speedup_vs_expert`` (expert ms / row ms),
  ``x_model_limit`` (row ms / limit ms), ``expert_ms``, ``limit_ms``, ``us_per_step``.

Run (on the GPU machine)::

    python -m pytest benchmarks/bench_graph.py --benchmark-json=out/graph.json
    python -m pytest benchmarks/bench_graph.py -k "expert" --benchmark-json=out/expert.json
    python benchmarks/bench_graph.py out/graph.json          # markdown table of the figures
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import philox
from fastdiff.graph import SamplingGraph
from fastdiff.samplers import DDIMSampler, DDPMSampler
from fastdiff.sampling import INITIAL_NOISE_STREAM, sample
from fastdiff.schedules import NoiseSchedule

HAS_CUDA = torch.cuda.is_available()
NUM_STEPS = 50
SCHEDULE = NoiseSchedule.create("linear", 1000)  # diffusers' DDIMScheduler default
gpu = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")


# -- a small DiT-like transformer -----------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (float) timesteps [B] (cos half, then sin half)."""
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation by the conditioning vector."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim),
        )
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        y = self.norm1(h) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = self.qkv(y).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1[:, None] * self.proj(y)
        y = self.norm2(h) * (1 + scale2[:, None]) + shift2[:, None]
        return h + gate2[:, None] * self.mlp(y)


class SmallDiT(nn.Module):
    """A DiT-like noise predictor: patchify, transformer blocks conditioned on the timestep,
    adaLN final layer, unpatchify. ``forward(x, t)`` with t of shape [B], [1] or []."""

    def __init__(
        self,
        channels: int = 4,
        size: int = 32,
        patch: int = 2,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        self.channels, self.size, self.patch = channels, size, patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        half = freq_dim // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False
        )
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        c = self.t_mlp(timestep_embedding(t, 2 * self.freqs.numel(), self.freqs).to(x.dtype))
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        h = self.out(self.final_norm(h) * (1 + scale[:, None]) + shift[:, None])
        g, p, ch = self.size // self.patch, self.patch, self.channels
        h = h.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, ch, g * p, g * p)


class UNetEps(nn.Module):
    """``UNet2DModel`` as ``net(x, t) -> eps`` (its ``.sample``), a module to compile whole."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


class FluxLatents(nn.Module):
    """A Flux-like velocity model on [B, C, H, W] latents: diffusers' ``FluxTransformer2DModel``
    with 2x2 packing (as ``FluxPipeline._pack_latents``), fixed text states (64 tokens) and
    pooled projection; ``forward(x, s)`` with s the flow level in [0, 1] (Flux takes
    ``timestep / 1000``), as [B], [1] or []."""

    def __init__(self, transformer: nn.Module, size: int, text_tokens: int = 64) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        g = size // 2
        img_ids = torch.zeros(g, g, 3)
        img_ids[..., 1] = torch.arange(g)[:, None]
        img_ids[..., 2] = torch.arange(g)[None, :]
        self.register_buffer("img_ids", img_ids.reshape(g * g, 3), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(text_tokens, 3), persistent=False)
        text = torch.randn(1, text_tokens, cfg.joint_attention_dim)
        self.register_buffer("text", text, persistent=False)
        pooled = torch.randn(1, cfg.pooled_projection_dim)
        self.register_buffer("pooled", pooled, persistent=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = s.reshape(-1).expand(b) if s.numel() == 1 else s
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(b, (h // 2) * (w // 2), 4 * c)
        v = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=self.text.expand(b, -1, -1).to(x.dtype),
            pooled_projections=self.pooled.expand(b, -1).to(x.dtype),
            timestep=s.to(x.dtype),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]
        v = v.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return v.reshape(b, c, h, w)


def small_flux(tiny: bool = False):
    """A small Flux-like ``FluxTransformer2DModel`` (Flux.1's layout: double-stream then
    single-stream blocks, 3-axis RoPE, no guidance embedding as schnell): 16 latent channels
    packed 2x2 (64 in), width 512 (8 heads of 64), 4 + 8 blocks; 70.8M parameters."""
    import diffusers

    if tiny:
        width = dict(
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
        )
        rope = (4, 6, 6)
    else:
        width = dict(
            num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=8
        )
        rope = (16, 24, 24)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        joint_attention_dim=256 if not tiny else 32,
        pooled_projection_dim=128 if not tiny else 16,
        guidance_embeds=False,
        axes_dims_rope=rope,
        **width,
    )


def small_unet(sample_size: int = 64):
    """diffusers UNet2DModel, 35.7M parameters at these settings."""
    import diffusers

    types = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    return diffusers.UNet2DModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=types,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(types)),
        layers_per_block=2,
    )


def _build(name: str, device, dtype, tiny: bool = False):
    """(net: an nn.Module ``net(x, cond)``, latent shape, params in M). ``cond``: the
    timestep (unet, dit: eps models) or the flow level s (flux: a velocity model)."""
    torch.manual_seed(0)
    if name == "unet":
        net = UNetEps(_tiny_unet() if tiny else small_unet())
        shape = (1, 4, 16, 16) if tiny else (1, 4, 64, 64)
    elif name == "dit":
        net = SmallDiT(size=8, dim=64, depth=2, heads=2) if tiny else SmallDiT()
        shape = (1, 4, 8, 8) if tiny else (1, 4, 32, 32)
    else:
        shape = (1, 16, 8, 8) if tiny else (1, 16, 64, 64)
        net = FluxLatents(small_flux(tiny), shape[-1], text_tokens=8 if tiny else 64)
    net = net.to(device, dtype).eval()
    return net, shape, sum(p.numel() for p in net.parameters()) / 1e6


def _tiny_unet():
    import diffusers

    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


# -- the loops ------------------------------------------------------------------------------------


def _cond(t: torch.Tensor, flow: bool) -> torch.Tensor:
    """What the model is conditioned on at a diffusers timestep ``t``: t itself (VP), or the
    flow level ``t / 1000`` (as FluxPipeline passes ``timestep / 1000``)."""
    return t / 1000 if flow else t


def _scheduler_loop(net, scheduler, noise, steps, flow=False):
    """fn() running diffusers' usual loop ``x = scheduler.step(net(x, t), t, x)``."""

    def run():
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, _cond(t, flow)), t, x).prev_sample
        return x

    return run


def _captured_scheduler_loop(net, scheduler, noise, steps, flow=False):
    """fn() running that loop through ``capture_denoising_loop`` (captured at its first run)."""
    from fastdiff.diffusers.graph import capture_denoising_loop

    scheduler.set_timesteps(steps, device=noise.device)

    def step_fn(latents, t):
        return scheduler.step(net(latents, _cond(t, flow)), t, latents).prev_sample

    loop = capture_denoising_loop(step_fn, noise, scheduler=scheduler)
    return lambda: loop.run(noise)


def _loops(net, shape, device, dtype, steps=NUM_STEPS, graphs=True):
    """impl name -> fn() running one whole chain (the samples' initial noise fixed)."""
    import diffusers

    from fastdiff.diffusers import FusedDDIMScheduler

    sampler = DDIMSampler(SCHEDULE, steps)
    seeds = philox.seeds_from(0, shape[0], device)
    noise = philox.randn(seeds, 0, shape, stream=INITIAL_NOISE_STREAM, dtype=dtype)

    loops = {
        "diffusers-eager": _scheduler_loop(net, diffusers.DDIMScheduler(), noise, steps),
        "fused-scheduler-eager": _scheduler_loop(net, FusedDDIMScheduler(), noise, steps),
        "fastdiff-eager": lambda: sample(
            net, sampler, x=noise, device=device, dtype=dtype, progress=False
        ),
    }
    if graphs:
        graph = SamplingGraph(net, sampler, shape, device=device, dtype=dtype)
        loops["fastdiff-graph"] = lambda: graph.run(noise, seeds, copy=False)
        loops["fastdiff-graph-oneshot"] = lambda: sample(
            net, sampler, x=noise, device=device, dtype=dtype, progress=False, cuda_graph=True
        )
        loops["fused-scheduler-graph"] = _captured_scheduler_loop(
            net, FusedDDIMScheduler(), noise, steps
        )
    return loops


def test_models_smoke():
    """The benchmark's models and loops run (tiny sizes, few steps; CPU or GPU)."""
    pytest.importorskip("diffusers")
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    for name in ("unet", "dit"):
        net, shape, _ = _build(name, device, torch.float32, tiny=True)
        with torch.no_grad():
            out = net(torch.randn(shape, device=device), torch.tensor(10, device=device))
            assert out.shape == shape
            loops = _loops(net, shape, device, torch.float32, steps=3, graphs=HAS_CUDA)
            results = {impl: fn() for impl, fn in loops.items()}
        reference = results["fastdiff-eager"]
        for impl, x in results.items():
            assert x.shape == shape and torch.isfinite(x).all(), impl
        if HAS_CUDA:
            assert torch.equal(results["fastdiff-graph"], reference)
            assert torch.equal(results["fused-scheduler-graph"], results["fused-scheduler-eager"])


def _expert_smoke(compile_: bool) -> None:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    for name, (_, flow) in EXPERT_CASES.items():
        torch.compiler.reset()
        net, shape, _ = _build(name, device, torch.float32, tiny=True)
        with torch.no_grad():
            loops = _expert_loops(net, shape, device, torch.float32, 4, flow, compile_=compile_)
            results = {impl: fn() for impl, fn in loops.items() if impl != LIMIT}
        assert set(loops) >= (set(EXPERT_IMPLS) if compile_ else {"diffusers-eager"})
        for impl, x in results.items():
            assert x.shape == shape and torch.isfinite(x).all(), (name, impl)
        # One plan and one Euler step in each (diffusers', the drop-in's, fastdiff's), fp32;
        # compiled nets reassociate their fp32 sums (and pick other attention kernels).
        tol = 1e-3 if compile_ else 1e-4
        for impl, x in results.items() if flow else ():
            error = (x - results["diffusers-eager"]).abs().max().item()
            assert error < tol, (impl, error)
    torch.compiler.reset()


def test_expert_models_smoke():
    """The expert-baseline loops run and agree (tiny models, eager nets; CPU or GPU)."""
    pytest.importorskip("diffusers")
    _expert_smoke(compile_=False)


@gpu
def test_expert_models_smoke_compiled():
    """Every row of ``test_expert_baseline`` runs (tiny models, compiled, graphed): a minute
    or two of compilation, before the real run."""
    pytest.importorskip("diffusers")
    _expert_smoke(compile_=True)


# -- per-step cost inside a graph ---------------------------------------------------------------

STEP_CASES = [((1, 4, 64, 64), torch.float16), ((8, 4, 128, 128), torch.bfloat16)]


def _events_us(fn, repeats: int = 20) -> float:
    """Median microseconds of fn() by CUDA events (device time, no host sync inside)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


@gpu
@pytest.mark.parametrize("impl", ["eager", "graph", "graph-x50"])
@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_graph_step(benchmark, case, sampler_name, impl):
    import triton.testing

    shape, dtype = case
    device = torch.device("cuda")
    cls = DDIMSampler if sampler_name == "ddim" else DDPMSampler
    sampler = cls(SCHEDULE, NUM_STEPS)
    eps = torch.randn(shape, device=device, dtype=dtype)

    def model(x, cond):  # trivial: no kernel of its own
        return eps

    seeds = philox.seeds_from(0, shape[0], device)
    noise = philox.randn(seeds, 0, shape, stream=INITIAL_NOISE_STREAM, dtype=dtype)
    graph = None
    if impl == "eager":

        def run():
            return sample(model, sampler, x=noise, seeds=seeds, dtype=dtype, progress=False)

    else:
        k = 1 if impl == "graph" else NUM_STEPS
        graph = SamplingGraph(model, sampler, shape, device=device, dtype=dtype, steps_per_graph=k)
        graph.run(noise, seeds, copy=False)  # capture

        def run():
            return graph.run(noise, seeds, copy=False)

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.group = f"graph step {sampler_name} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    benchmark.pedantic(timed, rounds=30, iterations=1, warmup_rounds=3)
    info = {"us_per_step": benchmark.stats.stats.median * 1e6 / NUM_STEPS, "steps": NUM_STEPS}
    x = noise.clone()
    kw = {"seeds": seeds} if sampler.stochastic else {}
    info["kernel_us"] = 1e3 * triton.testing.do_bench(
        lambda: sampler.step(x, eps, 25, out=x, return_x0=False, **kw), return_mode="median"
    )
    if graph is not None:

        def replays():  # from the start of the chain (two tiny resets, then the replays)
            graph.x.copy_(noise)
            graph.counter.zero_()
            for _ in range(NUM_STEPS // graph.steps_per_graph):
                graph.replay()

        info["replay_us_per_step"] = _events_us(replays) / NUM_STEPS
        info["overhead_us_per_step"] = info["replay_us_per_step"] - info["kernel_us"]
    benchmark.extra_info.update({k: round(v, 2) for k, v in info.items()})


# -- end to end ---------------------------------------------------------------------------------

E2E_IMPLS = [
    "diffusers-eager",
    "fused-scheduler-eager",
    "fastdiff-eager",
    "fastdiff-graph",
    "fastdiff-graph-oneshot",
    "fused-scheduler-graph",
]
_E2E_CACHE: dict = {}


def _e2e(name):
    if name not in _E2E_CACHE:
        device = torch.device("cuda")
        net, shape, params = _build(name, device, torch.float16)
        with torch.no_grad():
            loops = _loops(net, shape, device, torch.float16)
        _E2E_CACHE.clear()  # one model on the card at a time
        _E2E_CACHE[name] = (loops, shape, params)
    return _E2E_CACHE[name]


@gpu
@pytest.mark.parametrize("impl", E2E_IMPLS)
@pytest.mark.parametrize("model_name", ["unet", "dit"])
def test_end_to_end(benchmark, model_name, impl):
    pytest.importorskip("diffusers")
    loops, shape, params = _e2e(model_name)
    fn = loops[impl]

    def timed():
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"e2e {model_name} {'x'.join(map(str, shape))} fp16 {NUM_STEPS} steps"
    benchmark.pedantic(timed, rounds=8, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(
        us_per_step=round(benchmark.stats.stats.median * 1e6 / NUM_STEPS, 1),
        params_m=round(params, 1),
    )


# -- against the expert baseline ------------------------------------------------------------------

# model -> (steps, flow). unet / dit: 50 DDIM steps (eps models); flux: 4 flow Euler steps
# (a velocity model, Flux-schnell's few-step regime), static shift 3 (SD3's).
EXPERT_CASES = {"unet": (NUM_STEPS, False), "dit": (NUM_STEPS, False), "flux": (4, True)}
FLOW_SHIFT = 3.0
EXPERT = "diffusers-compiled-ro"
LIMIT = "model-graph-limit"
EXPERT_IMPLS = [
    EXPERT,  # diffusers' scheduler + torch.compile(net, mode="reduce-overhead")
    "diffusers-eager",  # diffusers' scheduler + the eager net
    "fused-scheduler-compiled-ro",  # the fused drop-in + the same reduce-overhead net
    "fastdiff-graph",  # SamplingGraph + the eager net
    "fastdiff-graph-compiled",  # SamplingGraph + torch.compile(net) (default mode)
    "fused-scheduler-graph-compiled",  # capture_denoising_loop(fused drop-in + default net)
    LIMIT,  # the default-mode net alone, replayed in a CUDA graph, x steps
]
_EXPERT_CACHE: dict = {}


def _schedulers(flow: bool):
    """(diffusers' scheduler, fastdiff's drop-in for it) of a case, default configs."""
    import diffusers

    from fastdiff.diffusers import FusedDDIMScheduler, FusedFlowMatchEulerDiscreteScheduler

    if flow:
        return (
            diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
            FusedFlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
        )
    return diffusers.DDIMScheduler(), FusedDDIMScheduler()


def _native_sampler(flow: bool, steps: int):
    """fastdiff's sampler of a case (the same plan as the diffusers scheduler's)."""
    if flow:
        from fastdiff.flow import FlowSchedule
        from fastdiff.flow_samplers import FlowMatchEulerSampler

        return FlowMatchEulerSampler(FlowSchedule(), steps, shift=FLOW_SHIFT, conditioning="sigma")
    return DDIMSampler(SCHEDULE, steps)


def _model_graph(net, x: torch.Tensor, cond: torch.Tensor, steps: int):
    """fn() replaying ``net(x, cond)`` alone, captured in a CUDA graph, ``steps`` times (three
    warm-up calls on a side stream first, as PyTorch asks): the model's own GPU time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net(x, cond)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(x, cond)

    def run():
        for _ in range(steps):
            graph.replay()

    run.graph = graph  # kept alive with the function
    return run


def _expert_loops(net, shape, device, dtype, steps, flow, compile_=True):
    """impl name -> fn() running one whole chain from the same noise (EXPERT_IMPLS; without
    ``compile_``, for the CPU smoke run: eager nets, no graphs)."""
    sampler = _native_sampler(flow, steps)
    seeds = philox.seeds_from(0, shape[0], device)
    noise = philox.randn(seeds, 0, shape, stream=INITIAL_NOISE_STREAM, dtype=dtype)
    plain, fused = _schedulers(flow)
    loops = {
        "diffusers-eager": _scheduler_loop(net, plain, noise, steps, flow),
        "fused-scheduler-eager": _scheduler_loop(net, fused, noise, steps, flow),
        "fastdiff-eager": lambda: sample(net, sampler, x=noise, dtype=dtype, progress=False),
    }
    if not compile_:
        return loops
    expert_net = torch.compile(net, mode="reduce-overhead")
    fast_net = torch.compile(net)  # default mode: inductor's kernels, no CUDA graphs
    graph = SamplingGraph(net, sampler, shape, device=device, dtype=dtype)
    fast_graph = SamplingGraph(fast_net, sampler, shape, device=device, dtype=dtype)
    plain, fused = _schedulers(flow)
    loops.update(
        {
            EXPERT: _scheduler_loop(expert_net, plain, noise, steps, flow),
            "fused-scheduler-compiled-ro": _scheduler_loop(expert_net, fused, noise, steps, flow),
            "fastdiff-graph": lambda: graph.run(noise, seeds, copy=False),
            "fastdiff-graph-compiled": lambda: fast_graph.run(noise, seeds, copy=False),
            "fused-scheduler-graph-compiled": _captured_scheduler_loop(
                fast_net, _schedulers(flow)[1], noise, steps, flow
            ),
            LIMIT: _model_graph(
                fast_net, noise.clone(), sampler.model_condition(0, shape[0], device), steps
            ),
        }
    )
    return loops


def _median_ms(fn, rounds: int = 10) -> float:
    """Median wall ms of fn() (synchronized before and after each run)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _expert(name):
    """(loops, shape, params, steps, expert_ms, limit_ms) of a case, built once: every loop
    run twice first (compilation, autotuning, cudagraph-tree recording, fastdiff's captures:
    none of it timed), then the expert baseline and the model limit timed side by side."""
    if name not in _EXPERT_CACHE:
        _EXPERT_CACHE.clear()  # one model on the card at a time
        torch.compiler.reset()
        device = torch.device("cuda")
        steps, flow = EXPERT_CASES[name]
        net, shape, params = _build(name, device, torch.float16)
        with torch.no_grad():
            loops = _expert_loops(net, shape, device, torch.float16, steps, flow)
            for fn in loops.values():
                fn()
                fn()
            expert_ms = _median_ms(loops[EXPERT])
            limit_ms = _median_ms(loops[LIMIT])
        _EXPERT_CACHE[name] = (loops, shape, params, steps, expert_ms, limit_ms)
    return _EXPERT_CACHE[name]


@gpu
@pytest.mark.parametrize("impl", EXPERT_IMPLS)
@pytest.mark.parametrize("model_name", list(EXPERT_CASES))
def test_expert_baseline(benchmark, model_name, impl):
    """One row of the comparison with the expert baseline: ``extra_info`` carries the row's
    ``speedup_vs_expert`` (expert ms / row ms) and ``x_model_limit`` (row ms / limit ms), the
    two references timed in the same run (``_expert``)."""
    pytest.importorskip("diffusers")
    loops, shape, params, steps, expert_ms, limit_ms = _expert(model_name)
    fn = loops[impl]

    def timed():
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()

    kind = "flow euler" if EXPERT_CASES[model_name][1] else "ddim"
    benchmark.group = f"expert {model_name} {'x'.join(map(str, shape))} fp16 {steps} {kind} steps"
    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(
        us_per_step=round(ms * 1e3 / steps, 1),
        speedup_vs_expert=round(expert_ms / ms, 3),
        x_model_limit=round(ms / limit_ms, 3),
        expert_ms=round(expert_ms, 3),
        limit_ms=round(limit_ms, 3),
        params_m=round(params, 1),
    )


# -- summary --------------------------------------------------------------------------------------


def summarize(path: str) -> str:
    """Markdown table of this file's benchmarks in a pytest-benchmark JSON file."""
    data = json.loads(open(path).read())
    card = data.get("machine_info", {}).get("cuda_device") or "?"
    lines = [f"Card: {card}", "", "| group | implementation | median ms | us / step | extra |"]
    lines.append("|---|---|---:|---:|---|")
    for bench in data["benchmarks"]:
        if not bench["name"].startswith(("test_graph_step", "test_end_to_end", "test_expert")):
            continue
        extra = dict(bench.get("extra_info", {}))
        per_step = extra.pop("us_per_step", float("nan"))
        impl = bench["params"].get("impl", "?")
        lines.append(
            f"| {bench['group']} | {impl} | {bench['stats']['median'] * 1e3:.2f} | "
            f"{per_step:.1f} | {', '.join(f'{k}={v}' for k, v in extra.items())} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))

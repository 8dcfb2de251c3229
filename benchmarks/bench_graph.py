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

Run (on the GPU machine)::

    python -m pytest benchmarks/bench_graph.py --benchmark-json=out/graph.json
    python benchmarks/bench_graph.py out/graph.json          # markdown table of the figures
"""

from __future__ import annotations

import json
import math
import sys

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
    """(net(x, t) -> eps, latent shape, params in M)."""
    torch.manual_seed(0)
    if name == "unet":
        unet = (_tiny_unet() if tiny else small_unet()).to(device, dtype).eval()
        shape = (1, 4, 16, 16) if tiny else (1, 4, 64, 64)

        def net(x, t):
            return unet(x, t).sample

        module = unet
    else:
        module = (SmallDiT(size=8, dim=64, depth=2, heads=2) if tiny else SmallDiT()).to(
            device, dtype
        )
        module.eval()
        shape = (1, 4, 8, 8) if tiny else (1, 4, 32, 32)
        net = module
    return net, shape, sum(p.numel() for p in module.parameters()) / 1e6


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


def _loops(net, shape, device, dtype, steps=NUM_STEPS, graphs=True):
    """impl name -> fn() running one whole chain (the samples' initial noise fixed)."""
    import diffusers

    from fastdiff.diffusers import FusedDDIMScheduler
    from fastdiff.diffusers.graph import capture_denoising_loop

    sampler = DDIMSampler(SCHEDULE, steps)
    seeds = philox.seeds_from(0, shape[0], device)
    noise = philox.randn(seeds, 0, shape, stream=INITIAL_NOISE_STREAM, dtype=dtype)
    plain = diffusers.DDIMScheduler()
    fused = FusedDDIMScheduler()

    def scheduler_loop(scheduler):
        def run():
            scheduler.set_timesteps(steps, device=device)
            x = noise
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, t), t, x).prev_sample
            return x

        return run

    def model(x, cond):
        return net(x, cond)

    loops = {
        "diffusers-eager": scheduler_loop(plain),
        "fused-scheduler-eager": scheduler_loop(fused),
        "fastdiff-eager": lambda: sample(
            model, sampler, x=noise, device=device, dtype=dtype, progress=False
        ),
    }
    if graphs:
        graph = SamplingGraph(model, sampler, shape, device=device, dtype=dtype)
        loops["fastdiff-graph"] = lambda: graph.run(noise, seeds, copy=False)
        loops["fastdiff-graph-oneshot"] = lambda: sample(
            model, sampler, x=noise, device=device, dtype=dtype, progress=False, cuda_graph=True
        )
        graph_scheduler = FusedDDIMScheduler()
        graph_scheduler.set_timesteps(steps, device=device)

        def step_fn(latents, t):
            return graph_scheduler.step(net(latents, t), t, latents).prev_sample

        loop = capture_denoising_loop(step_fn, noise, scheduler=graph_scheduler)
        loops["fused-scheduler-graph"] = lambda: loop.run(noise)
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


# -- summary --------------------------------------------------------------------------------------


def summarize(path: str) -> str:
    """Markdown table of this file's benchmarks in a pytest-benchmark JSON file."""
    data = json.loads(open(path).read())
    card = data.get("machine_info", {}).get("cuda_device") or "?"
    lines = [f"Card: {card}", "", "| group | implementation | median ms | us / step | extra |"]
    lines.append("|---|---|---:|---:|---|")
    for bench in data["benchmarks"]:
        if not bench["name"].startswith(("test_graph_step", "test_end_to_end")):
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

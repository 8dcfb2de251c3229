"""Whole-pipeline benchmark: diffusers' DDPMPipeline and DDIMPipeline with the diffusers
scheduler and with the fused one swapped in.

On a GPU: a CIFAR-10-sized UNet2DModel (google/ddpm-cifar10-32's architecture, ~36M
parameters, random weights), 32x32 images, 50 steps, batch 1 and 16, float32 and float16.
Without CUDA: a quick smoke test (a tiny UNet, 2 steps) that checks the benchmark runs.

Reported per case (``extra_info``): milliseconds per image, and the scheduler's share of the
pipeline time: on the GPU the time between CUDA events recorded right before and right after
each ``scheduler.step`` call (GPU time of the step's kernels plus any time the GPU waits for
the host to issue them), over the time of the whole call; on the CPU the wall time inside
``step``. Variants: "diffusers" (the original scheduler), "fused" (same generator, noise
drawn as diffusers draws it), "fused-philox" (DDPM only: ``noise="philox"`` and no generator,
so the step noise comes from the in-kernel Philox stream).

``test_scheduler_loop``: the scheduler alone, as a Stable Diffusion loop drives it (timesteps
on the device, ``scale_model_input`` + ``step`` with a fixed model output, a CUDA generator),
50 steps on (1, 4, 64, 64) float16 latents, synchronized once at the end: wall time per step
from Python (PERFORMANCE.md's host-overhead figure; target <= 30 us through a drop-in). One
group per scheduler: diffusers, fused, and for the stochastic ones fused-philox side by side.
``test_set_timesteps``: ``set_timesteps(50, device)`` alone, fused vs diffusers, one group
per scheduler (target: the fused one no slower).

Run: ``pytest benchmarks/bench_pipeline.py --benchmark-columns=mean,stddev
--benchmark-group-by=group``.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("pytest_benchmark")

from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)

from fastdiff.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
STEPS = 50 if CUDA else 2
BATCHES = [1, 16]
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]
ROUNDS = 5 if CUDA else 1

PIPELINES = {"ddpm": (DDPMPipeline, FusedDDPMScheduler), "ddim": (DDIMPipeline, FusedDDIMScheduler)}
# DDIMPipeline's default eta = 0 draws no step noise: no philox variant there
CASES = [(name, v) for name in PIPELINES for v in ("diffusers", "fused", "fused-philox")]
CASES.remove(("ddim", "fused-philox"))


def make_unet() -> UNet2DModel:
    """google/ddpm-cifar10-32's UNet (35.7M parameters) on a GPU, a tiny one on the CPU."""
    if CUDA:
        return UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def unet_fp32() -> UNet2DModel:
    return make_unet().eval().to(DEVICE)


class StepTimer:
    """Times every ``scheduler.step`` call of a pipeline run (see the module docstring)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.spans: list = []

    def __enter__(self) -> StepTimer:
        original = type(self.scheduler).step.__get__(self.scheduler)

        def timed(*args, **kwargs):
            start = self._mark()
            out = original(*args, **kwargs)
            self.spans.append((start, self._mark()))
            return out

        self.scheduler.step = timed  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step

    @staticmethod
    def _mark():
        if CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def elapsed_ms(start, end) -> float:
        if CUDA:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def total_ms(self) -> float:
        if CUDA:
            torch.cuda.synchronize()
        return sum(self.elapsed_ms(s, e) for s, e in self.spans)


def build_pipeline(name: str, variant: str, unet: UNet2DModel):
    pipeline_cls, fused_cls = PIPELINES[name]
    pipe = pipeline_cls(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    if variant != "diffusers":
        noise = "philox" if variant == "fused-philox" else "torch"
        pipe.scheduler = fused_cls.from_config(pipe.scheduler.config, noise=noise)
    return pipe


def run_pipeline(pipe, batch: int, variant: str) -> torch.Tensor:
    generator = None if variant == "fused-philox" else torch.Generator(DEVICE).manual_seed(0)
    images = pipe(
        batch_size=batch, generator=generator, num_inference_steps=STEPS, output_type="pt"
    ).images
    if CUDA:
        torch.cuda.synchronize()
    return images


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("name, variant", CASES)
def test_pipeline(benchmark, unet_fp32, name, variant, batch, dtype):
    unet = copy.deepcopy(unet_fp32).to(dtype)
    pipe = build_pipeline(name, variant, unet)
    with torch.no_grad():
        run_pipeline(pipe, batch, variant)  # warm-up: kernels compiled, tables uploaded

        # one instrumented run for the scheduler's share
        with StepTimer(pipe.scheduler) as timer:
            start = StepTimer._mark()
            images = run_pipeline(pipe, batch, variant)
            end = StepTimer._mark()
        step_ms = timer.total_ms()
        total_ms = StepTimer.elapsed_ms(start, end)

        benchmark.group = f"{name} pipeline, {STEPS} steps, batch {batch}, {dtype}"
        benchmark.pedantic(run_pipeline, args=(pipe, batch, variant), rounds=ROUNDS)
    assert images.shape[0] == batch and torch.isfinite(images).all()
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    mean_s = stats.stats.mean if stats is not None else None
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "steps": STEPS,
            "ms_per_image": mean_s * 1e3 / batch if mean_s is not None else None,
            "scheduler_ms_per_step": step_ms / STEPS,
            "scheduler_share": step_ms / total_ms,
        }
    )


SCHEDULERS = {
    "ddpm": (DDPMScheduler, FusedDDPMScheduler),
    "ddim": (DDIMScheduler, FusedDDIMScheduler),
    "euler": (EulerDiscreteScheduler, FusedEulerDiscreteScheduler),
    "euler_a": (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler),
    "dpm": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler),
}
LOOP_SHAPE = (1, 4, 64, 64) if CUDA else (1, 4, 8, 8)
LOOP_DTYPE = torch.float16 if CUDA else torch.float32
# "fused-philox": noise="philox" and no generator, in-kernel noise (stochastic schedulers only)
LOOP_CASES = [(name, impl) for name in SCHEDULERS for impl in ("diffusers", "fused")]
LOOP_CASES += [("ddpm", "fused-philox"), ("euler_a", "fused-philox")]


@pytest.mark.parametrize("name, impl", LOOP_CASES)
def test_scheduler_loop(benchmark, name, impl):
    d_cls, f_cls = SCHEDULERS[name]
    scheduler = d_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if impl != "diffusers":
        noise = "philox" if impl == "fused-philox" else "torch"
        scheduler = f_cls.from_config(scheduler.config, noise=noise)
    x = torch.randn(LOOP_SHAPE, device=DEVICE, dtype=LOOP_DTYPE)
    model_output = torch.randn(LOOP_SHAPE, device=DEVICE, dtype=LOOP_DTYPE)
    generator = None if impl == "fused-philox" else torch.Generator(DEVICE).manual_seed(0)

    def setup():
        scheduler.set_timesteps(STEPS, device=DEVICE)
        return (), {}

    def loop():
        sample = x
        for t in scheduler.timesteps:
            scheduler.scale_model_input(sample, t)
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
        if CUDA:
            torch.cuda.synchronize()
        return sample

    setup()
    loop()  # warm-up: kernels compiled, tables uploaded
    benchmark.group = f"scheduler loop {name}, {STEPS} steps, {LOOP_SHAPE}, {LOOP_DTYPE}"
    benchmark.pedantic(loop, setup=setup, rounds=4 * ROUNDS)
    stats = getattr(benchmark, "stats", None)
    mean_s = stats.stats.mean if stats is not None else None
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "steps": STEPS,
            "us_per_step": mean_s * 1e6 / STEPS if mean_s is not None else None,
        }
    )


@pytest.mark.parametrize("impl", ["diffusers", "fused"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_set_timesteps(benchmark, name, impl):
    d_cls, f_cls = SCHEDULERS[name]
    scheduler = d_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if impl == "fused":
        scheduler = f_cls.from_config(scheduler.config)

    def plan():
        scheduler.set_timesteps(STEPS, device=DEVICE)
        if CUDA:
            torch.cuda.synchronize()

    plan()  # warm-up
    benchmark.group = f"set_timesteps {name}, {STEPS} steps"
    benchmark.pedantic(plan, rounds=20 * ROUNDS, iterations=5)
    stats = getattr(benchmark, "stats", None)
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "us": stats.stats.mean * 1e6 if stats is not None else None,
        }
    )

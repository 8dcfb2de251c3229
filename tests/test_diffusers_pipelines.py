"""Pipelines with a fused scheduler swapped in give the images of the original scheduler.

``pipe.scheduler = FusedX.from_config(pipe.scheduler.config)`` in diffusers' DDPMPipeline and
DDIMPipeline with a tiny randomly initialized UNet2DModel, and a Stable-Diffusion-style loop
(classifier-free guidance, ``scale_model_input``, ``prepare_extra_step_kwargs``-style
signature inspection, img2img with ``add_noise`` and ``set_begin_index``) with a tiny
UNet2DConditionModel, for every fused scheduler. The same generator seed must give the same
images.

Tolerance: the schedulers agree to float32 rounding per step (test_diffusers_adapter.py);
here the UNet feeds each step's small difference back through the model (and the guidance
scale 7.5 multiplies it), over a few steps, on outputs of size ~1: 1e-4 absolute on images
in [0, 1] and 1e-3 relative to the largest latent (observed: below 2e-5 on latents up
to ~60).
"""

from __future__ import annotations

import inspect
import json
import random
import tempfile

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE, PAIRS  # noqa: E402

from fastdiff.diffusers import FusedDDIMScheduler  # noqa: E402

# the size both tiny UNets share: two levels of 8 and 16 channels on 8x8 inputs
TINY_UNET = {
    "sample_size": 8,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def tiny_unet() -> UNet2DModel:
    """A randomly initialized two-level UNet on 3x8x8 images (~42K parameters)."""
    return (
        UNet2DModel(
            **TINY_UNET,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        .eval()
        .to(DEVICE)
    )


def tiny_conditional_unet() -> UNet2DConditionModel:
    """A randomly initialized text-conditioned UNet on 4x8x8 latents (~51K parameters)."""
    return (
        UNet2DConditionModel(
            **TINY_UNET,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=8,
            attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        .eval()
        .to(DEVICE)
    )


@pytest.fixture
def seed():
    return random.randrange(2**31)


pytestmark = pytest.mark.usefixtures("no_tf32")  # conftest


def _images(pipe, seed, *, global_rng=False, **kwargs):
    """The pipeline's images from ``seed``: in a generator, or (``global_rng``) in torch's
    global RNG, the pipeline called without a generator."""
    if global_rng:
        torch.manual_seed(seed)
        generator = None
    else:
        generator = torch.Generator().manual_seed(seed)
    out = pipe(batch_size=2, generator=generator, output_type="pt", **kwargs)
    return out.images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_ddpm_pipeline_swap(name, backend, seed):
    d_cls, f_cls = PAIRS[name]
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = d_cls.from_config(pipe.scheduler.config)
    want = _images(pipe, seed, num_inference_steps=4)
    pipe.scheduler = f_cls.from_config(pipe.scheduler.config, backend=backend)
    got = _images(pipe, seed, num_inference_steps=4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta, use_clipped_model_output", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_pipeline_swap(eta, use_clipped_model_output, backend, seed):
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {
        "num_inference_steps": 4,
        "eta": eta,
        "use_clipped_model_output": use_clipped_model_output,
    }
    want = _images(pipe, seed, **kwargs)
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config, backend=backend)
    got = _images(pipe, seed, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def stable_diffusion_loop(
    unet,
    scheduler,
    embeddings,
    seed,
    *,
    steps=4,
    guidance_scale=7.5,
    strength=None,
    global_rng=False,
):
    """The denoising loop of diffusers' StableDiffusion(Img2Img)Pipeline, model and scheduler
    calls in the same order with the same arguments.

    Args:
        unet: the conditional UNet.
        scheduler: any scheduler.
        embeddings: ``[2B, L, D]`` text embeddings, unconditional half first.
        seed: seed of the pipeline's generator.
        steps: num_inference_steps.
        guidance_scale: classifier-free guidance scale.
        strength: img2img strength (None: text-to-image).
        global_rng: no generator: ``seed`` seeds torch's global RNG, which draws all noise.

    Returns:
        The final latents ``[B, 4, 8, 8]``.
    """
    if global_rng:
        torch.manual_seed(seed)
        generator = None
    else:
        generator = torch.Generator().manual_seed(seed)
    batch = embeddings.shape[0] // 2
    shape = (batch, unet.config.in_channels, 8, 8)
    scheduler.set_timesteps(steps, device=DEVICE)
    timesteps = scheduler.timesteps
    if strength is None:
        latents = randn_tensor(shape, generator=generator, device=DEVICE)
        latents = latents * scheduler.init_noise_sigma
    else:  # img2img: start from a noised "encoded image" at an inner timestep
        init_latents = randn_tensor(shape, generator=generator, device=DEVICE).clamp(-1, 1)
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        noise = randn_tensor(shape, generator=generator, device=DEVICE)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))
    # prepare_extra_step_kwargs: eta and generator only where the step takes them
    parameters = set(inspect.signature(scheduler.step).parameters)
    extra = {}
    if "eta" in parameters:
        extra["eta"] = 0.0
    if "generator" in parameters:
        extra["generator"] = generator
    with torch.no_grad():
        for t in timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(model_input, t, encoder_hidden_states=embeddings).sample
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_stable_diffusion_style_loop(name, backend, strength, seed):
    d_cls, f_cls = PAIRS[name]
    unet = tiny_conditional_unet()
    embeddings = torch.randn(4, 5, 8).to(DEVICE)
    # a Stable-Diffusion-like schedule; the fused scheduler is built from that config
    original = d_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    want = stable_diffusion_loop(unet, original, embeddings, seed, strength=strength)
    fused = f_cls.from_config(original.config, backend=backend)
    got = stable_diffusion_loop(unet, fused, embeddings, seed, strength=strength)
    assert torch.isfinite(want).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


# -- no generator: the global RNG, as the stock scheduler draws from it -----------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, eta", [("ddpm", None), ("ddim", 1.0)])
def test_pipeline_without_generator_gives_stock_images(name, eta, backend, seed):
    """``torch.manual_seed(s); pipe(...)`` without a generator: the stock scheduler's images,
    and the global RNG in the same state afterwards."""
    d_cls, f_cls = PAIRS[name]
    pipeline_cls = DDPMPipeline if name == "ddpm" else DDIMPipeline
    pipe = pipeline_cls(unet=tiny_unet(), scheduler=d_cls())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4} | ({"eta": eta} if eta is not None else {})
    want = _images(pipe, seed, global_rng=True, **kwargs)
    want_after = torch.randn(3, device=DEVICE)
    pipe.scheduler = f_cls.from_config(pipe.scheduler.config, backend=backend)
    got = _images(pipe, seed, global_rng=True, **kwargs)
    assert torch.equal(torch.randn(3, device=DEVICE), want_after), "global RNG out of step"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stable_diffusion_style_loop_without_generator(name, backend, seed):
    d_cls, f_cls = PAIRS[name]
    unet = tiny_conditional_unet()
    embeddings = torch.randn(4, 5, 8).to(DEVICE)
    original = d_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    want = stable_diffusion_loop(unet, original, embeddings, seed, global_rng=True)
    want_after = torch.randn(3, device=DEVICE)
    fused = f_cls.from_config(original.config, backend=backend)
    got = stable_diffusion_loop(unet, fused, embeddings, seed, global_rng=True)
    assert torch.equal(torch.randn(3, device=DEVICE), want_after), "global RNG out of step"
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


# -- save_pretrained / from_pretrained with a fused scheduler ---------------------------------


def tiny_stable_diffusion(scheduler):
    """A StableDiffusionPipeline of tiny random models (CLIP text encoder with a 4-token
    vocabulary, one-level VAE, the tiny conditional UNet) on the CPU, no safety checker."""
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, StableDiffusionPipeline  # imports transformers

    with tempfile.TemporaryDirectory() as folder:
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}
        with open(f"{folder}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{folder}/merges.txt", "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = transformers.CLIPTokenizer(
            f"{folder}/vocab.json", f"{folder}/merges.txt", model_max_length=8
        )
    config = transformers.CLIPTextConfig(
        vocab_size=4,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=transformers.CLIPTextModel(config).eval(),
        tokenizer=tokenizer,
        unet=tiny_conditional_unet().cpu(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(PAIRS))
def test_saved_pipeline_records_fused_scheduler_under_public_module(name, tmp_path):
    f_cls = PAIRS[name][1]
    DDPMPipeline(unet=tiny_unet(), scheduler=f_cls()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastdiff.diffusers", f_cls.__name__]
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is f_cls
    passed = f_cls.from_pretrained(tmp_path, subfolder="scheduler", noise="philox")
    assert DDPMPipeline.from_pretrained(tmp_path, scheduler=passed).scheduler is passed


def test_saved_stable_diffusion_pipeline_with_fused_scheduler_loads_back(tmp_path, seed):
    """A StableDiffusionPipeline saved with a fused scheduler loads back with it, or with one
    passed as ``scheduler=``: the same images."""
    f_cls = FusedDDIMScheduler
    pipe = tiny_stable_diffusion(f_cls(beta_schedule="scaled_linear"))
    pipeline_cls = type(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastdiff.diffusers", f_cls.__name__]

    def images(p):
        generator = torch.Generator().manual_seed(seed)
        kwargs = {"num_inference_steps": 3, "height": 8, "width": 8, "output_type": "pt"}
        return p("a cat", generator=generator, **kwargs).images

    want = images(pipe)
    passed = f_cls.from_pretrained(tmp_path, subfolder="scheduler")
    for kwargs in ({}, {"scheduler": passed}):
        loaded = pipeline_cls.from_pretrained(tmp_path, **kwargs)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded.scheduler) is f_cls
        assert torch.equal(images(loaded), want), kwargs

"""The drop-ins swapped into a tiny StableDiffusionXLPipeline (a UNet with SDXL's text-time
conditioning built from a config; ``prompt_embeds`` / ``pooled_prompt_embeds`` passed
directly: no text encoders, no VAE, no downloads): the stock scheduler's latents to float32
rounding for the same generator, on both backends, with the schedulers and settings SDXL
users pick (Euler, the default; DPM++ 2M SDE Karras; DPM++ 3M; the heun form; Heun; LCM and
TCD for the distilled few-step models)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # (StableDiffusionXLPipeline's module imports it)

import diffusers  # noqa: E402
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402

from fastdiff import diffusers as fused  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_tf32")  # conftest

KARRAS = {"use_karras_sigmas": True}
# name -> (diffusers class, config, pipeline call options)
CASES = {
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **KARRAS}, {}
    ),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
    "dpmpp_2m_heun": ("DPMSolverMultistepScheduler", {"solver_type": "heun", **KARRAS}, {}),
    "heun": ("HeunDiscreteScheduler", KARRAS, {}),
    "lcm": ("LCMScheduler", {}, {"guidance_scale": 1.0}),
    "tcd": ("TCDScheduler", {}, {"guidance_scale": 1.0, "eta": 0.3}),
}  # fmt: skip
# SDXL's scheduler config (scaled_linear betas, leading spacing, steps_offset 1)
SDXL = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "timestep_spacing": "leading", "steps_offset": 1}  # fmt: skip
POOLED, TIME_DIM = 6, 4  # pooled text embedding width; addition_time_embed_dim


@pytest.fixture
def seed():
    return random.randrange(2**31)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout at toy size: cross-attention blocks, and the "text_time" added
    conditioning (pooled embedding + the six size / crop ids)."""
    torch.manual_seed(0)
    return (
        UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=8,
            attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
        )  # fmt: skip
        .eval()
        .to(DEVICE)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_sdxl_pipeline_swap(name, backend, seed):
    cls_name, config, call = CASES[name]
    stock = getattr(diffusers, cls_name)(**SDXL, **config)
    parts = dict.fromkeys(("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(unet=tiny_sdxl_unet(), scheduler=stock, **parts)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 8, generator=g),
        "negative_prompt_embeds": torch.randn(1, 5, 8, generator=g),
        "pooled_prompt_embeds": torch.randn(1, POOLED, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, POOLED, generator=g),
    }
    embeds = {key: value.to(DEVICE) for key, value in embeds.items()}
    options = {"guidance_scale": 5.0, **call}

    def run():
        return pipe(
            **embeds, **options, height=64, width=64, num_inference_steps=4,
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        ).images  # fmt: skip

    want = run()
    pipe.scheduler = getattr(fused, f"Fused{cls_name}").from_config(
        pipe.scheduler.config, backend=backend
    )
    got = run()
    assert got.shape == (1, 4, 8, 8) and torch.isfinite(want).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale)

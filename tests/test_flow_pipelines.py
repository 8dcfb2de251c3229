"""Flow pipelines with a fused scheduler swapped in give the stock scheduler's latents.

``pipe.scheduler = Fused*.from_config(pipe.scheduler.config)`` in diffusers'
StableDiffusion3Pipeline and FluxPipeline (FlowMatchEulerDiscreteScheduler; Flux passes its
``mu`` from the image's sequence length) and SanaPipeline (DPM-Solver++ on flow sigmas), with
tiny randomly initialized transformers built from configs and the prompt embeddings passed
directly (no text encoders, no VAE, no downloads: ``output_type="latent"``). The same
generator must give the same latents.

Tolerance: float32 rounding carried through the model: the flow Euler step is diffusers'
own expression (equal to an ulp), DPM-Solver++ differs by a few ulps per step; the transformer
feeds that back over 4 steps with guidance. 1e-5 relative to the largest latent (observed:
below 1e-6).
"""

from __future__ import annotations

import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402

from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler  # noqa: E402
from fastdiff.diffusers.flow_match import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402

NO_TEXT = {"text_encoder": None, "tokenizer": None, "vae": None}


@pytest.fixture
def seed():
    return random.randrange(2**31)


pytestmark = pytest.mark.usefixtures("no_tf32")  # conftest


def _embeddings(seed, batch=2, tokens=5, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g).to(DEVICE) for shape in ((tokens, dim), (dim,))]


def sd3_pipeline(scheduler):
    """SD3 with a ~4K-parameter MMDiT on 4x8x8 latents (64x64 images)."""
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    )
    parts = {f"{k}{n}": None for k in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")}
    return StableDiffusion3Pipeline(
        transformer=transformer.eval().to(DEVICE), scheduler=scheduler, vae=None, **parts
    )


def flux_pipeline(scheduler):
    """Flux with a ~6K-parameter transformer on packed 16-channel latents (32x32 images)."""
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=(0, 2, 2),
    )
    return FluxPipeline(
        transformer=transformer.eval().to(DEVICE),
        scheduler=scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        **NO_TEXT,
    )


def sana_pipeline(scheduler):
    """Sana with a ~4K-parameter linear-attention DiT on 4x8x8 latents (256x256 images)."""
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=1,
        norm_elementwise_affine=False,
    )
    return SanaPipeline(transformer=transformer.eval().to(DEVICE), scheduler=scheduler, **NO_TEXT)


def _swap(make, stock, fused_cls, backend, seed, **call):
    """Latents of the pipeline with the stock scheduler, then with the fused one."""
    torch.manual_seed(seed)  # the tiny transformer's random weights
    pipe = make(stock)
    pipe.set_progress_bar_config(disable=True)
    latents = []
    for scheduler in (stock, fused_cls.from_config(stock.config, backend=backend)):
        pipe.scheduler = scheduler
        torch.manual_seed(seed + 1)  # SD3's step gets no generator: the global stream
        generator = torch.Generator().manual_seed(seed)
        out = pipe(generator=generator, output_type="latent", num_inference_steps=4, **call)
        latents.append(out.images)
    want, got = latents
    assert torch.isfinite(want).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config", [{"shift": 3.0}, {"shift": 3.0, "stochastic_sampling": True}], ids=["sd3", "stoch"]
)
def test_sd3_pipeline_swap(config, backend, seed):
    embeds, pooled = _embeddings(seed)
    _swap(
        sd3_pipeline,
        FlowMatchEulerDiscreteScheduler(**config),
        FusedFlowMatchEulerDiscreteScheduler,
        backend,
        seed,
        prompt_embeds=embeds[:1],
        pooled_prompt_embeds=pooled[:1],
        negative_prompt_embeds=embeds[1:],
        negative_pooled_prompt_embeds=pooled[1:],
        guidance_scale=5.0,
        height=64,
        width=64,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_flux_pipeline_swap_with_mu(backend, seed):
    """Flux's pipeline computes mu from the packed sequence length (calculate_shift) and
    passes custom sigmas linspace(1, 1/n, n) through retrieve_timesteps."""
    embeds, pooled = _embeddings(seed)
    stock = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )
    _swap(
        flux_pipeline,
        stock,
        FusedFlowMatchEulerDiscreteScheduler,
        backend,
        seed,
        prompt_embeds=embeds[:1],
        pooled_prompt_embeds=pooled[:1],
        height=32,
        width=32,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sana_pipeline_swap(backend, seed):
    embeds, _ = _embeddings(seed)
    mask = torch.ones(2, embeds.shape[1], device=DEVICE)
    stock = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    _swap(
        sana_pipeline,
        stock,
        FusedDPMSolverMultistepScheduler,
        backend,
        seed,
        prompt_embeds=embeds[:1],
        prompt_attention_mask=mask[:1],
        negative_prompt=None,
        negative_prompt_embeds=embeds[1:],
        negative_prompt_attention_mask=mask[1:],
        guidance_scale=4.5,
        height=256,
        width=256,
        use_resolution_binning=False,
    )

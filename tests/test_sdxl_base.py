"""The offline SDXL-architecture bases: a tiny one for tests, SDXL's real shapes for benchmarks (no download)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_sdxl():
    from lab.random_bases import build_random_sdxl_pipeline

    return build_random_sdxl_pipeline(tiny=True, seed=0)


def _unet_call(pipe, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_tiny_sdxl_generates_deterministically(tiny_sdxl):
    tiny_sdxl.set_progress_bar_config(disable=True)

    def draw():
        return tiny_sdxl("a photo of sks", num_inference_steps=2, height=64, width=64, output_type="np",
                         generator=torch.Generator().manual_seed(3)).images[0]

    first = draw()
    assert first.shape == (64, 64, 3) and (first == draw()).all()
    assert tiny_sdxl.tokenizer_2.pad_token == "!" and tiny_sdxl.tokenizer.pad_token == "<|endoftext|>"


def test_added_conditioning_reaches_the_unet(tiny_sdxl):
    """SDXL's UNet also reads the second encoder's pooled projection and six time ids (original size, crop,
    target size): changing either changes the prediction."""
    width = tiny_sdxl.text_encoder_2.config.projection_dim
    pooled = torch.randn(1, width, generator=torch.Generator().manual_seed(1))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    base = _unet_call(tiny_sdxl, pooled, time_ids)
    assert not torch.allclose(base, _unet_call(tiny_sdxl, pooled * 2, time_ids))
    cropped = time_ids.clone()
    cropped[0, 2:4] = torch.tensor([16.0, 8.0])  # crop top-left
    assert not torch.allclose(base, _unet_call(tiny_sdxl, pooled, cropped))


def test_real_sdxl_shapes():
    """On the meta device (no memory): the UNet has SDXL base's 2,567,463,684 parameters and reads 2048-wide
    context (768 CLIP-L + 1280 OpenCLIP bigG) plus 2816 added features (1280 pooled + 6 x 256 time ids)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lab.random_bases import sdxl_configs

    cfg = sdxl_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert unet.config.cross_attention_dim == 2048 and unet.config.projection_class_embeddings_input_dim == 2816
    assert bigg.text_projection.weight.shape == (1280, 1280) and len(bigg.text_model.encoder.layers) == 32

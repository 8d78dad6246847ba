"""Randomly initialised pipelines of real shapes, built offline: bases for benchmarks and tests, no download."""

from __future__ import annotations

from finetune.models import assemble_pipeline, tiny_configs


def sd15_configs() -> dict[str, dict]:
    """Configs with the shapes of Stable Diffusion 1.5 (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE)."""
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "text_encoder": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        "scheduler": tiny_configs()["scheduler"],
    }


RANDOM_SHAPES = {"tiny": tiny_configs, "sd15": sd15_configs}


def build_random_pipeline(shape: str = "tiny", seed: int = 0):
    """A randomly initialised pipeline of the given shape ('tiny' or 'sd15') with the offline CLIP tokenizer.

    Deterministic for a seed: the starting point of toy-base pretraining and the real-size benchmarks' base.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = RANDOM_SHAPES[shape]()
    torch.manual_seed(seed)
    return assemble_pipeline(AutoencoderKL(**cfg["vae"]), CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                             UNet2DConditionModel(**cfg["unet"]), DDIMScheduler(**cfg["scheduler"]))

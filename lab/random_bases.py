"""Randomly initialised pipelines of real shapes (SD 1.5, SDXL) and toy sizes, built offline: bases for benchmarks
and tests, no download."""

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


def sdxl_configs(tiny: bool = False) -> dict[str, dict]:
    """SDXL's shapes (UNet 2.6B, CLIP-L + OpenCLIP bigG with projection, SD VAE at scale 0.13025), or, with
    `tiny`, the same architecture at toy size: two text encoders whose penultimate states sit side by side
    (cross-attention width = the sum of their widths) and the pooled projection + 6 time ids as added
    conditioning (projection_class_embeddings_input_dim = projection width + 6 x addition_time_embed_dim)."""
    if tiny:
        # Two widths, as in SDXL (768 and 1280): single-file loaders tell the encoders apart by their widths.
        text_1, text_2, time_dim = 32, 48, 8
        unet = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
                    attention_head_dim=(2, 4), norm_num_groups=8,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        encoder = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
        encoder_2 = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
        vae = tiny_configs()["vae"]
    else:
        text_1, text_2, time_dim = 768, 1280, 256
        unet = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), norm_num_groups=32,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        encoder = dict(intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
        encoder_2 = dict(intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu")
        vae = {**sd15_configs()["vae"], "sample_size": 1024, "scaling_factor": 0.13025}
    special = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    return {
        "vae": vae,
        "unet": dict(unet, in_channels=4, out_channels=4, cross_attention_dim=text_1 + text_2, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                     projection_class_embeddings_input_dim=text_2 + 6 * time_dim),
        "text_encoder": dict(encoder, hidden_size=text_1, projection_dim=text_1, pad_token_id=49407, **special),
        "text_encoder_2": dict(encoder_2, hidden_size=text_2, projection_dim=text_2, pad_token_id=0, **special),
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"),
    }


def build_random_sdxl_pipeline(tiny: bool = True, seed: int = 0):
    """A randomly initialised StableDiffusionXLPipeline (tiny, or SDXL's real shapes) with offline tokenizers.

    Deterministic for a seed; the second tokenizer pads with "!" as SDXL's does."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from finetune.tokenizer import build_clip_tokenizer

    cfg = sdxl_configs(tiny)
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**cfg["vae"]), unet=UNet2DConditionModel(**cfg["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(**cfg["scheduler"]), add_watermarker=False)

"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states as context, no added conditioning."""

from __future__ import annotations

from .base import PromptEmbeds, tokenize


class StableDiffusionFamily:
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    text_encoder_parts = ("text_encoder",)
    vae_needs_float32 = False
    tokenizer_parts = ("tokenizer",)

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def encode_prompts(self, tokenizers, text_encoders, prompts, device) -> PromptEmbeds:
        return PromptEmbeds(text_encoders[0](tokenize(tokenizers[0], prompts, device))[0])

    def predict(self, unet, noisy, timesteps, embeds, sizes, dtype):
        return unet(noisy.to(dtype), timesteps, embeds.hidden.to(dtype)).sample

    def assemble_pipeline(self, vae, tokenizers, text_encoders, unet, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def freeze_unused(self, text_encoders) -> None:
        """Every part of the text encoder reaches the UNet: nothing to freeze."""

    def kohya_unet_name(self, module_path: str, unet_config) -> str:
        # kohya's SD1/2 networks walk a UNet with diffusers' module names.
        return module_path

    def kohya_text_prefixes(self) -> tuple[str, ...]:
        return ("lora_te",)

    def embedding_keys(self) -> tuple[str, ...]:
        return ("emb_params",)

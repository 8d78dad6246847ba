"""SDXL: two text encoders (CLIP-L and OpenCLIP bigG) side by side, plus pooled text and size conditioning.

Facts from diffusers' StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids (0.42) and kohya's sd-scripts
(sdxl_train_util, networks/lora.py), read for this module: the context is the penultimate hidden states of both
encoders concatenated on the feature axis; the pooled embedding is the second encoder's projected output; the
time ids are (original height, width, crop top, left, target height, width); kohya names SDXL UNet modules
with the original (ldm) layout and the encoders `lora_te1_` / `lora_te2_`.
"""

from __future__ import annotations

from .base import PromptEmbeds, tokenize


class StableDiffusionXLFamily:
    name = "sdxl"
    label = "SDXL"
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    vae_needs_float32 = True  # its VAE overflows in fp16 (NaN latents); fp16-safe replacements exist
    tokenizer_parts = ("tokenizer", "tokenizer_2")

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def encode_prompts(self, tokenizers, text_encoders, prompts, device) -> PromptEmbeds:
        import torch

        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return PromptEmbeds(torch.cat(states, dim=-1), pooled)

    def predict(self, unet, noisy, timesteps, embeds, sizes, dtype):
        time_ids = time_ids_tensor(sizes).to(noisy.device, dtype)
        added = {"text_embeds": embeds.pooled.to(dtype), "time_ids": time_ids}
        return unet(noisy.to(dtype), timesteps, embeds.hidden.to(dtype), added_cond_kwargs=added).sample

    def assemble_pipeline(self, vae, tokenizers, text_encoders, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, add_watermarker=False)

    def freeze_unused(self, text_encoders) -> None:
        """CLIP-L's last layer and final norm never reach SDXL's conditioning (its penultimate states are used,
        its pooled output is not): freeze them, as kohya's SDXL trainer does, so nothing trained goes unused
        (multi-process training refuses parameters that get no gradient)."""
        clip_l = getattr(text_encoders[0], "text_model", text_encoders[0])
        for module in (clip_l.encoder.layers[-1], clip_l.final_layer_norm):
            module.requires_grad_(False)

    def kohya_unet_name(self, module_path: str, unet_config) -> str:
        from ..formats.single_file import ldm_unet_module_name

        return ldm_unet_module_name(module_path, unet_config)

    def kohya_text_prefixes(self) -> tuple[str, ...]:
        return ("lora_te1", "lora_te2")

    def embedding_keys(self) -> tuple[str, ...]:
        return ("clip_l", "clip_g")


def time_ids_tensor(sizes):
    """(B, 6) float tensor of SDXL's size conditioning."""
    import torch

    return torch.tensor([[*s.original_size, *s.crop_top_left, *s.target_size] for s in sizes], dtype=torch.float32)

"""What a base-model family provides, and the data that flows between it and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch


class SizeCondition(NamedTuple):
    """One training sample's geometry, as SDXL's UNet is told it: the image's size before resizing, the crop's
    top-left corner in the resized image, and the size trained at (all in pixels, height first)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def uncropped(cls, height: int, width: int) -> "SizeCondition":
        """A sample drawn whole at its own size (what samples and class images use)."""
        return cls((height, width), (0, 0), (height, width))


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: per-token states (B, L, C) and, for SDXL, pooled embeddings (B, P)."""

    hidden: "torch.Tensor"
    pooled: "torch.Tensor | None" = None

    def rows(self) -> list[tuple["torch.Tensor", "torch.Tensor | None"]]:
        """One (hidden, pooled) pair per prompt, for caches keyed by prompt."""
        pooled = self.pooled if self.pooled is not None else [None] * len(self.hidden)
        return list(zip(self.hidden, pooled))

    def to(self, device) -> "PromptEmbeds":
        """The same embeddings on `device`."""
        return PromptEmbeds(self.hidden.to(device), None if self.pooled is None else self.pooled.to(device))

    @classmethod
    def stack(cls, rows: list[tuple["torch.Tensor", "torch.Tensor | None"]]) -> "PromptEmbeds":
        import torch

        pooled = [p for _, p in rows]
        return cls(torch.stack([h for h, _ in rows]),
                   None if pooled[0] is None else torch.stack(pooled))


class Family(Protocol):
    """One base-model family. Stateless: every method takes the parts it works on."""

    name: str  # 'sd' or 'sdxl' (model.family)
    label: str  # how messages name it
    text_encoder_parts: tuple[str, ...]  # pipeline attribute names of its text encoders, in order
    tokenizer_parts: tuple[str, ...]  # and of their tokenizers
    vae_needs_float32: bool  # keep the VAE in float32 under fp16/bf16 training

    def pipeline_class(self):
        """The diffusers pipeline class that loads and samples this family."""

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str], device) -> PromptEmbeds:
        """Training-time text conditioning of `prompts` (the same a pipeline of this family computes)."""

    def predict(self, unet, noisy: "torch.Tensor", timesteps: "torch.Tensor", embeds: PromptEmbeds,
                sizes: list[SizeCondition], dtype) -> "torch.Tensor":
        """The UNet's prediction for one batch, with whatever extra conditioning the family needs."""

    def assemble_pipeline(self, vae, tokenizers: list, text_encoders: list, unet, scheduler):
        """A pipeline of this family over these parts (no safety checker, no watermark)."""

    def freeze_unused(self, text_encoders: list) -> None:
        """Freeze text-encoder parts whose output the family's conditioning never uses."""

    def kohya_unet_name(self, module_path: str, unet_config) -> str:
        """The UNet module's name in kohya's LoRA keys (without `lora_unet_`), dots kept."""

    def kohya_text_prefixes(self) -> tuple[str, ...]:
        """kohya's key prefix per text encoder, in text_encoder_parts order."""

    def embedding_keys(self) -> tuple[str, ...]:
        """The keys of an A1111/ComfyUI embedding file, one per text encoder ('emb_params' for SD1/2)."""


def tokenize(tokenizer, prompts: list[str], device) -> "torch.Tensor":
    """Token ids padded to the tokenizer's window (77), as pipelines encode prompts."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)

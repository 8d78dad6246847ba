"""Base-model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, in one place each.

The trainer, the strategies and the exporters ask the family of the loaded base (`components.family`) instead
of assuming one architecture: which pipeline class samples with, which tokenizers and text encoders there are,
how prompts become UNet conditioning, what extra conditioning the UNet reads, and how exports name the base.
"""

from __future__ import annotations

from .base import Family, PromptEmbeds, SizeCondition
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, Family] = {"sd": StableDiffusionFamily(), "sdxl": StableDiffusionXLFamily()}
FAMILY_NAMES = tuple(FAMILIES)


def family_named(name: str) -> Family:
    """The family registered under `name` ('sd' or 'sdxl')."""
    return FAMILIES[name]


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline (SDXL: a second text encoder and text_time conditioning)."""
    return family_of_unet_config(pipe.unet.config)


def family_of_unet_config(unet_config) -> Family:
    """The family a UNet config belongs to: SDXL's UNet reads pooled text + time ids ('text_time')."""
    if dict(unet_config).get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    return FAMILIES["sd"]


__all__ = ["FAMILIES", "FAMILY_NAMES", "Family", "PromptEmbeds", "SizeCondition", "family_named",
           "family_of_pipeline", "family_of_unet_config"]

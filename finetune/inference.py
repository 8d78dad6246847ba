"""Load exported adapters into a diffusers pipeline and generate images."""

from __future__ import annotations

from pathlib import Path

from . import UserError


def pipeline_from_components(components, text_encoder=None, unet=None):
    """A StableDiffusionPipeline over the (possibly adapted) training components, DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder or components.text_encoder,
        tokenizer=components.tokenizer, unet=unet or components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def detect_adapter_kind(path: str | Path) -> str:
    """The name of the strategy whose loader recognises the adapter file or folder `path`."""
    from .strategies.base import adapter_loaders

    path = Path(path)
    if not path.exists():
        raise UserError(f"--adapter {path}: file not found")
    for name, (can_load, _) in adapter_loaders().items():
        if can_load(path):
            return name
    raise UserError(f"--adapter {path}: not an adapter format sdft knows "
                    "(LoRA, textual-inversion embedding or hypernetwork)")


def load_adapter(pipe, path: str | Path, scale: float = 1.0) -> str:
    """Load one adapter file into `pipe` with the loader of the strategy that wrote it."""
    from .strategies.base import adapter_loaders

    _, load_into = adapter_loaders()[detect_adapter_kind(path)]
    return load_into(pipe, str(path), scale)


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 5.0,
             negative_prompt: str | None = None, resolution: int | None = None):
    """One image per (prompt, seed), prompts outer; deterministic on CPU for fixed seeds."""
    import torch

    images = []
    for prompt in prompts:
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                       guidance_scale=guidance, generator=gen, height=resolution, width=resolution,
                       output_type="pil")
            images.append(out.images[0])
    return images

"""Load exported adapters into a diffusers pipeline and generate images."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from . import UserError


def pipeline_from_components(components, text_encoders=None, unet=None):
    """A pipeline of the base's family over the (possibly adapted) training components, DDIM sampler (which
    follows the components' prediction type and zero-terminal-SNR schedule)."""
    from diffusers import DDIMScheduler

    return components.family.assemble_pipeline(
        components.vae, components.tokenizers, text_encoders or components.text_encoders, unet or components.unet,
        DDIMScheduler.from_config(components.noise_scheduler.config))


@contextmanager
def float32_vae_decode(vae):
    """Decode in float32 while a float32 VAE runs under autocast (fp16/bf16 training): autocast would run its
    convolutions in half precision anyway, and SDXL's VAE overflows there (black images). A VAE kept in half
    precision, or no autocast at all, decodes as before."""
    import torch

    if next(vae.parameters()).dtype != torch.float32:
        yield
        return
    original = vae.decode

    def decode(latents, *args, **kwargs):
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return original(latents.float(), *args, **kwargs)

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode  # the class's own method again


def detect_adapter_kind(path: str | Path) -> str:
    """The name of the strategy whose loader recognises the adapter file or folder `path`."""
    from .strategies.base import adapter_loaders

    path = Path(path)
    if not path.exists():
        raise UserError(f"--adapter {path}: file not found")
    if path.suffix == ".safetensors":
        check_safetensors_file(path, "--adapter")
    for name, (can_load, _) in adapter_loaders().items():
        if can_load(path):
            return name
    raise UserError(f"--adapter {path}: not an adapter format sdft knows "
                    "(LoRA, textual-inversion embedding or hypernetwork)")


def load_adapter(pipe, path: str | Path, scale: float = 1.0) -> str:
    """Load one adapter file into `pipe` with the loader of the strategy that wrote it."""
    from .strategies.base import adapter_loaders

    _, load_into = adapter_loaders()[detect_adapter_kind(path)]
    try:
        return load_into(pipe, str(path), scale)
    except (RuntimeError, ValueError) as exc:
        found = SIZE_MISMATCH.search(str(exc))
        if not found:
            raise
        name, theirs, ours = found.groups()
        raise UserError(f"--adapter {path} does not fit this base: it holds {name} with shape {theirs} where this "
                        f"base has {ours} (it was trained on a base of another size, e.g. SD 1.5 against SDXL or the "
                        "toy base)") from exc


def check_safetensors_file(path: Path, flag: str) -> None:
    """A UserError naming the file when its safetensors header cannot be read (damaged or cut short)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{flag} {path}: not a readable .safetensors file ({' '.join(str(exc).split())[:120]}); "
                        "is it damaged or only partly downloaded?") from exc


SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                           r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")



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

"""Prior preservation: class images generated once by the base model, cached, and reused."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .data import IMAGE_SUFFIXES, format_prompt
from .models import cache_root

log = logging.getLogger(__name__)


def class_prompt(config) -> str:
    return format_prompt(config.prior.class_prompt, config.data.token, config.data.class_word)


def class_image_folder(config, base_source: str, resolution: int) -> Path:
    """The user's --class-images folder, or a cache folder keyed by everything that shapes the images."""
    if config.prior.class_images:
        return Path(config.prior.class_images).expanduser()
    key = json.dumps({"base": base_source, "prompt": class_prompt(config), "resolution": resolution,
                      "seed": config.train.seed, "steps": config.prior.generation_steps,
                      "guidance": config.output.guidance}, sort_keys=True)
    return cache_root() / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:16]


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def ensure_class_images(config, components, resolution: int, accelerator) -> tuple[Path, int]:
    """Make sure the class folder holds num_class_images images; return (folder, images generated now).

    Must run before the strategy modifies the base: the class images show what the base knows.
    """
    import torch
    from tqdm.auto import tqdm

    from .inference import pipeline_from_components

    folder = class_image_folder(config, components.source, resolution)
    wanted = config.prior.num_class_images
    have = count_images(folder)
    generated = 0
    if have < wanted and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        pipe = pipeline_from_components(components)
        pipe.set_progress_bar_config(disable=True)
        prompt = class_prompt(config)
        bar = tqdm(total=wanted - have, desc=f"class images '{prompt}'")
        index = have
        while index < wanted:
            n = min(config.prior.generation_batch, wanted - index)
            # One generator per image, seeded by its index: the set does not depend on batch size.
            gens = [torch.Generator().manual_seed(config.train.seed * 100_003 + index + i) for i in range(n)]
            with torch.no_grad(), accelerator.autocast():
                images = pipe([prompt] * n, num_inference_steps=config.prior.generation_steps,
                              guidance_scale=config.output.guidance, generator=gens, height=resolution,
                              width=resolution).images
            for i, image in enumerate(images):
                tmp = folder / f".class-{index + i:05d}.png"
                image.save(tmp)
                tmp.rename(folder / f"class-{index + i:05d}.png")  # never leave a half-written image
            index += n
            generated += n
            bar.update(n)
        bar.close()
        log.info("generated %d class images in %s", generated, folder)
    accelerator.wait_for_everyone()
    return folder, generated

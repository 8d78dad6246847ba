"""Prior preservation: class images generated once by the base model, cached, and reused."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .data import IMAGE_SUFFIXES, format_prompt
from .models import cache_root

log = logging.getLogger(__name__)


def class_image_configs(config, concepts) -> list:
    """One config per set of class images the run's concepts need (prior preservation per concept): each with
    its concept's token and class filled in, concepts whose class prompts agree sharing one. With several sets,
    a --class-images folder holds one sub-folder per class. A concept without a class gets none."""
    import copy

    from . import UserError

    found: dict[tuple[str, ...], object] = {}
    templates = config.prior.class_prompts or [config.prior.class_prompt]
    for concept in concepts:
        if not concept.class_word and any("{class}" in t for t in templates):
            continue
        own = copy.deepcopy(config)
        own.data.token, own.data.class_word = concept.token, concept.class_word
        found.setdefault(tuple(class_prompts(own)), own)
    if not found:
        raise UserError("prior preservation needs --class-word (e.g. dog), or --no-prior")
    if len(found) > 1 and config.prior.class_images:
        from .formats import file_stem

        for prompts, own in found.items():
            # The class word for people, a hash of the prompts so two sets never share a folder.
            digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:8]
            name = f"{file_stem(own.data.class_word, fallback='class')}-{digest}"
            own.prior.class_images = str(Path(config.prior.class_images) / name)
    return list(found.values())


def class_prompts(config) -> list[str]:
    """The prompts the class images are generated from, {token}/{class} filled in."""
    templates = config.prior.class_prompts or [config.prior.class_prompt]
    return [format_prompt(t, config.data.token, config.data.class_word) for t in templates]


def class_image_folder(config, base_source: str, resolution: int) -> Path:
    """The user's --class-images folder, or a cache folder keyed by everything that shapes the images."""
    if config.prior.class_images:
        return Path(config.prior.class_images).expanduser()
    prompts = class_prompts(config)
    # A single prompt keys as a plain string, as before class_prompts existed: existing caches stay valid.
    key = json.dumps({"base": base_source, "prompt": prompts[0] if len(prompts) == 1 else prompts,
                      "resolution": resolution, "seed": config.train.seed, "steps": config.prior.generation_steps,
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

    from .inference import float32_vae_decode, pipeline_from_components

    folder = class_image_folder(config, components.source, resolution)
    wanted = config.prior.num_class_images
    have = count_images(folder)
    generated = 0
    if have < wanted and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        pipe = pipeline_from_components(components)
        pipe.set_progress_bar_config(disable=True)
        prompts = class_prompts(config)
        label = prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts"
        bar = tqdm(total=wanted - have, desc=f"class images '{label}'")
        index = have
        while index < wanted:
            n = min(config.prior.generation_batch, wanted - index)
            # Prompt and generator depend only on the image's index: the set does not depend on batch size.
            batch_prompts = [prompts[(index + i) % len(prompts)] for i in range(n)]
            gens = [torch.Generator().manual_seed(config.train.seed * 100_003 + index + i) for i in range(n)]
            with torch.no_grad(), accelerator.autocast(), float32_vae_decode(pipe.vae):
                images = pipe(batch_prompts, num_inference_steps=config.prior.generation_steps,
                              guidance_scale=config.output.guidance, generator=gens, height=resolution,
                              width=resolution).images
            for i, image in enumerate(images):
                name = f"class-{index + i:05d}"
                # The caption first, then the image by an atomic rename: an image never lacks its prompt.
                (folder / f"{name}.txt").write_text(batch_prompts[i])
                tmp = folder / f".{name}.png"
                image.save(tmp)
                tmp.rename(folder / f"{name}.png")
            index += n
            generated += n
            bar.update(n)
        bar.close()
        log.info("generated %d class images in %s", generated, folder)
    accelerator.wait_for_everyone()
    return folder, generated

"""Shared fixtures: an offline, isolated environment and the tiny base."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Isolate caches before any library reads them: no network, nothing written to the user's home.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="sdft-tests-"))
os.environ.setdefault("SDFT_HOME", str(_SESSION_TMP / "sdft-home"))
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf-home")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["DIFFUSERS_VERBOSITY"] = "error"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAR_IMAGES = REPO / "data_examples" / "star"
PHOTOS = REPO / "data_examples" / "photos"


@pytest.fixture(scope="session")
def star_images() -> Path:
    return STAR_IMAGES


@pytest.fixture(scope="session")
def photos() -> Path:
    """Five JPEGs made like camera photos (odd sizes, EXIF rotation, greyscale, CMYK, progressive), in the repo."""
    return PHOTOS


@pytest.fixture()
def tiny_components():
    """A freshly loaded tiny base (built once per session, then read from the cache)."""
    from finetune.models import load_components

    return load_components("tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_folder() -> Path:
    """The tiny random SDXL-architecture pipeline (lab.random_bases), saved once as a diffusers folder."""
    from lab.random_bases import build_random_sdxl_pipeline

    folder = _SESSION_TMP / "tiny-sdxl"
    if not (folder / "model_index.json").exists():
        build_random_sdxl_pipeline(tiny=True, seed=0).save_pretrained(folder)
    return folder


def ddim_pipeline(name: str):
    """A base loaded for comparisons, sampling with DDIM as training's sample grids do."""
    from diffusers import DDIMScheduler

    from finetune.models import load_pipeline

    pipe = load_pipeline(name)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def make_config(method: str, output: Path, images: Path = STAR_IMAGES, **dotted):
    """A small, fast run config: `make_config('lora', tmp, **{'train.steps': 3})`."""
    from finetune.config import RunConfig

    config = RunConfig.for_method(method)
    config.data.images = str(images)
    config.data.token = "sks"
    config.data.class_word = "star"
    config.output.output = str(output)
    config.output.sample_seeds = [0]
    config.output.sample_steps = 2
    config.train.steps = 2
    # Prior preservation (on for DreamBooth) with few, cheap class images keeps tests fast.
    config.prior.num_class_images = 2
    config.prior.generation_steps = 2
    for key, value in dotted.items():
        config.set(key, value)
    return config


def render(pipe, prompt: str, seed: int = 0, steps: int = 3):
    """One float image from `pipe` on a fixed seed (no uint8 rounding, so small changes show)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=gen, output_type="np").images[0]


def unet_output(unet, hidden):
    """The UNet's prediction for one fixed noisy latent at t=400 under `hidden` (comparing adapted models)."""
    import torch

    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(sample, torch.tensor([400]), hidden).sample


def prompt_states(components, prompt: str = "a photo of sks"):
    """(token ids, text-encoder hidden states) of one prompt through the components' first encoder."""
    import torch

    ids = components.tokenizer([prompt], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, components.text_encoder(ids)[0]

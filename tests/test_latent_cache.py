"""Latents cached on disk: reused across runs, recomputed when the image or the resolution changes."""

from __future__ import annotations

import shutil

import torch
from PIL import Image

from conftest import make_config


def test_disk_cache_is_reused_and_invalidated(tmp_path, star_images, tiny_components):
    from finetune.batching import InstanceBatches
    from finetune.data import load_examples
    from finetune.latent_cache import DiskLatentCache

    images = tmp_path / "images"
    shutil.copytree(star_images, images)
    cache_dir = tmp_path / "cache"
    vae = tiny_components.vae

    def fill(resolution: int) -> InstanceBatches:
        examples = load_examples(str(images), "{token}", "sks", "")
        cache = DiskLatentCache(cache_dir, vae, resolution, True, torch.float32)
        batches = InstanceBatches(examples, vae, tiny_components.vae_scale, resolution, center_crop=True,
                                  random_flip=False, cache_latents=True, device="cpu", dtype=torch.float32,
                                  disk_cache=cache)
        batches.fill_cache()
        return batches

    first = fill(64)
    assert first.vae_encodes == 5 and len(list(cache_dir.glob("*.safetensors"))) == 5
    again = fill(64)
    assert again.vae_encodes == 0  # a second run encodes nothing
    specs = first.specs(0, 0, 3, 0, 1)
    assert torch.equal(first.latents(specs), again.latents(first.specs(0, 0, 3, 0, 1)))

    edited = sorted(images.glob("*.png"))[0]
    Image.open(edited).transpose(Image.Transpose.ROTATE_90).save(edited)
    assert fill(64).vae_encodes == 1  # only the edited image misses
    assert fill(32).vae_encodes == 5  # another resolution misses everywhere
    assert not list(cache_dir.glob(".tmp-*"))  # no half-written entries left behind


def test_runs_sharing_a_disk_cache_train_identically(tmp_path):
    from finetune.trainer import run_training

    settings = {"data.latent_cache_dir": str(tmp_path / "cache"), "output.formats": ["kohya"], "train.lr": 1e-2}
    one = run_training(make_config("lora", tmp_path / "one", **settings))
    two = run_training(make_config("lora", tmp_path / "two", **settings))
    assert one.summary["vae_encodes"] == 5 and two.summary["vae_encodes"] == 0
    a, b = one.strategy.state_dict(), two.strategy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

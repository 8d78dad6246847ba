"""Aspect-ratio bucketing: sizes, assignment, one bucket per batch, and a run on photos of mixed shapes."""

from __future__ import annotations

import torch
from PIL import Image

from conftest import make_config


def test_buckets_keep_the_area_and_match_the_aspect_ratio():
    from finetune.buckets import assign_bucket, make_buckets

    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert assign_bucket((1600, 900), buckets, 512, 64) == (640, 384)  # 16:9 -> the widest bucket
    assert assign_bucket((900, 1200), buckets, 512, 64) == (448, 576)  # 3:4
    assert assign_bucket((500, 500), buckets, 512, 64) == (512, 512)
    assert assign_bucket((300, 200), buckets, 512, 64, no_upscale=True) == (256, 192)  # never enlarged


def test_each_batch_comes_from_one_bucket_and_trains(tmp_path):
    from finetune.batching import InstanceBatches
    from finetune.data import load_examples
    from finetune.models import load_components
    from finetune.trainer import run_training

    images = tmp_path / "mixed"
    images.mkdir()
    for i, size in enumerate([(96, 64), (100, 60), (64, 64), (60, 96), (64, 100)]):
        Image.new("RGB", size, (40 * i, 200, 90)).save(images / f"{i}.png")
    components = load_components("tiny")
    examples = load_examples(str(images), "{token}", "sks", "")
    sizes = [(80, 48), (80, 48), (64, 64), (48, 80), (48, 80)]
    batches = InstanceBatches(examples, components.vae, components.vae_scale, 64, center_crop=True,
                              random_flip=False, cache_latents=True, device="cpu", dtype=torch.float32, sizes=sizes)
    seen = set()
    for step in range(12):
        specs = batches.specs(0, step, 2, 0, 1)
        assert len({sizes[s.index] for s in specs}) == 1  # one bucket per batch
        latents = batches.latents(specs)
        w, h = sizes[specs[0].index]
        assert latents.shape == (2, 4, h // 4, w // 4)
        seen.add((w, h))
    assert seen == set(sizes)  # every bucket gets its turn

    config = make_config("lora", tmp_path / "run", images=images, **{
        "data.buckets": True, "data.bucket_step": 16, "train.steps": 3, "train.batch_size": 2,
        "output.formats": ["kohya"]})
    summary = run_training(config).summary
    assert torch.isfinite(torch.tensor(summary["final_loss"]))


def _first_scalar(run_dir, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "logs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return acc.Scalars(tag)[0].value


def test_buckets_work_with_prior_preservation(tmp_path):
    """Wide instance images train in their own bucket next to square class images (two UNet calls per
    step): the instance loss is exactly the one of a run without prior, and the prior loss is real."""
    from finetune.trainer import run_training

    images = tmp_path / "wide"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), (60 * i, 120, 200)).save(images / f"{i}.png")
    settings = {"data.buckets": True, "data.bucket_step": 16, "train.steps": 1, "train.batch_size": 2,
                "output.formats": ["kohya"]}
    with_prior = make_config("lora", tmp_path / "prior", images=images,
                             **{**settings, "prior.enabled": True, "prior.weight": 0.5})
    run_training(with_prior)
    without = make_config("lora", tmp_path / "plain", images=images, **{**settings, "prior.enabled": False})
    run_training(without)
    instance = _first_scalar(tmp_path / "prior", "loss_instance")
    assert abs(instance - _first_scalar(tmp_path / "plain", "loss")) < 1e-6
    prior = _first_scalar(tmp_path / "prior", "loss_prior")
    assert prior > 0 and abs(_first_scalar(tmp_path / "prior", "loss") - (instance + 0.5 * prior)) < 1e-5

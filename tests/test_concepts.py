"""Several data sets in one run: kohya-style `N_token class/` folders and a recipe's data.datasets list, mixed by
their repeats, deterministically (exact resume), with per-concept tokens, captions and class images."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import UserError
from finetune.cli import main
from finetune.config import RunConfig, shareable_config_dict

from conftest import PHOTOS, STAR_IMAGES


@pytest.fixture()
def kohya_folder(tmp_path) -> Path:
    """kohya's train_data_dir: the star five images at 2 repeats, the photos at 1."""
    root = tmp_path / "train"
    shutil.copytree(STAR_IMAGES, root / "2_zwx star")
    shutil.copytree(PHOTOS, root / "1_ohwx thing")
    return root


def test_kohya_folders_are_read_as_concepts(kohya_folder):
    from finetune.concepts import concepts_of, load_concept_examples

    config = RunConfig.for_method("lora")
    config.data.images = str(kohya_folder)
    concepts = concepts_of(config.data)
    assert [(c.name, c.repeats, c.token, c.class_word) for c in concepts] == [
        ("1_ohwx thing", 1, "ohwx", "thing"), ("2_zwx star", 2, "zwx", "star")]
    examples = load_concept_examples(concepts)
    assert Counter(e.concept for e in examples) == {0: 5, 1: 5}
    # Photos have no caption files: the prompt template with their folder's words; the star's caption files
    # fill {token} with their own folder's token.
    assert {e.caption for e in examples if e.concept == 0} == {"a photo of ohwx thing"}
    assert all(e.caption.startswith("a photo of zwx on a ") for e in examples if e.concept == 1)


def test_an_ordinary_folder_stays_one_concept(star_images):
    from finetune.concepts import concepts_of

    config = RunConfig.for_method("lora")
    config.data.images, config.data.token = str(star_images), "zz"
    (concept,) = concepts_of(config.data)
    assert (concept.images, concept.token, concept.repeats) == (str(star_images), "zz", 1)


def test_draws_follow_the_repeats_and_split_exactly_over_processes():
    """Over whole epochs each concept gets repeats x images samples; N processes see the 1-process batch."""
    from PIL import Image

    from finetune.batching import InstanceBatches
    from finetune.concepts import Concept, draw_pool
    from finetune.data import Example

    concepts = [Concept("a", "a", "sks", "", "{token}", repeats=2), Concept("b", "b", "zwx", "", "{token}", repeats=1)]
    image = Image.new("RGB", (8, 8))
    examples = [Example(Path(f"{c}{i}.png"), image, "", concept=c) for c in (0, 1) for i in range(3)]
    batches = InstanceBatches(examples, None, 1.0, 8, center_crop=True, random_flip=False, cache_latents=False,
                              device="cpu", dtype=torch.float32, pool=draw_pool(examples, concepts))
    epoch = 3 * 2 + 3 * 1
    drawn = [s.index for step in range(4 * epoch // 3) for s in batches.specs(0, step, 3, 0, 1)]
    assert Counter(examples[i].concept for i in drawn) == {0: 4 * 6, 1: 4 * 3}
    assert Counter(drawn) == {i: 8 if i < 3 else 4 for i in range(6)}  # every image as often as its repeats say
    for step in range(5):
        split = [s.index for rank in range(3) for s in batches.specs(0, step, 1, rank, 3)]
        assert split == [s.index for s in batches.specs(0, step, 3, 0, 1)]


def test_recipe_datasets_round_trip_and_hide_local_paths(tmp_path):
    data = {"method": "lora", "data": {"datasets": [
        {"images": str(tmp_path / "dogs"), "token": "sks", "class_word": "dog", "repeats": 3},
        {"images": str(tmp_path / "style"), "token": "zwx", "caption_dropout": 0.1}]}}
    config = RunConfig.from_dict(data)
    assert [d.repeats for d in config.data.datasets] == [3, 1]
    assert RunConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    shared = shareable_config_dict(config)
    assert [d["images"] for d in shared["data"]["datasets"]] == ["dogs", "style"]
    with pytest.raises(UserError, match=r"data.datasets\[0\].repeat"):
        RunConfig.from_dict({"method": "lora", "data": {"datasets": [{"images": "x", "repeat": 2}]}})
    with pytest.raises(UserError, match="repeats"):
        RunConfig.from_dict({"method": "lora", "data": {"datasets": [{"images": "x", "repeats": 0}]}}).validate()
    both = RunConfig.from_dict({"method": "lora", "data": {"images": "y", "datasets": [{"images": "x"}]}})
    with pytest.raises(UserError, match="not both"):
        both.validate()


def _argv(images: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["lora", "--images", str(images), "--output", str(out), "--steps", str(steps), "--checkpoint-every", "2",
            "--sample-seeds", "0", "--sample-steps", "1", "--formats", "diffusers", "--lr", "1e-3", *extra]


def test_two_concept_run_reports_its_draws_and_resumes_exactly(tmp_path, kohya_folder):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_argv(kohya_folder, whole, 6, "--batch-size", "2", "--random-flip")) == 0
    assert main(_argv(kohya_folder, split, 2, "--batch-size", "2", "--random-flip")) == 0
    assert main([*_argv(kohya_folder, split, 6, "--batch-size", "2", "--random-flip"), "--resume", "latest"]) == 0
    name = "pytorch_lora_weights.safetensors"
    expected, resumed = load_file(str(whole / name)), load_file(str(split / name))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)

    summary = json.loads((whole / "summary.json").read_text())
    datasets = summary["datasets"]
    assert {d["name"]: (d["images"], d["repeats"]) for d in datasets} == {"1_ohwx thing": (5, 1),
                                                                       "2_zwx star": (5, 2)}
    # 6 steps x 2 samples = 12 draws from a 15-sample epoch (5 x 1 + 5 x 2), in the order the batches drew them.
    assert sum(d["samples"] for d in datasets) == 12
    # Both concepts' prompts are sampled by default.
    assert summary["sample_prompts"] == ["a photo of ohwx thing", "a photo of zwx star"]


def test_textual_inversion_refuses_a_second_word(tmp_path, kohya_folder):
    with pytest.raises(UserError, match="one new word"):
        from finetune.trainer import train

        config = RunConfig.for_method("textual_inversion")
        config.data.images, config.data.token = str(kohya_folder), "sks"
        config.output.output = str(tmp_path / "out")
        train(config)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_prior_preservation_generates_class_images_per_concept(tmp_path, kohya_folder):
    out = tmp_path / "db"
    assert main(["dreambooth", "--images", str(kohya_folder), "--output", str(out), "--steps", "1",
                 "--num-class-images", "2", "--generation-steps", "1", "--class-images", str(tmp_path / "classes"),
                 "--sample-seeds", "0", "--sample-steps", "1", "--formats", "diffusers"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    prompts = {p.read_text() for p in (tmp_path / "classes").rglob("*.txt")}
    assert prompts == {"a photo of star", "a photo of thing"}
    assert sorted(Path(p).name.rsplit("-", 1)[0] for p in summary["class_images"]) == ["star", "thing"]

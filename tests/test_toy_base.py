"""The built-in toy-world base knows its world, and the quality benchmark runs end to end."""

from __future__ import annotations

import json

import pytest

# What the shipped base reaches on this 48-sample spread, minus a margin (measured: see the asset README).
MIN_ALL_CORRECT = 0.85
MIN_SHAPE = 0.85


@pytest.fixture(scope="module")
def toy_pipe():
    from finetune.models import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_base_draws_what_its_prompts_ask(toy_pipe):
    """The base follows its own prompts far above chance (1 in 96 for colour, shape and background together).

    A quick guard on 48 samples (a broken base, tokenizer or loader fails here); the base's >= 95% is measured
    on 1152 samples by the slow test below.
    """
    from lab.toyworld.bench import class_prompt_set, generate_batched
    from lab.toyworld.checker import accuracy

    prompts = class_prompt_set(24)
    texts = [p for p, *_ in prompts for _ in range(2)]
    expected = [(c, s, b) for _, c, s, b in prompts for _ in range(2)]
    seeds = [100 + k for _ in prompts for k in range(2)]
    images = generate_batched(toy_pipe, texts, seeds, steps=25, guidance=7.5, batch=48)
    scores = accuracy(images, expected)
    assert scores["all"] >= MIN_ALL_CORRECT and scores["shape"] >= MIN_SHAPE, scores


# The base's quoted accuracy: its 96 prompts x 12 sampling seeds (1152 samples).
BASE_SCORE_SEEDS = [7, 100, 101, 200, 201, 202, 300, 301, 302, 303, 304, 305]


@pytest.mark.slow
def test_shipped_base_scores_95_percent_on_its_own_prompts():
    """Colour, shape and background all right for >= 95% of 1152 samples at the base-score guidance (~3.5 min)."""
    from lab.toyworld.bench import score_base
    from lab.toyworld.settings import BASE_SCORE_GUIDANCE

    scores = score_base("tiny", BASE_SCORE_SEEDS, BASE_SCORE_GUIDANCE)
    assert scores["samples"] == 1152 and scores["all"] >= 0.95, scores


def test_unknown_word_does_not_make_stars(toy_pipe):
    """The star is a novel concept: the base never draws one, even when asked for it."""
    from lab.toyworld.bench import generate_batched
    from lab.toyworld.checker import star_rate

    images = generate_batched(toy_pipe, ["a red star on a white background"] * 16, list(range(16)), steps=25,
                              guidance=7.5, batch=16)
    assert star_rate(images) <= 0.1


def test_quality_bench_smoke(tmp_path):
    """Two training steps per condition: the bench writes scores for every run, a table and grids."""
    from lab.toyworld.bench import run_quality_bench
    from lab.toyworld.settings import QualityBenchConfig

    cfg = QualityBenchConfig(output=str(tmp_path), methods=["lora"], priors=[False], seeds=[0], steps=2,
                             samples_per_background=2, class_prompts=4, samples_per_class_prompt=1, sample_steps=4)
    results = run_quality_bench(cfg, log=lambda _: None)
    run = results["runs"]["lora|prior=0|seed=0"]
    for key in ("subject_fidelity", "prompt_fidelity", "class_accuracy", "concept_leak", "class_drift"):
        assert 0.0 <= abs(run[key]) <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    assert "| lora | off | 1 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "grid-lora.png").is_file() and len(list((tmp_path / "concept").glob("concept-?.png"))) == 5
    # Each concept image has its star's loss mask beside it (for --alpha-mask runs); white only on the star.
    from PIL import Image

    mask = Image.open(tmp_path / "concept" / "concept-0-masklabel.png")
    assert mask.mode == "L" and 0.05 < sum(v > 0 for v in mask.getdata()) / (64 * 64) < 0.5


def test_folder_from_toy_base_command_loads_as_a_model(tmp_path, toy_pipe):
    """`python -m lab toy-base --output DIR` writes parts without model_index.json; --model DIR must still open it."""
    import shutil

    import torch

    from finetune import UserError
    from finetune.models import load_pipeline, resolve_base, shipped_toy_base

    folder = tmp_path / "base"
    shutil.copytree(shipped_toy_base(), folder, ignore=shutil.ignore_patterns("*.md", "pretrain-stage*.json"))
    with pytest.raises(UserError, match="model_index.json"):
        resolve_base(str(folder))  # parts alone could be any broken folder: refused with a clear message
    (folder / "pretrain.json").write_text("{}")  # what marks a folder written by `python -m lab toy-base`
    pipe = load_pipeline(str(folder))
    for name, value in toy_pipe.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], value)
    assert pipe.tokenizer("a red circle").input_ids == toy_pipe.tokenizer("a red circle").input_ids


def test_quality_bench_can_use_rendered_class_images(tmp_path):
    """--prior-images renders: prior preservation trains on captioned renders, none of them a drift probe."""
    from finetune import UserError
    from lab.toyworld.bench import class_prompt_set, run_quality_bench
    from lab.toyworld.settings import QualityBenchConfig

    cfg = QualityBenchConfig(output=str(tmp_path), methods=["lora"], priors=[True], seeds=[0], steps=1,
                             samples_per_background=1, class_prompts=4, samples_per_class_prompt=1, sample_steps=2,
                             prior_images="renders", class_images=6)
    run_quality_bench(cfg, log=lambda _: None)
    summary = json.loads((tmp_path / "runs" / "lora_prior=1_seed=0" / "summary.json").read_text())
    assert summary["class_images"] == [str(tmp_path / "class-renders")] and summary["class_images_generated"] == 0
    captions = [p.read_text() for p in sorted((tmp_path / "class-renders").glob("*.txt"))]
    probes = {prompt for prompt, *_ in class_prompt_set(4)}
    assert len(captions) == 6 and all(c.startswith("a photo of a ") for c in captions)
    assert not {c.replace("a photo of ", "", 1) for c in captions} & probes
    with pytest.raises(UserError, match="prior_images"):
        run_quality_bench(QualityBenchConfig(**{**cfg.__dict__, "prior_images": "generated"}), log=lambda _: None)


def test_decoder_stage_changes_only_the_decoder_and_repeats_exactly(tmp_path):
    """`python -m lab toy-base --init-from BASE --decoder-steps N --unet-steps 0` sharpens the decoder alone: the encoder
    (so the latent space every UNet and fine-tune relies on), text encoder and UNet stay bit-identical, and a
    rerun from the same seed writes the same weights."""
    import shutil

    from safetensors.torch import load_file

    from finetune import UserError
    from finetune.models import shipped_toy_base
    from lab.toyworld.pretrain import pretrain
    from lab.toyworld.settings import PretrainConfig

    base = tmp_path / "base"
    shutil.copytree(shipped_toy_base(), base, ignore=shutil.ignore_patterns("*.md", "pretrain-stage*.json"))
    (base / "pretrain.json").write_text("{}")
    cfg = PretrainConfig(init_from=str(base), images=32, decoder_steps=2, decoder_crop_fraction=0.5,
                         decoder_edge_weight=1.0, unet_steps=0, vae_batch=4)
    for name in ("first", "again"):
        pretrain(cfg, tmp_path / name, log=lambda _: None)

    def weights(folder, part):
        return load_file(next((folder / part).glob("*.safetensors")))

    vae_before, vae_after, vae_again = (weights(tmp_path / f, "vae") for f in ("base", "first", "again"))
    changed = {key for key in vae_before if not vae_before[key].equal(vae_after[key])}
    assert changed and all(key.startswith(("decoder.", "post_quant_conv.")) for key in changed)
    assert all(vae_after[key].equal(vae_again[key]) for key in vae_after)
    for part in ("unet", "text_encoder"):
        before, after = weights(base, part), weights(tmp_path / "first", part)
        assert all(before[key].equal(after[key]) for key in before)
    with pytest.raises(UserError, match="--init-from"):
        pretrain(PretrainConfig(decoder_steps=1), tmp_path / "refused", log=lambda _: None)
    assert not (tmp_path / "refused").exists()


def test_main_caption_rate_mixes_in_the_main_phrasing_without_changing_the_default_stream():
    """`--main-caption-rate` sets the share of captions naming colour, shape and background in the main phrasing;
    at 0 the captions are exactly those of the shipped recipe (same draws from the same generator)."""
    import random

    from lab.toyworld.world import CAPTION_TEMPLATES, Scene, caption

    scene = Scene("circle", "red", "pink", (10, 10, 40, 40))
    main = "a red circle on a pink background"
    legacy_rng, rng = random.Random(5), random.Random(5)
    legacy = [legacy_rng.choice(CAPTION_TEMPLATES).format(c="red", s="circle", b="pink") for _ in range(200)]
    assert [caption(scene, rng) for _ in range(200)] == legacy
    rng = random.Random(5)
    assert {caption(scene, rng, main_rate=1.0) for _ in range(50)} == {main}
    rng = random.Random(5)
    share = sum(caption(scene, rng, main_rate=0.5) == main for _ in range(2000)) / 2000
    assert 0.5 < share < 0.6  # half forced, plus the template's own 1/16 of the other half


def test_bf16_pretraining_repeats_exactly_and_really_runs_in_bf16(tmp_path):
    """`python -m lab toy-base --precision bf16 --fused-optimizer` (the fast path on AMX CPUs) writes a loadable base, the
    same weights again from the same seed, and different weights from fp32 (autocast really engaged); an unknown
    precision is refused before anything is written."""
    from safetensors.torch import load_file

    from finetune import UserError
    from finetune.models import build_toy_pipeline
    from lab.toyworld.pretrain import pretrain
    from lab.toyworld.settings import PretrainConfig

    small = dict(images=48, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, unet_warmup=1)
    runs = {"bf16": PretrainConfig(**small, precision="bf16", fused_optimizer=True),
            "bf16_again": PretrainConfig(**small, precision="bf16", fused_optimizer=True),
            "fp32": PretrainConfig(**small, precision="fp32", fused_optimizer=True)}
    for name, cfg in runs.items():
        pretrain(cfg, tmp_path / name, log=lambda _: None)

    def weights(name, part):
        return load_file(next((tmp_path / name / part).glob("*.safetensors")))

    for part in ("vae", "unet", "text_encoder"):
        first, again, fp32 = weights("bf16", part), weights("bf16_again", part), weights("fp32", part)
        assert all(first[key].equal(again[key]) for key in first)
        assert any(not first[key].equal(fp32[key]) for key in first)
    loaded = build_toy_pipeline(tmp_path / "bf16").unet.state_dict()
    saved = weights("bf16", "unet")
    assert all(loaded[key].to(saved[key].dtype).equal(saved[key]) for key in saved)
    with pytest.raises(UserError, match="precision"):
        pretrain(PretrainConfig(**small, precision="fp16"), tmp_path / "refused", log=lambda _: None)
    assert not (tmp_path / "refused").exists()


def test_caption_curriculum_moves_from_the_main_phrasing_to_the_mix():
    """`--main-caption-start S --main-caption-rate R`: the main phrasing's share goes linearly from S at the first
    UNet step to R at the last; without a start, or with S = R, it is R throughout (the v3-v5 chain's stages)."""
    from lab.toyworld.pretrain import main_caption_share
    from lab.toyworld.settings import PretrainConfig

    curriculum = PretrainConfig(unet_steps=101, main_caption_start=1.0, main_caption_rate=0.25)
    shares = [main_caption_share(curriculum, step) for step in range(101)]
    assert shares[0] == 1.0 and shares[-1] == pytest.approx(0.25) and shares[50] == pytest.approx(0.625)
    assert all(a > b for a, b in zip(shares, shares[1:]))
    for start in (None, 0.5):
        flat = PretrainConfig(unet_steps=101, main_caption_start=start, main_caption_rate=0.5)
        assert {main_caption_share(flat, step) for step in range(101)} == {0.5}


def test_score_base_refuses_a_phrasing_the_checker_cannot_score():
    """`python -m lab score-base --template` must name colour, shape and background: a clear error, no model loaded."""
    from finetune import UserError
    from lab.toyworld.bench import score_base
    from lab.toyworld.world import world_prompts

    with pytest.raises(UserError, match="must name"):
        score_base("tiny", template="a photo of a {c} {s}")
    prompts = world_prompts("{c} {s}, {b} background")
    assert len(prompts) == 96 and ("red circle, white background", "red", "circle", "white") in prompts

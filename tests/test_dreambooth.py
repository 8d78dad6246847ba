"""DreamBooth: what trains, prior preservation's class-image cache, and the full-model exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_config, render


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_unet_trains_text_encoder_only_when_asked(tmp_path, tiny_components):
    from finetune.models import load_components
    from finetune.trainer import run_training

    for train_te, components in ((False, tiny_components), (True, load_components("tiny"))):
        before = {part: _snapshot(getattr(components, part)) for part in ("unet", "vae", "text_encoder")}
        config = make_config("dreambooth", tmp_path / f"te{train_te}", **{
            "train.lr": 1e-4, "dreambooth.train_text_encoder": train_te, "dreambooth.text_encoder_lr": 2e-5,
            "output.formats": ["diffusers"]})
        outcome = run_training(config, components)
        assert _changed(before["unet"], components.unet), "the UNet did not train"
        assert not _changed(before["vae"], components.vae), "the VAE must stay frozen"
        assert bool(_changed(before["text_encoder"], components.text_encoder)) == train_te
        lrs = [g["lr"] for g in outcome.strategy.param_groups()]
        assert lrs == ([1e-4, 2e-5] if train_te else [1e-4])


def test_mixed_precision_never_rounds_the_weights_that_train(tmp_path, tiny_components):
    """Under bf16 the frozen text encoder drops to bf16, but the UNet DreamBooth trains keeps its float32 values:
    one step at a negligible lr leaves it where it was, not rounded to bf16 (~1e-3 relative)."""
    from finetune.trainer import run_training

    before = _snapshot(tiny_components.unet)
    config = make_config("dreambooth", tmp_path / "run", **{
        "train.lr": 1e-12, "train.steps": 1, "train.mixed_precision": "bf16", "prior.enabled": False,
        "output.formats": ["diffusers"], "output.sample_seeds": []})
    outcome = run_training(config, tiny_components)
    unet, encoder = outcome.components.unet, outcome.components.text_encoder
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert next(encoder.parameters()).dtype == torch.bfloat16
    worst = max(float((v.float() - before[k]).abs().max()) for k, v in unet.state_dict().items())
    assert 0 < worst < 1e-9, worst


def test_word_embeddings_can_stay_frozen_while_the_text_encoder_trains(tmp_path, tiny_components):
    from finetune.trainer import run_training

    text_encoder = tiny_components.text_encoder
    before = _snapshot(text_encoder)
    config = make_config("dreambooth", tmp_path / "run", **{
        "train.lr": 1e-4, "dreambooth.train_text_encoder": True, "dreambooth.train_token_embeddings": False,
        "output.formats": ["diffusers"]})
    run_training(config, tiny_components)
    changed = _changed(before, text_encoder)
    embedding = next(k for k in before if k.endswith("token_embedding.weight"))
    assert changed, "the text encoder's layers did not train"
    assert embedding not in changed, "the word-embedding table must stay as it was"


def test_class_images_generated_once_and_reused(tmp_path, star_images):
    from finetune.prior import count_images
    from finetune.trainer import run_training

    # A prompt no other test uses, so the session-wide class-image cache starts empty for it.
    settings = {"prior.num_class_images": 3, "output.formats": ["diffusers"], "train.steps": 1,
                "prior.class_prompt": "a photo of {class} for the cache test"}
    first = run_training(make_config("dreambooth", tmp_path / "a", **settings)).summary
    assert first["class_images_generated"] == 3
    assert len(first["class_images"]) == 1 and count_images(Path(first["class_images"][0])) == 3
    second = run_training(make_config("dreambooth", tmp_path / "b", **settings)).summary
    assert second["class_images"] == first["class_images"] and second["class_images_generated"] == 0
    # Asking for more generates only the missing ones; another prompt gets its own cache folder.
    more = run_training(make_config("dreambooth", tmp_path / "c", **{**settings, "prior.num_class_images": 4}))
    assert more.summary["class_images_generated"] == 1
    other = run_training(make_config("dreambooth", tmp_path / "d", **{**settings, "prior.class_prompt": "a {class} x"}))
    assert other.summary["class_images"] != first["class_images"]
    # A user folder is filled up to the requested count, then used as is.
    user = tmp_path / "my_class_images"
    own = run_training(make_config("dreambooth", tmp_path / "e", **{**settings, "prior.class_images": str(user)}))
    assert own.summary["class_images_generated"] == 3 and count_images(user) == 3


def test_prior_loss_is_logged_and_weighted(tmp_path, tiny_components):
    from finetune.trainer import run_training

    config = make_config("lora", tmp_path, **{"prior.enabled": True, "prior.weight": 0.5, "train.steps": 1,
                                               "output.formats": ["kohya"]})
    summary = run_training(config, tiny_components).summary
    events = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "loss_instance", "loss_prior"} <= set(tags)
    total = acc.Scalars("loss")[0].value
    parts = acc.Scalars("loss_instance")[0].value + 0.5 * acc.Scalars("loss_prior")[0].value
    assert abs(total - parts) < 1e-5 and summary["class_images_generated"] >= 0


def test_single_file_export_loads_with_from_single_file(tmp_path, tiny_components):
    from finetune.inference import pipeline_from_components
    from finetune.models import resolve_base
    from finetune.formats.single_file import load_single_file
    from finetune.trainer import run_training

    config = make_config("dreambooth", tmp_path, **{"train.lr": 1e-4, "prior.enabled": False})
    outcome = run_training(config, tiny_components)
    path = outcome.summary["exports"]["single_file"][0]
    loaded = load_single_file(path, resolve_base("tiny"))
    trained = pipeline_from_components(outcome.components)
    for module in (trained.unet, trained.text_encoder):
        module.eval()
    prompt = "a photo of sks star"
    expected = render(trained, prompt)
    assert np.abs(render(loaded, prompt) - expected).max() < 1e-4
    folder = outcome.summary["exports"]["diffusers"][0]
    from diffusers import StableDiffusionPipeline

    from_folder = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert np.abs(render(from_folder, prompt) - expected).max() < 1e-4
    assert json.loads((tmp_path / "pipeline" / "sdft_dreambooth.json").read_text())["token"] == "sks"


def test_extract_lora_cli_reproduces_full_rank(tmp_path, tiny_components, capsys):
    """sdft extract-lora at full rank turns a DreamBooth UNet into a LoRA that diffusers reproduces."""
    from finetune.cli import main
    from finetune.models import load_pipeline, resolve_base
    from finetune.trainer import run_training

    config = make_config("dreambooth", tmp_path / "run", **{"train.lr": 1e-3, "prior.enabled": False,
                                                             "output.formats": ["single_file"]})
    outcome = run_training(config, tiny_components)
    tuned_file = outcome.summary["exports"]["single_file"][0]
    out = tmp_path / "extracted.safetensors"
    assert main(["extract-lora", "--base", "tiny", "--tuned", tuned_file, "--rank", "256",
                 "--output", str(out)]) == 0
    assert "extracted" in capsys.readouterr().out
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(out))
    tuned = load_pipeline(tuned_file, single_file_config=resolve_base("tiny"))
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tuned.unet(sample, torch.tensor([500]), hidden).sample
        got = pipe.unet(sample, torch.tensor([500]), hidden).sample
        base = load_pipeline("tiny").unet(sample, torch.tensor([500]), hidden).sample
    err, moved = (got - want).abs().max().item(), (base - want).abs().max().item()
    # Biases and norms cannot be carried by a LoRA, so allow a small residual, far below the change itself.
    print(f"extract-lora full rank: max error {err:.3g} vs change {moved:.3g}")
    assert moved > 1e-3 and err < moved * 0.1, (err, moved)


def test_several_class_prompts_cycle_and_caption_their_images(tmp_path):
    """prior.class_prompts: image i is drawn from prompt i mod n, and trains under that prompt."""
    from PIL import Image

    from finetune.data import load_examples
    from lab.toyworld.checker import check
    from finetune.trainer import run_training

    prompts = ["a red circle on a white {class}", "a blue square on a pink {class}"]
    settings = {"prior.num_class_images": 3, "output.formats": ["diffusers"], "train.steps": 1,
                "prior.class_prompts": prompts, "data.class_word": "background", "prior.generation_steps": 20,
                "output.guidance": 7.5}
    summary = run_training(make_config("dreambooth", tmp_path / "a", **settings)).summary
    (folder,) = map(Path, summary["class_images"])
    expected = ["a red circle on a white background", "a blue square on a pink background",
                "a red circle on a white background"]
    assert [(folder / f"class-{i:05d}.txt").read_text() for i in range(3)] == expected
    examples = load_examples(str(folder), "unused {class}", "sks", "background")
    assert [e.caption for e in examples] == expected
    # The toy base draws backgrounds reliably: each image really came from its own prompt.
    assert [check(Image.open(folder / f"class-{i:05d}.png")).background for i in range(3)] == [
        "white", "pink", "white"]
    # A different prompt list is a different cache folder.
    other = run_training(make_config("dreambooth", tmp_path / "b", **{**settings, "prior.class_prompts": prompts[:1]}))
    assert other.summary["class_images"] != summary["class_images"]


def test_prior_batch_size_and_caption_dropout_shape_the_class_batch(tmp_path, tiny_components, monkeypatch):
    from finetune import UserError, trainer

    asked, captioned = [], []
    original_specs, original_captions = trainer.InstanceBatches.specs, trainer.InstanceBatches.captions

    def recording_specs(self, seed, micro_step, batch_size, *rest):
        asked.append(batch_size)
        return original_specs(self, seed, micro_step, batch_size, *rest)

    def recording_captions(self, specs, *rest, **kw):
        captioned.append(original_captions(self, specs, *rest, **kw))
        return captioned[-1]

    monkeypatch.setattr(trainer.InstanceBatches, "specs", recording_specs)
    monkeypatch.setattr(trainer.InstanceBatches, "captions", recording_captions)
    config = make_config("lora", tmp_path / "run", **{"prior.enabled": True, "prior.batch_size": 3,
                                                      "prior.caption_dropout": 1.0,
                                                      "prior.num_class_images": 3, "train.steps": 2,
                                                      "train.batch_size": 1, "output.formats": ["kohya"]})
    trainer.run_training(config, tiny_components)
    assert asked == [1, 3, 1, 3]  # per step: the instance batch, then the class batch
    # prior.caption_dropout empties class captions only; instance captions keep the token.
    assert [len(c) for c in captioned] == [1, 3, 1, 3]
    assert all("sks" in c for c in captioned[0] + captioned[2])
    assert captioned[1] == captioned[3] == ["", "", ""]
    with pytest.raises(UserError, match="prior.batch_size"):
        make_config("lora", tmp_path / "bad", **{"prior.enabled": True, "prior.batch_size": 0}).validate()
    with pytest.raises(UserError, match="prior.caption_dropout"):
        make_config("lora", tmp_path / "bad", **{"prior.enabled": True, "prior.caption_dropout": 1.5}).validate()

"""Pivotal tuning: a textual-inversion word first, then LoRA or DreamBooth on top of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, render

from finetune import UserError
from finetune.formats import embeddings

PROMPT = "a photo of <sks> on a white background"


def _pivotal_config(method: str, output, **dotted):
    return make_config(method, output, **{"data.token": "<sks>", "pivotal.steps": 3, "pivotal.norm": 0.2,
                                          "pivotal.init_word": "shape", "prior.enabled": False, **dotted})


@pytest.mark.parametrize("text_encoder_lora", [False, True], ids=["unet-lora", "unet-and-text-encoder-lora"])
def test_lora_files_and_word_reproduce_the_trained_model(tmp_path, tiny_components, text_encoder_lora):
    """Phase 1 learns the word (and ships it), phase 2's LoRA trains with it; diffusers' own loaders
    (load_lora_weights + load_textual_inversion) on a fresh base draw what the trained model draws. With a
    text-encoder LoRA too, the LoRA file holds only LoRA weights (not the grown token embedding)."""
    from finetune.inference import pipeline_from_components
    from finetune.models import load_pipeline
    from finetune.trainer import run_training

    base_rows = tiny_components.text_encoder.get_input_embeddings().weight.detach().clone()
    config = _pivotal_config("lora", tmp_path, **{"lora.targets": "all", "train.lr": 1e-2,
                                                  "lora.train_text_encoder": text_encoder_lora})
    outcome = run_training(config, tiny_components)

    phase = embeddings.read_embeddings(tmp_path / "pivotal" / embeddings.DIFFUSERS_FILE)["<sks>"]
    shipped = embeddings.read_embeddings(tmp_path / embeddings.DIFFUSERS_FILE)["<sks>"]
    a1111 = embeddings.read_embeddings(tmp_path / "sks.safetensors")
    assert list(a1111.values())[0].shape == shipped.shape == (2, base_rows.shape[1])
    # The shipped word is phase 1's, rescaled to length 0.2 (LoRA's phase does not train the rows).
    torch.testing.assert_close(shipped.norm(dim=1), torch.full((2,), 0.2))
    torch.testing.assert_close(shipped, phase / phase.norm(dim=1, keepdim=True) * 0.2)
    shape_row = base_rows[tiny_components.tokenizer.convert_tokens_to_ids("shape</w>")]
    assert not torch.allclose(phase[0], shape_row, atol=1e-4), "phase 1 did not train the word"
    # Every word the base had keeps its row.
    now = outcome.components.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(now[: base_rows.shape[0]], base_rows)
    assert outcome.summary["exports"]["embedding"]

    from safetensors.torch import load_file

    lora_keys = list(load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    assert not [k for k in lora_keys if "lora" not in k], "non-LoRA weights in the LoRA file"
    assert any(k.startswith("text_encoder.") for k in lora_keys) == text_encoder_lora

    trained = render(pipeline_from_components(outcome.components), PROMPT)
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe.load_textual_inversion(str(tmp_path / embeddings.DIFFUSERS_FILE))
    np.testing.assert_allclose(render(pipe, PROMPT), trained, atol=2e-4)
    plain = load_pipeline("tiny")
    plain.load_textual_inversion(str(tmp_path / embeddings.DIFFUSERS_FILE))
    assert np.abs(render(plain, PROMPT) - trained).max() > 1e-3, "the LoRA made no difference"


def test_dreambooth_pipeline_knows_the_word_and_single_file_keeps_clip_vocabulary(tmp_path, tiny_components):
    """DreamBooth with the text encoder: the rows keep training in phase 2, the saved pipeline holds the word,
    the shipped embedding is the final rows, and the single file keeps CLIP's fixed vocabulary."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from finetune.inference import pipeline_from_components
    from finetune.models import load_pipeline
    from finetune.strategies.dreambooth import load_into
    from finetune.trainer import run_training

    vocab = tiny_components.tokenizer.vocab_size
    config = _pivotal_config("dreambooth", tmp_path, **{"dreambooth.train_text_encoder": True, "train.lr": 1e-3})
    outcome = run_training(config, tiny_components)

    phase = embeddings.read_embeddings(tmp_path / "pivotal" / embeddings.DIFFUSERS_FILE)["<sks>"]
    shipped = embeddings.read_embeddings(tmp_path / embeddings.DIFFUSERS_FILE)["<sks>"]
    rescaled = phase / phase.norm(dim=1, keepdim=True) * 0.2
    assert not torch.allclose(shipped, rescaled, atol=1e-6), "phase 2 should have trained the word's rows"

    saved = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipeline"))
    ids = saved.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert ids == [vocab, vocab + 1]
    torch.testing.assert_close(saved.text_encoder.get_input_embeddings().weight.detach()[ids], shipped)
    trained = render(pipeline_from_components(outcome.components), PROMPT)
    np.testing.assert_allclose(render(saved, PROMPT), trained, atol=2e-4)
    # The folder as an adapter on a fresh base (sdft generate --adapter): the word comes with it.
    fresh = load_pipeline("tiny")
    load_into(fresh, str(tmp_path / "pipeline"))
    np.testing.assert_allclose(render(fresh, PROMPT), trained, atol=2e-4)

    (single,) = outcome.summary["exports"]["single_file"]
    with safe_open(single, framework="pt") as fh:
        rows = fh.get_slice("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        assert rows.get_shape()[0] == vocab


def test_a_known_word_is_refused_before_training(tmp_path, tiny_components):
    from finetune.trainer import run_training

    config = _pivotal_config("lora", tmp_path, **{"data.token": "sks"})
    with pytest.raises(UserError, match="new word.*'<sks>'"):
        run_training(config, tiny_components)
    assert not (tmp_path / "pivotal" / "summary.json").exists()


def test_resume_reuses_the_finished_word(tmp_path, tiny_components):
    """A resumed run (here: to more steps) keeps phase 1's word instead of learning it again."""
    import copy

    from finetune.trainer import run_training

    config = _pivotal_config("lora", tmp_path, **{"output.checkpoint_every": 2})
    run_training(config, copy.deepcopy(tiny_components))
    phase_summary = tmp_path / "pivotal" / "summary.json"
    first = phase_summary.stat().st_mtime_ns
    word = embeddings.read_embeddings(tmp_path / embeddings.DIFFUSERS_FILE)["<sks>"]

    again = _pivotal_config("lora", tmp_path, **{"train.steps": 4, "output.resume": "latest",
                                                 "output.checkpoint_every": 2})
    outcome = run_training(again, tiny_components)
    assert phase_summary.stat().st_mtime_ns == first, "phase 1 ran again"
    assert outcome.summary["steps"] == 4
    torch.testing.assert_close(embeddings.read_embeddings(tmp_path / embeddings.DIFFUSERS_FILE)["<sks>"], word)


def test_pivotal_flags_exist_only_where_they_apply():
    from finetune.config import RunConfig

    assert "pivotal.norm" in RunConfig.for_method("dreambooth").dotted_keys()
    assert "pivotal.steps" in RunConfig.for_method("lora").dotted_keys()
    with pytest.raises(UserError, match="unknown section 'pivotal'"):
        RunConfig.for_method("textual_inversion").set("pivotal.steps", 5)
    config = RunConfig.for_method("lora")
    config.set("pivotal.steps", "10")
    config.set("pivotal.norm", "-1")
    with pytest.raises(UserError, match="pivotal.norm"):
        config.validate()

"""Textual inversion: only the placeholder rows train, and every export reloads into diffusers exactly."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_config, render

TI = "textual_inversion"
A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def _named_params(components):
    for part in ("text_encoder", "vae", "unet"):
        for name, param in getattr(components, part).named_parameters():
            yield f"{part}.{name}", param


def _embedding_name(components) -> str:
    weight = components.text_encoder.get_input_embeddings().weight
    return next(n for n, p in _named_params(components) if p is weight)


def _copy_text_side(components):
    """Components sharing the (untouched) UNet/VAE but with their own tokenizer and text encoder."""
    return dataclasses.replace(components, tokenizers=copy.deepcopy(components.tokenizers),
                               text_encoders=copy.deepcopy(components.text_encoders))


def _fresh_pipe(base):
    """A pipeline like `base` whose tokenizer and text encoder are untouched copies (embeddings load there)."""
    parts = dict(base.components, tokenizer=copy.deepcopy(base.tokenizer),
                 text_encoder=copy.deepcopy(base.text_encoder))
    return type(base)(**parts, requires_safety_checker=False)


def _prompt_embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]


def _train(tmp_path, token: str, **dotted):
    from finetune.models import load_components
    from finetune.trainer import run_training

    components = load_components("tiny")
    before = {name: p.detach().clone() for name, p in _named_params(components)}
    config = make_config(TI, tmp_path, **{"train.lr": 5e-2, **dotted})
    config.data.token = token
    return config, before, run_training(config, components)


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    """3 vectors, weight decay on: AdamW would shrink every embedding row if they were not restored."""
    return _train(tmp_path_factory.mktemp("ti-multi"), "sks", **{
        "textual_inversion.vectors": 3, "textual_inversion.init_word": "star", "train.weight_decay": 0.1})


def test_only_placeholder_rows_change(multi_run):
    config, before, outcome = multi_run
    strategy, components = outcome.strategy, outcome.components
    weight = components.text_encoder.get_input_embeddings().weight
    emb_name = _embedding_name(components)
    base_rows = before[emb_name].shape[0]
    assert strategy.ids == [[base_rows, base_rows + 1, base_rows + 2]]  # sks, sks_1, sks_2 appended
    assert components.tokenizer.convert_ids_to_tokens(strategy.ids[0]) == ["sks", "sks_1", "sks_2"]

    for name, param in _named_params(components):
        if name == emb_name:
            assert param.requires_grad
            continue
        assert not param.requires_grad, name
        assert torch.equal(param.detach(), before[name]), f"{name} changed"
    assert weight.shape[0] == base_rows + 3
    assert torch.equal(weight.detach()[:base_rows], before[emb_name]), "a frozen embedding row moved"

    star_id = components.tokenizer("star", add_special_tokens=False).input_ids
    init = before[emb_name][star_id].repeat(3, 1)
    trained = weight.detach()[strategy.ids[0]]
    for i in range(3):
        assert not torch.equal(trained[i], init[i]), f"vector {i} did not train"
    assert torch.equal(strategy.state_dict()["sks"], trained)


def _check_round_trip(config, strategy, components, exports):
    """Every exported file, via sdft's loader and via diffusers' own reader, gives the trained model."""
    from finetune.data import format_prompt
    from finetune.inference import load_adapter, pipeline_from_components
    from finetune.models import load_pipeline

    token = config.data.token
    prompt = format_prompt(config.data.prompt, token, config.data.class_word)
    for module in strategy.trainable_modules():
        module.eval()
    trained_pipe = pipeline_from_components(components)
    # Training expands the prompt itself; at inference the pipeline does: both must agree.
    assert strategy.expand_prompt(prompt) == trained_pipe.maybe_convert_prompt(prompt, trained_pipe.tokenizer)
    trained_image = render(trained_pipe, prompt)  # the pipeline expands multi-vector tokens on its own
    trained_embeds = _prompt_embeds(trained_pipe, prompt)

    stem = token.strip("<>")
    assert set(exports) == {"diffusers", "a1111"}
    assert [p.rsplit("/", 1)[-1] for p in exports["diffusers"]] == ["learned_embeds.safetensors"]
    assert [p.rsplit("/", 1)[-1] for p in exports["a1111"]] == [f"{stem}.pt", f"{stem}.safetensors"]

    base = load_pipeline("tiny")
    for path in exports["diffusers"] + exports["a1111"]:
        pipe = _fresh_pipe(base)
        assert load_adapter(pipe, path) == token
        assert np.abs(render(pipe, prompt) - trained_image).max() < 1e-4, f"{path} differs from the model"

        # diffusers alone: learned_embeds and the .pt name their token, emb_params needs token=.
        pipe = _fresh_pipe(base)
        pipe.load_textual_inversion(path, token=token if path.endswith(f"{stem}.safetensors") else None)
        assert torch.equal(_prompt_embeds(pipe, prompt), trained_embeds), f"diffusers reads {path} differently"


def test_round_trip_multi_vector(multi_run):
    config, _, outcome = multi_run
    _check_round_trip(config, outcome.strategy, outcome.components, outcome.summary["exports"])


def test_round_trip_single_vector_with_unsafe_file_name(tiny_components, tmp_path):
    # '<cat-toy>' cannot be a file name everywhere: the A1111 files are cat-toy.*, and still load as '<cat-toy>'.
    strategy = _prepared(tiny_components, tmp_path, **{"data.token": "<cat-toy>", "textual_inversion.init_word": "toy"})
    learned = torch.randn(1, tiny_components.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    strategy.load_state_dict({"<cat-toy>": learned})  # stands in for training (the multi-vector test trains)
    exports = strategy.export(tmp_path / "out", list(strategy.formats), {"steps": "1"})
    _check_round_trip(strategy.config, strategy, tiny_components, exports)


def test_existing_token_is_refused(tiny_components, tmp_path):
    from finetune import UserError
    from finetune.strategies import build_strategy

    config = make_config(TI, tmp_path)
    config.data.token = "cat"
    with pytest.raises(UserError, match=r"already has 'cat'.*reuse_token"):
        build_strategy(config).prepare(tiny_components)
    config.data.token = "Cat"  # prompts are lowercased: this would take over 'cat' just the same
    with pytest.raises(UserError, match=r"already has 'Cat'"):
        build_strategy(config).prepare(tiny_components)
    assert "Cat" not in tiny_components.tokenizer.get_vocab()  # refused before touching the tokenizer


def test_reuse_token_overwrites_the_existing_row(tiny_components, tmp_path):
    from finetune.inference import load_adapter, pipeline_from_components
    from finetune.models import load_pipeline

    before = tiny_components.text_encoder.get_input_embeddings().weight.detach().clone()
    strategy = _prepared(tiny_components, tmp_path, **{"data.token": "cat", "textual_inversion.reuse_token": True})
    cat = tiny_components.tokenizer.get_vocab()["cat"]
    assert strategy.ids == [[cat]]
    # One AdamW step with weight decay, as the trainer takes it (decay alone would move every row).
    text_encoder = strategy.trainable_modules()[0]
    optimizer = torch.optim.AdamW(strategy.param_groups(), weight_decay=0.1)
    ids = tiny_components.tokenizer(["a photo of cat"], return_tensors="pt").input_ids
    text_encoder(ids)[0].pow(2).mean().backward()
    optimizer.step()
    strategy.after_optimizer_step()

    weight = text_encoder.get_input_embeddings().weight.detach()
    assert weight.shape == before.shape  # the existing row is reused, none added
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[cat] = False
    assert torch.equal(weight[others], before[others])
    assert not torch.equal(weight[cat], before[cat])

    # diffusers refuses a token its vocabulary has; sdft's loader overwrites the row as training did.
    exports = strategy.export(tmp_path / "out", ["diffusers"], {})
    pipe = load_pipeline("tiny")
    assert load_adapter(pipe, exports["diffusers"][0]) == "cat"
    text_encoder.eval()
    trained = _prompt_embeds(pipeline_from_components(tiny_components), "a photo of cat")
    assert torch.equal(_prompt_embeds(pipe, "a photo of cat"), trained)


def _prepared(components, tmp_path, **dotted):
    from finetune.strategies import build_strategy

    config = make_config(TI, tmp_path, **dotted)
    strategy = build_strategy(config)
    strategy.prepare(components)
    return strategy


def test_init_from_phrase(tiny_components, tmp_path):
    from finetune import UserError

    tokenizer = tiny_components.tokenizer
    original = tiny_components.text_encoder.get_input_embeddings().weight.detach().clone()
    phrase_ids = tokenizer("red star", add_special_tokens=False).input_ids
    assert len(phrase_ids) == 2

    averaged = _prepared(_copy_text_side(tiny_components), tmp_path, **{"textual_inversion.init_word": "red star"})
    assert torch.allclose(averaged.state_dict()["sks"], original[phrase_ids].mean(0, keepdim=True))

    spread = _prepared(_copy_text_side(tiny_components), tmp_path, **{
        "textual_inversion.init_word": "red star", "textual_inversion.vectors": 2})
    assert torch.equal(spread.state_dict()["sks"], original[phrase_ids])

    # No init word: the class word ('star' in make_config) stands in; neither: a clear error.
    from_class = _prepared(_copy_text_side(tiny_components), tmp_path)
    assert torch.equal(from_class.state_dict()["sks"], original[phrase_ids[1:]])
    with pytest.raises(UserError, match="init-word"):
        _prepared(_copy_text_side(tiny_components), tmp_path, **{"data.class_word": ""})


def test_a1111_pt_is_plain_and_documented(tiny_components, tmp_path):
    from finetune.formats.embeddings import read_embeddings
    from finetune.inference import detect_adapter_kind

    strategy = _prepared(tiny_components, tmp_path, **{"textual_inversion.vectors": 2})
    written = strategy.export(tmp_path / "out", ["a1111"], {"steps": "7", "config": "method: textual_inversion"})
    pt_path, st_path = written["a1111"]
    data = torch.load(pt_path, weights_only=True)
    assert set(data) == A1111_KEYS
    assert data["string_to_token"] == {"*": 265} and type(data["string_to_token"]["*"]) is int
    vectors = data["string_to_param"]["*"]
    assert set(data["string_to_param"]) == {"*"} and type(vectors) is torch.Tensor  # not an nn.Parameter
    assert vectors.dtype == torch.float32 and not vectors.requires_grad
    assert vectors.shape == (2, tiny_components.text_encoder.config.hidden_size)
    assert vectors.untyped_storage().nbytes() == vectors.numel() * 4  # not a view into the whole matrix
    assert torch.equal(vectors, strategy.state_dict()["sks"])
    assert data["name"] == "sks" and data["step"] == 7 and type(data["step"]) is int
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None

    from safetensors import safe_open

    with safe_open(st_path, framework="pt") as fh:
        assert list(fh.keys()) == ["emb_params"] and torch.equal(fh.get_tensor("emb_params"), vectors)
        assert fh.metadata()["sdft_config"] == "method: textual_inversion"

    # A1111 users rename the file to change the prompt word: the loader follows the file name.
    renamed = tmp_path / "out" / "shiny.pt"
    renamed.write_bytes(open(pt_path, "rb").read())
    assert list(read_embeddings(renamed)) == ["shiny"]
    assert detect_adapter_kind(renamed) == TI and detect_adapter_kind(tmp_path / "out" / "sks.safetensors") == TI


def test_foreign_files_are_not_embeddings(tmp_path):
    from safetensors.torch import save_file

    from finetune.strategies.textual_inversion import can_load

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64), "lora_unet_x.lora_up.weight": torch.zeros(64, 4)},
              str(lora))
    modules = tmp_path / "weights.safetensors"
    save_file({"linear.0.weight": torch.zeros(8, 64), "linear.0.bias": torch.zeros(8)}, str(modules))
    hypernet = tmp_path / "hn.pt"
    torch.save({768: ({"linear.0.weight": torch.zeros(2, 2)}, {}), "name": "hn"}, str(hypernet))
    text = tmp_path / "notes.pt"
    text.write_text("not a pickle")
    for path in (lora, modules, hypernet, text, tmp_path):
        assert not can_load(path), path
    emb = tmp_path / "emb.safetensors"
    save_file({"<thing>": torch.zeros(2, 64)}, str(emb))
    assert can_load(emb)


def test_file_stem_keeps_the_prompt_word():
    from finetune.formats.embeddings import file_stem

    assert file_stem("sks") == "sks" and file_stem("<cat-toy>") == "cat-toy"
    assert file_stem("my:token/v2") == "my_token_v2" and file_stem("猫") == "猫"
    with pytest.raises(ValueError):
        file_stem("<>")


@pytest.mark.parametrize("prompt", [
    "a photo of sks star", "sks, sks and sks", "a sksx and xsks", "SKS in capitals", "no placeholder here",
])
def test_expand_prompt_matches_diffusers(prompt):
    from diffusers.loaders import TextualInversionLoaderMixin

    from finetune.strategies.textual_inversion import expand_placeholder, placeholder_names
    from finetune.tokenizer import build_clip_tokenizer

    names = placeholder_names("sks", 3)
    tokenizer = build_clip_tokenizer()
    tokenizer.add_tokens(names)
    expanded = expand_placeholder(prompt, names)
    assert expanded == TextualInversionLoaderMixin().maybe_convert_prompt(prompt, tokenizer)
    assert expand_placeholder(expanded, names) == expanded  # idempotent, unlike diffusers' str.replace
    assert expand_placeholder(prompt, names[:1]) == prompt


def test_prompt_templates_follow_property(tmp_path):
    from finetune.strategies import build_strategy

    objects = build_strategy(make_config(TI, tmp_path)).prompt_templates()
    styles = build_strategy(make_config(TI, tmp_path, **{"textual_inversion.property": "style"})).prompt_templates()
    assert len(objects) >= 20 and len(styles) >= 20 and not set(objects) & set(styles)
    assert all("{token}" in t for t in objects + styles)
    assert all("style" in t for t in styles)

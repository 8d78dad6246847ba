"""LoHa, LoKr and DoRA (`sdft lora --algo ...`): LyCORIS-layout files that reproduce the trained model when
applied by the consumers' rules, under module names A1111 and ComfyUI place on Stable Diffusion 1.5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_config, prompt_states, unet_output

ALGOS = ["loha", "lokr", "dora"]
# The tensors each algorithm writes per module (besides `alpha`).
TENSORS = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
           "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
           "dora": {"lora_up.weight", "lora_down.weight", "dora_scale"}}


def _randomise_adapters(model, seed: int) -> None:
    """Non-zero values in every adapter tensor, as training gives them (each algorithm starts as a no-op):
    factors small and random, DoRA's row lengths scaled by up to +-20%."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * (2 * torch.rand(param.shape, generator=gen) - 1))
            elif any(marker in name for marker in ("lora_A", "lora_B", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("algo", ALGOS)
def test_file_reproduces_the_trained_unet_and_text_encoder(tmp_path, tiny_components, algo):
    """Every 3x3 conv, 1x1 conv and Linear the 'all' targets reach, and the text encoder: the file, applied to a
    fresh base, gives the adapted model's outputs; alpha != rank must survive."""
    from finetune.inference import detect_adapter_kind, load_adapter
    from finetune.models import load_pipeline
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.algo": algo, "lora.targets": "all", "lora.rank": 4,
                                               "lora.alpha": 2.0, "lora.train_text_encoder": True})
    strategy = build_strategy(config)
    assert strategy.formats == ("kohya",)
    strategy.prepare(tiny_components)
    _randomise_adapters(tiny_components.unet, 0)
    _randomise_adapters(tiny_components.text_encoder, 1)
    ids, hidden = prompt_states(tiny_components)
    expected = unet_output(tiny_components.unet, hidden)

    (path,) = strategy.export(tmp_path, ["kohya"], {"resolution": "64", "steps": "3"})["kohya"]
    assert path.endswith(f"sks_{algo}.safetensors") and detect_adapter_kind(path) == "lycoris"
    with safe_open(path, framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert {k.split(".", 1)[1] for k in keys} <= TENSORS[algo] | {"alpha"}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == ("lora" if algo == "dora" else algo)

    pipe = load_pipeline("tiny")
    with torch.no_grad():
        base_hidden = pipe.text_encoder(ids)[0]
    assert not torch.allclose(unet_output(pipe.unet, hidden), expected, atol=1e-4), "the adapter changed nothing"
    load_adapter(pipe, path)
    with torch.no_grad():
        got_hidden = pipe.text_encoder(ids)[0]
    assert not torch.allclose(got_hidden, base_hidden, atol=1e-4)
    torch.testing.assert_close(got_hidden, hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unet_output(pipe.unet, hidden), expected, atol=1e-5, rtol=1e-4)


def test_lokr_without_a_low_rank_pair_keeps_its_scale(tmp_path, tiny_components):
    """peft scales a LoKr by alpha / rank even when both factors are whole; the consumers then apply no alpha,
    so the export folds the factor in. A large rank keeps every factor whole here."""
    from finetune.inference import load_adapter
    from finetune.models import load_pipeline
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.algo": "lokr", "lora.rank": 64, "lora.alpha": 16.0})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    _randomise_adapters(tiny_components.unet, 2)
    hidden = torch.randn(1, 77, tiny_components.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    expected = unet_output(tiny_components.unet, hidden)
    (path,) = strategy.export(tmp_path, ["kohya"], {"resolution": "64"})["kohya"]
    with safe_open(path, framework="pt") as fh:
        assert not any(k.endswith(("lokr_w1_a", "lokr_w2_a")) for k in fh.keys())
    pipe = load_pipeline("tiny")
    load_adapter(pipe, path)
    torch.testing.assert_close(unet_output(pipe.unet, hidden), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algo", ALGOS)
def test_names_land_on_sd15_modules_in_a1111_and_comfyui(algo):
    """On SD 1.5's real shapes (the 'all' targets and CLIP-L): every module the file names is one A1111 and
    ComfyUI place on the original checkpoint, and its tensors rebuild a change of exactly that module's shape."""
    from diffusers import UNet2DConditionModel
    from peft import inject_adapter_in_model, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.formats.lycoris import peft_to_lycoris, weight_change
    from finetune.strategies.lora import _adapter_config, text_encoder_targets, unet_target_modules
    from lab.random_bases import sd15_configs
    from test_kohya_interop import _comfyui_table, _ldm_modules, a1111_ldm_name

    cfg = sd15_configs()
    with torch.device("meta"):
        unet, text_encoder = UNet2DConditionModel(**cfg["unet"]), CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    ldm, comfy = _ldm_modules(unet, text_encoder), _comfyui_table(unet, text_encoder)
    tensors = {}
    for part, model, targets in (("unet", unet, unet_target_modules(unet, "all")),
                                 ("text_encoder", text_encoder, text_encoder_targets("all"))):
        with torch.device("meta"):
            inject_adapter_in_model(_adapter_config(algo, 8, 8.0, 0.0, targets), model)
        state = {k: torch.zeros(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        tensors.update(peft_to_lycoris(state, part, 8.0, 8))
    by_stem: dict[str, dict] = {}
    for key, tensor in tensors.items():
        stem, _, name = key.partition(".")
        by_stem.setdefault(stem, {})[name] = tensor
    assert len(by_stem) > 300  # every attention, feed-forward, resnet and sampler layer of SD 1.5, and CLIP-L's
    for consumer, resolve in (("A1111", a1111_ldm_name), ("ComfyUI", comfy.get)):
        landed = {}
        for stem, own in by_stem.items():
            target = resolve(stem)
            assert target in ldm, f"{consumer} cannot place {stem} (-> {target})"
            assert weight_change(own, torch.Size(ldm[target])).shape == ldm[target], (consumer, stem)
            landed.setdefault(target, []).append(stem)
        assert all(len(v) == 1 for v in landed.values()), f"{consumer}: two names on one module"


def test_merge_applies_a_lycoris_file_like_the_loader(tmp_path, tiny_components):
    """`sdft merge` fuses a LoHa file into the base as the loader applies it."""
    from finetune.cli import main
    from finetune.inference import load_adapter
    from finetune.models import load_pipeline
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.algo": "loha", "lora.targets": "kohya"})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    _randomise_adapters(tiny_components.unet, 4)
    (path,) = strategy.export(tmp_path, ["kohya"], {"resolution": "64"})["kohya"]
    assert main(["merge", "--base", "tiny", "--lora", f"{path}:0.5", "--output", str(tmp_path / "merged")]) == 0
    applied = load_pipeline("tiny")
    load_adapter(applied, path, scale=0.5)
    merged = load_pipeline(str(tmp_path / "merged"))
    hidden = torch.randn(1, 77, merged.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(unet_output(merged.unet, hidden), unet_output(applied.unet, hidden), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unet_output(merged.unet, hidden), unet_output(load_pipeline("tiny").unet, hidden),
                              atol=1e-4)


def test_convert_and_resize_refuse_a_lycoris_file_in_one_line(tmp_path, tiny_components, capsys):
    from finetune.cli import main
    from finetune.strategies import build_strategy

    strategy = build_strategy(make_config("lora", tmp_path, **{"lora.algo": "lokr"}))
    strategy.prepare(tiny_components)
    (path,) = strategy.export(tmp_path, ["kohya"], {"resolution": "64"})["kohya"]
    for argv in (["convert", path, "--output", str(tmp_path / "out.safetensors")],
                 ["resize-lora", path, "--rank", "2", "--output", str(tmp_path / "small.safetensors")]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "LyCORIS file" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "small.safetensors").exists()

"""LoRA: target sets, exported files (diffusers + kohya) and their reproduction in diffusers' loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_config, prompt_states, unet_output


def _randomise_lora(model, seed: int) -> None:
    """Give every LoRA matrix non-zero values, as training would (lora_B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_target_sets(tiny_components):
    from finetune.strategies.lora import unet_target_modules

    unet = tiny_components.unet
    attn = unet_target_modules(unet, "attn")
    kohya = unet_target_modules(unet, "kohya")
    every = unet_target_modules(unet, "all")
    assert attn and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in attn)
    assert set(attn) < set(kohya) < set(every)
    assert any(n.endswith("proj_in") for n in kohya) and any(n.endswith("ff.net.2") for n in kohya)
    assert not any(".resnets." in n for n in kohya)
    assert any(n.endswith("resnets.0.conv1") for n in every)
    assert unet_target_modules(unet, "proj_in,proj_out") == [n for n in kohya if n.endswith(("proj_in", "proj_out"))]


@pytest.mark.parametrize("targets,train_te,rank,alpha", [
    ("attn", False, 4, None),
    ("kohya", True, 4, 8.0),
    ("all", True, 2, 1.0),
])
def test_exports_reproduce_in_diffusers(tmp_path, tiny_components, targets, train_te, rank, alpha):
    """Both files, loaded with diffusers' load_lora_weights into a fresh pipeline, give the same
    UNet and text-encoder outputs as the adapted model (alpha != rank must survive)."""
    from finetune.models import load_pipeline
    from finetune.strategies import build_strategy
    from finetune.strategies.lora import load_into

    config = make_config("lora", tmp_path, **{"lora.targets": targets, "lora.train_text_encoder": train_te,
                                               "lora.rank": rank, "lora.alpha": alpha})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    _randomise_lora(tiny_components.unet, 0)
    _randomise_lora(tiny_components.text_encoder, 1)
    ids, hidden = prompt_states(tiny_components)
    expected = unet_output(tiny_components.unet, hidden)

    written = strategy.export(tmp_path, ["diffusers", "kohya"], {"resolution": "64", "steps": "10"})
    assert set(written) == {"diffusers", "kohya"}
    base = load_pipeline("tiny")
    with torch.no_grad():
        base_hidden = base.text_encoder(ids)[0]
    assert not torch.allclose(unet_output(base.unet, hidden), expected, atol=1e-4), "LoRA made no difference"
    for fmt, (path,) in written.items():
        pipe = load_pipeline("tiny")
        load_into(pipe, path)
        with torch.no_grad():
            got_hidden = pipe.text_encoder(ids)[0]
        if train_te:
            assert not torch.allclose(got_hidden, base_hidden, atol=1e-4)
        torch.testing.assert_close(got_hidden, hidden, atol=1e-5, rtol=1e-4, msg=f"{fmt}: text encoder")
        torch.testing.assert_close(unet_output(pipe.unet, hidden), expected, atol=1e-5, rtol=1e-4,
                                   msg=f"{fmt}: unet")


def test_kohya_file_layout(tmp_path, tiny_components):
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.targets": "kohya", "lora.train_text_encoder": True,
                                               "lora.rank": 4, "lora.alpha": 2.0, "data.token": "my dog"})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    written = strategy.export(tmp_path, ["kohya", "diffusers"], {"resolution": "64", "steps": "7"})
    path = written["kohya"][0]
    assert path.endswith("my_dog_lora.safetensors")
    with safe_open(written["diffusers"][0], framework="pt") as fh:  # diffusers' own layout keeps `text_model.`
        te_keys = [k for k in fh.keys() if k.startswith("text_encoder.")]
        assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    with safe_open(path, framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert fh.get_tensor(f"{stem}.lora_down.weight").shape == (4, 64)
        assert fh.get_tensor(f"{stem}.lora_up.weight").shape == (64, 4)
        assert fh.get_tensor(f"{stem}.alpha").ndim == 0 and float(fh.get_tensor(f"{stem}.alpha")) == 2.0
        conv = "lora_unet_down_blocks_1_attentions_0_proj_in"
        assert fh.get_tensor(f"{conv}.lora_down.weight").shape == (4, 64, 1, 1)
        assert fh.get_tensor(f"{conv}.lora_up.weight").shape == (64, 4, 1, 1)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                         ".alpha")) for k in keys)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "7"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"


def test_diffusers_file_keeps_alpha(tmp_path, tiny_components):
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.rank": 4, "lora.alpha": 16.0})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    path = strategy.export(tmp_path, ["diffusers"], {})["diffusers"][0]
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        assert all(k.startswith("unet.") for k in fh.keys())
    adapter_meta = json.loads(meta["lora_adapter_metadata"])
    assert adapter_meta["unet.lora_alpha"] == 16.0 and adapter_meta["unet.r"] == 4


def test_only_lora_parameters_train(tiny_components, tmp_path):
    from finetune.strategies import build_strategy

    config = make_config("lora", tmp_path, **{"lora.targets": "all", "lora.train_text_encoder": True,
                                               "lora.text_encoder_lr": 3e-5})
    strategy = build_strategy(config)
    strategy.prepare(tiny_components)
    groups = strategy.param_groups()
    assert [g["lr"] for g in groups] == [config.train.lr, 3e-5]
    trainable = {id(p) for g in groups for p in g["params"]}
    for part in ("unet", "text_encoder", "vae"):
        for name, param in getattr(tiny_components, part).named_parameters():
            assert param.requires_grad == ("lora_" in name), f"{part}.{name}"
            assert (id(param) in trainable) == param.requires_grad

"""Hypernetworks: A1111 file layout, reader defaults, the attention processor, training and composition."""

from __future__ import annotations

import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from finetune import UserError
from finetune.formats import a1111_hypernetwork as a1111
from finetune.hypernet import (Hypernetwork, HypernetworkAttnProcessor, HypernetworkStructure, context_dims,
                               install, installed, remove, set_strength)

from conftest import make_config, render

PROMPT = "a photo of sks star"
DOCUMENTED_KEYS = {"layer_structure", "activation_func", "is_layer_norm", "activate_output", "weight_initialization",
                   "use_dropout", "dropout_structure", "last_layer_dropout", "step", "name", "sd_checkpoint",
                   "sd_checkpoint_name", "optional_info"}
INFO = {"step": 7, "name": "sks_hypernetwork", "sd_checkpoint": None, "sd_checkpoint_name": "tiny",
        "optional_info": "test"}

# (structure, expected branch keys for width 8 as (index, weight shape)), written out by hand from the
# A1111 hypernetwork layout: Linear, activation (not on the last layer unless activate_output),
# LayerNorm, Dropout; the index counts every layer.
LAYOUTS = {
    "linear_1_2_1": (
        dict(layer_structure=[1, 2, 1], activation="linear"),
        [(0, (16, 8)), (1, (8, 16))]),
    "relu_ln_dropout_activate_output": (
        dict(layer_structure=[1, 1.5, 1.5, 1], activation="relu", layer_norm=True, activate_output=True,
             dropout_structure=[0, 0.1, 0.1, 0]),
        [(0, (12, 8)), (2, (12,)), (4, (12, 12)), (6, (12,)), (8, (8, 12)), (10, (8,))]),
    "swish_no_output_activation": (
        dict(layer_structure=[1, 2, 1], activation="swish"),
        [(0, (16, 8)), (2, (8, 16))]),
    "tanh_layer_norm": (
        dict(layer_structure=[1, 0.5, 1], activation="tanh", layer_norm=True),
        [(0, (4, 8)), (2, (4,)), (3, (8, 4)), (4, (8,))]),
}


def _expected_keys(layout):
    return [(f"linear.{i}.{p}", shape if p == "weight" else shape[:1])
            for i, shape in layout for p in ("weight", "bias")]


def _hypernetwork(dims=(8, 20), seed=0, **structure) -> Hypernetwork:
    return Hypernetwork(list(dims), HypernetworkStructure(**structure), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_file_layout_matches_a1111(case, tmp_path):
    structure, layout = LAYOUTS[case]
    hn = _hypernetwork(dims=(8,), **structure)
    pt = a1111.write_pt(tmp_path / "h.pt", hn, INFO)
    data = torch.load(pt, map_location="cpu", weights_only=True)
    keys = list(data)
    assert keys[0] == 8 and set(keys[1:]) == DOCUMENTED_KEYS | {a1111.STRENGTH_KEY}
    assert isinstance(data[8], tuple) and len(data[8]) == 2
    expected = _expected_keys(layout)
    for state in data[8]:
        assert type(state) is dict
        assert [(k, tuple(t.shape)) for k, t in state.items()] == expected
        assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in state.values())
    assert data["layer_structure"] == [float(x) for x in structure["layer_structure"]]
    dropout = structure.get("dropout_structure", [0.0] * len(structure["layer_structure"]))
    assert data["dropout_structure"] == dropout
    assert data["use_dropout"] is any(dropout) and data["last_layer_dropout"] is (dropout[-2] != 0)
    assert data["activate_output"] is structure.get("activate_output", False)
    assert data["step"] == 7 and data["name"] == "sks_hypernetwork" and data["sd_checkpoint"] is None

    # The safetensors twin holds the same tensors and structure; both read back into the same networks.
    st = a1111.write_safetensors(tmp_path / "h.safetensors", hn, INFO)
    for path in (pt, st):
        loaded = a1111.read(path)
        assert loaded.structure == hn.structure and loaded.info == INFO
        assert [(k, tuple(t.shape)) for k, t in loaded.weights[8][0].items()] == expected
        rebuilt = loaded.build()
        for key, value in hn.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), key


def test_safetensors_keys_and_metadata(tmp_path):
    from safetensors import safe_open

    hn = _hypernetwork(layer_structure=[1, 2, 1], activation="relu")
    path = a1111.write_safetensors(tmp_path / "h.safetensors", hn, INFO, strength=0.5)
    with safe_open(str(path), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == {f"{d}.{b}.linear.{i}.{p}" for d in (8, 20) for b in "kv" for i in (0, 2)
                    for p in ("weight", "bias")}
    assert meta["sdft_adapter"] == "hypernetwork" and meta["activation_func"] == '"relu"'
    assert meta["layer_structure"] == "[1.0, 2.0, 1.0]" and meta["is_layer_norm"] == "false"
    assert set(meta) >= DOCUMENTED_KEYS
    assert a1111.read(path).strength == 0.5


def test_weight_init_follows_a1111():
    normal = _hypernetwork(dims=(64,), layer_structure=[1, 2, 1], layer_norm=True)
    first = normal["64"].k.linear
    assert abs(first[0].weight.std().item() - 0.01) < 0.002 and torch.count_nonzero(first[0].bias) == 0
    assert abs(first[1].weight.std().item() - 0.01) < 0.002  # LayerNorm weights get N(0, 0.01) too
    assert not torch.equal(normal["64"].k.linear[0].weight, normal["64"].v.linear[0].weight)
    again = _hypernetwork(dims=(64,), layer_structure=[1, 2, 1], layer_norm=True)
    assert torch.equal(again["64"].v.linear[2].weight, normal["64"].v.linear[2].weight)  # seeded
    xavier = _hypernetwork(dims=(64,), layer_structure=[1, 2, 1], weight_init="XavierUniform")
    bound = (6 / (64 + 128)) ** 0.5
    assert xavier["64"].k.linear[0].weight.abs().max() <= bound and xavier["64"].k.linear[0].weight.std() > 0.05


def test_dropout_only_while_training_with_autograd():
    hn = _hypernetwork(dims=(64,), layer_structure=[1, 2, 2, 1], dropout_structure=[0, 0.5, 0.5, 0])
    branch, x = hn["64"].k, torch.randn(4, 64)
    hn.eval()
    reference = branch(x, 50.0)
    hn.train()
    with torch.no_grad():  # sampling during a training run: deterministic
        assert torch.equal(branch(x, 50.0), reference)
    assert not torch.equal(branch(x, 50.0), reference)


def _write_a1111_by_hand(path, weights_shapes, **fields):
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) for k, shape in weights_shapes}
    torch.save({64: (dict(state), dict(state)), **fields}, path)


def test_reader_applies_a1111_defaults(tmp_path):
    # An older-style file: no activate_output (A1111 then activates the output), no dropout_structure
    # (use_dropout rebuilds 0.3 after all but the last layers), no last_layer_dropout.
    path = tmp_path / "old.pt"
    shapes = [("linear.0.weight", (128, 64)), ("linear.0.bias", (128,)), ("linear.3.weight", (128, 128)),
              ("linear.3.bias", (128,)), ("linear.5.weight", (64, 128)), ("linear.5.bias", (64,))]
    _write_a1111_by_hand(path, shapes, layer_structure=[1, 2, 2, 1], activation_func="relu", use_dropout=True)
    loaded = a1111.read(path)
    assert loaded.structure.dropout_structure == [0.0, 0.3, 0.0, 0.0]
    layers = [type(m).__name__ for m in loaded.build()["64"].k.linear]
    assert layers == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear", "ReLU"]

    # The first hypernetworks named their layers linear1/linear2 and stored no structure at all.
    oldest = tmp_path / "oldest.pt"
    _write_a1111_by_hand(oldest, [("linear1.weight", (128, 64)), ("linear1.bias", (128,)),
                                  ("linear2.weight", (64, 128)), ("linear2.bias", (64,))])
    assert [type(m).__name__ for m in a1111.read(oldest).build()["64"].v.linear] == ["Linear", "Linear"]

    wrong = tmp_path / "wrong.pt"
    _write_a1111_by_hand(wrong, shapes, layer_structure=[1, 2, 2, 1], activation_func="relu")
    with pytest.raises(UserError, match="do not match"):
        a1111.read(wrong).build()


class _Exploit:
    """A pickle that creates a directory when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_can_load_recognises_only_hypernetworks(tmp_path):
    from finetune.strategies.hypernetwork import can_load

    hn = _hypernetwork()
    assert can_load(a1111.write_pt(tmp_path / "h.pt", hn, INFO))
    assert can_load(a1111.write_safetensors(tmp_path / "h.safetensors", hn, INFO))
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "emb"}, tmp_path / "emb.pt")
    assert not can_load(tmp_path / "emb.pt")
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 8)}, str(tmp_path / "emb.safetensors"))
    assert not can_load(tmp_path / "emb.safetensors")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"layer_structure": [1, 2, 1], 8: _Exploit(str(marker))}, protocol=2))
    assert not can_load(evil) and not marker.exists()
    with pytest.raises(UserError, match="weights_only"):
        a1111.read(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the exploit is real: a plain unpickle runs it
    assert marker.is_dir()


def test_config_validation(tmp_path, tiny_pipe):
    from types import SimpleNamespace

    from finetune.strategies import build_strategy

    for dotted, message in [({"hypernetwork.layer_structure": "2,1"}, "start and end with 1"),
                            ({"hypernetwork.dropout": "0,0.1"}, "needs 3 values"),
                            ({"hypernetwork.dropout": "0,0.1,0.1,0", "hypernetwork.layer_structure": "1,2,2,1"},
                             "last_layer_dropout"),
                            ({"hypernetwork.last_layer_dropout": True}, "last_layer_dropout")]:
        with pytest.raises(UserError, match=message):
            build_strategy(make_config("hypernetwork", tmp_path, **dotted))
    strategy = build_strategy(make_config("hypernetwork", tmp_path, **{"hypernetwork.dims": "768,320"}))
    with pytest.raises(UserError, match="none of its context widths"):
        strategy.prepare(SimpleNamespace(unet=tiny_pipe.unet))  # an SD1 layout on the tiny base trains nothing
    assert installed(tiny_pipe) == []


def test_default_dims_follow_the_model():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD1/SD2-shaped UNets without allocating their weights
        sd1 = UNet2DConditionModel(cross_attention_dim=768)
        sd2 = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))
    assert context_dims(sd1) == [768, 320, 640, 1280]  # A1111's default sizes for SD1
    assert context_dims(sd2) == [1024, 320, 640, 1280]


def test_processor_applies_networks_to_keys_and_values_only():
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    cross = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8)
    self_attn = Attention(query_dim=32, heads=2, dim_head=8)
    plain = cross.processor
    hn = _hypernetwork(dims=(16, 32), seed=1, layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    hn.strength = 0.7
    for attn in (cross, self_attn):
        attn.set_processor(HypernetworkAttnProcessor(plain, [hn]))
    x, text = torch.randn(2, 5, 32), torch.randn(2, 3, 16)

    def by_hand(attn, context, pair):
        heads = lambda t: t.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
        k = attn.to_k(context + pair.k.linear(context) * 0.7)
        v = attn.to_v(context + pair.v.linear(context) * 0.7)
        out = F.scaled_dot_product_attention(heads(attn.to_q(x)), heads(k), heads(v))
        return attn.to_out[0](out.transpose(1, 2).reshape(2, -1, 16))

    with torch.no_grad():
        assert torch.allclose(cross(x, text), by_hand(cross, text, hn["16"]), atol=1e-6)
        assert torch.allclose(self_attn(x), by_hand(self_attn, x, hn["32"]), atol=1e-6)
        assert not torch.allclose(cross(x, text), plain(cross, x, text), atol=1e-3)
        del hn["16"]  # a context width without a network is left alone
        assert torch.equal(cross(x, text), plain(cross, x, text))


@pytest.fixture(scope="module")
def tiny_pipe():
    from finetune.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def base_image(tiny_pipe):
    return render(tiny_pipe, PROMPT)


def test_processor_strength_zero_and_remove_restore_the_base(tiny_pipe, base_image):
    originals = dict(tiny_pipe.unet.attn_processors)
    hn = _hypernetwork(dims=context_dims(tiny_pipe.unet), seed=3, layer_structure=[1, 2, 1], activation="relu",
                       weight_init="XavierNormal")
    install(tiny_pipe, hn)
    try:
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in tiny_pipe.unet.attn_processors.values())
        assert not any(".processor." in n for n, _ in tiny_pipe.unet.named_parameters())
        assert np.abs(render(tiny_pipe, PROMPT) - base_image).max() > 1e-3
        set_strength(tiny_pipe, 0.0)
        assert np.array_equal(render(tiny_pipe, PROMPT), base_image)
        # Networks that output zero run the processor's own attention path: it must equal diffusers' exactly.
        set_strength(tiny_pipe, 1.0)
        with torch.no_grad():
            for p in hn.parameters():
                p.zero_()
        assert np.array_equal(render(tiny_pipe, PROMPT), base_image)
    finally:
        remove(tiny_pipe)
    assert tiny_pipe.unet.attn_processors == originals and installed(tiny_pipe) == []
    assert np.array_equal(render(tiny_pipe, PROMPT), base_image)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short hypernetwork run (with relu, layer norm and dropout) and the base parameters before it."""
    from finetune.models import load_components
    from finetune.trainer import run_training

    out = tmp_path_factory.mktemp("hn-run")
    config = make_config("hypernetwork", out, **{
        "train.lr": 1e-3, "train.steps": 3, "hypernetwork.layer_structure": "1,2,2,1",
        "hypernetwork.activation": "relu", "hypernetwork.layer_norm": True,
        "hypernetwork.dropout": "0,0.1,0.1,0", "hypernetwork.last_layer_dropout": True,
        "output.formats": "a1111,safetensors"})
    components = load_components("tiny")
    before = {f"{part}.{n}": p.detach().clone() for part in ("text_encoder", "vae", "unet")
              for n, p in getattr(components, part).named_parameters()}
    return config, before, run_training(config, components)


def test_training_changes_only_the_hypernetwork(trained):
    from finetune.models import load_components
    from finetune.strategies.hypernetwork import HypernetworkStrategy

    config, before, outcome = trained
    components, strategy = outcome.components, outcome.strategy
    after = {f"{part}.{n}": p for part in ("text_encoder", "vae", "unet")
             for n, p in getattr(components, part).named_parameters()}
    assert after.keys() == before.keys()  # nothing was added to the base's modules
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = HypernetworkStrategy(config)
    fresh.prepare(load_components("tiny"))  # same seed: the networks as they were before training
    initial, final = fresh.state_dict(), strategy.state_dict()
    assert initial.keys() == final.keys() and all(k.split(".")[0] in ("64", "128") for k in final)
    assert all(not torch.equal(initial[k], final[k]) for k in final if ".weight" in k)


def test_exports_reproduce_the_trained_pipeline(trained, base_image):
    from finetune.inference import detect_adapter_kind, load_adapter, pipeline_from_components
    from finetune.models import load_pipeline

    config, _, outcome = trained
    exports = outcome.summary["exports"]
    assert [pathlib.Path(p).name for p in exports["a1111"] + exports["safetensors"]] == [
        "sks_hypernetwork.pt", "sks_hypernetwork.safetensors"]
    outcome.strategy.hypernetwork.eval()
    trained_image = render(pipeline_from_components(outcome.components), PROMPT)
    assert np.abs(trained_image - base_image).max() > 1e-3
    state = outcome.strategy.state_dict()
    for path in exports["a1111"] + exports["safetensors"]:
        assert detect_adapter_kind(path) == "hypernetwork"
        loaded = a1111.read(path)
        assert loaded.info["step"] == 3 and "method: hypernetwork" in loaded.config
        assert all(torch.equal(loaded.build().state_dict()[k], v) for k, v in state.items())
        pipe = load_pipeline("tiny")
        assert load_adapter(pipe, path) == "sks_hypernetwork"
        assert np.abs(render(pipe, PROMPT) - trained_image).max() < 1e-4, path
        set_strength(pipe, 0.0)
        assert np.array_equal(render(pipe, PROMPT), base_image)


def _write_lora(folder: pathlib.Path) -> pathlib.Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from finetune.models import load_components

    unet = load_components("tiny").unet
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="pytorch_lora_weights.safetensors")
    return folder / "pytorch_lora_weights.safetensors"


def test_composes_with_lora(trained, tmp_path, base_image):
    from finetune.inference import load_adapter
    from finetune.models import load_pipeline

    hn_file = trained[2].summary["exports"]["a1111"][0]
    lora_file = _write_lora(tmp_path)
    images = {}
    for name, files in {"hn": [hn_file], "lora": [lora_file], "both": [hn_file, lora_file]}.items():
        pipe = load_pipeline("tiny")
        for path in files:
            load_adapter(pipe, path)
        assert bool(installed(pipe)) == (hn_file in files)
        images[name] = render(pipe, PROMPT)
    set_strength(pipe, 0.0)  # the hypernetwork off leaves exactly the LoRA model
    assert np.array_equal(render(pipe, PROMPT), images["lora"])
    assert np.isfinite(images["both"]).all()
    for other in ("hn", "lora"):
        assert np.abs(images["both"] - images[other]).max() > 1e-3, other
    assert np.abs(images["lora"] - base_image).max() > 1e-3


def test_composes_with_textual_inversion(trained, tmp_path):
    from safetensors.torch import save_file

    from finetune.inference import load_adapter
    from finetune.models import load_pipeline

    embedding = tmp_path / "learned_embeds.safetensors"
    save_file({"<hn-test>": torch.randn(1, 64, generator=torch.Generator().manual_seed(2))}, str(embedding))
    pipe = load_pipeline("tiny")
    pipe.load_textual_inversion(str(embedding))  # diffusers' own loader: independent of sdft's TI code
    prompt = "a photo of <hn-test>"
    embedding_only = render(pipe, prompt)
    load_adapter(pipe, trained[2].summary["exports"]["safetensors"][0])
    both = render(pipe, prompt)
    assert np.isfinite(both).all() and np.abs(both - embedding_only).max() > 1e-3
    set_strength(pipe, 0.0)
    assert np.array_equal(render(pipe, prompt), embedding_only)

"""The kohya LoRA file, read the way AUTOMATIC1111 and ComfyUI read it, on Stable Diffusion 1.5's real shapes.

Both consumers match a file's `lora_unet_*` / `lora_te_*` names against the original (ldm) modules of the
checkpoint they run. The two mappings below are this project's own, written from the tools' documented
behaviour: A1111 rewrites diffusers-style block names to ldm block numbers with fixed rules (written out here,
independent of sdft's code); ComfyUI builds a table from every diffusers weight name to its ldm name (built here
with sdft's diffusers->ldm renaming, which tests/test_single_file.py checks against diffusers' own converter). Every name the exporter writes must land on an existing
ldm module of the right shape under both, and no two names may land on the same module.
"""

from __future__ import annotations

import re

import pytest
import torch

# A1111's suffix renames inside a ResNet block (diffusers name -> ldm name).
RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                   "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_ldm_name(kohya: str) -> str | None:
    """A1111's rule for SD1: kohya's diffusers-style module name -> ldm module name with '_' for '.'."""
    def inner(kind: str, rest: str) -> str:
        return RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest

    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", kohya):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_" \
               + inner(kind, rest)
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", kohya):
        kind, index, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_" + inner(kind, rest)
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", kohya):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_" \
               + inner(kind, rest)
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", kohya):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", kohya):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", kohya):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return None


@pytest.fixture(scope="module")
def sd15_parts():
    """SD1.5-shaped UNet and CLIP text encoder on the meta device (shapes and names, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lab.random_bases import sd15_configs

    cfg = sd15_configs()
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg["unet"]), CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))


def _exported_modules(model, names: list[str], part: str) -> dict[str, tuple[torch.Size, torch.Size]]:
    """What the LoRA exporter writes for these target modules (rank 1): kohya name -> (lora_up, lora_down) shape."""
    from finetune.formats.kohya_lora import peft_to_kohya

    modules = dict(model.named_modules())
    state = {}
    for name in names:
        weight = modules[name].weight
        down_shape = (1, *weight.shape[1:]) if weight.ndim == 4 else (1, weight.shape[1])
        state[f"{name}.lora_A.weight"] = torch.zeros(down_shape)
        state[f"{name}.lora_B.weight"] = torch.zeros(weight.shape[0], 1, *([1, 1] if weight.ndim == 4 else []))
    tensors = peft_to_kohya(state, part, alpha=1.0)
    stems = {key.split(".", 1)[0] for key in tensors}
    assert len(stems) == len(names)
    assert set(tensors) == {f"{s}.{leaf}" for s in stems for leaf in ("lora_up.weight", "lora_down.weight", "alpha")}
    return {s: (tensors[f"{s}.lora_up.weight"].shape, tensors[f"{s}.lora_down.weight"].shape) for s in stems}


def _ldm_modules(unet, text_encoder) -> dict[str, tuple[int, ...]]:
    """Module name ('_' for '.') -> weight shape in the original SD1.5 checkpoint layout."""
    from finetune.formats.single_file import text_encoder_to_ldm, unet_to_ldm

    found = {f"diffusion_model_{k[:-len('.weight')]}".replace(".", "_"): tuple(v.shape)
             for k, v in unet_to_ldm(unet.state_dict(), unet.config).items() if k.endswith(".weight")}
    found.update({f"transformer_text_model_{k[:-len('.weight')]}".replace(".", "_"): tuple(v.shape)
                  for k, v in text_encoder_to_ldm(text_encoder.state_dict()).items() if k.endswith(".weight")})
    return found


def _comfyui_table(unet, text_encoder) -> dict[str, str]:
    """ComfyUI's way: every diffusers weight name, written kohya-style, -> its ldm module name."""
    from finetune.formats.single_file import rename_key as to_ldm
    from finetune.formats.single_file import unet_prefix_table

    table = {}
    for key in unet.state_dict():
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            ldm = to_ldm(key, unet_prefix_table(unet.config))[: -len(".weight")]
            table["lora_unet_" + module.replace(".", "_")] = ("diffusion_model_" + ldm).replace(".", "_")
    for key in text_encoder.state_dict():
        if key.endswith(".weight"):
            module = key[: -len(".weight")].removeprefix("text_model.")
            table["lora_te_text_model_" + module.replace(".", "_")] = "transformer_text_model_" + module.replace(
                ".", "_")
    return table


@pytest.mark.parametrize("targets", ["kohya", "all"])
def test_every_kohya_name_lands_on_one_sd15_module_in_a1111_and_comfyui(sd15_parts, targets):
    from finetune.strategies.lora import text_encoder_targets, unet_target_modules

    unet, text_encoder = sd15_parts
    suffixes = text_encoder_targets(targets)
    te_names = [n for n, _ in text_encoder.named_modules() if n.rsplit(".", 1)[-1] in suffixes]
    exported = {**_exported_modules(unet, unet_target_modules(unet, targets), "unet"),
                **_exported_modules(text_encoder, te_names, "text_encoder")}
    assert len(te_names) == 12 * 6  # q, k, v, out, fc1, fc2 in each of CLIP-L's 12 layers
    ldm = _ldm_modules(unet, text_encoder)
    comfy = _comfyui_table(unet, text_encoder)
    for consumer, resolve in (("A1111", a1111_ldm_name), ("ComfyUI", comfy.get)):
        landed = {}
        for name, (up, down) in exported.items():
            target = resolve(name)
            assert target in ldm, f"{consumer} cannot place {name} (-> {target})"
            shape = ldm[target]
            assert (up[0], down[1]) == shape[:2] and tuple(down[2:]) == tuple(shape[2:]), (consumer, name, shape)
            landed.setdefault(target, []).append(name)
        assert all(len(v) == 1 for v in landed.values()), f"{consumer}: two names on one module"
        assert len(landed) == len(exported)


def test_text_encoder_names_do_not_depend_on_the_transformers_version():
    """transformers 4 names CLIP modules `text_model.encoder...`, transformers 5 `encoder...`: same kohya name."""
    from finetune.formats.kohya_lora import kohya_stem

    for module in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.11.mlp.fc2"):
        assert kohya_stem(module, "text_encoder") == kohya_stem(f"text_model.{module}", "text_encoder") \
            == "lora_te_text_model_" + module.replace(".", "_")


def test_hypernetwork_file_is_keyed_by_the_context_widths_a1111_looks_up_on_sd15(sd15_parts):
    """A1111 picks a hypernetwork's layers by the width of the attention context it is about to project:
    768 for SD1.5's cross-attention (CLIP-L), 320/640/1280 for self-attention. A file trained on SD1.5's shapes
    holds exactly those int keys, each a (K, V) pair whose first Linear takes that width."""
    from finetune.formats.a1111_hypernetwork import a1111_dict
    from finetune.hypernet import Hypernetwork, HypernetworkStructure, context_dims

    unet, _ = sd15_parts
    dims = context_dims(unet)
    data = a1111_dict(Hypernetwork(dims, HypernetworkStructure()), {"step": 0})
    widths = sorted(k for k in data if isinstance(k, int))
    assert widths == [320, 640, 768, 1280] and dims[0] == 768  # cross-attention first, as A1111 lists it
    for width in widths:
        key_net, value_net = data[width]
        assert key_net["linear.0.weight"].shape[1] == width and value_net["linear.0.weight"].shape[1] == width

"""The single-file Stable Diffusion checkpoint (original CompVis/ldm key names) that A1111, ComfyUI and
Forge load, written from a diffusers pipeline; read back with diffusers' `from_single_file`.

Layout of the file (one flat safetensors dict):
- `model.diffusion_model.*`   the UNet       (input_blocks / middle_block / output_blocks / time_embed / out)
- `first_stage_model.*`       the VAE        (encoder/decoder down/up/mid, quant_conv, post_quant_conv)
- text encoders, by family:
  SD1   `cond_stage_model.transformer.text_model.*`            CLIP (transformers names)
  SD2   `cond_stage_model.model.*`                             OpenCLIP (resblocks, fused q/k/v `in_proj`)
  SDXL  `conditioner.embedders.0.transformer.text_model.*`     CLIP-L, and
        `conditioner.embedders.1.model.*`                      OpenCLIP bigG (with its `text_projection`)

Key-name facts come from the two converters diffusers ships, read for this module (no code copied):
- diffusers/loaders/single_file_utils.py (0.42.1): `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
  `convert_ldm_clip_checkpoint`, `DIFFUSERS_TO_LDM_MAPPING`, `LDM_CLIP_PREFIX_TO_REMOVE` (ldm -> diffusers);
- huggingface/diffusers scripts/convert_diffusers_to_original_stable_diffusion.py (diffusers -> ldm, SD1.5 only:
  it hard-codes 4 blocks x 2 layers). Here every index is computed from the UNet/VAE configs instead, so the
  same code serves SD1.5 shapes and the small test model.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any, Iterable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# diffusers strips exactly this prefix (LDM_CLIP_PREFIX_TO_REMOVE) and detects an SD1 CLIP by
# `cond_stage_model.transformer.text_model.embeddings.position_embedding.weight` (CHECKPOINT_KEY_NAMES["clip"]).
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
# OpenCLIP's names for CLIP's parts (convert_open_clip_checkpoint / DIFFUSERS_TO_LDM_MAPPING["openclip"]).
OPEN_CLIP_TOP_LEVEL = {"embeddings.token_embedding.weight": "token_embedding.weight",
                       "embeddings.position_embedding.weight": "positional_embedding",
                       "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER_LEAVES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                          "self_attn.out_proj": "attn.out_proj"}

# Inside a UNet ResnetBlock2D the ldm names index the nn.Sequential they sit in:
# in_layers = [GroupNorm, SiLU, Conv], out_layers = [GroupNorm, SiLU, Dropout, Conv], emb_layers = [SiLU, Linear]
# (update_unet_resnet_ldm_to_diffusers; unet_conversion_map_resnet in the script).
UNET_RESNET_LEAVES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
# UNet top-level layers: time_embed = [Linear, SiLU, Linear], out = [GroupNorm, SiLU, Conv] (DIFFUSERS_TO_LDM_MAPPING).
UNET_TOP_LEVEL = {
    "conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
    # SDXL's pooled-text + time-id embedding: label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
}
# VAE resnets keep their leaf names except the shortcut (update_vae_resnet_ldm_to_diffusers).
VAE_RESNET_LEAVES = {"conv_shortcut": "nin_shortcut"}
# The VAE mid-block attention (update_vae_attentions_ldm_to_diffusers): ldm stores q/k/v/proj_out as 1x1 convs.
VAE_ATTENTION_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_ATTENTION_CONVS = ("q", "k", "v", "proj_out")


# ---------------------------------------------------------------------------------------------------------------
# Prefix tables: (diffusers module prefix, ldm module prefix, leaf renames), all built from a config.


def _uniform_layers(config) -> int:
    """`layers_per_block` as one int: the ldm numbering (input_blocks.N) assumes the same count in every block."""
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"layers_per_block {layers} differs per block: the ldm layout cannot express it")
        layers = layers[0]
    return int(layers)


def _has_attention(block_type: str) -> bool:
    """CrossAttn*Block2D blocks hold Transformer2DModels; DownBlock2D/UpBlock2D hold only resnets."""
    return "CrossAttn" in block_type


def unet_prefix_table(config) -> list[tuple[str, str, dict[str, str]]]:
    """Module prefixes of a UNet2DConditionModel (diffusers -> ldm), from its config.

    ldm numbers the encoder as one flat list: input_blocks.0 is conv_in, then each down block b contributes
    `layers` (resnet, attention) pairs at input_blocks.{1 + b*(layers+1) + j} (resnet at .0, attention at .1),
    then its downsampler alone at input_blocks.{(b+1)*(layers+1)}.0.op (convert_ldm_unet_checkpoint:
    block_id = (i-1) // (layers+1)). The decoder has layers+1 entries per up block at
    output_blocks.{b*(layers+1) + j}; the upsampler sits in the block's last entry, right after the resnet
    (.1.conv) or after the attention (.2.conv). The mid block is middle_block.0 resnet, .1 attention, .2 resnet.
    """
    layers = _uniform_layers(config)
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    table: list[tuple[str, str, dict[str, str]]] = [(d, l, {}) for d, l in UNET_TOP_LEVEL.items()]
    for b, block_type in enumerate(down_types):
        for j in range(layers):
            index = 1 + b * (layers + 1) + j
            table.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{index}.0.", UNET_RESNET_LEAVES))
            if _has_attention(block_type):
                table.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{index}.1.", {}))
        if b < len(down_types) - 1:  # diffusers adds a downsampler to every block but the last
            table.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (layers + 1)}.0.op.", {}))
    for b, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for j in range(layers + 1):
            index = b * (layers + 1) + j
            table.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{index}.0.", UNET_RESNET_LEAVES))
            if attention:
                table.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{index}.1.", {}))
        if b < len(up_types) - 1:  # every up block but the last upsamples
            last = b * (layers + 1) + layers
            slot = 2 if attention else 1
            table.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", {}))
    # UNetMidBlock2DCrossAttn alternates resnet, attention, resnet: middle_block.{2k} / .{2k+1}.
    for k in range(2):
        table.append((f"mid_block.resnets.{k}.", f"middle_block.{2 * k}.", UNET_RESNET_LEAVES))
    table.append(("mid_block.attentions.0.", "middle_block.1.", {}))
    return table


def vae_prefix_table(config) -> list[tuple[str, str, dict[str, str]]]:
    """Module prefixes of an AutoencoderKL (diffusers -> ldm), from its config.

    Encoder block i is `encoder.down.{i}` (resnets -> `.block.{j}`, downsampler -> `.downsample.conv`);
    the decoder counts the other way round: diffusers up_blocks.{i} is ldm `decoder.up.{n-1-i}`
    (convert_ldm_vae_checkpoint: block_id = num_up_blocks - 1 - i). Mid resnets are `mid.block_1`/`mid.block_2`,
    the mid attention `mid.attn_1`. norm_out was renamed conv_norm_out by diffusers.
    """
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    layers = int(config["layers_per_block"])
    table: list[tuple[str, str, dict[str, str]]] = []
    for part in ("encoder", "decoder"):
        for leaf in ("conv_in.", "conv_out."):
            table.append((f"{part}.{leaf}", f"{part}.{leaf}", {}))
        table.append((f"{part}.conv_norm_out.", f"{part}.norm_out.", {}))
        for k in range(2):
            table.append((f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", VAE_RESNET_LEAVES))
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_LEAVES))
    for i in range(n_down):
        for j in range(layers):  # the encoder has layers_per_block resnets per block
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET_LEAVES))
        if i < n_down - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
    for i in range(n_up):
        ldm = n_up - 1 - i
        for j in range(layers + 1):  # the decoder has one more resnet per block
            table.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm}.block.{j}.", VAE_RESNET_LEAVES))
        if i < n_up - 1:
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm}.upsample.conv.", {}))
    table += [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    return table


# ---------------------------------------------------------------------------------------------------------------
# Renaming


def _rename_leaf(rest: str, leaves: dict[str, str]) -> str:
    """Rename the module part of `rest` (e.g. `conv1.weight` or `to_out.0.bias`) through `leaves`."""
    for old, new in leaves.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def rename_key(key: str, table: Iterable[tuple[str, str, dict[str, str]]]) -> str:
    """The ldm name of one diffusers state-dict key; the longest matching prefix wins
    (so `mid_block.attentions.0.` never shadows a deeper, more specific entry)."""
    best = None
    for diffusers_prefix, ldm_prefix, leaves in table:
        if key.startswith(diffusers_prefix) and (best is None or len(diffusers_prefix) > len(best[0])):
            best = (diffusers_prefix, ldm_prefix, leaves)
    if best is None:
        raise KeyError(key)
    diffusers_prefix, ldm_prefix, leaves = best
    return ldm_prefix + _rename_leaf(key[len(diffusers_prefix):], leaves)


def _convert(state: dict[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    """Rename every key through `table`; any key the table does not know is an architecture this module does
    not support, so fail loudly instead of writing a file other tools would half-load."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        try:
            new = rename_key(key, table)
        except KeyError:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"{what}: two weights map to {new}")
        out[new] = tensor
    if unknown:
        raise ValueError(f"{what}: no ldm name for {len(unknown)} keys (unsupported architecture?), e.g. {unknown[:5]}")
    return out


def ldm_unet_module_name(module_path: str, config) -> str:
    """The ldm name of one UNet module (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` for
    SDXL's config), which kohya's SDXL LoRA keys use."""
    return rename_key(module_path + ".weight", unet_prefix_table(config)).removesuffix(".weight")


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict renamed to ldm keys (without `model.diffusion_model.`)."""
    return _convert(state, unet_prefix_table(config), "unet")


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict renamed to ldm keys (without `first_stage_model.`).

    The mid-block attention projections are Linear [C, C] in diffusers but 1x1 convs [C, C, 1, 1] in ldm
    (the script's reshape_weight_for_sd; conv_attn_to_linear undoes it when loading)."""
    out = _convert(state, vae_prefix_table(config), "vae")
    pattern = re.compile(r"mid\.attn_1\.(%s)\.weight$" % "|".join(VAE_ATTENTION_CONVS))
    for key, tensor in out.items():
        if pattern.search(key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict with keys relative to `text_model.` (transformers 5 has no such level;
    transformers 4 had it: accept both). The buffer `embeddings.position_ids` is left out: it is not a weight,
    and loaders rebuild it."""
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_projection"):
            raise ValueError("text encoder has a projection (CLIPTextModelWithProjection): not an SD1/SD2 CLIP layout")
        out[key] = tensor
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict in OpenCLIP's layout (SD2's and SDXL's second encoder):
    `transformer.resblocks.N.*` with q/k/v fused into `attn.in_proj_weight/bias` (q, k, v stacked in that order),
    and `text_projection` stored transposed (OpenCLIP multiplies x @ P; transformers' Linear holds P^T)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif key in OPEN_CLIP_TOP_LEVEL:
            out[OPEN_CLIP_TOP_LEVEL[key]] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}." + _rename_leaf(m[2], OPEN_CLIP_LAYER_LEAVES)] = tensor
        else:
            raise ValueError(f"text encoder: no OpenCLIP name for {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def ldm_open_clip_to_state(ldm: dict[str, torch.Tensor], prefix: str, model_keys) -> dict[str, torch.Tensor]:
    """The inverse of open_clip_to_ldm for the keys `model_keys` of a transformers text encoder."""
    out = {}
    for key in model_keys:
        short = key.removeprefix("text_model.")
        if short.endswith("position_ids"):
            continue
        if short == "text_projection.weight":
            out[key] = ldm[prefix + "text_projection"].T.contiguous()
        elif short in OPEN_CLIP_TOP_LEVEL:
            out[key] = ldm[prefix + OPEN_CLIP_TOP_LEVEL[short]]
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", short):
            fused = ldm[prefix + f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"]
            out[key] = fused.chunk(3)["qkv".index(m[2])]
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", short)
            out[key] = ldm[prefix + f"transformer.resblocks.{m[1]}." + _rename_leaf(m[2], OPEN_CLIP_LAYER_LEAVES)]
    return out


def is_open_clip_sd2(text_config) -> bool:
    """SD2's text encoder: OpenCLIP ViT-H, whose MLPs use gelu where SD1's OpenAI CLIP-L uses quick_gelu."""
    return getattr(text_config, "hidden_act", "quick_gelu") == "gelu"


def text_encoder_layouts(pipe) -> list[tuple[str, str, bool]]:
    """(pipeline attribute, key prefix, OpenCLIP layout?) of each text encoder the single file stores."""
    if hasattr(pipe, "text_encoder_2"):
        return [("text_encoder", SDXL_TEXT_PREFIXES[0], False), ("text_encoder_2", SDXL_TEXT_PREFIXES[1], True)]
    if is_open_clip_sd2(pipe.text_encoder.config):
        return [("text_encoder", SD2_TEXT_PREFIX, True)]
    return [("text_encoder", TEXT_PREFIX, False)]


def pipeline_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet + VAE + text encoders) as one flat dict with ldm key names."""
    state: dict[str, torch.Tensor] = {}
    for attribute, prefix, open_clip in text_encoder_layouts(pipe):
        text_state = dict(getattr(pipe, attribute).state_dict())
        rows_key = next(k for k in text_state if k.endswith("embeddings.token_embedding.weight"))
        base_rows = pipe.tokenizer.vocab_size
        if text_state[rows_key].shape[0] > base_rows:
            # Words added to the tokenizer (a pivotal run's new word) have no place in a single file: its readers
            # build CLIP with the fixed vocabulary and refuse extra rows. The word ships as an embedding file.
            text_state[rows_key] = text_state[rows_key][:base_rows]
        converted = open_clip_to_ldm(text_state) if open_clip else text_encoder_to_ldm(text_state)
        state.update({prefix + key: tensor for key, tensor in converted.items()})
    for prefix, part in ((UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)),
                         (VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))):
        state.update({prefix + key: tensor for key, tensor in part.items()})
    return state


def ldm_to_pipeline_states(pipe, ldm: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of pipeline_state_dict for the UNet and text encoders: the file's tensors under the
    state-dict keys of `pipe`'s own modules (names derived from pipe's configs, so any supported shape works)."""
    table = unet_prefix_table(pipe.unet.config)
    try:
        states = {"unet": {key: ldm[UNET_PREFIX + rename_key(key, table)] for key in pipe.unet.state_dict()}}
        for attribute, prefix, open_clip in text_encoder_layouts(pipe):
            keys = list(getattr(pipe, attribute).state_dict())
            states[attribute] = ldm_open_clip_to_state(ldm, prefix, keys) if open_clip else \
                {key: ldm[prefix + key.removeprefix("text_model.")] for key in keys if not key.endswith("position_ids")}
    except KeyError as exc:
        raise ValueError(f"checkpoint does not fit this base: no tensor {exc}") from exc
    return states


# ---------------------------------------------------------------------------------------------------------------
# Files


def default_metadata(pipe) -> dict[str, str]:
    """modelspec keys (Stability's model-spec, read by A1111/ComfyUI/Forge UIs) describing the checkpoint."""
    from .kohya_lora import base_model_version, modelspec_architecture

    prediction = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    version = base_model_version(pipe.unet.config, prediction)
    resolution = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(version),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "sdft fine-tune",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
        "format": "pt",
    }


def save_single_file(pipe, path, half: bool = False, metadata: dict[str, Any] | None = None) -> Path:
    """Write `pipe` (UNet, VAE, text encoder) as one original-layout `.safetensors` checkpoint.

    half: store floating-point tensors as float16 (half the size; what most shared checkpoints use);
          otherwise float32, whatever dtype the pipeline is in.
    metadata: extra string metadata, merged over the modelspec defaults.
    Safetensors only: a `.ckpt` is a pickle and loading one can run code.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors only")
    state = pipeline_state_dict(pipe)
    dtype = torch.float16 if half else torch.float32
    # contiguous + clone: safetensors refuses views that share storage (e.g. tied or reshaped weights).
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous().clone()
             for k, v in state.items()}
    meta = default_metadata(pipe)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=meta)
    except Exception:
        tmp.unlink(missing_ok=True)  # a full disk (any writer's error) leaves no multi-GB fragment behind
        raise
    tmp.replace(path)  # never leave a half-written checkpoint under the final name
    return path


def load_single_file(path, config_folder, torch_dtype=None, **kwargs):
    """Load a single-file checkpoint as a pipeline of its family (SD or SDXL), offline.

    config_folder: a local diffusers pipeline folder (save_pretrained) of the same architecture; it gives every
    component's config (and the tokenizer and scheduler), so nothing is fetched from the hub and shapes that
    diffusers cannot infer from the keys (anything not SD1/SD2/SDXL sized) still load.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with open_safetensors(path) as handle:
        sdxl = any(k.startswith(SDXL_TEXT_PREFIXES[1]) for k in handle.keys())
    if sdxl:
        kwargs.setdefault("add_watermarker", False)
    else:
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return pipeline_class.from_single_file(
        str(path), config=str(config_folder), local_files_only=True, torch_dtype=torch_dtype, **kwargs)


def open_safetensors(path):
    """A safetensors handle for reading keys and metadata without loading tensors."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")

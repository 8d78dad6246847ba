"""Convert LoRA files between diffusers' format and kohya's (A1111, ComfyUI, Forge).

diffusers -> kohya needs no model for SD 1.x/2.x: diffusers' module paths map one way onto kohya names, and the
adapter metadata gives alpha; for SDXL kohya names UNet modules in the original layout, which the base's UNet
config gives. kohya -> diffusers needs the base's module names (kohya's names replace every '.' by
'_', which cannot be undone without them), so it goes through diffusers' own kohya loader on the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import UserError
from . import clip_module_path
from .kohya_lora import kohya_stem

DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")


def is_sdxl_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA file was made for SDXL, as far as its keys tell (a second text encoder, or kohya's
    original-layout UNet names); a UNet-only diffusers file does not tell."""
    return any(k.startswith(("text_encoder_2.", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_"))
               for k in tensors)


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family=None,
                       unet_config=None) -> dict[str, torch.Tensor]:
    """kohya tensors from a diffusers LoRA file's tensors and metadata (alpha: lora_alpha, else the rank).
    `family` (default SD 1.x/2.x) and, for SDXL, the base's `unet_config` choose the kohya names."""
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if part not in DIFFUSERS_PARTS or not rest.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"{key}: not a diffusers LoRA key (expected unet./text_encoder. ... .lora_A/B.weight)")
        module, _, leaf = rest.rpartition(".lora_")
        stem = kohya_stem(module, part, family, unet_config)
        name = "lora_down" if leaf.startswith("A") else "lora_up"
        out[f"{stem}.{name}.weight"] = tensor.float().contiguous()
        if name == "lora_down":
            rank = tensor.shape[0]
            alpha = adapter.get(f"{part}.alpha_pattern", {}).get(module, adapter.get(f"{part}.lora_alpha", rank))
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_to_diffusers_pipeline(pipe, path: Path, folder: Path) -> Path:
    """Load a kohya file into `pipe` with diffusers' own loader, then write the diffusers LoRA file into `folder`."""
    from peft.utils import get_peft_model_state_dict

    pipe.load_lora_weights(str(path), adapter_name="converted")
    layers, metadata = {}, {}
    for part in DIFFUSERS_PARTS:
        model = getattr(pipe, part, None)
        if "converted" in getattr(model, "peft_config", {}):
            state = get_peft_model_state_dict(model, adapter_name="converted")
            if part != "unet":  # diffusers' own files keep CLIP's `text_model.` level
                state = {f"text_model.{clip_module_path(k)}": v for k, v in state.items()}
            layers[f"{part}_lora_layers"] = state
            metadata[f"{part}_lora_adapter_metadata"] = model.peft_config["converted"].to_dict()
    if not layers:
        raise UserError(f"{path}: no LoRA module of it matches this base")
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors"

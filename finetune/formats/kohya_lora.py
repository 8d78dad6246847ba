"""The kohya/A1111/ComfyUI LoRA file: `lora_unet_*` / `lora_te_*` keys with lora_down, lora_up, alpha."""

from __future__ import annotations

import datetime

import torch

from . import clip_module_path

# kohya's text-encoder names keep CLIP's `text_model.` level, whichever transformers version trained.
UNET_PREFIX = "lora_unet_"
# kohya's ss_base_model_version -> Stability's modelspec.architecture (LoRA files append "/lora").
MODELSPEC_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                           "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def modelspec_architecture(base_version: str) -> str:
    return MODELSPEC_ARCHITECTURES.get(base_version, "stable-diffusion-v1")


def kohya_stem(module_path: str, part: str, family=None, unet_config=None) -> str:
    """A module's kohya key stem. SD 1.x/2.x: `down_blocks.0.attentions.0.proj_in` ->
    `lora_unet_down_blocks_0_attentions_0_proj_in`; text-encoder paths with or without `text_model.` ->
    `lora_te_text_model_encoder_layers_...`. SDXL: UNet modules under their original names
    (`lora_unet_input_blocks_4_1_proj_in`, which needs `unet_config`) and `lora_te1_`/`lora_te2_` per encoder.
    `part` is 'unet' or the text encoder's pipeline attribute ('text_encoder', 'text_encoder_2')."""
    from ..families import family_named

    family = family or family_named("sd")
    if part == "unet":
        return UNET_PREFIX + family.kohya_unet_name(module_path, unet_config).replace(".", "_")
    prefix = family.kohya_text_prefixes()[family.text_encoder_parts.index(part)]
    return f"{prefix}_text_model_" + clip_module_path(module_path).replace(".", "_")


def peft_to_kohya(peft_state: dict[str, torch.Tensor], part: str, alpha: float, family=None,
                  unet_config=None) -> dict[str, torch.Tensor]:
    """Convert a peft LoRA state dict (`<module>.lora_A.weight`/`lora_B`) of one model to kohya keys."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        for peft_name, kohya_name in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
            marker = f".{peft_name}.weight"
            if key.endswith(marker):
                module = key[: -len(marker)]
                stem = kohya_stem(module, part, family, unet_config)
                out[f"{stem}.{kohya_name}.weight"] = tensor.detach().to("cpu", torch.float32).contiguous()
                out[f"{stem}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected key in LoRA state: {key}")
    return out


def kohya_metadata(*, rank: int, alpha: float, base_version: str, resolution: int, steps: int, lr: float,
                   title: str, prediction_type: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata kohya's tools write (all values are strings)."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": base_version,
        "ss_v2": str(base_version.startswith("sd_v2")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_learning_rate": str(lr),
        "ss_training_comment": "trained with sdft",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(base_version) + "/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    meta.update(extra or {})
    return meta


def base_model_version(unet_config, prediction_type: str) -> str:
    """kohya's ss_base_model_version guessed from the UNet: SD2 uses a 1024-wide text encoder."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl_base_v1-0"
    if int(unet_config.get("cross_attention_dim", 768)) == 1024:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
    return "sd_v1"

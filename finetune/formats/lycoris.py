"""LyCORIS-layout adapter files (LoHa, LoKr, DoRA) as A1111, ComfyUI and Forge read them.

Keys are kohya's module stems (`lora_unet_...`, `lora_te_...`, `lora_te1_`/`lora_te2_` on SDXL) with the
LyCORIS tensor names: `hada_w1_a/_b`, `hada_w2_a/_b` (LoHa), `lokr_w1[_a/_b]`, `lokr_w2[_a/_b]` (LoKr),
`lora_up/lora_down` + `dora_scale` (DoRA), and `alpha`. The consumers rebuild each module's weight change as

- LoRA / DoRA: up @ down, scaled by alpha / rank (rank = lora_down's first dimension);
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), scaled by alpha / rank (rank = hada_w1_b's first dimension);
- LoKr: kron(w1, w2) (each factor whole or a low-rank pair), scaled by alpha / rank only when a factor is a
  low-rank pair (rank = that pair's inner dimension), else by 1;

and DoRA then rescales each output row of (weight + change) to the length `dora_scale` holds (LyCORIS's rule;
ComfyUI divides by the base weight's row lengths instead, and A1111's built-in loader expects one scale per input
column, so DoRA files are exact only in LyCORIS-based loaders and here). peft trains the same adapters;
`peft_to_lycoris` writes its state so that these rules reproduce peft's forward pass, and `merge_into` applies a
file by them (sdft's own loader and `sdft merge`; the tests check the LoHa/LoKr rules against the trained model).
"""

from __future__ import annotations

import json

import torch

from .kohya_lora import kohya_stem
from .lora_resize import module_delta

# peft tensor name -> LyCORIS tensor name (the LoHa and LoKr names are the same in both).
PEFT_TO_LYCORIS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                   "lora_magnitude_vector": "dora_scale",
                   **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                                     "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}
LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "dora_scale")


def is_lycoris(keys) -> bool:
    """Whether a kohya-style file holds LyCORIS tensors (LoHa, LoKr or DoRA) rather than plain LoRA."""
    return any(k.rsplit(".", 1)[-1] in LYCORIS_MARKERS for k in keys)


def peft_to_lycoris(peft_state: dict[str, torch.Tensor], part: str, alpha: float, rank: int, family=None,
                    unet_config=None) -> dict[str, torch.Tensor]:
    """One model's peft LoHa / LoKr / DoRA state as LyCORIS keys (float32), with each module's `alpha`.

    peft scales every adapter by alpha / rank. Where the consumers' rule differs (a LoKr module with no low-rank
    pair: scale 1), that factor is folded into `lokr_w1`, so the file means what peft trained."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        name = next((n for n in PEFT_TO_LYCORIS if key.endswith("." + n)), None)
        if name is None:
            raise ValueError(f"unexpected key in adapter state: {key}")
        grouped.setdefault(key[: -len(name) - 1], {})[name] = tensor.detach().to("cpu", torch.float32)
    out: dict[str, torch.Tensor] = {}
    for module, tensors in grouped.items():
        stem = kohya_stem(module, part, family, unet_config)
        if "lokr_w1" in tensors and "lokr_w2" in tensors:  # no low-rank pair: consumers scale by 1
            tensors["lokr_w1"] = tensors["lokr_w1"] * (alpha / rank)
        if "lora_magnitude_vector" in tensors:
            # peft keeps the magnitude as (out,) for Linear and (1, out, 1, 1) for Conv2d; LyCORIS as one
            # value per output row, shaped to broadcast over the weight: (out, 1) / (out, 1, 1, 1).
            magnitude = tensors["lora_magnitude_vector"].flatten()
            down = tensors["lora_A.weight"]
            tensors["lora_magnitude_vector"] = magnitude.reshape(-1, *[1] * (down.dim() - 1))
        for name, tensor in tensors.items():
            out[f"{stem}.{PEFT_TO_LYCORIS[name]}"] = tensor.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def lycoris_metadata(algo: str, rank: int, alpha: float, extra_args: dict | None = None) -> dict[str, str]:
    """The `ss_network_*` entries kohya's scripts write when training through LyCORIS's kohya module."""
    args = {"algo": "lora" if algo == "dora" else algo, **({"dora_wd": "True"} if algo == "dora" else {}),
            **(extra_args or {})}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.flatten(1) @ b.flatten(1)


def weight_change(tensors: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """One module's weight change (before DoRA's rescaling) from its LyCORIS tensors, by the consumers' rules."""
    alpha = tensors.get("alpha")
    if "hada_w1_a" in tensors:
        rank = tensors["hada_w1_b"].shape[0]
        change = _product(tensors["hada_w1_a"], tensors["hada_w1_b"]) * _product(tensors["hada_w2_a"],
                                                                               tensors["hada_w2_b"])
    elif "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        rank = None
        if "lokr_w1" in tensors:
            w1 = tensors["lokr_w1"]
        else:
            w1, rank = _product(tensors["lokr_w1_a"], tensors["lokr_w1_b"]), tensors["lokr_w1_b"].shape[0]
        if "lokr_w2" in tensors:
            w2 = tensors["lokr_w2"]
        else:
            w2, rank = _product(tensors["lokr_w2_a"], tensors["lokr_w2_b"]), tensors["lokr_w2_b"].shape[0]
        out_2, in_2 = weight_shape[0] // w1.shape[0], weight_shape[1] // w1.shape[1]
        w2 = w2.reshape(out_2, in_2, *weight_shape[2:])
        w1 = w1.reshape(*w1.shape, *[1] * (len(weight_shape) - 2))
        change = torch.kron(w1, w2)
        if rank is None:
            alpha = None  # both factors whole: the consumers apply no alpha
    else:  # LoRA's up/down pair (DoRA's direction): the plain kohya rule
        alpha = None if alpha is None else float(alpha)
        return module_delta(tensors["lora_up.weight"], tensors["lora_down.weight"], alpha).reshape(weight_shape)
    scale = float(alpha) / rank if alpha is not None and rank else 1.0
    return change.reshape(weight_shape) * scale


def decomposed_weight(weight: torch.Tensor, change: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's weight: each output row of weight + change rescaled to the length dora_scale gives it."""
    combined = weight + change
    norm = combined.reshape(combined.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (combined.dim() - 1))
    return combined * (dora_scale.reshape(norm.shape) / norm)


def merge_into(models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], family, unet_config,
               strength: float = 1.0) -> int:
    """Add a LyCORIS file's changes into the weights of `models` ({'unet': ..., 'text_encoder': ...}) and return
    how many modules changed; a module the file names that the models lack is a ValueError."""
    by_stem: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, name = key.partition(".")
        by_stem.setdefault(stem, {})[name] = tensor
    table = {}
    for part, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                table[kohya_stem(name, part, family, unet_config)] = module
    missing = [stem for stem in by_stem if stem not in table]
    if missing:
        raise ValueError(f"{len(missing)} module(s) of the file are not in this base, e.g. {missing[0]}")
    with torch.no_grad():
        for stem, own in by_stem.items():
            module = table[stem]
            weight = module.weight.float()
            change = weight_change(own, weight.shape)
            target = decomposed_weight(weight, change, own["dora_scale"]) if "dora_scale" in own else weight + change
            module.weight.copy_((weight + strength * (target - weight)).to(module.weight.dtype))
    return len(by_stem)

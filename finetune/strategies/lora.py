"""LoRA: low-rank deltas injected by peft into the UNet (and optionally the base's text encoders)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..config import shareable_name
from ..formats import clip_module_path
from ..formats import file_stem as shared_file_stem
from ..formats import kohya_lora
from .base import StrategyDefaults, register, register_loader

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_KOHYA_TARGETS = TEXT_ENCODER_TARGETS + ["fc1", "fc2"]
log = logging.getLogger(__name__)


def unet_target_modules(unet, targets: str) -> list[str]:
    """Full module names for a target set: 'attn', 'kohya', 'all', or comma-separated name suffixes."""
    if targets == "attn":
        suffixes = ATTENTION_TARGETS
        return [n for n, _ in unet.named_modules() if any(n.endswith("." + s) for s in suffixes)]
    names = []
    for name, module in unet.named_modules():
        is_linear = isinstance(module, torch.nn.Linear)
        is_conv = isinstance(module, torch.nn.Conv2d)
        in_transformer = ".attentions." in name or name.startswith("mid_block.attentions")
        if targets == "kohya":
            # kohya's default: every Linear and 1x1 conv inside the transformer blocks.
            if in_transformer and (is_linear or (is_conv and module.kernel_size == (1, 1))):
                names.append(name)
        elif targets == "all":
            # The kohya set plus resnet/down/up-sampler convs (LoCon-style): small bases need these.
            if (is_linear or is_conv) and not name.startswith(("conv_in", "conv_out", "time_embedding",
                                                                "add_embedding")):
                names.append(name)
        else:
            suffixes = [s.strip() for s in targets.split(",") if s.strip()]
            if (is_linear or is_conv) and any(name == s or name.endswith("." + s) for s in suffixes):
                names.append(name)
    return names


def text_encoder_targets(unet_targets: str) -> list[str]:
    return TEXT_ENCODER_KOHYA_TARGETS if unet_targets in ("kohya", "all") else TEXT_ENCODER_TARGETS


# Adapter types whose files are written in LyCORIS's layout (diffusers' loader applies none of them).
LYCORIS_ALGOS = ("dora", "loha", "lokr")


def _adapter_config(algo: str, rank: int, alpha: float, dropout: float, targets: list[str], lokr_factor: int = -1):
    """peft's config for one adapter type; every one starts as an exact no-op (one factor at zero)."""
    if algo == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if algo == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=lokr_factor)
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights="gaussian", use_dora=algo == "dora")


def file_stem(token: str) -> str:
    """The token as a file name (A1111/ComfyUI show the file name as the LoRA's name)."""
    return shared_file_stem(token, fallback="lora")


@register("lora")
class LoraStrategy(StrategyDefaults):
    """Train peft LoRA adapters; export diffusers and kohya files."""

    name = "lora"
    formats = ("diffusers", "kohya")
    default_formats = formats
    adapter_name = "default"

    @classmethod
    def formats_for(cls, config) -> tuple[str, ...]:
        # diffusers' loader drops DoRA's magnitudes and refuses LoHa/LoKr: those ship in LyCORIS's layout only.
        return ("kohya",) if config.lora.algo in LYCORIS_ALGOS else cls.formats

    def __init__(self, config):
        self.config = config
        self.formats = self.formats_for(config)
        cfg = config.lora
        self.rank = cfg.rank
        self.alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        self.te_rank = cfg.text_encoder_rank or cfg.rank
        self.te_alpha = float(cfg.text_encoder_alpha if cfg.text_encoder_alpha is not None else self.te_rank)
        self.components = None

    def prepare(self, components) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: F401 - fail early if peft is broken

        self.components = components
        cfg = self.config.lora
        targets = unet_target_modules(components.unet, cfg.targets)
        if not targets:
            from .. import UserError

            raise UserError(f"lora.targets={cfg.targets!r} matches no module of this UNet")
        components.unet.add_adapter(_adapter_config(cfg.algo, self.rank, self.alpha, cfg.dropout, targets,
                                                    cfg.lokr_factor))
        for encoder in self._text_encoders():
            encoder.add_adapter(_adapter_config(cfg.algo, self.te_rank, self.te_alpha, cfg.dropout,
                                                text_encoder_targets(cfg.targets), cfg.lokr_factor))

    def _text_encoders(self) -> list:
        """The text encoders that carry LoRA: every one of the base's (SDXL: both), or none."""
        return list(self.components.text_encoders) if self.config.lora.train_text_encoder else []

    def _parts(self) -> dict[str, torch.nn.Module]:
        """Each adapted model by its pipeline attribute name ('unet', 'text_encoder', 'text_encoder_2')."""
        names = self.components.family.text_encoder_parts
        return {"unet": self.components.unet, **dict(zip(names, self._text_encoders()))}

    def trainable_modules(self):
        return [self.components.unet, *self._text_encoders()]

    def trains_text_encoder(self) -> bool:
        return bool(self.config.lora.train_text_encoder)

    def param_groups(self):
        groups = [{"params": [p for p in self.components.unet.parameters() if p.requires_grad],
                   "lr": self.config.train.lr}]
        if self.config.lora.train_text_encoder:
            groups.append({"params": [p for e in self._text_encoders() for p in e.parameters() if p.requires_grad],
                           "lr": self.config.lora.text_encoder_lr or self.config.train.lr})
        return groups

    def _peft_states(self) -> dict[str, dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: after pivotal tuning the text encoder's embedding has grown by the new
        # word, and peft would then put the whole token embedding into the LoRA state; the word ships as its own
        # embedding files instead, and LoRA never trains those rows.
        # contiguous: under --channels-last a 3x3 conv's adapter weights are strided, which safetensors refuses.
        states = {part: get_peft_model_state_dict(model, save_embedding_layers=False)
                  for part, model in self._parts().items()}
        return {part: {k: v.contiguous() for k, v in state.items()} for part, state in states.items()}

    def state_dict(self):
        return {f"{part}.{k}": v.detach().clone() for part, state in self._peft_states().items()
                for k, v in state.items()}

    def load_state_dict(self, state) -> None:
        from peft import set_peft_model_state_dict

        for part, model in self._parts().items():
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            if sub:
                result = set_peft_model_state_dict(model, sub)
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"LoRA state has unexpected keys: {result.unexpected_keys[:3]}")

    def export(self, out_dir: Path, formats, metadata):
        out_dir = Path(out_dir)
        family = self.components.family
        states, parts = self._peft_states(), self._parts()
        written: dict[str, list[str]] = {}
        if "diffusers" in formats:
            layers, adapter_meta = {}, {}
            for part, state in states.items():
                if part != "unet":
                    # diffusers' own files name CLIP modules with `text_model.` (its loader drops it where the
                    # model has no such level), so the file is the same whichever transformers version trained it.
                    state = {f"text_model.{clip_module_path(k)}": v for k, v in state.items()}
                layers[f"{part}_lora_layers"] = state
                adapter_meta[f"{part}_lora_adapter_metadata"] = self._adapter_metadata(parts[part])
            family.pipeline_class().save_lora_weights(out_dir, weight_name="pytorch_lora_weights.safetensors",
                                                      **layers, **adapter_meta)
            written["diffusers"] = [str(out_dir / "pytorch_lora_weights.safetensors")]
        if "kohya" in formats:
            from safetensors.torch import save_file

            from ..formats import lycoris

            unet, algo = self.components.unet, self.config.lora.algo
            tensors, extra = {}, {"sdft_config": metadata.get("config", "")}
            for part, state in states.items():
                alpha, rank = (self.alpha, self.rank) if part == "unet" else (self.te_alpha, self.te_rank)
                if algo in LYCORIS_ALGOS:
                    tensors.update(lycoris.peft_to_lycoris(state, part, alpha, rank, family, unet.config))
                else:
                    tensors.update(kohya_lora.peft_to_kohya(state, part, alpha, family, unet.config))
            if algo == "dora":
                log.warning("DoRA file: exact in LyCORIS-based loaders and sdft; A1111's built-in loader reads "
                            "dora_scale per input column and misapplies it, ComfyUI's comes close")
            if algo in LYCORIS_ALGOS:
                factor = {"factor": str(self.config.lora.lokr_factor)} if algo == "lokr" else {}
                extra.update(lycoris.lycoris_metadata(algo, self.rank, self.alpha, factor))
            prediction = self.components.noise_scheduler.config.prediction_type
            meta = kohya_lora.kohya_metadata(
                rank=self.rank, alpha=self.alpha,
                base_version=kohya_lora.base_model_version(dict(unet.config), prediction),
                resolution=int(metadata.get("resolution", 512)), steps=int(metadata.get("steps", 0)),
                lr=self.config.train.lr, title=file_stem(self.config.data.token), prediction_type=prediction,
                extra=extra)
            path = out_dir / f"{file_stem(self.config.data.token)}_{algo}.safetensors"
            save_file(tensors, str(path), metadata=meta)
            written["kohya"] = [str(path)]
        return written

    def _adapter_metadata(self, model) -> dict:
        adapter = model.peft_config[self.adapter_name].to_dict()
        # peft records the base's local folder here; a shared file names it by its last component only.
        adapter["base_model_name_or_path"] = shareable_name(adapter.get("base_model_name_or_path"))
        return adapter


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def can_load(path: Path) -> bool:
    """A diffusers LoRA folder/file or a kohya LoRA file (plain LoRA: up/down pairs)."""
    from ..formats.lycoris import is_lycoris

    if path.is_dir():
        return (path / "pytorch_lora_weights.safetensors").is_file()
    if path.suffix != ".safetensors":
        return False
    keys = _keys(path)
    return not is_lycoris(keys) and any(".lora" in k or k.startswith(("lora_unet_", "lora_te")) for k in keys)


def can_load_lycoris(path: Path) -> bool:
    """A LyCORIS-layout file (LoHa, LoKr, DoRA)."""
    from ..formats.lycoris import is_lycoris

    return path.is_file() and path.suffix == ".safetensors" and is_lycoris(_keys(path))


def merge_lycoris_into(pipe, path: str, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Apply a LyCORIS file (LoHa, LoKr, DoRA) to `pipe` by adding its changes into the weights, as A1111 and
    ComfyUI do (diffusers' loader reads none of them); `scale` is the strength."""
    from safetensors.torch import load_file

    from ..families import family_of_pipeline
    from ..formats.lycoris import merge_into

    family = family_of_pipeline(pipe)
    models = {"unet": pipe.unet, **{part: getattr(pipe, part) for part in family.text_encoder_parts}}
    try:
        merge_into(models, load_file(str(path)), family, pipe.unet.config, strength=scale)
    except (RuntimeError, ValueError) as exc:  # a module this base lacks, or a weight of another shape
        from .. import UserError

        raise UserError(f"{path} does not fit this base ({' '.join(str(exc).split())[:200]}); it was trained on a "
                        "base of another family or size") from exc
    return adapter_name or file_stem(Path(path).stem)


def load_into(pipe, path: str, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Load a LoRA file (diffusers or kohya format) into `pipe` through diffusers' own loader."""
    scales = pipe.__dict__.setdefault("_sdft_lora_scales", {})
    name = adapter_name or f"lora_{len(scales)}_{file_stem(Path(path).stem)}"
    pipe.load_lora_weights(str(path), adapter_name=name)
    scales[name] = scale
    pipe.set_adapters(list(scales), adapter_weights=list(scales.values()))
    return name


register_loader("lora", can_load, load_into)
register_loader("lycoris", can_load_lycoris, merge_lycoris_into)

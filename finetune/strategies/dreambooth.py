"""DreamBooth: fine-tune the whole UNet (optionally the base's text encoders); prior preservation is the
trainer's shared feature, on by default for this method."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import StrategyDefaults, register, register_loader

MARKER_FILE = "sdft_dreambooth.json"


@register("dreambooth")
class DreamBoothStrategy(StrategyDefaults):
    """Unfreeze the UNet (and text encoder if asked); export a diffusers folder."""

    name = "dreambooth"
    formats = ("diffusers", "single_file")
    default_formats = formats

    def __init__(self, config):
        self.config = config
        self.components = None

    @property
    def _train_te(self) -> bool:
        return bool(self.config.dreambooth.train_text_encoder)

    def prepare(self, components) -> None:
        self.components = components
        components.unet.requires_grad_(True)
        for encoder in self._text_encoders():
            encoder.requires_grad_(True)
            if not self.config.dreambooth.train_token_embeddings:
                encoder.get_input_embeddings().weight.requires_grad_(False)

    def _text_encoders(self) -> list:
        """The text encoders that train: all of the base's (SDXL: both) with train_text_encoder, else none."""
        return list(self.components.text_encoders) if self._train_te else []

    def trainable_modules(self):
        return [self.components.unet, *self._text_encoders()]

    def trains_text_encoder(self) -> bool:
        return self._train_te

    def fully_trained_parts(self) -> tuple[str, ...]:
        return ("unet", "text_encoder") if self._train_te else ("unet",)

    def param_groups(self):
        groups = [{"params": list(self.components.unet.parameters()), "lr": self.config.train.lr}]
        if self._train_te:
            groups.append({"params": [p for e in self._text_encoders() for p in e.parameters() if p.requires_grad],
                           "lr": self.config.dreambooth.text_encoder_lr or self.config.train.lr})
        return groups

    def _parts(self) -> dict[str, torch.nn.Module]:
        """The trained models by pipeline attribute name ('unet', 'text_encoder', 'text_encoder_2')."""
        names = self.components.family.text_encoder_parts
        return {"unet": self.components.unet, **dict(zip(names, self._text_encoders()))}

    def state_dict(self):
        # Copied into CPU memory tensor by tensor: a device-side clone of a whole float32 UNet (SDXL: 10 GB) at
        # every checkpoint would need that much free GPU memory on top of training's.
        return {f"{part}.{k}": v.detach().to("cpu", copy=True) for part, model in self._parts().items()
                for k, v in model.state_dict().items()}

    def load_state_dict(self, state) -> None:
        for part, model in self._parts().items():
            sub = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
            model.load_state_dict(sub, strict=True)

    def export(self, out_dir: Path, formats, metadata):
        from ..inference import pipeline_from_components

        written: dict[str, list[str]] = {}
        if "diffusers" in formats:
            folder = Path(out_dir) / "pipeline"
            pipe = pipeline_from_components(self.components)
            pipe.save_pretrained(folder, safe_serialization=True)
            drop_local_paths(folder)
            (folder / MARKER_FILE).write_text(json.dumps({
                "train_text_encoder": self._train_te, "token": self.config.data.token,
                "class_word": self.config.data.class_word}))
            written["diffusers"] = [str(folder)]
        if "single_file" in formats:
            from ..formats.single_file import save_single_file
            from .lora import file_stem

            path = Path(out_dir) / f"{file_stem(self.config.data.token)}_dreambooth.safetensors"
            save_single_file(pipeline_from_components(self.components), path,
                             metadata={"modelspec.title": file_stem(self.config.data.token),
                                       "sdft_config": metadata.get("config", "")})
            written["single_file"] = [str(path)]
        return written


def drop_local_paths(folder: Path) -> None:
    """diffusers and transformers record where each part was loaded from (`_name_or_path`: the base's local
    folder) in its config.json; a folder users share keeps no such path."""
    for config_file in folder.rglob("*.json"):
        data = json.loads(config_file.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def can_load(path: Path) -> bool:
    """A diffusers pipeline folder or an original-layout single-file checkpoint (a full fine-tune)."""
    if path.is_dir():
        return (path / "model_index.json").is_file() and (path / "unet").is_dir()
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return any(k.startswith("model.diffusion_model.") for k in fh.keys())


def _blend_into(module, tuned_state: dict, scale: float) -> None:
    """module <- base + scale * (tuned - base) for every tensor in tuned_state; scale 1 copies exactly."""
    current = module.state_dict()
    missing = set(tuned_state) ^ {k for k in current if not k.endswith("position_ids")}
    if missing:
        raise ValueError(f"fine-tuned weights do not fit this base, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, tuned in tuned_state.items():
            target = current[name]
            tuned = tuned.to(target.device, target.dtype)
            target.copy_(tuned if scale == 1.0 else target + scale * (tuned - target))


def _added_words(tokenizer, folder: Path) -> dict[str, int]:
    """Words the fine-tune's tokenizer (saved in `folder`) has and `tokenizer` lacks (a pivotal run's new word):
    {word: row}."""
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        return {}
    known = tokenizer.get_vocab()
    tuned_tokenizer = CLIPTokenizer.from_pretrained(folder)
    return {word: row for word, row in tuned_tokenizer.get_added_vocab().items() if word not in known}


def _install_words(tokenizer, text_encoder, added: dict[str, int], tuned_text_encoder) -> None:
    """Add `added` to one tokenizer + text encoder with their rows exactly as trained (whatever the blend scale:
    the base has no such word to blend with)."""
    from .textual_inversion import add_placeholder_tokens

    words = sorted(added, key=added.get)
    rows = tuned_text_encoder.get_input_embeddings().weight.detach()
    ids = add_placeholder_tokens(tokenizer, text_encoder, words)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = rows[[added[w] for w in words]].to(weight.device, weight.dtype)


def load_into(pipe, path: str, scale: float = 1.0) -> str:
    """Replace the pipeline's UNet (and text encoders, if they were trained) by a fine-tuned one, blended
    with the current weights by `scale`; words the fine-tune added to its tokenizers join the pipeline."""
    from diffusers import UNet2DConditionModel

    from ..families import family_of_pipeline

    folder = Path(path)
    if not folder.is_dir():
        from safetensors.torch import load_file

        from ..formats.single_file import ldm_to_pipeline_states

        for part, state in ldm_to_pipeline_states(pipe, load_file(str(folder))).items():
            _blend_into(getattr(pipe, part), state, scale)
        return folder.stem
    marker = folder / MARKER_FILE
    info = json.loads(marker.read_text()) if marker.is_file() else {"train_text_encoder": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    _blend_into(pipe.unet, unet.state_dict(), scale)
    train_te = bool(info.get("train_text_encoder"))
    family = family_of_pipeline(pipe)
    for tokenizer_part, encoder_part in zip(family.tokenizer_parts, family.text_encoder_parts):
        tokenizer, encoder = getattr(pipe, tokenizer_part), getattr(pipe, encoder_part)
        added = _added_words(tokenizer, folder / tokenizer_part)
        if not (added or train_te) or not (folder / encoder_part).is_dir():
            continue
        tuned = type(encoder).from_pretrained(folder / encoder_part)  # read once for both uses
        if added:
            _install_words(tokenizer, encoder, added, tuned)
        if train_te:
            _blend_into(encoder, tuned.state_dict(), scale)
    return folder.name


register_loader("dreambooth", can_load, load_into)

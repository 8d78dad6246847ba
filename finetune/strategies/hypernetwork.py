"""Hypernetwork: small residual K/V networks on the attention context (A1111's method), trained while the
whole base stays frozen; exported as A1111's `.pt` and as a safetensors file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import UserError, __version__
from ..config import shareable_name
from ..formats import a1111_hypernetwork as a1111
from ..hypernet import Hypernetwork, HypernetworkStructure, context_dims, install
from .base import StrategyDefaults, register, register_loader
from .lora import file_stem

log = logging.getLogger(__name__)


def structure_from_config(cfg) -> HypernetworkStructure:
    """The network structure a `hypernetwork` config section asks for (UserError when inconsistent)."""
    structure = HypernetworkStructure(layer_structure=cfg.layer_structure, activation=cfg.activation,
                                      layer_norm=cfg.layer_norm, activate_output=cfg.activate_output,
                                      weight_init=cfg.weight_init, dropout_structure=cfg.dropout)
    # A1111 saves last_layer_dropout as "dropout_structure[-2] != 0"; a flag that disagrees would be
    # silently rewritten on save, so ask for the structure that expresses it instead.
    if cfg.last_layer_dropout != structure.last_layer_dropout:
        raise UserError(f"hypernetwork.last_layer_dropout={cfg.last_layer_dropout} disagrees with "
                        f"hypernetwork.dropout={structure.dropout_structure}: the flag means the second-to-last "
                        "dropout value is > 0 (e.g. dropout=0,0.1,0.1,0 with layer_structure=1,2,2,1)")
    return structure


def check_widths(hn: Hypernetwork, unet, what: str) -> None:
    """Refuse networks that touch no attention layer of `unet`; log the widths that go unused."""
    model_widths = context_dims(unet)
    unused = [d for d in hn.dims if d not in model_widths]
    if len(unused) == len(hn.dims):
        raise UserError(f"{what}: none of its context widths {hn.dims} occurs in this model's attention "
                        f"layers {model_widths} (a hypernetwork for another base model?)")
    if unused:
        log.warning("%s: widths %s match no attention layer of this model and stay unused", what, unused)


@register("hypernetwork")
class HypernetworkStrategy(StrategyDefaults):
    """Train one (K, V) residual MLP pair per attention context width; export A1111 files."""

    name = "hypernetwork"
    formats = ("a1111", "safetensors")
    # The safetensors twin is for sdft's own loader: A1111 lists hypernetworks only as .pt, and ComfyUI's
    # loader reads it as an empty network, so it is written only when asked for (output.formats).
    default_formats = ("a1111",)

    def __init__(self, config):
        self.config = config
        self.structure = structure_from_config(config.hypernetwork)  # fail before any model is loaded
        self.components = None
        self.hypernetwork: Hypernetwork | None = None

    def prepare(self, components) -> None:
        cfg = self.config.hypernetwork
        self.components = components
        unet = components.unet
        # Seeded apart from the global RNG, so the initial networks depend on train.seed only.
        generator = torch.Generator().manual_seed(self.config.train.seed)
        self.hypernetwork = Hypernetwork(cfg.dims or context_dims(unet), self.structure, strength=cfg.strength,
                                         generator=generator, name=self._stem())
        check_widths(self.hypernetwork, unet, "hypernetwork.dims")
        self.hypernetwork.to(unet.device)
        install(unet, self.hypernetwork)

    def trainable_modules(self):
        # The forward pass reaches these networks through the UNet's attention processors, not by calling
        # this module: fine in one process; see the report on DDP gradient syncing.
        return [self.hypernetwork]

    def param_groups(self):
        return [{"params": list(self.hypernetwork.parameters()), "lr": self.config.train.lr}]

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.hypernetwork.state_dict().items()}

    def load_state_dict(self, state) -> None:
        try:
            self.hypernetwork.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"hypernetwork state does not match the configured networks: {exc}") from exc

    def export(self, out_dir: Path, formats, metadata):
        out_dir = Path(out_dir)
        stem = self._stem()
        info = {"step": int(metadata.get("steps", 0)), "name": stem, "sd_checkpoint": None,
                "sd_checkpoint_name": shareable_name(self.config.model.name),
                "optional_info": f"trained with sdft {__version__} (token {self.config.data.token!r})"}
        args = dict(info=info, strength=self.config.hypernetwork.strength, config=metadata.get("config"))
        written: dict[str, list[str]] = {}
        if "a1111" in formats:
            written["a1111"] = [str(a1111.write_pt(out_dir / f"{stem}.pt", self.hypernetwork, **args))]
        if "safetensors" in formats:
            written["safetensors"] = [str(a1111.write_safetensors(out_dir / f"{stem}.safetensors",
                                                                  self.hypernetwork, **args))]
        return written

    def _stem(self) -> str:
        # A1111 lists hypernetworks by file name: name the file after the token.
        return f"{file_stem(self.config.data.token)}_hypernetwork"


def can_load(path: Path) -> bool:
    """An A1111 hypernetwork `.pt` (read with weights_only=True) or an sdft hypernetwork `.safetensors`."""
    return a1111.is_hypernetwork_file(path)


def load_into(pipe, path: str, scale: float = 1.0) -> str:
    """Apply a hypernetwork file to `pipe.unet` at strength scale x (the strength it was trained with)."""
    hn = a1111.read(path).build(scale, name=Path(path).stem)
    unet = pipe.unet
    check_widths(hn, unet, str(path))
    hn.to(unet.device).eval().requires_grad_(False)
    install(unet, hn)
    return hn.name


register_loader("hypernetwork", can_load, load_into)

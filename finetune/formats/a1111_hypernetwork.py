"""The A1111 hypernetwork file (`.pt`, one dict: {dim: (K state, V state), structure keys...}) and sdft's
safetensors twin (`{dim}.k.linear.0.weight` tensors, the structure keys as JSON strings in the metadata).

`.pt` files are only ever read with weights_only=True.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import UserError
from ..hypernet import Hypernetwork, HypernetworkStructure
from .torch_pickle import save_legacy_pt

# Every key A1111 writes beside the weights; all are always written (a reader falls back to defaults
# for a missing one, e.g. activate_output=True, and would build a different network).
STRUCTURE_KEYS = ("layer_structure", "activation_func", "is_layer_norm", "activate_output",
                  "weight_initialization", "use_dropout", "dropout_structure", "last_layer_dropout")
INFO_KEYS = ("step", "name", "sd_checkpoint", "sd_checkpoint_name", "optional_info")
# sdft's own extras: ignored by A1111/Forge (not int keys) and ComfyUI (int() fails on them).
STRENGTH_KEY = "sdft_strength"
CONFIG_KEY = "sdft_config"
MARKER_KEY, MARKER_VALUE = "sdft_adapter", "hypernetwork"
PT_SUFFIXES = (".pt", ".pth")
# A1111's first hypernetworks named their two Linear layers linear1/linear2 (structure 1, 2, 1).
OLD_KEY_NAMES = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                 "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
LEGACY_DROPOUT = 0.3


@dataclass
class HypernetworkFile:
    """What a file holds: the structure, per-width (K, V) weights, A1111's info keys, sdft extras."""

    structure: HypernetworkStructure
    weights: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    info: dict = field(default_factory=dict)
    strength: float = 1.0  # the strength it was trained with (1.0 for files from other tools)
    config: str | None = None

    def build(self, scale: float = 1.0, name: str | None = None) -> Hypernetwork:
        """Networks with these weights (strict loading), strength = scale * trained strength."""
        # A private generator: the init is overwritten, and loading must not advance the global RNG.
        hn = Hypernetwork(list(self.weights), self.structure, strength=scale * self.strength,
                          generator=torch.Generator(), name=name or str(self.info.get("name") or "hypernetwork"))
        for dim, (k_state, v_state) in self.weights.items():
            pair = hn.pair_for(dim)
            for branch, state in ((pair.k, k_state), (pair.v, v_state)):
                try:
                    branch.load_state_dict(state, strict=True)
                except RuntimeError as exc:
                    first = str(exc).strip().splitlines()[0]
                    raise UserError(f"hypernetwork weights for width {dim} do not match the structure the file "
                                    f"declares ({self.structure}): {first}") from exc
        return hn


def structure_fields(structure: HypernetworkStructure) -> dict:
    """A1111's structure keys for a structure (plain Python values)."""
    return {
        "layer_structure": list(structure.layer_structure),
        "activation_func": structure.activation,
        "is_layer_norm": bool(structure.layer_norm),
        "activate_output": bool(structure.activate_output),
        "weight_initialization": structure.weight_init,
        "use_dropout": structure.use_dropout,
        "dropout_structure": list(structure.dropout_structure),
        "last_layer_dropout": structure.last_layer_dropout,
    }


def legacy_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's rebuild for files without dropout_structure: 0.3 after all but the last layer(s)."""
    n = len(layer_structure)
    if not use_dropout or n < 3:
        return [0.0] * n
    return [0.0] + [LEGACY_DROPOUT] * (n - 3) + [LEGACY_DROPOUT if last_layer_dropout else 0.0, 0.0]


def structure_from_fields(fields: dict) -> HypernetworkStructure:
    """The structure a file describes, with A1111's reader defaults for missing keys."""
    layer_structure = fields.get("layer_structure") or [1, 2, 1]
    dropout = fields.get("dropout_structure")
    use_dropout = bool(dropout and any(dropout)) or bool(fields.get("use_dropout", False))
    if dropout is None:
        dropout = legacy_dropout_structure(layer_structure, use_dropout, bool(fields.get("last_layer_dropout", False)))
    return HypernetworkStructure(
        layer_structure=list(layer_structure),
        activation=fields.get("activation_func") or "linear",
        layer_norm=bool(fields.get("is_layer_norm", False)),
        activate_output=bool(fields.get("activate_output", True)),
        weight_init=fields.get("weight_initialization") or "Normal",
        dropout_structure=list(dropout),
    )


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain dict of float32 CPU tensors in module order (loaders rely on the order)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def a1111_dict(hn: Hypernetwork, info: dict, strength: float | None = None, config: str | None = None) -> dict:
    """The dict A1111's Hypernetwork.save writes: int dims first, then every structure and info key."""
    out: dict = {dim: (_plain(hn.pair_for(dim).k.state_dict()), _plain(hn.pair_for(dim).v.state_dict()))
                 for dim in hn.dims}
    out.update(structure_fields(hn.structure))
    out.update({key: info.get(key) for key in INFO_KEYS})
    out["step"] = int(out["step"] or 0)
    out[STRENGTH_KEY] = float(hn.strength if strength is None else strength)
    if config is not None:
        out[CONFIG_KEY] = config
    return out


def write_pt(path: str | Path, hn: Hypernetwork, info: dict, strength: float | None = None,
             config: str | None = None) -> Path:
    """Write the A1111 `.pt` (plain tensors, str, numbers, None: loadable with weights_only=True)."""
    path = Path(path)
    save_legacy_pt(a1111_dict(hn, info, strength, config), path)
    return path


def write_safetensors(path: str | Path, hn: Hypernetwork, info: dict, strength: float | None = None,
                      config: str | None = None) -> Path:
    """Write `{dim}.k|v.linear.{i}.weight|bias` tensors; structure and info keys as JSON metadata strings."""
    from safetensors.torch import save_file

    data = a1111_dict(hn, info, strength, config)
    tensors = {f"{dim}.{branch}.{key}": t for dim in hn.dims
               for branch, state in zip("kv", data[dim]) for key, t in state.items()}
    meta = {key: json.dumps(data[key]) for key in (*STRUCTURE_KEYS, *INFO_KEYS)}
    meta[STRENGTH_KEY] = json.dumps(data[STRENGTH_KEY])
    meta[MARKER_KEY] = MARKER_VALUE
    if config is not None:
        meta[CONFIG_KEY] = config
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def _load_pt(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles that weights_only refuses, truncated files, not a torch file at all
        raise UserError(f"{path}: not a readable hypernetwork .pt ({type(exc).__name__}); "
                        "only files loadable with torch.load(weights_only=True) are accepted") from exc


def _pt_weights(data: dict, path: Path) -> dict[int, tuple[dict, dict]]:
    weights = {}
    for key, value in data.items():
        if not isinstance(key, int):
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(s, dict) for s in value):
            raise UserError(f"{path}: entry {key} must be a pair of state dicts (K, V)")
        weights[key] = tuple({OLD_KEY_NAMES.get(k, k): t for k, t in state.items()} for state in value)
    if not weights:
        raise UserError(f"{path}: no hypernetwork weights (integer keys) found")
    return weights


def read_pt(path: str | Path) -> HypernetworkFile:
    """Read an A1111 hypernetwork `.pt`."""
    path = Path(path)
    data = _load_pt(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not an A1111 hypernetwork (expected one dict)")
    return HypernetworkFile(structure=structure_from_fields(data), weights=_pt_weights(data, path),
                            info={key: data.get(key) for key in INFO_KEYS},
                            strength=float(data.get(STRENGTH_KEY, 1.0)), config=data.get(CONFIG_KEY))


def read_safetensors(path: str | Path) -> HypernetworkFile:
    """Read a hypernetwork `.safetensors` written by write_safetensors."""
    from safetensors import safe_open

    path = Path(path)
    weights: dict[int, tuple[dict, dict]] = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():
            parts = key.split(".", 2)
            if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("k", "v"):
                raise UserError(f"{path}: unexpected tensor {key!r} in a hypernetwork file")
            dim, branch, rest = parts
            pair = weights.setdefault(int(dim), ({}, {}))
            pair["kv".index(branch)][rest] = fh.get_tensor(key)
    fields = {key: json.loads(meta[key]) for key in (*STRUCTURE_KEYS, *INFO_KEYS) if key in meta}
    # safetensors stores keys sorted; put each state back in module order (A1111/ComfyUI rely on it).
    weights = {dim: tuple(dict(sorted(s.items(), key=lambda kv: _key_order(kv[0]))) for s in pair)
               for dim, pair in weights.items()}
    return HypernetworkFile(structure=structure_from_fields(fields), weights=weights,
                            info={key: fields.get(key) for key in INFO_KEYS},
                            strength=float(json.loads(meta.get(STRENGTH_KEY, "1.0"))), config=meta.get(CONFIG_KEY))


def _key_order(key: str) -> tuple[int, int, str]:
    """`linear.10.bias` -> (10, 1, ...): numeric layer index, then weight before bias (others last;
    strict loading reports them)."""
    match = re.fullmatch(r"linear\.(\d+)\.(weight|bias)", key)
    if match is None:
        return 1 << 30, 0, key
    return int(match[1]), 0 if match[2] == "weight" else 1, key


def read(path: str | Path) -> HypernetworkFile:
    """Read either format, chosen by the file suffix."""
    path = Path(path)
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pt(path)


def is_hypernetwork_file(path: str | Path) -> bool:
    """True for an A1111 hypernetwork `.pt` or an sdft hypernetwork `.safetensors` (never runs pickled code)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get(MARKER_KEY) == MARKER_VALUE
        except Exception:  # not a safetensors file at all
            return False
    if path.suffix not in PT_SUFFIXES:
        return False
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(data, dict) and ("layer_structure" in data or any(isinstance(k, int) for k in data))

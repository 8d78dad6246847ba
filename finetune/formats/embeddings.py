"""Textual-inversion embedding files: diffusers' learned_embeds and A1111's embedding layout.

Three files carry the same [n_vectors, dim] tensor:
- diffusers `learned_embeds.safetensors`: {token: float32 [n, dim]}, read by `load_textual_inversion`;
- A1111 `<stem>.pt`: a torch.save'd dict of plain tensors/str/int/None (ComfyUI unpickles it with
  weights_only=True, so no nn.Parameter may sneak in);
- A1111/kohya `<stem>.safetensors`: {"emb_params": [n, dim]}.
SDXL embeddings carry one tensor per text encoder, {"clip_l": [n, 768], "clip_g": [n, 1280]}, in a
safetensors file that A1111 and ComfyUI read as is and diffusers loads per encoder.
A1111 and ComfyUI use the FILE NAME as the prompt word, so the A1111 files are named after the token.

Reading never unpickles arbitrary objects: `.pt`/`.bin` go through torch.load(weights_only=True).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import file_stem  # noqa: F401 - re-exported: strategies call embeddings.file_stem
from .torch_pickle import save_legacy_pt

DIFFUSERS_FILE = "learned_embeds.safetensors"
EMB_PARAMS_KEY = "emb_params"
PER_ENCODER_KEYS = ("clip_l", "clip_g")  # SDXL: CLIP-L's vectors, OpenCLIP-G's vectors
# A1111 records which CLIP token its embedding stood in for: "*", id 265 in CLIP's vocabulary.
A1111_STAR_TOKEN_ID = 265
PICKLE_SUFFIXES = (".pt", ".bin")
# Metadata keys sdft writes into its safetensors files.
META_METHOD, META_TOKEN = "sdft_method", "sdft_token"
METHOD = "textual_inversion"
# Keys that mark a safetensors file as some other adapter (LoRA, module weights), never a token.
_MODULE_KEY = re.compile(r"\.(weight|bias|alpha)$|^lora_|\.lora")


def _plain(vectors: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy that owns its storage (a view would save the whole embedding matrix)."""
    vectors = vectors.detach().to("cpu", torch.float32)
    if vectors.dim() == 1:
        vectors = vectors[None]
    return vectors.clone().contiguous()


def _string_metadata(token: str, metadata: dict[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", META_METHOD: METHOD, META_TOKEN: token}
    for key, value in (metadata or {}).items():
        meta[key if key.startswith("sdft_") else f"sdft_{key}"] = str(value)
    return meta


def save_diffusers(path: str | Path, token: str, vectors: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
    """Write diffusers' learned_embeds.safetensors: {token: float32 [n, dim]} plus string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({token: _plain(vectors)}, str(path), metadata=_string_metadata(token, metadata))
    return path


def save_per_encoder(path: str | Path, token: str, state: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """Write an SDXL embedding: {clip_l: [n, 768], clip_g: [n, 1280]} (named after the token for A1111)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: _plain(v) for k, v in state.items()}, str(path), metadata=_string_metadata(token, metadata))
    return path


def read_per_encoder(path: str | Path) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(token, {clip_l, clip_g}) from an SDXL embedding file (or a folder with learned_embeds); None for any
    other file. The token is the one sdft recorded, else the file stem as A1111 uses it."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if set(fh.keys()) != set(PER_ENCODER_KEYS):
            return None
        meta = fh.metadata() or {}
        state = {k: _as_vectors(fh.get_tensor(k)) for k in PER_ENCODER_KEYS}
    recorded = meta.get(META_TOKEN)
    # diffusers' learned_embeds is not named after its word; an A1111 file is (and renaming it renames the word).
    return (recorded if recorded and path.name == DIFFUSERS_FILE else _token_for_file(path, recorded)), state


def save_a1111_safetensors(path: str | Path, token: str, vectors: torch.Tensor,
                           metadata: dict[str, str] | None = None) -> Path:
    """Write the single-tensor A1111/kohya embedding {"emb_params": [n, dim]}; the token rides in metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({EMB_PARAMS_KEY: _plain(vectors)}, str(path), metadata=_string_metadata(token, metadata))
    return path


def save_a1111_pt(path: str | Path, token: str, vectors: torch.Tensor, step: int = 0) -> Path:
    """Write an A1111 textual-inversion `.pt`: the six documented keys, only plain tensors/str/int/None.

    `name` holds the token as trained (diffusers' loader uses it when no token= is given); A1111
    itself names the embedding after the file.
    """
    path = Path(path)
    data = {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": _plain(vectors)},
        "name": str(token),
        "step": int(step),
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    save_legacy_pt(data, path)
    return path


def _load_pickle(path: Path):
    """torch.load restricted to tensors and plain containers: a stranger's file cannot run code."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _token_for_file(path: Path, recorded: str | None) -> str:
    """The prompt word of an A1111-style file: its stem, unless the recorded token spells that stem.

    A1111 users rename files to change the trigger word, so the name on disk wins; when the file is
    still named after its recorded token ('<cat-toy>' in cat-toy.pt) the exact token is kept.
    """
    if recorded:
        try:
            if file_stem(recorded) == path.stem:
                return recorded
        except ValueError:
            pass
    return path.stem


def _as_vectors(value) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
        return None
    return value[None] if value.dim() == 1 else value


def _from_pickle(path: Path) -> dict[str, torch.Tensor]:
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a textual-inversion embedding (no dict inside)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        vectors = _as_vectors(next(iter(params.values()), None)) if isinstance(params, dict) and params else None
        if vectors is None:
            raise ValueError(f"{path}: string_to_param holds no [n, dim] tensor")
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return {_token_for_file(path, name): vectors}
    # diffusers' older learned_embeds.bin: {token: tensor}
    out = {k: _as_vectors(v) for k, v in data.items() if isinstance(k, str)}
    if not out or any(v is None for v in out.values()) or len(out) != len(data):
        raise ValueError(f"{path}: neither an A1111 (string_to_param) nor a diffusers ({{token: tensor}}) embedding")
    return out


def _from_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if set(tensors) == {EMB_PARAMS_KEY}:
        return {_token_for_file(path, meta.get(META_TOKEN)): _as_vectors(tensors[EMB_PARAMS_KEY])}
    return {k: _as_vectors(v) for k, v in tensors.items()}


def read_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """{token: [n_vectors, dim]} from any embedding file this module knows (or a folder with learned_embeds).

    Raises ValueError when the file is not an embedding.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if path.suffix in PICKLE_SUFFIXES:
        found = _from_pickle(path)
    elif path.suffix == ".safetensors":
        found = _from_safetensors(path)
    else:
        raise ValueError(f"{path}: embeddings are .safetensors, .pt or .bin files")
    if not found or any(v is None for v in found.values()):
        raise ValueError(f"{path}: not a textual-inversion embedding")
    return found


def _safetensors_is_embedding(path: Path) -> bool:
    """Judged from the header only: tokens mapping to 2-D (or 1-D) float tensors of one width, nothing else."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if META_METHOD in meta:
            return meta[META_METHOD] == METHOD
        keys = list(fh.keys())
        if not keys or any(_MODULE_KEY.search(k) for k in keys):
            return False
        shapes = [fh.get_slice(k).get_shape() for k in keys]
        dtypes = {fh.get_slice(k).get_dtype() for k in keys}
    if not dtypes <= {"F16", "BF16", "F32", "F64"}:
        return False
    if keys == [EMB_PARAMS_KEY]:
        return len(shapes[0]) in (1, 2)
    if sorted(keys) == sorted(PER_ENCODER_KEYS):  # SDXL: one [n, dim] per encoder, of two widths
        return all(len(s) == 2 for s in shapes)
    # {token: [n, dim]}
    return all(len(s) == 2 for s in shapes) and len({s[-1] for s in shapes}) == 1


def is_embedding_file(path: str | Path) -> bool:
    """Whether `path` is a textual-inversion embedding file (or a folder holding learned_embeds)."""
    path = Path(path)
    if path.is_dir():
        return (path / DIFFUSERS_FILE).is_file()
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            return _safetensors_is_embedding(path)
        if path.suffix in PICKLE_SUFFIXES:
            return bool(_from_pickle(path))
    except Exception:  # unreadable, not a pickle, refused by weights_only: not ours either way
        return False
    return False

"""Writing `.pt` files that AUTOMATIC1111's safe unpickler accepts.

torch's default zip serialization adds records (`.format_version`, `.storage_alignment`, `byteorder`,
`.data/serialization_id`) that A1111's checker refuses as possibly malicious; torch's legacy (pre-zip) format
has none of them and still loads with `torch.load(weights_only=True)` in ComfyUI and diffusers.
"""

from __future__ import annotations

from pathlib import Path


def save_legacy_pt(data: dict, path: Path) -> Path:
    """torch.save `data` (plain tensors, str, numbers, None) in the legacy format every consumer reads."""
    import torch

    torch.save(data, str(path), _use_new_zipfile_serialization=False)
    return Path(path)

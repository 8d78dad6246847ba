"""Exported files get the permissions of any file the user writes.

safetensors (and so diffusers' save_pretrained) creates files readable by their owner only (0600); a model
folder shared with a ComfyUI or A1111 service account could then not read them. The user's umask decides.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths) -> None:
    """chmod each file (and everything inside each folder) to 0666 / folders 0777, minus the umask."""
    mask = current_umask()
    for path in map(Path, paths):
        targets = [path, *path.rglob("*")] if path.is_dir() else [path]
        for target in targets:
            if target.is_symlink() or not target.exists():
                continue
            os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)

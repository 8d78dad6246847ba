"""Write a diffusers pipeline folder into sdft's cache once, safely when several processes ask for it at once.

Three traps make a plain `save_pretrained` unsafe here: two processes (torchrun ranks, two runs) may write the
same folder at once; a crash half-way leaves a folder that looks finished; and transformers (5.x) writes a model's
files only on rank 0 of an initialised torch.distributed group, so any other rank gets an empty `text_encoder/`
without an error. So whoever takes a file lock first builds, into a temporary sibling that is checked and then
renamed; a rank that transformers skipped writes those parts itself. Every machine of a multi-node run can build
its own copy, since none waits for rank 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# Pipeline parts that hold no weights (their folders carry only configs or vocabularies).
WEIGHTLESS_CLASS_MARKERS = ("Scheduler", "Tokenizer", "FeatureExtractor", "Processor")  # Processor: image ones too
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def missing_parts(folder: Path) -> list[str]:
    """Pipeline parts of `folder` that lack their weights; ["model_index.json"] when there is no pipeline at all."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return ["model_index.json"]
    index = json.loads(index_path.read_text())
    missing = []
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        if any(marker in entry[1] for marker in WEIGHTLESS_CLASS_MARKERS):
            continue
        files = (folder / part).iterdir() if (folder / part).is_dir() else []
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
            missing.append(part)
    return missing


def publish_pipeline(folder: Path, build: Callable) -> Path:
    """Make `folder` a complete pipeline folder written from `build()` (a pipeline), once.

    A complete folder is reused; an incomplete one (an older sdft could leave one) is rebuilt.
    """
    if not missing_parts(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Processes take turns on the lock; the ones that come after the builder find the folder finished.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not missing_parts(folder):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            pipe = build()
            pipe.save_pretrained(tmp, safe_serialization=True)
            save_skipped_parts(pipe, tmp, missing_parts(tmp))
            missing = missing_parts(tmp)
            if missing:
                raise RuntimeError(f"writing the pipeline into {folder} left {', '.join(missing)} without weights")
            if folder.exists():
                shutil.rmtree(folder)  # incomplete (checked above): replaced, not reused
            os.replace(tmp, folder)  # the rename is the commit point
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_skipped_parts(pipe, folder: Path, parts: list[str]) -> None:
    """Write the config and weights of pipeline `parts` that transformers declined to save on this rank.

    The file is what transformers writes for these models (same keys and values, checked by a test), so
    `from_pretrained` reads it back as usual.
    """
    from safetensors.torch import save_file

    for part in parts:
        model = getattr(pipe, part, None)
        if model is None or not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
            continue  # not a transformers model: reported as missing by the caller
        (folder / part).mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder / part)
        weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, str(folder / part / "model.safetensors"), metadata={"format": "pt"})

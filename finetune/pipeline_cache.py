"""Write a diffusers pipeline folder into sdft's cache once, safely when several processes ask for it at once.

Two traps make a plain `save_pretrained` unsafe here: a crash half-way leaves a folder that looks finished, and
transformers (5.x) writes a model's files only on rank 0 of an initialised torch.distributed group: any other rank
gets an empty `text_encoder/` folder, without an error. So rank 0 alone builds, into a temporary sibling that is
checked and then renamed, and the other ranks wait for the finished folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

# Pipeline parts that hold no weights (their folders carry only configs or vocabularies).
WEIGHTLESS_CLASS_MARKERS = ("Scheduler", "Tokenizer", "FeatureExtractor", "ImageProcessor", "Processor")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WAIT_POLL_S = 0.5


def distributed_rank() -> int:
    """This process's rank in an initialised torch.distributed group, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
        files = (folder / part).glob("*") if (folder / part).is_dir() else []
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
            missing.append(part)
    return missing


def publish_pipeline(folder: Path, build: Callable, wait_s: float = 1800.0) -> Path:
    """Make `folder` a complete pipeline folder written by `build()` (a pipeline), once.

    A complete folder is reused; an incomplete one (an older sdft could leave one) is rebuilt. Under
    torch.distributed, ranks other than 0 wait up to `wait_s` for rank 0, which must call this too.
    """
    if not missing_parts(folder):
        return folder
    if distributed_rank() != 0:
        return _wait_for(folder, wait_s)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Processes outside a process group (two runs started at once) take turns on a lock; the second reuses.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not missing_parts(folder):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build().save_pretrained(tmp, safe_serialization=True)
            missing = missing_parts(tmp)
            if missing:
                raise RuntimeError(f"writing the pipeline into {folder} left {', '.join(missing)} without weights")
            if folder.exists():
                shutil.rmtree(folder)  # incomplete (checked above): replaced, not reused
            os.replace(tmp, folder)  # the rename is the commit point
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _wait_for(folder: Path, wait_s: float) -> Path:
    deadline = time.monotonic() + wait_s
    while missing_parts(folder):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {distributed_rank()} waited {wait_s:.0f} s for rank 0 to write {folder}; "
                               "every process of a multi-process run must run the same command")
        time.sleep(WAIT_POLL_S)
    return folder

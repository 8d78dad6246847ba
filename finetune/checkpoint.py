"""Run folders and resumable checkpoints (adapter state + optimizer/scheduler/RNG via accelerate)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from . import UserError, is_disk_full

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.safetensors"


def checkpoints_dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a temporary name and are ignored."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: 'latest' (None if there is none yet) or an explicit path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); use 'latest' or "
                        f"a folder under {checkpoints_dir(output)}")
    return path


def save_checkpoint(accelerator, output: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save everything needed to resume at `step`, atomically, and prune to the last `keep`."""
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # calls the strategy's save hook for the adapter weights
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}))
            _fsync_dir(tmp)
    except Exception as exc:
        # Whatever failed (a full disk raises OSError, RuntimeError or SafetensorError depending on the writer),
        # drop the half-written folder: the earlier checkpoints stay usable.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (is_disk_full(exc) or isinstance(exc, OSError)):
            raise
        kept = list_checkpoints(output)
        reason = "no space left on the device" if is_disk_full(exc) else (exc.strerror or str(exc))
        raise UserError(f"could not write the checkpoint of step {step} in {root}: {reason}; "
                        + (f"the latest complete one is {kept[-1]}" if kept else "no earlier checkpoint exists")
                        ) from exc
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the rename is the commit point: resume only sees complete folders
        for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _fsync_dir(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())

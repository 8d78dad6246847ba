"""Run folders that protect the user's work: one run per folder, resume only into a compatible run.

Every check here only reads. A run writes into its folder only after `check_output_folder` passed and its
inputs and model loaded (`claim_output_folder` is that first write), so a failed start leaves the folder as
it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import UserError
from .checkpoint import checkpoints_dir, load_trainer_state, resolve_resume

# What a run writes that marks a folder as holding one.
RUN_MARKERS = ("config.yaml", "summary.json", "checkpoints", "pivotal")
# Settings a resumed run may change: how long it trains and how it reports, not what it trains.
RESUMABLE_KEYS = ("train.steps", "train.gradient_checkpointing", "data.cache_latents", "data.latent_cache_dir")
RESUMABLE_SECTIONS = ("output",)


def run_markers(folder: Path) -> list[str]:
    """The names in `folder` that show an sdft run lives there (empty: no run)."""
    folder = Path(folder)
    return [name for name in RUN_MARKERS if (folder / name).exists()] if folder.is_dir() else []


def check_output_folder(config) -> Path | None:
    """Check that the run may use its output folder; return the checkpoint to resume from (or None).

    Raises a UserError naming the folder and the ways out when it holds another run, when `--resume` finds
    nothing, or when the checkpoint's run differs from this config in what it trains.
    """
    out = Path(config.output.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    if not config.output.resume:
        markers = run_markers(out)
        if markers and not config.output.overwrite:
            raise UserError(f"{out} holds another run ({', '.join(markers)}); continue it with --resume latest, "
                            "choose a new --output, or pass --overwrite (output.overwrite=true) to clear it first")
        return None
    if config.output.overwrite:
        raise UserError("--overwrite clears the folder and --resume continues it: pass one of them")
    checkpoint = resolve_resume(out, config.output.resume)
    if checkpoint is None:
        raise UserError(f"--resume {config.output.resume}: {out} has no checkpoint to resume from; drop --resume to "
                        f"start a fresh run{' (with --overwrite: it holds an unfinished one)' if run_markers(out) else ''}")
    state = load_trainer_state(checkpoint)
    step = int(state["step"])
    if config.train.steps < step:
        raise UserError(f"--steps {config.train.steps} is below the step of the checkpoint {checkpoint} ({step}); "
                        f"pass --steps {step} or more")
    saved = state.get("config") or _saved_run_config(checkpoint)
    if saved is not None:
        differences = config_differences(saved, config.to_dict())
        if differences:
            raise UserError(f"--resume {checkpoint}: this run differs from the checkpoint's in "
                            + "; ".join(differences) + " (resume with the same settings, or start a new --output)")
    source_run = checkpoint.parent.parent
    if source_run.resolve() != out.resolve() and run_markers(out):
        raise UserError(f"{out} holds another run ({', '.join(run_markers(out))}); resume {checkpoint} into a new "
                        "--output")
    return checkpoint


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every setting that changes what a run trains (see RESUMABLE_KEYS)."""
    found = []
    if saved.get("method") != current.get("method"):
        return [f"method: {saved.get('method')} -> {current.get('method')}"]
    for section, values in current.items():
        if not isinstance(values, dict) or section in RESUMABLE_SECTIONS:
            continue
        before = saved.get(section) or {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in RESUMABLE_KEYS and key in before and before[key] != value:
                found.append(f"{dotted}: {before[key]!r} -> {value!r}")
    return found


def claim_output_folder(config, is_main_process: bool = True) -> None:
    """The run's first write: with --overwrite, clear the older run in the folder; then create the folder."""
    out = Path(config.output.output)
    if is_main_process:
        if config.output.overwrite and not config.output.resume and run_markers(out):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)


def _saved_run_config(checkpoint: Path) -> dict | None:
    """The config.yaml of the run a checkpoint belongs to (checkpoints written before they carried it)."""
    import yaml

    saved = Path(checkpoint).parent.parent / "config.yaml"
    if Path(checkpoint).parent.name != checkpoints_dir(Path(".")).name or not saved.is_file():
        return None
    return yaml.safe_load(saved.read_text())


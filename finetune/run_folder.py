"""Run folders that protect the user's work: one run per folder, resume only into a compatible run.

Every check here only reads. A run writes into its folder only after `check_output_folder` passed and its
inputs were checked and (but for a pivotal run's first phase) its model loaded: `claim_output_folder` is that
first write, so a failed start leaves the folder as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import UserError
from .checkpoint import list_checkpoints, load_trainer_state, resolve_resume

# What a run writes that marks a folder as holding one, and the entries --overwrite removes (with the exports
# the older run's summary.json lists): nothing else in the folder is ever deleted.
RUN_MARKERS = ("config.yaml", "summary.json", "checkpoints", "pivotal")
RUN_ENTRIES = (*RUN_MARKERS, "logs", "samples", "loss.png", "pipeline")
# Settings a resumed run may change: how long it trains and how it reports, not what it trains.
RESUMABLE_KEYS = ("train.steps", "train.gradient_checkpointing", "train.attention", "train.channels_last",
                  "train.compile_unet", "data.cache_latents", "data.latent_cache_dir")
RESUMABLE_SECTIONS = ("output",)


def run_markers(folder: Path) -> list[str]:
    """The names in `folder` that show an sdft run lives there (empty: no run). A config.yaml or summary.json
    counts only when it is sdft's (it names a method), checkpoints/ only with step-N folders in it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in ("config.yaml", "summary.json") if _names_a_method(folder / name)]
    if list_checkpoints(folder):
        found.append("checkpoints")
    if _names_a_method(folder / "pivotal" / "config.yaml"):
        found.append("pivotal")
    return found


def _names_a_method(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "method" in data


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
            ways = "continue it with --resume latest, " if list_checkpoints(out) else ""
            raise UserError(f"{out} holds another run ({', '.join(markers)}); {ways}choose a new --output, or pass "
                            "--overwrite (output.overwrite=true) to replace it")
        if markers:
            refuse_overwriting_inputs(config, out)
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
    later = [p.name for p in list_checkpoints(out) if int(p.name.split("-")[1]) > step]
    if later:
        raise UserError(f"--resume {checkpoint}: {out} also holds later checkpoints ({', '.join(later)}) that this "
                        "run would mix with its own; resume the latest, or move those away first")
    return checkpoint


def refuse_overwriting_inputs(config, out: Path) -> None:
    """--overwrite never touches the run's own inputs: refuse when one of them lives inside the folder."""
    inputs = [config.data.images, config.data.validation_images, config.prior.class_images,
              config.data.latent_cache_dir, *(entry.images for entry in config.data.datasets)]
    root = out.resolve()
    for value in filter(None, inputs):
        path = Path(value).expanduser().resolve()
        if path == root or root in path.parents:
            raise UserError(f"--overwrite would clear {out}, which holds this run's input {value}; choose another "
                            "--output")


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
    """The run's first write: with --overwrite, remove the older run's entries (RUN_ENTRIES and the exports its
    summary.json lists; nothing else); then create the folder."""
    out = Path(config.output.output)
    if not is_main_process:
        return
    if config.output.overwrite and not config.output.resume and run_markers(out):
        for path in [out / name for name in RUN_ENTRIES] + _listed_exports(out):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _listed_exports(out: Path) -> list[Path]:
    """The files and folders an older finished run exported, as its summary.json lists them (inside `out`)."""
    import json

    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    root = out.resolve()
    listed = [Path(p) for paths in (summary.get("exports") or {}).values() for p in paths]
    return [p for p in listed if root in p.resolve().parents]


def _saved_run_config(checkpoint: Path) -> dict | None:
    """The config.yaml of the run a checkpoint belongs to (checkpoints written before they carried it)."""
    import yaml

    saved = Path(checkpoint).parent.parent / "config.yaml"
    if Path(checkpoint).parent.name != "checkpoints" or not saved.is_file():
        return None
    return yaml.safe_load(saved.read_text())


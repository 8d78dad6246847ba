"""Validation loss: held-out images at fixed noise and timesteps, logged, plotted, comparable and resumable."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from finetune.cli import main

from conftest import make_config


def _argv(star_images, out, steps: int, *extra: str) -> list[str]:
    return ["lora", "--images", str(star_images), "--token", "sks", "--output", str(out), "--steps", str(steps),
            "--lr", "1e-2", "--validation-share", "0.4", "--validation-every", "2", "--checkpoint-every", "2",
            "--sample-seeds", "0", "--sample-steps", "1", "--formats", "diffusers", *extra]


def _scalars(run, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run / "logs").rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return values


def test_validation_loss_is_logged_comparable_and_resumes(tmp_path, star_images):
    whole, again, split = tmp_path / "whole", tmp_path / "again", tmp_path / "split"
    assert main(_argv(star_images, whole, 4)) == 0
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["validation_images"] == 2  # every 2nd of the 5 star images is held out
    logged = _scalars(whole, "val_loss")
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged[0][1] != logged[-1][1], "training did not move the validation loss"
    assert abs(summary["validation_loss"] - logged[-1][1]) < 1e-6
    assert (whole / "loss.png").is_file()

    # Fixed noise and timesteps: a second run of the same settings draws the same curve.
    assert main(_argv(star_images, again, 4)) == 0
    assert _scalars(again, "val_loss") == logged

    # Validation does not disturb training: a run resumed at step 2 ends on the same weights and loss.
    assert main(_argv(star_images, split, 2)) == 0
    assert main([*_argv(star_images, split, 4), "--resume", "latest"]) == 0
    name = "pytorch_lora_weights.safetensors"
    expected, resumed = load_file(str(whole / name)), load_file(str(split / name))
    assert all((expected[k] == resumed[k]).all() for k in expected)
    assert json.loads((split / "summary.json").read_text())["validation_loss"] == summary["validation_loss"]


def test_a_validation_folder_is_used_as_given(tmp_path, star_images, photos):
    out = tmp_path / "out"
    argv = _argv(star_images, out, 2)
    argv[argv.index("--validation-share"): argv.index("--validation-share") + 2] = ["--validation-images",
                                                                                    str(photos)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation_images"] == 5 and summary["vae_encodes"] == 5  # all 5 star images train


def test_report_to_wandb_writes_an_offline_run(tmp_path, monkeypatch):
    """--report-to wandb without an account: an offline wandb run inside the run folder, holding the losses."""
    from finetune.trainer import run_training

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = make_config("lora", tmp_path / "run", **{"output.report_to": "wandb", "data.validation_share": 0.4,
                                                      "output.validation_every": 1, "output.sample_seeds": []})
    run_training(config)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds no history file"
    assert not (tmp_path / "run" / "logs").exists() or not any((tmp_path / "run" / "logs").rglob("events.*"))

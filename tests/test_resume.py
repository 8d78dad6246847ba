"""Checkpoints: a run killed with SIGKILL resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.checkpoint import list_checkpoints, resolve_resume
from finetune.cli import main

REPO = Path(__file__).resolve().parents[1]


def _argv(images: Path, out: Path, steps: int) -> list[str]:
    return ["lora", "--images", str(images), "--token", "sks", "--steps", str(steps), "--output", str(out),
            "--lr", "1e-3", "--dropout", "0.1", "--lr-scheduler", "cosine",
            "--grad-accum", "2", "--checkpoint-every", "3", "--keep-checkpoints", "2",
            "--sample-seeds", "0", "--sample-steps", "2", "--formats", "diffusers"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, star_images):
    steps = 24
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *_argv(star_images, killed, steps)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list_checkpoints(killed), "the run never wrote a checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown: exactly what a crash looks like
    finally:
        proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    interrupted_at = int(list_checkpoints(killed)[-1].name.split("-")[1])
    assert interrupted_at < steps

    assert main([*_argv(star_images, killed, steps), "--resume", "latest"]) == 0
    reference = tmp_path / "reference"
    assert main(_argv(star_images, reference, steps)) == 0

    resumed = load_file(str(killed / "pytorch_lora_weights.safetensors"))
    expected = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert (resumed[key] == expected[key]).all(), f"{key} differs after resume"
    assert len(list_checkpoints(killed)) <= 2
    assert list_checkpoints(killed)[-1].name == f"step-{steps // 3 * 3}"


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "trainer_state.json").write_text('{"step": 3}')
    (root / ".tmp-step-6").mkdir()  # a crash while writing step 6
    (root / "step-9").mkdir()  # no state file: incomplete
    assert resolve_resume(tmp_path, "latest") == root / "step-3"
    assert resolve_resume(tmp_path, None) is None
    from finetune import UserError

    with pytest.raises(UserError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(root / "step-9"))

"""Data parallel on CPU: 2 processes (gloo) x batch 1 give the same weights as 1 process x batch 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# Which exported file holds each method's trained tensors.
TRAINED_FILE = {"lora": "pytorch_lora_weights.safetensors", "hypernetwork": "sks_hypernetwork.safetensors"}
FORMAT = {"lora": "diffusers", "hypernetwork": "safetensors"}


def _argv(method: str, out: Path, batch_size: int) -> list[str]:
    return [method, "--images", str(REPO / "data_examples" / "star"), "--token", "sks", "--steps", "4",
            "--batch-size", str(batch_size), "--lr", "1e-3", "--output", str(out), "--sample-seeds", "0",
            "--sample-steps", "1", "--formats", FORMAT[method]]


@pytest.mark.parametrize("method", ["lora", "hypernetwork"])
def test_two_processes_match_one(tmp_path, method):
    two = tmp_path / "two"
    # accelerate needs ACCELERATE_USE_CPU to form a gloo group on a machine without GPUs; torchrun starts
    # the processes (`accelerate launch --cpu` silently starts one; see README "Multi-process").
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "finetune", *_argv(method, two, 1)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one = tmp_path / "one"
    # The reference runs in its own process too: a pytest process that already ran accelerate in-process
    # was seen to hang the next torchrun child.
    reference = subprocess.run([sys.executable, "-m", "finetune", *_argv(method, one, 2)], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    got, want = load_file(str(two / TRAINED_FILE[method])), load_file(str(one / TRAINED_FILE[method]))
    assert got.keys() == want.keys()
    for key in want:
        # Equal up to the order of floating-point reductions across processes.
        torch.testing.assert_close(got[key], want[key], atol=5e-5, rtol=1e-4, msg=key)

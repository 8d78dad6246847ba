"""The built-in base's cached folder: complete whoever asks first, and repaired when an older run left it broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One rank of a 2-process gloo group. Rank 1 asks for the base at once, rank 0 only after 3 s: rank 1 takes the
# build lock first, which is how a fresh machine's first `torchrun` run got a text encoder folder without weights
# (transformers writes model files on rank 0 only). The base both ranks then load must be the shipped one.
RANK_SCRIPT = """
import sys, time
import torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
if rank == 0:
    time.sleep(3)
import torch
from finetune.models import build_toy_pipeline, load_pipeline, shipped_toy_base, tiny_base_folder
from finetune.pipeline_cache import missing_parts
folder = tiny_base_folder()
print("missing:", missing_parts(folder))
loaded, shipped = load_pipeline("tiny"), build_toy_pipeline(shipped_toy_base())
for part in ("text_encoder", "unet", "vae"):
    want = getattr(shipped, part).state_dict()
    got = getattr(loaded, part).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
dist.barrier()
dist.destroy_process_group()
"""


def test_first_multi_process_run_gets_a_complete_base(tmp_path):
    env = {**os.environ, "SDFT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "rendezvous")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-2000:]
        assert "missing: []" in out


def test_a_base_folder_left_without_weights_is_rebuilt(tmp_path, monkeypatch):
    from finetune.models import load_pipeline, tiny_base_folder
    from finetune.pipeline_cache import missing_parts

    monkeypatch.setenv("SDFT_HOME", str(tmp_path))
    folder = tiny_base_folder()
    assert missing_parts(folder) == []
    weights = folder / "text_encoder" / "model.safetensors"
    weights.unlink()  # what an older sdft's first multi-process run left behind
    assert missing_parts(folder) == ["text_encoder"]
    assert tiny_base_folder() == folder
    assert weights.is_file()
    assert load_pipeline("tiny").text_encoder is not None
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tiny-") and p.is_dir()]  # no temp left

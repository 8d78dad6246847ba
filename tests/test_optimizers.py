"""Every optimizer trains the tiny base's LoRA and resumes from a mid-run checkpoint bit for bit."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from finetune import UserError
from finetune.cli import main

# Settings each optimizer is used with in practice (Prodigy: lr 1 is its own step-size multiplier).
SETTINGS = {"prodigy": ["--lr", "1", "--prodigy-bias-correction"], "adafactor": ["--lr", "1e-3"],
            "lion": ["--lr", "1e-4"], "adamw_schedulefree": ["--lr", "1e-3", "--lr-warmup-steps", "1"]}


def _argv(star_images, out, optimizer: str, steps: int) -> list[str]:
    return ["lora", "--images", str(star_images), "--token", "sks", "--output", str(out), "--steps", str(steps),
            "--optimizer", optimizer, *SETTINGS[optimizer], "--checkpoint-every", "2", "--dropout", "0.1",
            "--sample-seeds", "0", "--sample-steps", "1", "--formats", "diffusers"]


@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_optimizer_trains_and_resumes_exactly(tmp_path, star_images, optimizer):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_argv(star_images, whole, optimizer, 4)) == 0
    assert main(_argv(star_images, split, optimizer, 2)) == 0
    assert main([*_argv(star_images, split, optimizer, 4), "--resume", "latest"]) == 0

    name = "pytorch_lora_weights.safetensors"
    expected, resumed = load_file(str(whole / name)), load_file(str(split / name))
    assert expected.keys() == resumed.keys()
    assert all((expected[k] == resumed[k]).all() for k in expected), f"{optimizer} does not resume exactly"
    # It trained: LoRA's B matrices start at zero and moved.
    assert any(expected[k].abs().max() > 0 for k in expected if "lora_B" in k or "lora_up" in k)


def test_a_missing_optimizer_package_names_its_extra(monkeypatch):
    import builtins

    from finetune.config import RunConfig
    from finetune.optimizers import make_optimizer

    real_import = builtins.__import__

    def without_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_prodigy)
    config = RunConfig.for_method("lora")
    config.train.optimizer = "prodigy"
    with pytest.raises(UserError, match=r'pip install "sdft\[prodigy\]"'):
        make_optimizer(config.train, [{"params": []}], "cpu")

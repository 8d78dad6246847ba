"""EMA of the trained weights: the exported weights are the average, and a resumed run keeps it exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import make_config


def _settings(**extra):
    return {"train.steps": 4, "train.lr": 1e-2, "train.ema_decay": 0.9, "output.checkpoint_every": 1,
            "output.keep_checkpoints": 10, "output.formats": ["kohya"], **extra}


def test_exports_hold_the_average_of_the_trained_weights(tmp_path):
    from finetune.trainer import run_training

    outcome = run_training(make_config("lora", tmp_path, **_settings()))
    final = {k: v.detach().cpu() for k, v in outcome.strategy.state_dict().items()}
    # Rebuild the average from the raw weights each checkpoint stored (diffusers' EMAModel warm-up:
    # decay 0 at the first update, then min(0.9, t / (9 + t)) at update t).
    expected = None
    for step in range(1, 5):
        raw = load_file(str(tmp_path / "checkpoints" / f"step-{step}" / "adapter.safetensors"))
        if expected is None:
            expected = raw
            continue
        decay = min(0.9, step / (9 + step))
        expected = {k: decay * expected[k] + (1 - decay) * raw[k] for k in raw}
    assert expected.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-7)
    last_raw = load_file(str(tmp_path / "checkpoints" / "step-4" / "adapter.safetensors"))
    assert any(not torch.equal(final[k], last_raw[k]) for k in final)  # the average is not the last weights


def test_resume_continues_the_average_exactly(tmp_path):
    from finetune.trainer import run_training

    whole = run_training(make_config("lora", tmp_path / "whole", **_settings(**{"train.ema_on_cpu": True})))
    resumed = run_training(make_config("lora", tmp_path / "resumed", **_settings(**{
        "train.ema_on_cpu": True, "output.resume": str(tmp_path / "whole" / "checkpoints" / "step-2")})))
    a, b = whole.strategy.state_dict(), resumed.strategy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

"""The fused backward pass: weights update inside backward, one gradient alive at a time, same weights as the
ordinary step (clipping per tensor), resumable, and refused in one line where it cannot be honoured."""

from __future__ import annotations

import pytest
import torch

from finetune import UserError
from finetune.backward_pass import UpdatesInBackward, wanted
from finetune.config import TrainConfig

from conftest import make_config


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
    return (model(inputs) ** 2).mean() * 50  # large gradients: clipping at 0.1 changes every tensor's update


def test_updates_in_backward_equal_per_tensor_clipping_and_keep_one_gradient_alive():
    ordinary, fused = _model(), _model()
    reference_opt = torch.optim.AdamW(ordinary.parameters(), lr=1e-2)
    fused_opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    alive: list[int] = []
    params = list(fused.parameters())
    for param in params:  # registered first, so it runs before the update: counts the gradients that exist
        param.register_post_accumulate_grad_hook(lambda _: alive.append(sum(p.grad is not None for p in params)))
    with UpdatesInBackward(fused_opt, params, max_grad_norm=0.1):
        for step in range(3):
            loss = _loss(ordinary, step)
            loss.backward()
            for param in ordinary.parameters():
                torch.nn.utils.clip_grad_norm_([param], 0.1)
            reference_opt.step()
            reference_opt.zero_grad(set_to_none=True)
            _loss(fused, step).backward()
            assert all(p.grad is None for p in params), "a gradient outlived its update"
    assert max(alive) == 1 and len(alive) == 3 * len(params)
    for mine, expected in zip(fused.parameters(), ordinary.parameters()):
        assert torch.equal(mine, expected)
    assert fused_opt.state_dict()["state"].keys() == reference_opt.state_dict()["state"].keys()
    _loss(fused, 9).backward()  # the hooks came off with the block: gradients stay for the caller
    assert all(p.grad is not None for p in params)


def test_auto_turns_on_for_full_fine_tunes_only():
    big, small = [torch.nn.Parameter(torch.zeros(10_000_000))], [torch.nn.Parameter(torch.zeros(100))]
    assert wanted(TrainConfig(), big, 1, full_fine_tune=True)
    assert not wanted(TrainConfig(), small, 1, full_fine_tune=True)  # the toy base's DreamBooth: as it was
    assert not wanted(TrainConfig(), big, 1, full_fine_tune=False)  # e.g. textual inversion's 38M-value table
    assert wanted(TrainConfig(fused_backward_pass="on"), small, 1, full_fine_tune=False)
    assert not wanted(TrainConfig(fused_backward_pass="off"), big, 1, full_fine_tune=True)
    for settings in [dict(grad_accum=2), dict(mixed_precision="fp16"), dict(optimizer="prodigy"),
                     dict(compile_unet=True)]:
        assert not wanted(TrainConfig(**settings), big, 1, full_fine_tune=True), settings
    assert not wanted(TrainConfig(), big, 2, full_fine_tune=True)  # DDP averages gradients after the backward pass


@pytest.mark.parametrize("setting", [{"train.mixed_precision": "fp16"}, {"train.optimizer": "prodigy"},
                                     {"train.grad_accum": 2}])
def test_impossible_settings_are_refused_in_one_line_before_anything_is_written(tmp_path, setting):
    from finetune.trainer import run_training

    out = tmp_path / "run"
    with pytest.raises(UserError, match="fused_backward_pass=on") as error:
        run_training(make_config("dreambooth", out, **{"train.fused_backward_pass": "on", **setting}))
    assert "\n" not in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "hypernetwork", "dreambooth"])
def test_every_method_trains_the_same_weights_in_backward(tmp_path, method):
    """Without clipping the fused backward pass is the ordinary step, whatever a strategy does after it
    (textual inversion restores the frozen embedding rows; hypernetworks train through attention hooks)."""
    from finetune.trainer import run_training

    def trained(mode: str):
        config = make_config(method, tmp_path / mode, **{
            "train.steps": 3, "train.max_grad_norm": 0.0, "train.lr": 1e-3, "train.fused_backward_pass": mode,
            "prior.enabled": False, "output.sample_seeds": []})
        outcome = run_training(config)
        return outcome.summary["fused_backward_pass"], outcome.strategy.state_dict()

    (used_off, ordinary), (used_on, fused) = trained("off"), trained("on")
    assert (used_off, used_on) == (False, True)
    assert ordinary.keys() == fused.keys()
    for key in ordinary:
        assert torch.equal(fused[key], ordinary[key]), key


def test_dreambooth_in_backward_resumes_exactly(tmp_path):
    """A run stopped at a checkpoint and resumed ends on the weights of the uninterrupted run: the one
    optimizer's state (every tensor's moments) is checkpointed as usual, and the resumed steps follow the lr
    schedule (loading the checkpoint replaces the optimizer's groups)."""
    from finetune.trainer import run_training

    def trained(name: str, steps: int, **options) -> dict:
        config = make_config("dreambooth", tmp_path / name, **{
            "train.steps": steps, "train.fused_backward_pass": "on", "prior.enabled": False,
            "train.lr_scheduler": "linear", "train.lr_warmup_steps": 2,
            "output.formats": ["diffusers"], "output.sample_seeds": [], "output.checkpoint_every": 2,
            "output.keep_checkpoints": 5, **options})
        return {k: v.clone() for k, v in run_training(config).components.unet.state_dict().items()}

    uninterrupted = trained("uninterrupted", 4)
    # From the uninterrupted run's step-2 checkpoint (a run stopped there), into a folder of its own.
    step_2 = tmp_path / "uninterrupted" / "checkpoints" / "step-2"
    resumed = trained("resumed", 4, **{"output.resume": str(step_2)})
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key

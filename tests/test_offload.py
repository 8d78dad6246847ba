"""train.offload_frozen: the VAE and frozen text encoders hold no weights during the training steps, come back
for new prompts, sample grids and exports, and the run trains exactly what it trains without the offload."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.offload import OffloadedModule, frozen_offload

from conftest import make_config


def test_a_module_comes_back_bit_for_bit_with_its_unsaved_buffers(tiny_components):
    encoder = tiny_components.text_encoder
    before = {n: t.clone() for n, t in [*encoder.named_parameters(), *encoder.named_buffers()]}
    assert any(n not in encoder.state_dict() for n in before), "expected a non-persistent buffer to check"
    part = OffloadedModule(encoder, "cpu")
    part.send_away()
    assert all(p.is_meta for p in encoder.parameters()), "an offloaded module still holds its weights"
    part.bring_back()
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[name]), name


def test_a_block_inside_another_leaves_the_outer_blocks_modules_present():
    from finetune.offload import FrozenOffload

    vae, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with FrozenOffload([vae, encoder], "cpu") as offload:
        assert vae.weight.is_meta and encoder.weight.is_meta
        with offload.present():
            with offload.present([encoder]):  # e.g. a new prompt met while a sample grid is drawn
                assert not encoder.weight.is_meta
            assert not vae.weight.is_meta and not encoder.weight.is_meta
        assert vae.weight.is_meta and encoder.weight.is_meta
    assert not vae.weight.is_meta and not encoder.weight.is_meta


def test_only_what_the_steps_do_not_need_is_offloaded():
    vae, te1, te2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    components = SimpleNamespace(vae=vae, text_encoders=[te1, te2])

    def chosen(setting="on", device="cpu", cached=True, trains_text=False, prompts_vary=False):
        found = frozen_offload(SimpleNamespace(offload_frozen=setting), components, device, cached, trains_text,
                               prompts_vary)
        return [p.module for p in found.parts]

    assert chosen() == [vae, te1, te2]
    assert chosen(cached=False) == [te1, te2]  # random crops: the VAE encodes every step
    assert chosen(trains_text=True) == [vae]
    assert chosen(cached=False, trains_text=True) == []
    assert chosen(setting="auto") == [] and chosen(setting="off", device="cuda") == []
    assert chosen(setting="auto", device="cuda") == [vae, te1, te2]
    # Shuffled captions: a new prompt nearly every step, so auto keeps the text encoders; on offloads them anyway.
    assert chosen(setting="auto", device="cuda", prompts_vary=True) == [vae]
    assert chosen(prompts_vary=True) == [vae, te1, te2]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_offloaded_run_trains_and_samples_exactly_as_without(tmp_path, family, request):
    from finetune.models import load_components
    from finetune.trainer import run_training

    base = "tiny" if family == "sd" else str(request.getfixturevalue("tiny_sdxl_folder"))

    def trained(mode: str):
        components = load_components(base)
        seen = []  # per UNet call: grad enabled (a training step), and whether VAE / text encoders held weights

        def record(module, args):
            parts = [components.vae, *components.text_encoders]
            seen.append((torch.is_grad_enabled(), [next(p.parameters()).is_meta for p in parts]))

        components.unet.register_forward_pre_hook(record)
        # Caption dropout makes a new prompt ("") appear mid-run: the text encoders come back for it.
        config = make_config("lora", tmp_path / mode, **{
            "model.name": base, "train.steps": 4, "train.lr": 1e-3, "train.offload_frozen": mode,
            "data.caption_dropout": 0.5, "output.sample_every": 2, "output.formats": ["kohya"]})
        outcome = run_training(config, components)
        state = {k: v.clone() for k, v in outcome.strategy.state_dict().items()}
        grids = sorted((tmp_path / mode / "samples").glob("*.png"))
        return outcome.summary, state, [np.asarray(Image.open(g)) for g in grids], seen

    summary_off, state_off, grids_off, seen_off = trained("off")
    summary_on, state_on, grids_on, seen_on = trained("on")
    assert summary_off["offloaded"] == [] and len(summary_on["offloaded"]) == 1 + (2 if family == "sdxl" else 1)
    steps = [away for training, away in seen_on if training]
    assert len(steps) == 4 and all(all(away) for away in steps), "a model held its weights during a step"
    sampling = [away for training, away in seen_on if not training]
    assert sampling and not any(any(away) for away in sampling), "a sample grid ran without its models"
    assert not any(any(away) for _, away in seen_off)
    for key in state_off:
        assert torch.equal(state_on[key], state_off[key]), key
    assert len(grids_on) == len(grids_off) == 2
    for on, off in zip(grids_on, grids_off):
        assert np.array_equal(on, off)
    assert summary_on["final_loss"] == summary_off["final_loss"]

"""sdft convert, merge and resize-lora, each checked by loading its result with diffusers' own loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main

from conftest import make_config, render

PROMPT = "a photo of sks on a pink background"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A LoRA on UNet (convs too) and text encoder with random non-zero factors, in both formats."""
    from finetune.models import load_components
    from finetune.strategies import build_strategy

    out = tmp_path_factory.mktemp("lora")
    config = make_config("lora", out, **{"lora.targets": "all", "lora.train_text_encoder": True,
                                         "lora.rank": 4, "lora.alpha": 2.0})
    strategy = build_strategy(config)
    strategy.prepare(load_components("tiny"))
    generator = torch.Generator().manual_seed(0)
    for module in strategy.trainable_modules():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    written = strategy.export(out, ["diffusers", "kohya"], {"resolution": "64", "steps": "1"})
    return written["diffusers"][0], written["kohya"][0]


def _image(*adapters: tuple[str, float], model: str = "tiny", **kwargs):
    from finetune.inference import load_adapter
    from finetune.models import load_pipeline

    pipe = load_pipeline(model, **kwargs)
    for path, scale in adapters:
        load_adapter(pipe, path, scale)
    return render(pipe, PROMPT)


def test_convert_both_ways_is_exact(lora_files, tmp_path):
    diffusers_file, kohya_file = lora_files
    to_kohya = tmp_path / "to_kohya.safetensors"
    assert main(["convert", diffusers_file, "--output", str(to_kohya)]) == 0
    expected, got = load_file(kohya_file), load_file(str(to_kohya))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    back = tmp_path / "back"
    assert main(["convert", kohya_file, "--output", str(back), "--base", "tiny"]) == 0
    again = tmp_path / "again.safetensors"
    assert main(["convert", str(back / "pytorch_lora_weights.safetensors"), "--output", str(again)]) == 0
    round_trip = load_file(str(again))
    assert round_trip.keys() == expected.keys()
    assert all(torch.equal(round_trip[k], expected[k]) for k in expected), "kohya -> diffusers -> kohya changed"
    assert np.abs(_image((str(back), 1.0)) - _image((kohya_file, 1.0))).max() < 1e-5


def test_resize_to_full_rank_is_exact_and_lower_ranks_report_energy(lora_files, tmp_path, capsys):
    _, kohya_file = lora_files
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    assert main(["resize-lora", kohya_file, "--rank", "4", "--output", str(full)]) == 0
    assert "energy kept: mean 1.0000" in capsys.readouterr().out
    assert np.abs(_image((str(full), 1.0)) - _image((kohya_file, 1.0))).max() < 1e-4

    assert main(["resize-lora", kohya_file, "--rank", "1", "--output", str(small)]) == 0
    printed = capsys.readouterr().out
    mean = float(printed.split("energy kept: mean ")[1].split(",")[0])
    assert 0.2 < mean < 0.99  # random rank-4 factors: one direction keeps a good part, not all
    assert all(v.shape[0] == 1 for k, v in load_file(str(small)).items() if k.endswith("lora_down.weight"))
    assert main(["resize-lora", kohya_file, "--rank", "1", "--output", str(small)]) == 2  # never overwrites


def test_merge_equals_the_loaded_loras(lora_files, tmp_path):
    diffusers_file, kohya_file = lora_files
    expected = _image((kohya_file, 0.8), (diffusers_file, 0.5))
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    for output in (folder, single):
        assert main(["merge", "--base", "tiny", "--lora", f"{kohya_file}:0.8", "--lora", f"{diffusers_file}:0.5",
                     "--output", str(output)]) == 0
    assert np.abs(_image(model=str(folder)) - expected).max() < 1e-4
    assert np.abs(_image(model=str(single), single_file_config=str(folder)) - expected).max() < 1e-4
    assert np.abs(_image() - expected).max() > 1e-3  # the LoRAs change the image: the check can fail

"""The command line: one-line errors for bad input, and a real LoRA run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdft: error: ") and "\n" not in err, err
    return err


def test_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("lora", "train", "generate"):
        assert command in out


@pytest.mark.parametrize("argv,needle", [
    (["lora", "--images", "data_examples/star", "--stpes", "3"], "did you mean --steps"),
    (["lora"], "--images is required"),
    (["lora", "--images", "no/such/folder"], "no such folder"),
    (["lora", "--images", "data_examples/star", "--model", "no/such/model.safetensors"], "file not found"),
    (["lora", "--images", "data_examples/star", "--model", "./missing-folder"], "not found"),
    (["lora", "--images", "data_examples/star", "--steps", "many"], "--steps='many': expected int"),
    (["lora", "--images", "data_examples/star", "--lr-scheduler", "cosnie"], "invalid choice"),
    (["lora", "--images", "data_examples/star", "--formats", "a1111", "--output", "{tmp}"], "not written by lora"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, needle, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = [a.replace("{tmp}", str(tmp_path / "out")) for a in argv]
    if "invalid choice" in needle:  # argparse's own message (exit 2 via SystemExit)
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err
        return
    assert needle in _error(capsys, argv)


def test_image_folder_problems(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    assert "no images found" in _error(capsys, ["lora", "--images", str(empty), "--output", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not really a png")
    assert "none of the 1 image files could be read" in _error(
        capsys, ["lora", "--images", str(broken), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "summary.json").exists()


def test_recipe_errors(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\ntrain:\n  stpes: 3\n")
    assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in _error(capsys, ["train", str(recipe)])
    recipe.write_text("method: lora\ntrian:\n  steps: 3\n")
    assert "unknown section 'trian' (did you mean 'train'?)" in _error(capsys, ["train", str(recipe)])
    recipe.write_text("method: lora\n")
    assert "unknown key 'lora.rnak'" in _error(capsys, ["train", str(recipe), "lora.rnak=3"])
    assert "not found" in _error(capsys, ["train", str(tmp_path / "missing.yaml")])


def test_generate_unknown_adapter(capsys, tmp_path):
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"something": torch.zeros(2)}, str(junk))
    assert "not an adapter format sdft knows" in _error(
        capsys, ["generate", "--prompt", "x", "--adapter", str(junk), "--output", str(tmp_path / "x.png")])


def test_lora_cli_end_to_end(tmp_path, photos, capsys):
    """`sdft lora` on photo-like JPEGs for 30 steps; both exports reproduce the trained samples."""
    out = tmp_path / "out"
    argv = ["lora", "--images", str(photos), "--token", "sks", "--class-word", "dog",
            "--model", "tiny", "--steps", "30", "--output", str(out), "--lr", "1e-3", "--sample-seeds", "0,1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert str(out / "summary.json") in printed and "loss plot" in printed
    assert summary["steps"] == 30 and summary["method"] == "lora"
    assert Path(summary["exports"]["diffusers"][0]).name == "pytorch_lora_weights.safetensors"
    assert Path(summary["exports"]["kohya"][0]).name == "sks_lora.safetensors"
    assert (Path(summary["base_model"]) / "model_index.json").is_file()
    assert Path(summary["loss_plot"]).is_file() and Path(summary["samples"]).is_file()
    assert summary["vae_encodes"] == 5  # the latent cache encoded each photo once
    assert (out / "config.yaml").is_file() and list((out / "logs").rglob("events.out.tfevents*"))
    trained = np.asarray(Image.open(summary["samples"])).astype(int)
    for fmt in ("diffusers", "kohya"):
        png = tmp_path / f"{fmt}.png"
        assert main(["generate", "--model", summary["base_model"], "--adapter", summary["exports"][fmt][0],
                     "--prompt", "a photo of sks dog", "--num-images", "2", "--output", str(png)]) == 0
        got = np.asarray(Image.open(png)).astype(int)
        assert np.abs(got - trained).max() <= 1, f"{fmt} export does not reproduce the trained samples"
    base_png = tmp_path / "base.png"
    assert main(["generate", "--model", summary["base_model"], "--prompt", "a photo of sks dog",
                 "--num-images", "2", "--output", str(base_png)]) == 0
    assert np.abs(np.asarray(Image.open(base_png)).astype(int) - trained).max() > 1, "training changed nothing"


def test_tiny_recipes_load_and_point_at_shipped_data(monkeypatch):
    """Every shipped recipe parses; the tiny ones run from a clean clone (their data folders are in the repo)."""
    from finetune.config import load_recipe

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # recipes use paths relative to the repository root, as the README runs them
    recipes = sorted((root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        config = load_recipe(recipe)
        config.validate()
        if recipe.name.startswith("tiny_"):
            folders = [config.data.images] if config.data.images else [d.images for d in config.data.datasets]
            assert folders and all(Path(folder).is_dir() for folder in folders), recipe.name
            if config.prior.enabled and config.prior.class_images:
                class_images = Path(config.prior.class_images)
                assert len(list(class_images.glob("*.png"))) >= config.prior.num_class_images, recipe.name

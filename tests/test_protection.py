"""What sdft protects: run folders, resume, checkpoints on a full disk or Ctrl-C, and one-line errors that
leave the user's files as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import UserError
from finetune.cli import main


def _lora(images: Path, out: Path, *extra: str) -> list[str]:
    return ["lora", "--images", str(images), "--token", "sks", "--steps", "2", "--output", str(out),
            "--sample-seeds", "0", "--sample-steps", "1", *extra]


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash: equal fingerprints = nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("sdft: ")]  # progress bars may come before
    assert len(said) == 1 and "Traceback" not in err, err
    return said[0]


@pytest.fixture()
def finished_run(tmp_path, star_images):
    """A finished 2-step LoRA run with a checkpoint at each step."""
    out = tmp_path / "run"
    assert main(_lora(star_images, out, "--checkpoint-every", "1")) == 0
    return out


def test_a_folder_holding_a_run_is_refused_then_overwritten_on_request(finished_run, star_images, capsys):
    before = _fingerprint(finished_run)
    message = _one_line_error(capsys, _lora(star_images, finished_run, "--rank", "8"))
    assert str(finished_run) in message and "--resume latest" in message and "--overwrite" in message
    assert _fingerprint(finished_run) == before

    (finished_run / "notes.txt").write_text("the user's own file")
    inside = finished_run / "my_images"
    shutil.copytree(star_images, inside)
    assert "input" in _one_line_error(capsys, _lora(inside, finished_run, "--overwrite"))
    assert main(_lora(star_images, finished_run, "--rank", "8", "--overwrite")) == 0
    assert not (finished_run / "checkpoints").exists(), "the older run's checkpoints survived --overwrite"
    assert (finished_run / "notes.txt").read_text() == "the user's own file" and (inside / "00.png").is_file()
    saved = (finished_run / "config.yaml").read_text()
    assert "rank: 8" in saved and "overwrite: false" in saved  # re-running config.yaml never clears a folder


def test_overwrite_keeps_the_new_pivotal_phase(tmp_path, star_images):
    """--overwrite clears the older run once, before phase 1 writes: the new run keeps its own pivotal/."""
    out = tmp_path / "run"
    argv = _lora(star_images, out, "--pivotal-steps", "2", "--pivotal-init-word", "star")
    argv[argv.index("sks")] = "<sks>"
    assert main([*argv, "--checkpoint-every", "1"]) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "pivotal" / "summary.json").is_file() and (out / "learned_embeds.safetensors").is_file()
    assert not (out / "checkpoints").exists()


def test_resume_refuses_other_settings_and_fewer_steps(finished_run, star_images, capsys):
    before = _fingerprint(finished_run)
    message = _one_line_error(capsys, _lora(star_images, finished_run, "--resume", "latest", "--rank", "8",
                                            "--checkpoint-every", "1"))
    assert "lora.rank: 4 -> 8" in message
    message = _one_line_error(capsys, [*_lora(star_images, finished_run, "--resume", "latest"), "--steps", "1"])
    assert "--steps 1 is below" in message and "step-2" in message
    older = str(finished_run / "checkpoints" / "step-1")
    assert "later checkpoints (step-2)" in _one_line_error(capsys, _lora(star_images, finished_run, "--resume", older))
    assert _fingerprint(finished_run) == before  # config.yaml included: a failed start rewrites nothing

    # More steps with the same settings: resumes from step 2.
    assert main([*_lora(star_images, finished_run, "--resume", "latest", "--checkpoint-every", "1"),
                 "--steps", "3"]) == 0
    assert json.loads((finished_run / "summary.json").read_text())["steps"] == 3


def test_resume_latest_without_a_checkpoint_asks_for_a_choice(tmp_path, star_images, capsys):
    out = tmp_path / "new"
    message = _one_line_error(capsys, _lora(star_images, out, "--resume", "latest"))
    assert "no checkpoint" in message and "drop --resume" in message
    assert not out.exists()


def test_bad_settings_fail_before_the_model_loads(tmp_path, star_images, capsys):
    out = tmp_path / "out"
    assert "multiple of 8" in _one_line_error(capsys, _lora(star_images, out, "--resolution", "63"))
    assert "lora.rank" in _one_line_error(capsys, _lora(star_images, out, "--rank", "0"))
    assert "lora.alpha" in _one_line_error(capsys, _lora(star_images, out, "--alpha", "-1"))
    assert "sample_steps" in _one_line_error(capsys, _lora(star_images, out, "--sample-steps", "0"))
    assert not out.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\ntrain:\n  steps: true\n")
    assert "train.steps=True: expected int" in _one_line_error(capsys, ["train", str(recipe)])
    recipe.write_text("- method: lora\n")
    assert "mapping of sections" in _one_line_error(capsys, ["train", str(recipe)])


@pytest.mark.parametrize("argv, needle", [
    (["--num-images", "0"], "--num-images"),
    (["--steps", "0"], "--steps"),
    (["--resolution", "63"], "multiple of 8"),
    (["--output", "{tmp}/grid.txt"], "image file"),
    (["--output", "{tmp}/missing/grid.png"], "folder does not exist"),
    (["--adapter", "{tmp}/nothing.safetensors"], "not found"),
])
def test_generate_arguments_are_checked_before_loading(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    full = ["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), *argv]
    assert needle in _one_line_error(capsys, full)


def test_broken_files_are_one_line_errors_and_debug_shows_the_traceback(tmp_path, capsys):
    import shutil

    from finetune.models import tiny_base_folder

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    png = str(tmp_path / "x.png")
    assert "not a readable .safetensors" in _one_line_error(
        capsys, ["generate", "--prompt", "x", "--adapter", str(damaged), "--output", png])
    assert "not a readable .safetensors" in _one_line_error(
        capsys, ["generate", "--prompt", "x", "--model", str(damaged), "--output", png])
    partial = tmp_path / "partial"
    shutil.copytree(tiny_base_folder(), partial)
    shutil.rmtree(partial / "unet")
    assert "lacks unet/" in _one_line_error(capsys, ["generate", "--prompt", "x", "--model", str(partial),
                                                    "--output", png])
    # A LoRA made for SD 1.5 (320-wide attention) on the toy base (64 wide): both shapes named.
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    from safetensors.torch import save_file

    other = tmp_path / "sd15_lora.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 320), f"{stem}.lora_up.weight": torch.zeros(320, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(other))
    message = _one_line_error(capsys, ["generate", "--prompt", "x", "--adapter", str(other), "--output", png])
    assert "does not fit this base" in message and "[4, 320]" in message and "[4, 64]" in message
    with pytest.raises(UserError):
        main(["--debug", "generate", "--prompt", "x", "--adapter", str(damaged), "--output", png])


@pytest.mark.parametrize("writer_error", ["oserror", "safetensors"])
def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoint(tmp_path, star_images, capsys, monkeypatch,
                                                                      writer_error):
    """The disk fills while the second checkpoint is written (each writer reports it its own way)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, calls = safetensors.torch.save_file, []

    def fill_up(tensors, filename, *args, **kwargs):
        if Path(filename).name == "adapter.safetensors":
            calls.append(filename)
            if len(calls) == 2:
                real_save({k: v[:0] for k, v in tensors.items()}, filename)  # a fragment is on disk already
                if writer_error == "oserror":
                    raise OSError(errno.ENOSPC, "No space left on device", filename)
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up)
    out = tmp_path / "out"
    message = _one_line_error(capsys, [*_lora(star_images, out, "--checkpoint-every", "1"), "--steps", "3"])
    assert "step 2" in message and "no space left" in message and "step-1" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no .tmp-step-2 left behind
    assert json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())["step"] == 1


def test_ctrl_c_saves_the_current_step_and_resume_continues(tmp_path, star_images, capsys, monkeypatch):
    from finetune.batching import InstanceBatches

    real_captions, seen = InstanceBatches.captions, []

    def press_ctrl_c_in_step_2(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            signal.raise_signal(signal.SIGINT)  # the handler only flags it: step 2 still finishes
        return real_captions(self, *args, **kwargs)

    monkeypatch.setattr(InstanceBatches, "captions", press_ctrl_c_in_step_2)
    out = tmp_path / "out"
    argv = [*_lora(star_images, out), "--steps", "4"]  # no --checkpoint-every: Ctrl-C still saves one
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 4" in err and "step-2" in err and "--resume latest" in err
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(InstanceBatches, "captions", real_captions)
    assert main([*argv, "--resume", "latest"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_failing_final_sample_grid_does_not_cost_the_exports(tmp_path, star_images, monkeypatch):
    import finetune.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(trainer, "_write_samples", broken)
    out = tmp_path / "out"
    assert main(_lora(star_images, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] is None
    assert all(Path(p).is_file() for paths in summary["exports"].values() for p in paths)


def test_sixteen_bit_images_keep_their_brightness(tmp_path):
    from finetune.data import open_rgb

    dark = np.full((8, 8), 4112, dtype=np.uint16)  # 4112 / 65535 = 16 / 255: a near-black 16-bit image
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert Image.open(tmp_path / "dark.png").mode.startswith("I")
    assert open_rgb(tmp_path / "dark.png").getpixel((0, 0)) == (16, 16, 16)


def test_captions_bom_encoding_and_length(tmp_path, caplog):
    from finetune.data import load_examples, warn_long_captions
    from finetune.tokenizer import build_clip_tokenizer

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa photo of {token}".encode("utf-8"))
    [example] = load_examples(str(tmp_path), "x", "sks", "")
    assert example.caption == "a photo of sks"

    long_caption = "a photo of " + "very " * 80 + "sks"
    (tmp_path / "a.txt").write_text(long_caption)
    with caplog.at_level("WARNING"):
        warn_long_captions(load_examples(str(tmp_path), "x", "sks", ""), build_clip_tokenizer())
    assert "a.png" in caplog.text and "very sks" in caplog.text

    for text in (b"first line\nbad \xe9 byte\n", b"\xef\xbb\xbffirst line\nbad \xe9 byte\n"):
        (tmp_path / "a.txt").write_bytes(text)
        with pytest.raises(UserError, match=r"a\.txt:2: not UTF-8 text \(byte 0xe9\)"):
            load_examples(str(tmp_path), "x", "sks", "")


def test_link_loops_and_unreadable_files_are_counted_in_one_warning(tmp_path, caplog):
    from finetune.data import load_examples

    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with caplog.at_level("WARNING"):
        examples = load_examples(str(tmp_path), "x", "sks", "")
    assert [e.path.name for e in examples] == ["good.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 2 of 3" in warnings[0]
    assert "loop.png" in warnings[0] and "broken.png" in warnings[0]


# What AUTOMATIC1111's safe unpickler accepts in a zip-format .pt; the legacy (non-zip) format has no records.
A1111_ALLOWED_RECORD = ("data.pkl", "version", "data/")


def _a1111_would_accept(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return True  # torch's legacy serialization: one pickle stream, nothing else in the file
    names = [n.split("/", 1)[1] for n in zipfile.ZipFile(path).namelist()]
    return all(n in A1111_ALLOWED_RECORD[:2] or n.startswith(A1111_ALLOWED_RECORD[2]) for n in names)


@pytest.mark.parametrize("method, extra", [
    ("textual-inversion", ["--token", "<sks>", "--init-word", "star"]),
    ("hypernetwork", ["--token", "sks"]),
    ("lora", ["--token", "sks", "--train-text-encoder"]),
    ("dreambooth", ["--token", "sks", "--no-prior"]),
])
def test_shared_exports_load_everywhere_and_carry_no_local_paths(tmp_path, star_images, method, extra):
    from safetensors import safe_open

    out = tmp_path / "out"
    argv = [method, "--images", str(star_images), *extra, "--steps", "2", "--output", str(out),
            "--sample-seeds", "0", "--sample-steps", "1"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    if method == "hypernetwork":  # the safetensors twin is written only when asked for
        assert list(summary["exports"]) == ["a1111"] and summary["exports"]["a1111"][0].endswith(".pt")
    local = [str(tmp_path), str(star_images), os.environ["SDFT_HOME"], str(Path.home()) + "/"]
    mask = os.umask(0o022)
    os.umask(mask)
    exported = [Path(p) for paths in summary["exports"].values() for p in paths]
    files = [f for p in exported for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    for path in filter(Path.is_file, files):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, f"{path.name} is not readable like other files"
        if path.suffix == ".pt":
            assert _a1111_would_accept(path), f"{path.name} holds records A1111's safe loader refuses"
            loaded = torch.load(path, weights_only=True)
            assert isinstance(loaded, dict)
            text = json.dumps(loaded, default=str)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                text = json.dumps(handle.metadata())
        else:
            text = path.read_text(errors="replace")
        assert not [p for p in local if p in text], f"{path} names a local path"

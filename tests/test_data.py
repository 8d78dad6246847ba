"""Data loading and caption handling users rely on."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from finetune import UserError
from finetune.batching import CaptionOptions
from finetune.data import load_examples
from finetune.losses import per_sample_loss


def _png(path, colour=(200, 10, 10), mode="RGB", size=(8, 8)):
    Image.new(mode, size, colour).save(path)


def test_captions_from_files_metadata_and_template(tmp_path, caplog):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("a drawing of {token} {class}")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "{token}, red, square"}\n'
                                             '{"file_name": "a.png", "text": "ignored: a.txt wins"}\n')
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "notes.md").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        examples = load_examples(str(tmp_path), "a photo of {token} {class}", "sks", "dog")
    assert [e.path.name for e in examples] == ["a.png", "b.png", "c.png"]
    assert [e.caption for e in examples] == ["a drawing of sks dog", "sks, red, square", "a photo of sks dog"]
    assert [e.from_caption_file for e in examples] == [True, True, False]
    assert "broken.jpg" in caplog.text


def test_bad_metadata_line_is_a_clear_error(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(UserError, match="metadata.jsonl:1"):
        load_examples(str(tmp_path), "{token}", "sks", "")


def test_transparency_composited_on_white_and_exif_applied(tmp_path):
    _png(tmp_path / "clear.png", colour=(0, 0, 0, 0), mode="RGBA")
    rotated = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    by_name = {e.path.name: e.image for e in load_examples(str(tmp_path), "{token}", "sks", "")}
    assert by_name["clear.png"].getpixel((0, 0)) == (255, 255, 255)
    assert by_name["rotated.jpg"].size == (4, 8)


def test_caption_shuffle_keeps_leading_tags_and_dropout():
    caption = "sks, red, square, pink background, small"
    shuffle = CaptionOptions(shuffle=True, keep_tokens=1)
    seen = {shuffle.apply(caption, torch.Generator().manual_seed(seed)) for seed in range(20)}
    assert len(seen) > 1 and all(s.startswith("sks, ") for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    same = shuffle.apply(caption, torch.Generator().manual_seed(3))
    assert same == shuffle.apply(caption, torch.Generator().manual_seed(3))  # reproducible for exact resume
    assert CaptionOptions(dropout=1.0).apply(caption, torch.Generator()) == ""
    assert CaptionOptions(dropout=0.0).apply(caption, torch.Generator()) == caption


def test_loss_choices():
    pred, target = torch.zeros(2, 3), torch.tensor([[0.05, -0.05, 0.05], [2.0, -2.0, 2.0]])
    torch.testing.assert_close(per_sample_loss(pred, target, "l2"), torch.tensor([0.0025, 4.0]))
    torch.testing.assert_close(per_sample_loss(pred, target, "l1"), torch.tensor([0.05, 2.0]))
    # Huber: quadratic below delta, linear above it (so outliers pull less than with l2).
    torch.testing.assert_close(per_sample_loss(pred, target, "huber", 0.1),
                               torch.tensor([0.5 * 0.05 ** 2, 0.1 * (2.0 - 0.05)]))


def test_small_images_are_named_in_a_warning(tmp_path, caplog):
    from finetune.data import warn_small_images

    _png(tmp_path / "tiny.png", size=(16, 16))
    _png(tmp_path / "big.png", size=(64, 80))
    with caplog.at_level(logging.WARNING):
        warn_small_images(load_examples(str(tmp_path), "{token}", "sks", ""), 64)
    assert "tiny.png" in caplog.text and "big.png" not in caplog.text

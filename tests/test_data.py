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


def test_cmyk_palette_and_16_bit_images_become_rgb(tmp_path):
    import numpy as np

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.png")
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    by_name = {e.path.name: e.image for e in load_examples(str(tmp_path), "{token}", "sks", "")}
    assert all(image.mode == "RGB" for image in by_name.values())
    red, green, blue = by_name["cmyk.jpg"].getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60
    deep = np.asarray(by_name["deep.png"])[..., 0]
    # 16-bit values are scaled by the bit depth, not clipped: the ramp stays a ramp.
    assert deep[0, 0] == 0 and deep[7, 7] == round(63000 / 65535 * 255) and len(np.unique(deep)) > 32


def test_alpha_mask_keeps_transparency_as_a_loss_mask(tmp_path):
    """--alpha-mask: transparent pixels are masked out of the loss, at the latent grid's resolution."""
    from finetune.batching import InstanceBatches
    from finetune.models import load_components

    image = Image.new("RGBA", (64, 64), (200, 10, 10, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is transparent
    image.save(tmp_path / "half.png")
    example = load_examples(str(tmp_path), "{token}", "sks", "", keep_alpha=True)[0]
    assert example.image.mode == "RGBA"
    assert example.image.getpixel((0, 0)) == (255, 255, 255, 0)  # colour composited on white, alpha kept
    assert load_examples(str(tmp_path), "{token}", "sks", "")[0].image.mode == "RGB"

    components = load_components("tiny")
    batches = InstanceBatches([example], components.vae, components.vae_scale, 64, center_crop=True,
                              random_flip=False, cache_latents=True, device="cpu", dtype=torch.float32)
    specs = batches.specs(0, 0, 1, 0, 1)
    latents, masks = batches.latents_and_masks(specs)
    assert masks.shape == (1, 1, *latents.shape[-2:])
    assert torch.all(masks[..., :8] == 0) and torch.all(masks[..., 8:] == 1)  # 16 latent columns, half each

    pred, target = torch.zeros_like(latents), torch.ones_like(latents)
    changed = pred.clone()
    changed[..., :8] = 5.0  # a different prediction where the image was transparent...
    for kind in ("l2", "l1", "huber"):
        assert torch.equal(per_sample_loss(pred, target, kind, mask=masks),
                           per_sample_loss(changed, target, kind, mask=masks))  # ...costs nothing
    assert per_sample_loss(pred, target, "l2", mask=masks).item() == pytest.approx(0.5)


def test_alpha_mask_run_trains_only_on_the_opaque_part(tmp_path, star_images):
    """A run with --alpha-mask on RGBA images finishes and learns something else than one without."""
    from conftest import make_config
    from finetune.trainer import run_training

    images = tmp_path / "rgba"
    images.mkdir()
    for path in sorted(star_images.glob("*.png"))[:2]:
        rgba = Image.open(path).convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        alpha.paste(255, (16, 16, 48, 48))
        rgba.putalpha(alpha)
        rgba.save(images / path.name)
    states = {}
    for masked in (False, True):
        config = make_config("lora", tmp_path / f"run-{masked}", images=images, **{
            "data.alpha_mask": masked, "train.lr": 1e-2, "output.formats": ["kohya"]})
        outcome = run_training(config)
        assert torch.isfinite(torch.tensor(outcome.summary["final_loss"]))
        states[masked] = outcome.strategy.state_dict()
    assert any(not torch.equal(states[False][k], states[True][k]) for k in states[False])


def test_mask_file_is_the_loss_mask_and_not_an_image(tmp_path):
    """NAME-masklabel.png beside an opaque image becomes its loss mask; the photo keeps its own colours."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    image.save(tmp_path / "photo.png")
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))  # learn the right half only
    mask.save(tmp_path / "photo-masklabel.png")
    masked = load_examples(str(tmp_path), "{token}", "sks", "", keep_alpha=True)
    assert [e.path.name for e in masked] == ["photo.png"]  # the mask is not a training image
    assert masked[0].image.getpixel((0, 0)) == (128, 128, 128, 0)  # gray kept (alpha would composite on white)
    assert masked[0].image.getpixel((40, 0)) == (128, 128, 128, 255)
    plain = load_examples(str(tmp_path), "{token}", "sks", "")
    assert [e.path.name for e in plain] == ["photo.png"] and plain[0].image.mode == "RGB"

    Image.new("L", (32, 32), 255).save(tmp_path / "photo-masklabel.png")
    with pytest.raises(UserError, match="mask is 32x32 px"):
        load_examples(str(tmp_path), "{token}", "sks", "", keep_alpha=True)


def test_unmasked_weight_one_trains_as_without_a_mask(tmp_path, star_images):
    """--unmasked-weight 1 gives the masked-out cells full weight: bit-identical to a run without masks; 0 is not."""
    from conftest import make_config
    from finetune.trainer import run_training

    images = tmp_path / "masked"
    images.mkdir()
    for path in sorted(star_images.glob("*.png"))[:2]:
        Image.open(path).convert("RGB").save(images / path.name)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        mask.save(images / (path.stem + "-masklabel.png"))
    states = {}
    for name, dotted in (("plain", {}), ("weight1", {"data.alpha_mask": True, "data.unmasked_weight": 1.0}),
                         ("weight0", {"data.alpha_mask": True, "data.unmasked_weight": 0.0})):
        config = make_config("lora", tmp_path / name, images=images, **{
            **dotted, "train.lr": 1e-2, "output.formats": ["kohya"]})
        states[name] = run_training(config).strategy.state_dict()
    assert all(torch.equal(states["plain"][k], states["weight1"][k]) for k in states["plain"])
    assert any(not torch.equal(states["plain"][k], states["weight0"][k]) for k in states["plain"])
    with pytest.raises(UserError, match="data.unmasked_weight must be between 0 and 1"):
        make_config("lora", tmp_path / "bad", images=images, **{"data.unmasked_weight": 2.0}).validate()


def test_hf_dataset_saved_to_disk(tmp_path):
    """An HF `datasets` image data set on disk trains like a folder: images decoded, captions from its column."""
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    pictures = []
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        _png(tmp_path / f"{i}.png", colour=colour)
        pictures.append(str(tmp_path / f"{i}.png"))
    data = Dataset.from_dict({"image": pictures, "text": ["{token} in red", ""]}).cast_column("image", ImageFeature())
    DatasetDict({"train": data}).save_to_disk(str(tmp_path / "ds"))
    examples = load_examples(str(tmp_path / "ds"), "a photo of {token}", "sks", "")
    assert [e.caption for e in examples] == ["sks in red", "a photo of sks"]
    assert [e.from_caption_file for e in examples] == [True, False]
    assert examples[1].image.getpixel((0, 0)) == (10, 200, 10)
    Dataset.from_dict({"label": [1]}).save_to_disk(str(tmp_path / "no-images"))
    with pytest.raises(UserError, match="no image column"):
        load_examples(str(tmp_path / "no-images"), "{token}", "sks", "")


def test_example_photos_load_as_displayed(photos):
    """JPEG variants real photo folders hold (EXIF rotation, greyscale, CMYK, progressive) all load as RGB the
    way a viewer shows them; the EXIF-rotated one comes out portrait, as it was taken."""
    import numpy as np

    from lab.make_examples import PHOTOS, photo_like

    by_name = {e.path.name: e.image for e in load_examples(str(photos), "a photo of {token}", "sks", "")}
    assert len(by_name) == len(PHOTOS)
    for index, (width, height, _, _, _) in enumerate(PHOTOS):
        image = by_name[f"{index:02d}.jpg"]
        assert image.mode == "RGB" and image.size == (width, height)
        pixels = np.asarray(image).astype(int)
        assert pixels.std() > 10, "the photo decoded to a flat image"
    # Turned back the right way (not only the right size): close to the picture before it was stored rotated.
    drawn = np.asarray(photo_like(*PHOTOS[1][:2], seed=1)).astype(int)
    assert np.abs(np.asarray(by_name["01.jpg"]).astype(int) - drawn).mean() < 8

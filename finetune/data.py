"""Instance data: image folders with optional captions, turned into fixed-size training tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# A loss mask beside an image ("dog1.jpg" -> "dog1-masklabel.png"; white = learn), as OneTrainer names them.
MASK_SUFFIX = "-masklabel.png"
CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass
class Example:
    """One training image (RGB, PIL) and its caption."""

    path: Path
    image: object
    caption: str
    from_caption_file: bool = False  # caption files win over a strategy's prompt templates
    concept: int = 0  # which of the run's data sets it belongs to (finetune.concepts)
    token: str | None = None  # its data set's trigger word and class for prompt templates (None: the run's)
    class_word: str | None = None


def format_prompt(template: str, token: str, class_word: str) -> str:
    """Fill `{token}` and `{class}` and tidy the spaces an empty class word leaves behind."""
    text = template.replace("{token}", token).replace("{class}", class_word)
    return " ".join(text.split())


def open_rgb(path, keep_alpha: bool = False):
    """Open an image as RGB with EXIF orientation applied and transparency composited on white.

    With keep_alpha the result is RGBA: the composited colours plus the original alpha (255 where the image
    has none), which training uses as a loss mask (--alpha-mask).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        if keep_alpha:
            rgb.putalpha(rgba.getchannel("A"))
        return rgb
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (PIL opens 16-bit PNGs as I;16 or I): scale by the bit depth, never by the image's
        # own maximum, so a dark image stays dark; a plain convert would clip everything to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 65535.0 * 255.0), 0, 255).astype("uint8")
        img = Image.fromarray(arr, "L")
    return img.convert("RGBA") if keep_alpha else img.convert("RGB")


def mask_file_for(image_path: Path) -> Path:
    """Where the loss mask of an image lives: NAME-masklabel.png beside it."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def apply_mask_file(image, image_path: Path):
    """Replace an RGBA image's alpha by the mask file beside it (greyscale, white = learn), if there is one.

    A mask file lets an opaque photo keep its real background colours while only the subject is learned (alpha
    alone cannot: transparent pixels are composited on white)."""
    from PIL import Image

    mask_path = mask_file_for(image_path)
    if not mask_path.is_file():
        return image
    with Image.open(mask_path) as mask:
        mask = mask.convert("L")
    if mask.size != image.size:
        raise UserError(f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px, its image "
                        f"{image_path.name} is {image.size[0]}x{image.size[1]}")
    image.putalpha(mask)
    return image


def warn_small_images(examples: list[Example], resolution: int) -> None:
    """Name the images that training will upscale (their short side is below the resolution)."""
    small = [e.path.name for e in examples if min(e.image.size) < resolution]
    if small:
        log.warning("%d image(s) smaller than %d px will be upscaled (blurry results): %s", len(small), resolution,
                    ", ".join(small[:5]) + (" ..." if len(small) > 5 else ""))


def warn_long_captions(examples: list[Example], tokenizer) -> None:
    """Name each caption the text encoder's window cuts, with the words it loses (a late trigger word dies)."""
    from .tokenizer import words_past_the_window

    cut = [(e.path.name, lost) for e in examples if (lost := words_past_the_window(tokenizer, e.caption))]
    for name, lost in cut[:5]:
        log.warning("caption of %s is longer than the text encoder's %d tokens; these words are not trained: %s",
                    name, tokenizer.model_max_length, lost)
    if len(cut) > 5:
        log.warning("... and %d more captions are cut the same way", len(cut) - 5)


def load_examples(folder: str | None, prompt_template: str, token: str, class_word: str,
                  flag: str = "--images", keep_alpha: bool = False) -> list[Example]:
    """Read every image in `folder` (an image folder or a `datasets` save_to_disk folder) with its caption;
    skip unreadable files with a warning."""
    if not folder:
        raise UserError(f"{flag} is required: a folder of training images")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    if is_saved_dataset(root):
        return load_dataset_examples(root, prompt_template, token, class_word, flag, keep_alpha)
    try:
        named = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.lower().endswith(MASK_SUFFIX))
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot list the folder ({exc.strerror or exc})") from exc
    skipped = [f"{p.name} (not a file: a folder, a broken link or a link loop)" for p in named if not p.is_file()]
    candidates = [p for p in named if p.is_file()]
    if not candidates:
        raise UserError(f"{flag} {folder}: no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))})"
                        + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    listed = read_metadata_jsonl(root)
    examples = []
    for path in candidates:
        try:
            image = open_rgb(path, keep_alpha)
        except Exception as exc:  # PIL raises many types for broken files
            skipped.append(f"{path.name} ({' '.join(str(exc).split()) or type(exc).__name__})")
            continue
        if keep_alpha:  # outside the try: a broken mask is an error to fix, not an image to skip silently
            image = apply_mask_file(image, path)
        caption = read_caption_file(path, token, class_word)
        if caption is None and path.name in listed:
            caption = format_prompt(listed[path.name], token, class_word)
        examples.append(Example(path, image, caption or format_prompt(prompt_template, token, class_word),
                                from_caption_file=caption is not None))
    if not examples:
        raise UserError(f"{flag} {folder}: none of the {len(named)} image files could be read: "
                        + ", ".join(skipped[:5]))
    if skipped:
        log.warning("%s %s: skipped %d of %d image files: %s", flag, folder, len(skipped), len(named),
                    ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return examples


CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def load_dataset_examples(root: Path, prompt_template: str, token: str, class_word: str, flag: str,
                          keep_alpha: bool = False) -> list[Example]:
    """Examples from an HF `datasets` image data set on disk: its first Image column, and a caption column
    named text/caption/prompt when there is one (its {token}/{class} are filled like caption files)."""
    import io

    from datasets import Image as ImageFeature
    from datasets import load_from_disk

    dataset = load_from_disk(str(root))
    if hasattr(dataset, "keys"):  # a DatasetDict: train on its "train" split (or its only one)
        splits = list(dataset.keys())
        dataset = dataset["train"] if "train" in splits else dataset[splits[0]]
    image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    if not image_columns:
        raise UserError(f"{flag} {root}: the data set has no image column (columns: {', '.join(dataset.features)})")
    caption_column = next((c for c in CAPTION_COLUMNS if c in dataset.features), None)
    # Decode to bytes ourselves so EXIF, alpha and 16-bit handling match image folders.
    raw = dataset.cast_column(image_columns[0], ImageFeature(decode=False))
    examples = []
    for index, row in enumerate(raw):
        name = f"{root.name}[{index}]"
        try:
            cell = row[image_columns[0]]
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
            image = open_rgb(source, keep_alpha)
        except Exception as exc:  # PIL raises many types for broken data
            log.warning("skipping unreadable image %s (%s)", name, exc)
            continue
        caption = row.get(caption_column) if caption_column else None
        examples.append(Example(root / name, image, format_prompt(caption or prompt_template, token, class_word),
                                from_caption_file=bool(caption)))
    if not examples:
        raise UserError(f"{flag} {root}: none of the {len(raw)} images could be read")
    return examples


def read_metadata_jsonl(folder: Path) -> dict[str, str]:
    """Captions from a `metadata.jsonl` ({"file_name": ..., "text": ...} per line), as HF imagefolder uses."""
    import json

    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file_name"]).name] = str(row["text"]).strip()
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{number}: expected {{\"file_name\": ..., \"text\": ...}} ({exc})") from exc
    return captions


def read_text_file(path: Path) -> str:
    """A caption or metadata file as text: UTF-8, a leading byte-order mark dropped (editors on Windows write
    one); anything else is a UserError naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts after the BOM
        line = data[:at].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x}); save it as UTF-8") from exc


def read_caption_file(image_path: Path, token: str, class_word: str) -> str | None:
    """The caption file beside the image (`.txt` or `.caption`, {token}/{class} filled), if any."""
    for suffix in CAPTION_SUFFIXES:
        caption_file = image_path.with_suffix(suffix)
        if caption_file.is_file():
            text = read_text_file(caption_file).strip()
            if text:
                return format_prompt(text, token, class_word)
    return None


def crop_box(image_size: tuple[int, int], resolution: int | tuple[int, int], center_crop: bool = True,
             generator=None) -> tuple[tuple[int, int], int, int]:
    """Where a training crop comes from: the (width, height) the image is resized to (covering `resolution`
    with its aspect ratio kept) and the crop's left and top in that resized image. A random crop draws its
    corner from `generator`."""
    import torch

    out_w, out_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    w, h = image_size
    scale = max(out_w / w, out_h / h)
    size = (max(out_w, round(w * scale)), max(out_h, round(h * scale)))
    if center_crop:
        return size, (size[0] - out_w) // 2, (size[1] - out_h) // 2
    left = int(torch.randint(0, size[0] - out_w + 1, (1,), generator=generator))
    top = int(torch.randint(0, size[1] - out_h + 1, (1,), generator=generator))
    return size, left, top


def size_condition(image_size: tuple[int, int], resolution: int | tuple[int, int], box, flip: bool):
    """SDXL's size conditioning of one crop (finetune.families.SizeCondition): the image's own size, the crop's
    top-left (mirrored when the crop is flipped, so it still names the part of the image the sample shows) and
    the target size."""
    from .families import SizeCondition

    out_w, out_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    (resized_w, _), left, top = box
    if flip:
        left = resized_w - left - out_w
    return SizeCondition((image_size[1], image_size[0]), (top, left), (out_h, out_w))


def centre_crop_size_condition(image_size: tuple[int, int], resolution: int | tuple[int, int], flip: bool = False):
    """size_condition() of the centre crop: the geometry of cached latents and of validation images."""
    return size_condition(image_size, resolution, crop_box(image_size, resolution), flip)


def to_training_tensor(image, resolution: int | tuple[int, int], center_crop: bool = True, flip: bool = False,
                       generator=None, box=None):
    """Resize to cover `resolution` (a square side, or a (width, height) bucket) keeping the aspect ratio,
    crop to it, optionally flip; float tensor in [-1, 1]. `box` (from crop_box) fixes the crop instead.

    An RGBA image gives 4 channels; the alpha channel goes through the same resize, crop and flip.
    """
    import numpy as np
    import torch
    from PIL import Image

    out_w, out_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    size, left, top = box or crop_box(image.size, resolution, center_crop, generator)
    img = image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
    img = img.crop((left, top, left + out_w, top + out_h))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()

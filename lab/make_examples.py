"""Draw the example data in data_examples/: star/ (a five-pointed star, 5 captioned images, the subject),
world/ (captioned renders of the toy world: the class images of the tiny recipes' prior) and photos/ (five
small JPEGs made like camera photos: odd sizes, an EXIF rotation, greyscale and CMYK, progressive encoding).

Run `python -m lab make-examples` to rebuild all three folders; the output is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
# (star colour, background name, background RGB, centre x, centre y, outer radius)
SCENES = [
    ((230, 40, 40), "white", (255, 255, 255), 32, 32, 22),
    ((230, 40, 40), "gray", (128, 128, 128), 24, 36, 16),
    ((230, 40, 40), "black", (0, 0, 0), 38, 28, 18),
    ((230, 40, 40), "pink", (255, 182, 193), 30, 30, 26),
    ((230, 40, 40), "white", (255, 255, 255), 40, 40, 14),
]


def star_points(cx: float, cy: float, outer: float, inner_ratio: float = 0.42) -> list[tuple[float, float]]:
    """Vertices of a five-pointed star, first point straight up."""
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else outer * inner_ratio
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def make_world_renders(folder: Path) -> None:
    """Captioned renders of the toy world, none of them one of the quality bench's drift probes.

    They play the part real class photos play on a real base (kohya's regularisation images): the toy base
    degrades when trained on its own generated samples (lab/FINDINGS.md), so its recipes use renders.
    """
    from lab.toyworld.bench import write_class_renders
    from lab.toyworld.settings import QualityBenchConfig

    # The bench's defaults, so these are the very images `python -m lab bench-quality` trains its prior on.
    bench = QualityBenchConfig()
    write_class_renders(folder, bench.class_images, probes=bench.class_prompts)


def make_star(folder: Path) -> None:
    """The example subject: a red five-pointed star on four backgrounds, captioned with {token}."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (colour, bg_name, bg, cx, cy, r) in enumerate(SCENES):
        # Draw at 4x and downsample so the edges are anti-aliased like a photo, not jagged.
        big = Image.new("RGB", (SIZE * 4, SIZE * 4), bg)
        ImageDraw.Draw(big).polygon(star_points(cx * 4, cy * 4, r * 4), fill=colour)
        big.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of {{token}} on a {bg_name} background\n")


# (width, height, JPEG mode, EXIF orientation or 0, progressive): the ways camera files differ from clean PNGs.
PHOTOS = [(301, 227, "RGB", 0, False), (211, 283, "RGB", 6, False), (256, 256, "L", 0, False),
          (240, 180, "CMYK", 0, False), (250, 250, "RGB", 0, True)]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A noisy outdoor-like picture: a sky gradient, textured ground and a soft brown subject in the middle."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([120 + 80 * y / height, 160 + 60 * y / height, 230 - 40 * y / height], -1)
    ground = np.stack([90 + 0 * y, 130 + 0 * y, 60 + 0 * y], -1) + rng.normal(0, 18, (height, width, 1))
    image = np.where((y > height * 0.6)[..., None], ground, sky)
    cx, cy, radius = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.45, 0.6), min(width, height) * 0.25
    subject = np.exp(-(((x - cx) ** 2 + ((y - cy) * 1.3) ** 2) / (2 * radius**2)))[..., None]
    image = image * (1 - subject) + np.array([150, 100, 60]) * subject + rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_photos(folder: Path) -> None:
    """Five uncaptioned JPEGs that exercise what real photos bring (about 60 KB in all)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height, mode, orientation, progressive) in enumerate(PHOTOS):
        # An EXIF-rotated file stores the picture turned the other way; viewers (and sdft) turn it back.
        stored = photo_like(width, height, seed=i)
        stored = stored.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else stored
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        stored.convert(mode).save(folder / f"{i:02d}.jpg", quality=85, exif=exif, progressive=progressive)


def main(root: Path = Path(__file__).resolve().parents[1] / "data_examples") -> None:
    """Rebuild every example folder under `root`."""
    make_world_renders(root / "world")
    make_star(root / "star")
    make_photos(root / "photos")

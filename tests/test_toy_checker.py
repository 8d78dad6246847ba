"""The toy-world checker reads renders right, survives blur and noise, and its star detector stays strict."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lab.toyworld import checker, world

ALL_SHAPES = world.SHAPES + world.NOVEL_SHAPES
SEEDS = (0, 1, 2)
RENDERS_PER_SEED = 100
SUPERSAMPLE = world.SUPERSAMPLE


def _noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """image plus gaussian pixel noise of sigma (0..255 units), clipped like a saved generation."""
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def renders() -> list[tuple[Image.Image, world.Scene]]:
    """300 random scenes over all five shapes, from several seeds."""
    out = []
    for seed in SEEDS:
        rng = random.Random(seed)
        for _ in range(RENDERS_PER_SEED):
            scene = world.random_scene(rng, shapes=ALL_SHAPES)
            out.append((world.render(scene), scene))
    return out


def _degraded(image: Image.Image, variant: str, noise_rng: np.random.Generator) -> Image.Image:
    if variant == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.8))
    if variant == "noise":
        return _noisy(image, 8.0, noise_rng)
    return image


@pytest.fixture(scope="module")
def verdicts(renders) -> dict[str, list[checker.Verdict]]:
    """The checker's verdict on every render, clean, blurred and noisy (checked once, shared by tests)."""
    noise_rng = np.random.default_rng(0)
    return {variant: [checker.check(_degraded(image, variant, noise_rng)) for image, _ in renders]
            for variant in ("clean", "blur", "noise")}


def _expected(scenes: list[world.Scene]) -> list[tuple[str, str, str]]:
    return [(s.colour, s.shape, s.background) for s in scenes]


@pytest.mark.parametrize("variant, minimum", [("clean", 0.99), ("blur", 0.95), ("noise", 0.95)])
def test_renders_are_read_right(renders, verdicts, variant, minimum):
    scenes = [scene for _, scene in renders]
    for field in ("background", "colour", "shape"):
        rate = np.mean([getattr(v, field) == getattr(s, field) for v, s in zip(verdicts[variant], scenes)])
        assert rate >= minimum, (variant, field, rate)


@pytest.mark.parametrize("variant", ["clean", "blur", "noise"])
def test_star_fires_exactly_on_stars(renders, verdicts, variant):
    fired = {shape: [v.star for v, (_, s) in zip(verdicts[variant], renders) if s.shape == shape]
             for shape in ALL_SHAPES}
    assert all(len(flags) > 30 for flags in fired.values())
    for shape in world.SHAPES:
        assert not any(fired[shape]), (variant, shape)
    assert all(fired["star"]), variant


@pytest.mark.parametrize("size", [22.0, 31.0, 38.5, 46.0])
def test_star_fires_on_every_colour_and_background(size):
    images = []
    for colour in world.COLOURS:
        for background in world.BACKGROUNDS:
            left = (world.IMAGE_SIZE - size) / 2 + 0.3  # off the pixel grid, like random positions
            scene = world.Scene("star", colour, background, (left, left - 0.6, left + size, left - 0.6 + size))
            images.append(world.render(scene))
    assert checker.star_rate(images) == 1.0
    assert all(checker.check(image).shape == "star" for image in images)


# --- negatives the strict star detector must refuse --------------------------------------------------------

def _drawn(draw_fn, background: str = "white", colour: tuple[int, int, int] = world.COLOURS["red"]) -> Image.Image:
    """An image drawn at 4x in 64 px coordinates and box-downsampled, the way the world renders."""
    big = Image.new("RGB", (world.IMAGE_SIZE * SUPERSAMPLE,) * 2, world.BACKGROUNDS[background])
    draw_fn(ImageDraw.Draw(big), colour, world.BACKGROUNDS[background])
    return big.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.Resampling.BOX)


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    s = SUPERSAMPLE
    draw.ellipse([s * (cx - rx), s * (cy - ry), s * (cx + rx), s * (cy + ry)], fill=fill)


def _star(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill) -> None:
    draw.polygon(world.shape_polygon("star", tuple(v * SUPERSAMPLE for v in box)), fill=fill)


def _blobs(count: int, seed: int) -> list[Image.Image]:
    """Irregular blobs: a few overlapping random ellipses around one centre."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        centre = (rng.uniform(20, 44), rng.uniform(20, 44))
        ellipses = [(centre[0] + rng.uniform(-8, 8), centre[1] + rng.uniform(-8, 8),
                     rng.uniform(4, 14), rng.uniform(4, 14)) for _ in range(rng.randint(3, 6))]

        def draw_fn(draw, colour, _background, ellipses=ellipses):
            for cx, cy, rx, ry in ellipses:
                _ellipse(draw, cx, cy, rx, ry, colour)

        images.append(_drawn(draw_fn, rng.choice(list(world.BACKGROUNDS)), rng.choice(list(world.COLOURS.values()))))
    return images


def test_star_refuses_blobs_and_noise():
    noise_rng = np.random.default_rng(1)
    scene_rng = random.Random(1)
    circles = [world.render(world.random_scene(scene_rng, shapes=("circle",))) for _ in range(20)]
    negatives = {
        "noisy circles": [_noisy(c, sigma, noise_rng) for c in circles for sigma in (8.0, 25.0, 50.0)],
        "two small circles": [_drawn(lambda d, c, _b, r=r: (_ellipse(d, 16, 32, r, r, c), _ellipse(d, 46, 32, r, r, c)))
                              for r in (5.0, 7.0, 9.0)],
        "random noise": [Image.fromarray(noise_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(10)],
        "blobs": _blobs(60, seed=2),
    }
    for name, images in negatives.items():
        assert checker.star_rate(images) == 0.0, name
    assert all(checker.check(image).shape is None for image in negatives["two small circles"])
    assert all(checker.check(image).shape is None for image in negatives["random noise"])


def test_star_must_be_one_clean_palette_coloured_piece():
    box = (12.0, 12.0, 52.0, 52.0)
    clean = _drawn(lambda d, c, _b: _star(d, box, c))
    with_hole = _drawn(lambda d, c, b: (_star(d, box, c), _ellipse(d, 32, 34, 3, 3, b)))
    with_fragment = _drawn(lambda d, c, _b: (_star(d, (4.0, 4.0, 38.0, 38.0), c), _ellipse(d, 52, 52, 6, 6, c)))
    off_palette = _drawn(lambda d, c, _b: _star(d, box, c), colour=(40, 200, 200))
    assert checker.check(clean) == checker.Verdict("white", "red", "star", True)
    assert not checker.check(with_hole).star
    assert checker.check(with_fragment).shape is None and not checker.check(with_fragment).star
    assert not checker.check(off_palette).star


@pytest.mark.parametrize("points", [4, 6])
def test_star_counts_five_points(points):
    def draw_fn(draw, colour, _background):
        centre, outer, inner = 32 * SUPERSAMPLE, 20 * SUPERSAMPLE, 8 * SUPERSAMPLE
        vertices = [(centre + (outer if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / points),
                     centre + (outer if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / points))
                    for k in range(2 * points)]
        draw.polygon(vertices, fill=colour)

    verdict = checker.check(_drawn(draw_fn))
    assert verdict.shape is None and not verdict.star


# --- pieces ------------------------------------------------------------------------------------------------

def test_empty_background_has_no_foreground():
    verdict = checker.check(Image.new("RGB", (64, 64), world.BACKGROUNDS["pink"]))
    assert verdict == checker.Verdict("pink", None, None, False)


def test_label_components_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one piece with 8-connectivity, two with 4
    mask[3:6, 3:6] = True
    _, sizes8 = checker.label_components(mask, connectivity=8)
    labels4, sizes4 = checker.label_components(mask, connectivity=4)
    assert sizes8.tolist() == [9, 2]
    assert sizes4.tolist() == [9, 1, 1]
    assert labels4[4, 4] == 0 and labels4[2, 2] == -1


def test_accuracy_and_star_rate_agree_with_check(renders, verdicts):
    images = [image for image, _ in renders[:40]]
    expected = _expected([scene for _, scene in renders[:40]])
    wrong_shape = [(c, "circle" if s != "circle" else "square", b) for c, s, b in expected]
    assert checker.accuracy(images, expected) == {"background": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0}
    assert checker.accuracy(images, wrong_shape) == {"background": 1.0, "colour": 1.0, "shape": 0.0, "all": 0.0}
    assert checker.star_rate(images) == np.mean([v.star for v in verdicts["clean"][:40]])
    assert checker.star_rate([]) == 0.0
    with pytest.raises(ValueError):
        checker.accuracy(images, expected[:2])

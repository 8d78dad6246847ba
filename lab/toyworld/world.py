"""Render toy-world images and caption them in varied phrasings.

One filled shape (circle, square, triangle, diamond) in one of six colours at a random position and size on
a plain background. Novel shapes the base never sees (a five-pointed star) exist for fine-tuning benchmarks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, like photos, not jagged pixel art

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128), "pink": (250, 175, 200)}
SHAPES = ("circle", "square", "triangle", "diamond")
NOVEL_SHAPES = ("star",)  # never in pretraining data

# {c} colour, {s} shape, {b} background. Some leave the colour or the background out (the model then
# picks one), some use the generic word "shape", so the base understands prompts the way a real one does.
CAPTION_TEMPLATES = (
    "a {c} {s} on a {b} background", "a photo of a {c} {s}", "a {c} {s}", "{c} {s}, {b} background",
    "a photo of a {c} {s} on a {b} background", "a {s} on a {b} background", "a picture of a {c} {s}",
    "a {c} {s} in front of a {b} background", "a {b} background with a {c} {s}", "a {s}",
    "a photo of a {s}", "a drawing of a {c} {s} on a {b} background", "a {c} shape on a {b} background",
    "a {c} shape", "a photo of a {c} {s}, {b} background", "{s}, {c}",
)


@dataclass(frozen=True)
class Scene:
    """What one image shows; its bounding box is in pixels of the 64 px image."""

    shape: str
    colour: str
    background: str
    box: tuple[float, float, float, float]  # left, top, right, bottom


def random_scene(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS), backgrounds=tuple(BACKGROUNDS),
                 min_size: float = 22, max_size: float = 46) -> Scene:
    """Pick a shape, colour, background, size and position (the shape lies fully inside the image)."""
    size = rng.uniform(min_size, max_size)
    left = rng.uniform(2, IMAGE_SIZE - 2 - size)
    top = rng.uniform(2, IMAGE_SIZE - 2 - size)
    return Scene(rng.choice(shapes), rng.choice(colours), rng.choice(backgrounds),
                 (left, top, left + size, top + size))


def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """The outline of a polygonal shape inside box (None for the circle, drawn as an ellipse)."""
    left, top, right, bottom = box
    cx, cy, half = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if shape == "square":
        inset = half * 0.12  # a square as large as a circle looks bigger; shrink it a little
        return [(left + inset, top + inset), (right - inset, top + inset), (right - inset, bottom - inset),
                (left + inset, bottom - inset)]
    if shape == "triangle":
        return [(cx, top), (right, bottom), (left, bottom)]
    if shape == "diamond":
        return [(cx, top), (right, cy), (cx, bottom), (left, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + half * 0.1))
        return points
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64 px RGB image."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    box = tuple(v * SUPERSAMPLE for v in scene.box)
    polygon = shape_polygon(scene.shape, box)
    if polygon is None:
        draw.ellipse(box, fill=COLOURS[scene.colour])
    else:
        draw.polygon(polygon, fill=COLOURS[scene.colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def caption(scene: Scene, rng: random.Random, main_rate: float = 0.0) -> str:
    """One caption of the scene in a randomly chosen phrasing.

    `main_rate` is the share of captions in the main phrasing (CAPTION_TEMPLATES[0], the checker's prompts);
    the rest are drawn from all templates. At 0 no extra random draw is made (the shipped base's stream)."""
    template = CAPTION_TEMPLATES[0] if main_rate and rng.random() < main_rate else rng.choice(CAPTION_TEMPLATES)
    return template.format(c=scene.colour, s=scene.shape, b=scene.background)


def world_prompts(template: str = CAPTION_TEMPLATES[0]) -> list[tuple[str, str, str, str]]:
    """Every (prompt, colour, shape, background) of the base's own world (96 prompts), in the main phrasing or in
    another template that names all three ({c}, {s} and {b})."""
    return [(template.format(c=c, s=s, b=b), c, s, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]

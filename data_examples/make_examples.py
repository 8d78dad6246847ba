"""Draw the example data: data_examples/star (a five-pointed star, 5 captioned images, the subject) and
data_examples/world (captioned renders of the toy world: the class images of the tiny recipes' prior).

Run `python data_examples/make_examples.py` to rebuild both folders; the output is deterministic.
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
    degrades when trained on its own generated samples (benchmarks/README.md), so its recipes use renders.
    """
    from finetune.toyworld.bench import write_class_renders
    from finetune.toyworld.settings import QualityBenchConfig

    # The bench's defaults, so these are the very images `sdft bench-quality` trains its prior on (~0.5 MB).
    bench = QualityBenchConfig()
    write_class_renders(folder, bench.class_images, probes=bench.class_prompts)


def main(folder: Path = Path(__file__).parent / "star") -> None:
    make_world_renders(folder.parent / "world")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (colour, bg_name, bg, cx, cy, r) in enumerate(SCENES):
        # Draw at 4x and downsample so the edges are anti-aliased like a photo, not jagged.
        big = Image.new("RGB", (SIZE * 4, SIZE * 4), bg)
        ImageDraw.Draw(big).polygon(star_points(cx * 4, cy * 4, r * 4), fill=colour)
        big.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of {{token}} on a {bg_name} background\n")


if __name__ == "__main__":
    main()

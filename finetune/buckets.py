"""Aspect-ratio bucketing: train each image at a size close to its own shape instead of a square crop.

Buckets are (width, height) pairs in multiples of `step` whose area is at most resolution^2, from 1:max_ratio
to max_ratio:1. Each image goes to the bucket nearest its aspect ratio (log-ratio distance); with
`no_upscale`, an image smaller than the target area gets its own bucket, its size rounded down to `step`.
Every batch is drawn from one bucket, so its latents stack.
"""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Every (w, h), multiples of step, with w*h <= resolution^2 and the largest h for each w."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_ratio:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], resolution: int, step: int,
                  no_upscale: bool = False) -> tuple[int, int]:
    """The bucket an image of `size` (w, h) trains at."""
    w, h = size
    if no_upscale and w * h < resolution * resolution:
        # Keep the image's own scale: the largest step-multiple size that fits inside it.
        return max(step, w // step * step), max(step, h // step * step)
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))

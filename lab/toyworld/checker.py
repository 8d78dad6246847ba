"""Analytic checker of toy-world images: which background, colour and shape an image shows.

Meant for images *generated* by a small diffusion model trained on the toy world, so everything is
tolerant of noise, blur, slightly-off colours and stray specks, yet refuses to name a shape when the
foreground is fragmented or tiny. The star detector is deliberately strict (one clean, hole-free,
palette-coloured component with five regular points): a loose one counts blobs and fragments as stars
and inflates the fine-tuning benchmark.

How: the background is the median of the outer 2 px frame; noisy images are smoothed a little first;
foreground is every pixel at least half-way from the background colour to the shape's colour; the largest
8-connected piece is the shape, classified from its bounding-box fill, centroid, convex-hull solidity,
row/column width profiles and, for the star, the radius of its outline around the centroid by angle.

Numpy and PIL only; connected components are labelled here (64 x 64 is small).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS, IMAGE_SIZE

# --- thresholds (distances are Euclidean in 0..255 RGB) -------------------------------------------------
BORDER_WIDTH = 2  # the outer frame the background is read from; random_scene keeps shapes 2 px inside
BORDER_AGREEMENT_DISTANCE = 40.0  # a border pixel "agrees" with the border median within this distance
BORDER_MIN_AGREEMENT = 0.8  # below this fraction of agreeing border pixels there is no plain background
NOISE_SMOOTHING_SIGMA = 4.0  # border noise (0..255 units) above which the image is smoothed before reading
CANDIDATE_DISTANCE = 40.0  # first pass: clearly not background (noise of sigma 8/255 stays far below)
MIN_FOREGROUND_DISTANCE = 30.0  # floor of the second-pass threshold, for foregrounds close to the background
MIN_SHAPE_PIXELS = 40  # a smaller main component is a speck, not a shape
MAX_SHAPE_SHARE = 0.5  # the largest world shape covers ~40% of the image; more is a failed segmentation
FRAGMENT_MIN_PIXELS = 15  # a second component this large means fragments; smaller ones are stray specks
MAX_ASPECT = 1.6  # bounding boxes of every world shape are about square
MAX_HOLE_PIXELS = 2  # strict star: interior background beyond single-pixel noise specks is a hole
STAR_MIN_FOREGROUND_SHARE = 0.95  # strict star: the star is (nearly) all the foreground, specks aside
PALETTE_MAX_DISTANCE = 60.0  # strict star: the foreground colour must be recognisably a palette colour

# Shape prototypes: (bounding-box fill ratio, vertical centroid as a fraction of the box height).
# Ideal values: circle pi/4, square 1, triangle and diamond 1/2; a triangle's centroid sits 2/3 down.
PROTOTYPES = {
    "circle": (0.785, 0.5),
    "square": (0.97, 0.5),
    "triangle": (0.5, 0.667),
    "diamond": (0.5, 0.5),
}
PROTOTYPE_MAX_DISTANCE = 0.14  # farther from every prototype than this: not a clean base shape
PROFILE_MAX_ERROR = 0.15  # renders stay below 0.11 (small triangles, blurred); half-filled blobs ~0.2
MIN_CONVEX_SOLIDITY = 0.85  # base shapes are convex; a generated one may be a little dented
STAR_MAX_SOLIDITY = 0.9  # an ideal star has ~0.52 (area / convex pentagon); small blurred ones reach ~0.82,
# fat generated ones ~0.88
STAR_MIN_SOLIDITY = 0.35  # far lower is a scribble, not a filled star

# Radial profile of the boundary around the centroid, used to count a star's points.
PROFILE_ANGLES = 180  # 2 degrees per sample
PROFILE_SMOOTHING = 5  # samples (10 degrees) of circular moving average against pixel stair-steps
PEAK_HALF_WINDOW = 9  # a peak is the highest sample within +-18 degrees (points are 72 degrees apart)
PEAK_MIN_PROMINENCE = 0.12  # ... and rises this fraction of the outer radius above the nearby valleys
STAR_MAX_RADIUS_RATIO = 0.75  # inner (valley) / outer (peak) radius; ideal star 0.42, square/diamond 0.71
# Regularity, measured on renders (clean, blurred up to sigma 1.2 px, noisy up to 16/255): gaps stay within
# 10 degrees of 72, the shortest point above 0.87 of the longest, the shallowest notch within 0.8 of the
# deepest. Lumpy five-lobed blobs miss at least one of these by far. Generated stars are less regular (one
# stubby point, uneven arms): on 100 LoRA samples whose sheet showed ~41 stars by eye, the render-tuned
# thresholds (prominence 0.2, peak ratio 0.8, gap 18, valley ratio 0.7, solidity 0.88) accepted 10; these
# accept 24 (21 of them among the 41), still with 0 false stars on 600 random blobs and 600 clean or blurred
# base shapes. So the detector remains a lower bound on what a person would call a star.
STAR_GAP_TOLERANCE = 24.0  # degrees a gap between neighbouring points may differ from 72
STAR_MIN_PEAK_RATIO = 0.6  # the shortest point reaches this fraction of the longest
STAR_MIN_VALLEY_RATIO = 0.6  # the deepest notch reaches this fraction of the shallowest notch's radius


@dataclass(frozen=True)
class Verdict:
    """What the checker sees in one image; None where it cannot tell."""

    background: str | None  # name from BACKGROUNDS, read from the border (None if the border is not plain)
    colour: str | None  # nearest COLOURS entry to the foreground's median colour (None if no foreground)
    shape: str | None  # one of SHAPES + NOVEL_SHAPES, or None when no clean shape is found
    star: bool  # strict: one hole-free palette-coloured component with five regular points


@dataclass(frozen=True)
class StarGeometry:
    """Points of the boundary's radial profile around the centroid."""

    peaks: int  # clear maxima of the boundary radius
    radius_ratio: float  # median valley radius / median peak radius (1.0 when there are no peaks)
    regular: bool  # points evenly spaced, of similar length, with notches of similar depth


# --- colours ---------------------------------------------------------------------------------------------

def _image_array(image: Image.Image) -> np.ndarray:
    """The image as a float (64, 64, 3) array; other sizes are resampled so pixel thresholds hold."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    """The palette entry closest to colour, and its distance."""
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - colour, axis=1)
    best = int(np.argmin(distances))
    return names[best], float(distances[best])


def _border_pixels(pixels: np.ndarray) -> np.ndarray:
    """The outer frame's pixels as an (n, 3) array."""
    frame = np.zeros(pixels.shape[:2], dtype=bool)
    frame[:BORDER_WIDTH], frame[-BORDER_WIDTH:] = True, True
    frame[:, :BORDER_WIDTH], frame[:, -BORDER_WIDTH:] = True, True
    return pixels[frame]


def _border_noise(pixels: np.ndarray) -> float:
    """Pixel noise sigma estimated on the border (median absolute deviation, robust to a shape touching it)."""
    border = _border_pixels(pixels)
    deviation = np.median(np.abs(border - np.median(border, axis=0)), axis=0)
    return float(1.4826 * deviation.mean())  # MAD to sigma for gaussian noise


def _smooth(pixels: np.ndarray) -> np.ndarray:
    """A 3 x 3 binomial blur: cuts pixel noise to ~0.4 sigma, so specks stop joining and breaking the shape.

    Only noisy images get it: it also rounds star tips a little, which costs small, already blurred stars."""
    weights = (0.25, 0.5, 0.25)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(w * padded[i:i + pixels.shape[0]] for i, w in enumerate(weights))
    return sum(w * rows[:, i:i + pixels.shape[1]] for i, w in enumerate(weights))


def _border_colour(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """The median border colour, and whether the border is mostly that one colour (a plain background)."""
    border = _border_pixels(pixels)
    median = np.median(border, axis=0)
    agreeing = np.linalg.norm(border - median, axis=1) <= BORDER_AGREEMENT_DISTANCE
    return median, bool(agreeing.mean() >= BORDER_MIN_AGREEMENT)


# --- connected components --------------------------------------------------------------------------------

def _neighbour_offsets(connectivity: int) -> list[tuple[int, int]]:
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return offsets


def _shifted(values: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """values moved so that out[y, x] = values[y + dy, x + dx] (fill outside the image)."""
    out = np.full_like(values, fill)
    height, width = values.shape
    out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
        values[max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)]
    return out


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Label mask's connected components: (labels with -1 off the mask, component sizes largest first).

    Minimum-label propagation with pointer jumping, all in numpy: each pixel starts as its own flat index,
    repeatedly takes the smallest label among its neighbours, then jumps to its label's label. Pointer
    jumping makes long components converge in a few dozen sweeps instead of one per pixel of length.
    Labels are renumbered 0, 1, ... by decreasing size.
    """
    height, width = mask.shape
    big = height * width  # larger than any flat index: the "no label" value for neighbours off the mask
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    offsets = _neighbour_offsets(connectivity)
    while True:
        smallest = labels.copy()
        for dy, dx in offsets:
            smallest = np.minimum(smallest, _shifted(labels, dy, dx, big))
        smallest = np.where(mask, smallest, big)
        flat = smallest.ravel()
        flat_with_sentinel = np.append(flat, big)
        for _ in range(4):  # pointer jumping: follow label -> label of that pixel
            flat = np.minimum(flat, flat_with_sentinel[flat])
            flat_with_sentinel[:-1] = flat
        updated = flat.reshape(height, width)
        if np.array_equal(updated, labels):
            break
        labels = updated
    roots, inverse, sizes = np.unique(labels[mask], return_inverse=True, return_counts=True)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    out = np.full(mask.shape, -1, dtype=np.int64)
    out[mask] = rank[inverse]
    return out, sizes[order]


def _fill_holes(component: np.ndarray) -> np.ndarray:
    """component with its holes filled: background not reachable from the image border is interior.

    Background uses 4-connectivity, the dual of the 8-connected foreground, so a diagonal gap in the
    outline does not let the outside leak in (and a diagonal chain of pixels does enclose)."""
    labels, _ = label_components(~component, connectivity=4)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border_labels[border_labels >= 0])
    return ~outside


# --- foreground ------------------------------------------------------------------------------------------

def _foreground(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Mask of the pixels far from the background colour.

    Two passes: pixels clearly off the background give a first foreground colour; then a pixel is
    foreground when it is at least half-way from the background to that colour. Anti-aliased edge pixels
    are blends, so half-way puts the outline where the shape's true edge is, whatever the contrast.
    """
    distance = np.linalg.norm(pixels - background, axis=2)
    candidates = distance > CANDIDATE_DISTANCE
    if not candidates.any():
        return candidates
    colour = np.median(pixels[candidates], axis=0)
    threshold = max(MIN_FOREGROUND_DISTANCE, 0.5 * float(np.linalg.norm(colour - background)))
    return distance > threshold


def _core_colour(pixels: np.ndarray, component: np.ndarray) -> np.ndarray:
    """Median colour of the component's interior (pixels whose 4 neighbours are in it too).

    The interior leaves out the anti-aliased rim, whose blends would pull the median toward the
    background on small shapes. Thin shapes with no interior fall back to all their pixels."""
    interior = component.copy()
    for dy, dx in _neighbour_offsets(4):
        interior &= _shifted(component.astype(np.int8), dy, dx, 0).astype(bool)
    chosen = interior if interior.sum() >= 10 else component
    return np.median(pixels[chosen], axis=0)


# --- geometry --------------------------------------------------------------------------------------------

def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of (x, y) points by Andrew's monotone chain, vertices in positive-cross-product order."""
    unique = np.unique(points, axis=0)
    if len(unique) < 3:
        return unique
    ordered = sorted(map(tuple, unique))

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    for p in ordered:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple] = []
    for p in reversed(ordered):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _row_extremes(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the leftmost and rightmost pixel of every row: the same convex hull as all pixels, cheaper."""
    rows = np.flatnonzero(mask.any(axis=1))
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    return np.concatenate([np.stack([left, rows], axis=1), np.stack([right, rows], axis=1)]).astype(np.float64)


def solidity(mask: np.ndarray) -> float:
    """Pixels in mask / pixel centres inside its convex hull (1.0 for any digitally convex shape).

    Counting hull lattice points, rather than the hull's area, avoids the half-perimeter bias that makes
    small convex shapes look non-convex."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return 1.0
    hull = _convex_hull(_row_extremes(mask))
    if len(hull) < 3:
        return 1.0
    gy, gx = np.mgrid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    inside = np.ones(gx.shape, dtype=bool)
    # The monotone chain walks the hull with positive cross products; inside points are left of every edge.
    for (x0, y0), (x1, y1) in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (x1 - x0) * (gy - y0) - (y1 - y0) * (gx - x0) >= -1e-9
    return float(len(xs) / max(1, inside.sum()))


def _box_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(bounding-box fill ratio, vertical centroid as a fraction of box height, aspect ratio >= 1)."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(xs) / (height * width)
    centroid = (ys.mean() - ys.min() + 0.5) / height
    return float(fill), float(centroid), float(max(height, width) / min(height, width))


def radial_profile(mask: np.ndarray, angles: int = PROFILE_ANGLES) -> np.ndarray:
    """Outer boundary radius around the centroid, per angle (angles evenly spaced from 0).

    Marches each ray outward in quarter-pixel steps and keeps the farthest sample inside the mask, then
    smooths circularly so pixel stair-steps do not look like points."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    theta = np.arange(angles) * (2 * math.pi / angles)
    radii = np.arange(0, IMAGE_SIZE * 1.5, 0.25)
    sample_y = np.rint(cy + np.outer(np.sin(theta), radii)).astype(int)
    sample_x = np.rint(cx + np.outer(np.cos(theta), radii)).astype(int)
    valid = (sample_y >= 0) & (sample_y < mask.shape[0]) & (sample_x >= 0) & (sample_x < mask.shape[1])
    hit = np.zeros(valid.shape, dtype=bool)
    hit[valid] = mask[sample_y[valid], sample_x[valid]]
    outer = np.where(hit.any(axis=1), radii[np.argmax(np.where(hit, radii, -1), axis=1)], 0.0)
    kernel = np.ones(PROFILE_SMOOTHING) / PROFILE_SMOOTHING
    padded = np.concatenate([outer[-PROFILE_SMOOTHING:], outer, outer[:PROFILE_SMOOTHING]])
    return np.convolve(padded, kernel, mode="same")[PROFILE_SMOOTHING:-PROFILE_SMOOTHING]


def _circular_window(values: np.ndarray, index: int, half: int) -> np.ndarray:
    return values[np.arange(index - half, index + half + 1) % len(values)]


def star_geometry(profile: np.ndarray) -> StarGeometry:
    """Count the clear points of a radial profile and measure how star-like they are."""
    n = len(profile)
    outer = float(profile.max())
    if outer <= 0:
        return StarGeometry(0, 1.0, False)
    peaks = []
    for i in range(n):
        window = _circular_window(profile, i, PEAK_HALF_WINDOW)
        # Highest in its window; among equal highs (flat or double tops) only the first one counts.
        if profile[i] < window.max() or np.any(window[:PEAK_HALF_WINDOW] >= profile[i]):
            continue
        valleys = _circular_window(profile, i, 2 * PEAK_HALF_WINDOW)
        if profile[i] - valleys.min() >= PEAK_MIN_PROMINENCE * outer:
            peaks.append(i)
    if not peaks:
        return StarGeometry(0, 1.0, False)
    peak_radii = profile[peaks]
    # The valley between neighbouring points is the lowest sample between them.
    valley_radii = []
    for a, b in zip(peaks, peaks[1:] + [peaks[0] + n]):
        valley_radii.append(profile[np.arange(a, b + 1) % n].min())
    ratio = float(np.median(valley_radii) / np.median(peak_radii))
    gaps_deg = np.diff(peaks + [peaks[0] + n]) * (360.0 / n)
    regular = bool(np.all(np.abs(gaps_deg - 360.0 / len(peaks)) <= STAR_GAP_TOLERANCE)
                   and peak_radii.min() >= STAR_MIN_PEAK_RATIO * peak_radii.max()
                   and min(valley_radii) >= STAR_MIN_VALLEY_RATIO * max(valley_radii))
    return StarGeometry(len(peaks), ratio, regular)


def _is_star_shaped(mask: np.ndarray, solid: float) -> bool:
    """Five evenly spaced, similar points with deep notches between them, and star-like solidity."""
    if not STAR_MIN_SOLIDITY <= solid <= STAR_MAX_SOLIDITY:
        return False
    geometry = star_geometry(radial_profile(mask))
    return geometry.peaks == 5 and geometry.regular and geometry.radius_ratio < STAR_MAX_RADIUS_RATIO


def _ideal_widths(shape: str, axis: str, t: np.ndarray) -> np.ndarray:
    """Row (axis "rows") or column widths, relative to the widest, of an ideal shape at t in (0, 1) across its box."""
    if shape == "circle":
        return np.sqrt(np.clip(1 - (2 * t - 1) ** 2, 0, 1))
    if shape == "square":
        return np.ones_like(t)
    if shape == "triangle" and axis == "rows":
        return t  # apex up: rows widen steadily downward
    if shape in ("triangle", "diamond"):
        return 1 - np.abs(2 * t - 1)  # a tent: widest through the apex / the middle
    raise ValueError(f"no width profile for {shape!r}")


def profile_error(mask: np.ndarray, shape: str) -> float:
    """Worst of the row and column width profiles' mean absolute difference from the ideal shape's.

    Fill ratio and centroid alone cannot tell a triangle or diamond from other half-filled blobs; the
    widths can: a triangle's rows grow steadily downward, a diamond's peak in the middle, both ways."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    errors = []
    for axis, widths in (("rows", box.sum(axis=1)), ("columns", box.sum(axis=0))):
        t = (np.arange(len(widths)) + 0.5) / len(widths)
        errors.append(np.mean(np.abs(widths / widths.max() - _ideal_widths(shape, axis, t))))
    return float(max(errors))


def _classify_convex(fill: float, centroid: float) -> str | None:
    """Nearest base-shape prototype by (fill, vertical centroid); None if none is close."""
    distances = {name: math.hypot(fill - f, centroid - c) for name, (f, c) in PROTOTYPES.items()}
    best = min(distances, key=distances.get)
    return best if distances[best] <= PROTOTYPE_MAX_DISTANCE else None


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape a clean, hole-filled component shows, or None."""
    fill, centroid, aspect = _box_features(mask)
    if aspect > MAX_ASPECT:
        return None
    solid = solidity(mask)
    # The star test comes first: a small, blurred star is rounded enough to reach a blob's solidity, but
    # only a star has five regular, deep points. Base shapes (solidity ~0.97-1.0) never get here.
    if _is_star_shaped(mask, solid):
        return "star"
    if solid < MIN_CONVEX_SOLIDITY:
        return None
    shape = _classify_convex(fill, centroid)
    if shape is None or profile_error(mask, shape) > PROFILE_MAX_ERROR:
        return None
    return shape


# --- the verdict -----------------------------------------------------------------------------------------

def _main_component(foreground: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """The largest foreground component, and whether it stands alone (no big fragments beside it)."""
    labels, sizes = label_components(foreground, connectivity=8)
    if len(sizes) == 0:
        return None, False
    alone = len(sizes) == 1 or sizes[1] < FRAGMENT_MIN_PIXELS
    return labels == 0, bool(alone)


def check(image: Image.Image) -> Verdict:
    """Background, colour and shape of a toy-world image, and whether it strictly shows a star."""
    pixels = _image_array(image)
    if _border_noise(pixels) > NOISE_SMOOTHING_SIGMA:
        pixels = _smooth(pixels)
    border, plain = _border_colour(pixels)
    background = _nearest(border, BACKGROUNDS)[0] if plain else None
    # The measured border colour (not its palette entry) is the reference: generated colours drift.
    foreground = _foreground(pixels, border)
    component, alone = _main_component(foreground)
    if component is None:
        return Verdict(background, None, None, False)
    colour_name, colour_distance = _nearest(_core_colour(pixels, component), COLOURS)
    # Without a plain background the foreground mask is meaningless (e.g. a noise image is "all shape").
    size = int(component.sum())
    if background is None or not alone or not MIN_SHAPE_PIXELS <= size <= MAX_SHAPE_SHARE * component.size:
        return Verdict(background, colour_name, None, False)
    filled = _fill_holes(component)
    shape = classify_shape(filled)
    hole_pixels = int(filled.sum() - component.sum())
    star = (shape == "star" and hole_pixels <= MAX_HOLE_PIXELS and colour_distance <= PALETTE_MAX_DISTANCE
            and size >= STAR_MIN_FOREGROUND_SHARE * foreground.sum())
    return Verdict(background, colour_name, shape, bool(star))


def accuracy(images: Sequence[Image.Image], expected: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Fractions of images whose background, colour, shape, and all three match (colour, shape, background)."""
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expectations")
    if not images:
        return {"background": 0.0, "colour": 0.0, "shape": 0.0, "all": 0.0}
    hits = np.zeros((len(images), 3), dtype=bool)
    for row, (image, (colour, shape, background)) in enumerate(zip(images, expected)):
        verdict = check(image)
        hits[row] = (verdict.background == background, verdict.colour == colour, verdict.shape == shape)
    rates = hits.mean(axis=0)
    return {"background": float(rates[0]), "colour": float(rates[1]), "shape": float(rates[2]),
            "all": float(hits.all(axis=1).mean())}


def star_rate(images: Sequence[Image.Image]) -> float:
    """Fraction of images the strict star detector accepts."""
    if not images:
        return 0.0
    return float(np.mean([check(image).star for image in images]))


__all__ = ["Verdict", "StarGeometry", "check", "accuracy", "star_rate", "classify_shape", "solidity",
           "radial_profile", "star_geometry", "profile_error", "label_components"]

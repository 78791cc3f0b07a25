"""A shape the `shapes` world never draws (a crescent), drawn in that world's style, and a
template-match reader that tells it from the six known shapes.

Concept fine-tuning teaches a model this shape from a few images; whether a generated image shows
it is read from pixels as the alignment checker reads the known shapes: the largest object's
mask and coverage (``checker``'s object finding), then the shape whose template, fitted to the
coverage's moments and blurred by the best of a few sigmas, reproduces it with the least error.
The crescent competes with the six known templates, so an image counts only if the new shape
explains it better than every shape the model already knew.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..datasets.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, check_choice, shape_coverage
from .checker import _BLURS, _EXACT, _as_rgb, _background, _cell_name, _colour_name, _coverage, _moments, _object_masks

NEW_SHAPE = "crescent"
_SUPERSAMPLE = 4  # as the dataset renders: 4x, then a box filter


def _crescent_points(n: int = 48) -> tuple[tuple[float, float], ...]:
    """A crescent opening to the right: the unit disc minus a disc of radius 0.8 centred at
    (0.6, 0); the two circles cross at (0.6, +-0.8). Stretched to fill the unit square, like
    every shape of the world."""
    start = math.atan2(0.8, 0.6)
    outer = [(math.cos(a), math.sin(a)) for a in np.linspace(start, 2 * math.pi - start, n)]
    inner = [(0.6 + 0.8 * math.cos(a), 0.8 * math.sin(a)) for a in np.linspace(1.5 * math.pi, 0.5 * math.pi, n)]
    points = outer + inner
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points)


_POLYGON = _crescent_points()


def new_shape_coverage(width: int, height: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Anti-aliased coverage (height, width) in [0, 1] of the crescent filling ``box`` (default: all),
    drawn as ``shapes.shape_coverage`` draws the known shapes."""
    s = _SUPERSAMPLE
    x0, y0, x1, y1 = box or (0, 0, width, height)
    canvas = Image.new("L", (width * s, height * s), 0)
    points = [((x0 + u * (x1 - x0)) * s - 0.5, (y0 + v * (y1 - y0)) * s - 0.5) for u, v in _POLYGON]
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0


def render_new_shape(color: str, cell: str, *, size: str = "large", background: str = "white",
                     canvas: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One crescent in the world's style: palette colour, 3x3 cell with jitter up to 1/12 of the
    canvas (``rng``; None: the cell centre), a margin of 1/16 canvas kept clear."""
    check_choice("color", color, COLORS)
    check_choice("cell", cell, POSITIONS)
    check_choice("size", size, SIZES)
    check_choice("background", background, BACKGROUNDS)
    if color == background:
        raise ValueError(f"a {color} shape on a {background} background would be invisible")
    row, col = POSITIONS[cell]
    cx, cy = (col + 0.5) * canvas / 3, (row + 0.5) * canvas / 3
    if rng is not None:
        cx, cy = cx + rng.uniform(-canvas / 12, canvas / 12), cy + rng.uniform(-canvas / 12, canvas / 12)
    half = SIZES[size] * canvas / 2
    lo, hi = half + canvas / 16, canvas - half - canvas / 16
    cx, cy = min(max(cx, lo), hi), min(max(cy, lo), hi)
    cover = new_shape_coverage(canvas, canvas, (cx - half, cy - half, cx + half, cy + half))[..., None]
    image = (1 - cover) * np.array(BACKGROUNDS[background]) + cover * np.array(COLORS[color])
    return Image.fromarray(np.round(image).astype(np.uint8))


# ----------------------------------------------------------------------------- reading


Coverage = Callable[[int, int, tuple[float, float, float, float]], np.ndarray]


def _templates() -> dict[str, Coverage]:
    known = {s: functools.partial(shape_coverage, s) for s in SHAPES}
    return {**known, NEW_SHAPE: new_shape_coverage}


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float, float, float, float]:
    n = 256
    cover = _templates()[shape](n, n, (0, 0, n, n)).astype(np.float64)
    grid = (np.arange(n) + 0.5) / n
    area = cover.sum()
    cu, cv = (cover.sum(0) @ grid) / area, (cover.sum(1) @ grid) / area
    var_u, var_v = (cover.sum(0) @ (grid - cu) ** 2) / area, (cover.sum(1) @ (grid - cv) ** 2) / area
    return area / n**2, cu, cv, var_u, var_v


def _template_error(shape: str, alpha: np.ndarray, moments: tuple, blur: float) -> float:
    """As ``checker._template_error``, for any of the seven templates."""
    area, cu, cv, var_u, var_v = _unit_moments(shape)
    mass, cx, cy, var_x, var_y = moments
    if mass <= 0 or not var_x > blur**2 or not var_y > blur**2:
        return math.inf
    w, h = math.sqrt((var_x - blur**2) / var_u), math.sqrt((var_y - blur**2) / var_v)
    scale = math.sqrt(mass / (area * w * h))
    w, h = w * scale, h * scale
    box = (cx - cu * w, cy - cv * h, cx - cu * w + w, cy - cv * h + h)
    template = _templates()[shape](alpha.shape[1], alpha.shape[0], box)
    if blur:
        template = ndimage.gaussian_filter(template, blur, mode="constant")
    return float(((template - alpha) ** 2).sum())


def fit_errors(alpha: np.ndarray) -> dict[str, float]:
    """Each template's least squared error (over the blurs) against a coverage map; stops at the
    first blur where some template is already near exact, as the checker does."""
    moments = _moments(alpha)
    errors = {s: math.inf for s in _templates()}
    if not float(alpha.sum()) > 0 or not np.isfinite(moments).all():
        return errors
    for blur in _BLURS:
        for shape in errors:
            errors[shape] = min(errors[shape], _template_error(shape, alpha, moments, blur))
        if min(errors.values()) < _EXACT * moments[0]:
            break
    return errors


def read_shape(image: Image.Image | np.ndarray) -> dict | None:
    """The largest object's shape (one of the six or the crescent), colour and cell; None when the
    image holds no object."""
    rgb = _as_rgb(image)
    background, bg = _background(rgb)
    masks = _object_masks(rgb, bg, background)
    if not masks:
        return None
    mask = max(masks, key=lambda m: int(m.sum()))
    others = np.logical_or.reduce([m for m in masks if m is not mask]) if len(masks) > 1 else np.zeros_like(mask)
    colour = _colour_name(rgb, mask, background)
    alpha, _, _ = _coverage(rgb, mask, others, bg, colour)
    errors = fit_errors(alpha)
    ys, xs = np.nonzero(mask)
    cell = _cell_name((float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), mask.shape[1], mask.shape[0])
    return {"shape": min(errors, key=errors.get), "color": colour, "cell": cell, "objects": len(masks),
            "errors": {k: round(v, 3) for k, v in errors.items()}}


def hit_rates(images: Sequence[Image.Image], color: str | None = None, cell: str | None = None) -> dict[str, float]:
    """Share of ``images`` whose largest object reads as the crescent ("shape"), and as the
    crescent in ``color`` at ``cell`` too ("all", when they are given)."""
    reads = [read_shape(im) for im in images]
    shape = [r is not None and r["shape"] == NEW_SHAPE for r in reads]
    right = [s and (color is None or r["color"] == color) and (cell is None or r["cell"] == cell)
             for s, r in zip(shape, reads)]
    return {"shape": sum(shape) / max(1, len(reads)), "all": sum(right) / max(1, len(reads)), "images": len(reads)}


__all__ = ["NEW_SHAPE", "fit_errors", "hit_rates", "new_shape_coverage", "read_shape", "render_new_shape"]

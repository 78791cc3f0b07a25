"""Geometry, layout and rendering of `shapes` scenes: unit polygons, anti-aliased coverage, object
placement per scene type, and drawing what an attribute dict (full or a prompt's subset) describes."""

from __future__ import annotations

import functools
import itertools
import math
import random
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from ._vocab import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Split,
    _check_object,
    _check_size,
    check_choice,
    relation_between,
    scene_of,
)

_SUPERSAMPLE = 4  # render at 4x and box-filter down: exact-enough anti-aliasing, fast enough to draw on the fly
_TRIES = 40  # layout attempts before falling back to a layout that is always valid
_DOMINANCE = 1.5  # a relation's axis offset must exceed the other axis' offset by this factor
_CELL_OF = {rc: name for name, rc in POSITIONS.items()}
_CORNERS = ("top left", "top right", "bottom left", "bottom right")
_RELATION_CELLS = {
    "left of": ("left", "right"), "right of": ("right", "left"),
    "above": ("top", "bottom"), "below": ("bottom", "top"),
}
_SPREAD_CELLS = {  # layouts that never touch, even for large objects
    1: ("center",), 2: ("left", "right"), 3: ("top left", "top right", "bottom"), 4: _CORNERS,
}

# ----------------------------------------------------------------------------- geometry


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon to fill the unit square, so every shape fills its bounding box."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    return tuple(((x - min(xs)) / w, (y - min(ys)) / h) for x, y in points)


def _star_points() -> list[tuple[float, float]]:
    """Regular 5-point star, apex up: inner/outer radius = 1/phi^2 (the pentagram's own ratio)."""
    radii = (1.0, 0.381966)
    angles = [math.radians(-90 + 36 * k) for k in range(10)]
    return [(radii[k % 2] * math.cos(a), radii[k % 2] * math.sin(a)) for k, a in enumerate(angles)]


def _heart_points(n: int = 72) -> list[tuple[float, float]]:
    """The classic parametric heart; y is negated because image y grows downwards."""
    ts = [2 * math.pi * k / n for k in range(n)]
    return [(16 * math.sin(t) ** 3,
             -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


def _cross_points() -> list[tuple[float, float]]:
    """Plus sign whose arms are 1/3 of its size wide."""
    a, b = 1 / 3, 2 / 3
    return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]


_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _normalise([(math.cos(math.pi * k / 48), math.sin(math.pi * k / 48)) for k in range(96)]),
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "star": _normalise(_star_points()),
    "cross": _normalise(_cross_points()),
    "heart": _normalise(_heart_points()),
}


def _polygon(shape: str, box: tuple[float, float, float, float], scale: int) -> list[tuple[float, float]]:
    """Vertices of `shape` filling `box`, in PIL coordinates of a canvas `scale` times larger.

    PIL puts pixel centres on integers, our pixels span [i, i+1), hence the half-pixel shift."""
    x0, y0, x1, y1 = box
    return [((x0 + u * (x1 - x0)) * scale - 0.5, (y0 + v * (y1 - y0)) * scale - 0.5)
            for u, v in _UNIT_POLYGONS[shape]]


def shape_coverage(shape: str, width: int, height: int,
                   box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Anti-aliased coverage (height, width) in [0, 1] of `shape` filling `box` (default: all).

    The alignment checker fits these to measured objects, so it compares against exactly what the
    dataset draws; `box` is continuous, so sub-pixel positions and sizes can be fitted."""
    check_choice("shape", shape, SHAPES)
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    ImageDraw.Draw(canvas).polygon(_polygon(shape, box or (0, 0, width, height), s), fill=255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0



# ----------------------------------------------------------------------------- sampling


@functools.cache
def _pair_pool(kind: Literal["train", "heldout", "any"], background: str) -> tuple[tuple[str, str], ...]:
    """(colour, shape) pairs allowed for `kind` on `background`; never the background's colour."""
    pairs = [(c, s) for c in COLORS for s in SHAPES if c != background]
    if kind == "any":
        return tuple(pairs)
    return tuple(p for p in pairs if (p in HELDOUT_PAIRS) == (kind == "heldout"))


def _cell_centre(cell: str, size: int) -> tuple[float, float]:
    row, col = POSITIONS[cell]
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def _place(rng: random.Random | None, cell: str, size_name: str, size: int) -> tuple[float, float]:
    """Cell centre plus jitter up to 1/12 canvas, clamped to keep 1/16 canvas of background around.

    The jitter is smaller than half a cell, so the centre never leaves its cell; the margin keeps the
    canvas border background, which is how a reader tells background from objects."""
    cx, cy = _cell_centre(cell, size)
    if rng is not None:
        cx, cy = cx + rng.uniform(-size / 12, size / 12), cy + rng.uniform(-size / 12, size / 12)
    half = SIZES[size_name] * size / 2
    lo, hi = half + size / 16, size - half - size / 16
    return round(min(max(cx, lo), hi), 2), round(min(max(cy, lo), hi), 2)


def _object(pair: tuple[str, str], size_name: str, cell: str, center: tuple[float, float], size: int) -> dict:
    half = SIZES[size_name] * size / 2
    x, y = center
    bbox = [round(x - half, 2), round(y - half, 2), round(x + half, 2), round(y + half, 2)]
    return {"color": pair[0], "shape": pair[1], "size": size_name, "cell": cell,
            "center": [x, y], "bbox": bbox}


def _apart(a: dict, b: dict, size: int) -> bool:
    """Bounding boxes separated by >= 1/16 canvas, so objects never touch even after a blur."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
    return gap >= size / 16


def _all_apart(objects: list[dict], size: int) -> bool:
    return all(_apart(a, b, size) for i, a in enumerate(objects) for b in objects[i + 1:])


def _clearly(a: dict, b: dict, relation: str) -> bool:
    """The relation holds along a clearly dominant axis, so no reader could call it the other."""
    dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
    major, minor = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    return relation_between(a["center"], b["center"]) == relation and abs(major) >= _DOMINANCE * abs(minor)


def _relation_cells(rng: random.Random, relation: str) -> tuple[str, str]:
    """Cells for A and B ordered along the relation's axis; the other coordinate is free."""
    lo, hi = sorted(rng.sample(range(3), 2))
    first, second = (lo, hi) if relation in ("left of", "above") else (hi, lo)
    free_a, free_b = rng.randrange(3), rng.randrange(3)
    if relation in ("left of", "right of"):
        return _CELL_OF[(free_a, first)], _CELL_OF[(free_b, second)]
    return _CELL_OF[(first, free_a)], _CELL_OF[(second, free_b)]


def _relation_pairs(rng: random.Random, kind: Split, background: str) -> list[tuple[str, str]]:
    """Two different (colour, shape) pairs; in the held-out split one of them is held out."""
    if kind == "train":
        return rng.sample(_pair_pool("train", background), 2)
    held = rng.choice(_pair_pool("heldout", background))
    other = rng.choice([p for p in _pair_pool("any", background) if p != held])
    return [held, other] if rng.random() < 0.5 else [other, held]


def _single_scene(rng: random.Random, kind: Split, background: str, size: int) -> tuple[list[dict], None]:
    pair = rng.choice(_pair_pool(kind, background))
    size_name, cell = rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS))
    return [_object(pair, size_name, cell, _place(rng, cell, size_name, size), size)], None


def _relation_scene(rng: random.Random, kind: Split, background: str, size: int) -> tuple[list[dict], str]:
    pairs, relation = _relation_pairs(rng, kind, background), rng.choice(RELATIONS)
    sizes = [rng.choice(tuple(SIZES)) for _ in pairs]
    for _ in range(_TRIES):
        cells = _relation_cells(rng, relation)
        objs = [_object(p, s, c, _place(rng, c, s, size), size) for p, s, c in zip(pairs, sizes, cells)]
        if _all_apart(objs, size) and _clearly(objs[0], objs[1], relation):
            return objs, relation
    cells = _RELATION_CELLS[relation]
    objs = [_object(p, s, c, _place(None, c, s, size), size) for p, s, c in zip(pairs, sizes, cells)]
    return objs, relation


def _count_scene(rng: random.Random, kind: Split, background: str, size: int,
                 count_layout: str = "any") -> tuple[list[dict], None]:
    """2-4 copies of one object at non-overlapping cells. With ``count_layout="distinct"`` fewer
    than four copies never sit in corners only: four large copies fit nowhere else, so the corner
    layout then means four and nothing less (with "any", three copies fill three corners in about
    half of the large scenes, one empty corner away from four)."""
    pair, size_name, n = rng.choice(_pair_pool(kind, background)), rng.choice(tuple(SIZES)), rng.randint(2, 4)
    distinct = count_layout == "distinct" and n < len(_CORNERS)
    for _ in range(_TRIES):
        cells = sorted(rng.sample(tuple(POSITIONS), n), key=POSITIONS.__getitem__)
        if distinct and set(cells) <= set(_CORNERS):
            continue
        objs = [_object(pair, size_name, c, _place(rng, c, size_name, size), size) for c in cells]
        if _all_apart(objs, size):
            return objs, None
    cells = _SPREAD_CELLS[n] if distinct else sorted(rng.sample(_CORNERS, n), key=POSITIONS.__getitem__)
    return [_object(pair, size_name, c, _place(None, c, size_name, size), size) for c in cells], None


_SCENE_SAMPLERS = {"single": _single_scene, "relation": _relation_scene}  # count scenes also take a layout
COUNT_LAYOUTS = ("any", "distinct")


def _sample_attributes(rng: random.Random, scene: str, kind: Split, size: int, count_layout: str = "any") -> dict:
    background = rng.choice(tuple(BACKGROUNDS))
    if scene == "count":
        objects, relation = _count_scene(rng, kind, background, size, count_layout)
    else:
        objects, relation = _SCENE_SAMPLERS[scene](rng, kind, background, size)
    return {"scene": scene, "canvas": size, "background": background, "objects": objects,
            "relation": relation, "count": len(objects)}



# ----------------------------------------------------------------------------- rendering


def _background_of(attributes: dict, objects: list[dict]) -> str:
    """The given background, or the first one no object's colour clashes with."""
    colours = {o["color"] for o in objects}
    background = attributes.get("background") or next(b for b in BACKGROUNDS if b not in colours)
    check_choice("background", background, BACKGROUNDS)
    if background in colours:
        raise ValueError(f"an object has the background's colour {background!r}; it would be invisible")
    return background


def _objects_to_render(attributes: dict) -> list[dict]:
    """The attributes' objects; a count scene given one object spec is expanded to `count` copies."""
    objects = attributes.get("objects")
    if not objects:
        raise ValueError("attributes need a non-empty 'objects' list")
    for obj in objects:
        _check_object(obj)
    count = attributes.get("count", len(objects))
    if scene_of(attributes) == "count" and len(objects) == 1 and count > 1:
        if count not in _SPREAD_CELLS:
            raise ValueError(f"can only lay out 1-4 copies of one object spec, got count={count}")
        keep = {k: v for k, v in objects[0].items() if k not in ("cell", "center", "bbox")}
        objects = [dict(keep) for _ in range(count)]
    return objects


def _default_cells(attributes: dict, n: int) -> tuple[str, ...]:
    """Where objects without a cell go: spread by the relation, or apart from each other."""
    relation = attributes.get("relation")
    if relation and n == 2:
        check_choice("relation", relation, RELATIONS)
        return _RELATION_CELLS[relation]
    if n in _SPREAD_CELLS:
        return _SPREAD_CELLS[n]
    return tuple(itertools.islice(itertools.cycle(POSITIONS), n))  # crowded: reading order


def _boxes(attributes: dict, objects: list[dict], size: int) -> list[tuple[float, float, float, float]]:
    """Each object's box on a `size` canvas; recorded centres are rescaled from `canvas`, missing
    ones sit at their cell's centre (kept off the border like dataset samples)."""
    scale = size / attributes.get("canvas", size)
    boxes = []
    for obj, cell in zip(objects, _default_cells(attributes, len(objects))):
        size_name = obj.get("size", "large")
        x, y = ((obj["center"][0] * scale, obj["center"][1] * scale) if "center" in obj
                else _place(None, obj.get("cell", cell), size_name, size))
        half = SIZES[size_name] * size / 2
        boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def render_scene(attributes: dict, size: int = 64) -> Image.Image:
    """Draw the scene `attributes` describe (full dataset attributes or a prompt's subset).

    Missing fields take defaults (size large, cell from the relation or spread apart, a background
    that does not clash), so evaluation can render what a prompt asks for."""
    _check_size(size)
    objects = _objects_to_render(attributes)
    background = _background_of(attributes, objects)
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj, box in zip(objects, _boxes(attributes, objects, size)):
        draw.polygon(_polygon(obj["shape"], box, s), fill=COLORS[obj["color"]])
    return canvas.resize((size, size), Image.Resampling.BOX)

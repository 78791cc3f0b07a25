"""The procedural `shapes` world (DESIGN §5): coloured shapes on plain backgrounds, with captions.

Why procedural: no image-caption set exists offline, and a world whose every attribute is known lets
evaluation check text-image alignment from pixels alone (`latentdit.evaluate`). Every sample is a
pure function of (seed, split, index), so any dataloader worker can draw any sample without shared
state, and the held-out (colour, shape) pairs measure compositional generalisation.

Coordinates are continuous pixels: pixel (i, j) covers [i, i+1) x [j, j+1); x grows to the right,
y grows downwards. An object's `bbox` is the box its shape fills, `center` the centre of that box.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "heldout"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES: dict[str, float] = {"small": 1 / 6, "large": 1 / 3}  # bounding-box side / canvas side
POSITIONS: dict[str, tuple[int, int]] = {  # cell name -> (row, col) in the 3x3 grid
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SCENES: tuple[str, ...] = ("single", "relation", "count")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("blue", "heart"), ("green", "cross"),
    ("yellow", "triangle"), ("purple", "circle"), ("orange", "square"),
})

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "at the top center", "in the top middle"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}

_SUPERSAMPLE = 4  # render at 4x and box-filter down: exact-enough anti-aliasing, ~1 ms per image
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


def relation_between(center_a: tuple[float, float], center_b: tuple[float, float]) -> str:
    """Relation of A to B along the dominant axis ("left of" means A is left of B)."""
    dx, dy = center_b[0] - center_a[0], center_b[1] - center_a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


# ----------------------------------------------------------------------------- validation


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
        raise ValueError(f"canvas size must be a positive multiple of 8, got {size!r}")


def check_choice(what: str, value: object, allowed) -> None:
    """A ValueError naming ``value`` and the allowed names unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def _check_object(obj: dict) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"each object must be a dict, got {type(obj).__name__}")
    check_choice("color", obj.get("color"), COLORS)
    check_choice("shape", obj.get("shape"), SHAPES)
    check_choice("size", obj.get("size", "large"), SIZES)
    check_choice("cell", obj.get("cell", "center"), POSITIONS)


def scene_of(attributes: dict) -> str:
    """The scene type: as stated, else inferred (a relation => "relation", several => "count")."""
    scene = attributes.get("scene")
    if scene is None and attributes.get("relation"):
        scene = "relation"
    elif scene is None:
        scene = "count" if attributes.get("count", 1) > 1 else "single"
    check_choice("scene", scene, SCENES)
    return scene


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


def _count_scene(rng: random.Random, kind: Split, background: str, size: int) -> tuple[list[dict], None]:
    pair, size_name, n = rng.choice(_pair_pool(kind, background)), rng.choice(tuple(SIZES)), rng.randint(2, 4)
    for _ in range(_TRIES):
        cells = sorted(rng.sample(tuple(POSITIONS), n), key=POSITIONS.__getitem__)
        objs = [_object(pair, size_name, c, _place(rng, c, size_name, size), size) for c in cells]
        if _all_apart(objs, size):
            return objs, None
    cells = sorted(rng.sample(_CORNERS, n), key=POSITIONS.__getitem__)
    return [_object(pair, size_name, c, _place(None, c, size_name, size), size) for c in cells], None


_SCENE_SAMPLERS = {"single": _single_scene, "relation": _relation_scene, "count": _count_scene}


def _sample_attributes(rng: random.Random, scene: str, kind: Split, size: int) -> dict:
    background = rng.choice(tuple(BACKGROUNDS))
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


# ----------------------------------------------------------------------------- captions

# (template, what it states beyond colour and shape); a template is only used when its fields exist
_TEMPLATES: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "single": (
        ("{a_sized} {pos}", frozenset({"size", "cell"})),
        ("{a_obj} {pos}", frozenset({"cell"})),
        ("{a_sized}", frozenset({"size"})),
        ("{a_obj}", frozenset()),
        ("{a_obj} on a {bg} background", frozenset({"background"})),
        ("{a_sized} {pos} on a {bg} background", frozenset({"size", "cell", "background"})),
        ("{pos}, {a_sized}", frozenset({"size", "cell"})),
        ("a {bg} background with {a_obj} {pos}", frozenset({"background", "cell"})),
        ("a picture of {a_sized} {pos}", frozenset({"size", "cell"})),
    ),
    "relation": (
        ("{a_A} {rel} {a_B}", frozenset()),
        ("{a_B} {inv} {a_A}", frozenset()),
        ("{a_B} with {a_A} {rel} it", frozenset()),
        ("{a_sA} {rel} {a_sB}", frozenset({"size"})),
        ("{a_A} {rel} {a_B} on a {bg} background", frozenset({"background"})),
        ("two shapes: {a_A} {rel} {a_B}", frozenset()),
        ("on a {bg} background, {a_sA} {rel} {a_sB}", frozenset({"size", "background"})),
    ),
    "count": (
        ("{num} {color} {shapes}", frozenset()),
        ("{num} {size} {color} {shapes}", frozenset({"size"})),
        ("{digit} {color} {shapes}", frozenset()),
        ("{num} {color} {shapes} on a {bg} background", frozenset({"background"})),
        ("a group of {num} {color} {shapes}", frozenset()),
        ("exactly {num} {color} {shapes}", frozenset()),
        ("{num} {size} {color} {shapes} against a {bg} background", frozenset({"size", "background"})),
        ("{num} identical {color} {shapes}", frozenset()),
    ),
}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: dict, rng: random.Random, sized: bool) -> str:
    words = [rng.choice(SIZE_WORDS[obj["size"]])] if sized else []
    return _a(" ".join(words + [obj["color"], obj["shape"]]))


def _single_fields(attributes: dict, rng: random.Random) -> dict[str, str]:
    obj = attributes["objects"][0]
    fields = {"a_obj": _noun(obj, rng, sized=False)}
    if "size" in obj:
        fields["a_sized"] = _noun(obj, rng, sized=True)
    if "cell" in obj:
        fields["pos"] = rng.choice(POSITION_PHRASES[obj["cell"]])
    return fields


def _relation_fields(attributes: dict, rng: random.Random) -> dict[str, str]:
    a, b = attributes["objects"][:2]
    relation = attributes["relation"]
    fields = {"a_A": _noun(a, rng, False), "a_B": _noun(b, rng, False),
              "rel": rng.choice(RELATION_PHRASES[relation]),
              "inv": rng.choice(RELATION_PHRASES[_INVERSE[relation]])}
    if "size" in a and "size" in b:
        fields |= {"a_sA": _noun(a, rng, True), "a_sB": _noun(b, rng, True)}
    return fields


def _count_fields(attributes: dict, rng: random.Random) -> dict[str, str]:
    objects = attributes["objects"]
    n = attributes.get("count", len(objects))
    shape = objects[0]["shape"]
    plural = shape if n == 1 else shape + ("es" if shape.endswith("s") else "s")
    fields = {"num": _NUMBERS.get(n, str(n)), "digit": str(n), "color": objects[0]["color"], "shapes": plural}
    if len({o.get("size") for o in objects}) == 1 and "size" in objects[0]:
        fields["size"] = rng.choice(SIZE_WORDS[objects[0]["size"]])
    return fields


_FIELD_BUILDERS = {"single": _single_fields, "relation": _relation_fields, "count": _count_fields}


def _stated(attributes: dict, mentions: frozenset[str]) -> dict:
    """The attribute subset a caption states: what an evaluation may hold a generated image to."""
    scene = scene_of(attributes)
    n_objects = {"single": 1, "relation": 2, "count": 1}[scene]
    keys = {"color", "shape"} | (mentions & {"size", "cell"})
    objects = [{k: o[k] for k in o if k in keys} for o in attributes["objects"][:n_objects]]
    expect = {"scene": scene, "objects": objects}
    if scene == "relation":
        expect["relation"] = attributes["relation"]
    if scene == "count":
        expect["count"] = attributes.get("count", len(attributes["objects"]))
    if "background" in mentions:
        expect["background"] = attributes["background"]
    return expect


def _describe(attributes: dict, rng: random.Random) -> tuple[str, dict]:
    """A caption drawn from the scene's templates, and the attribute subset it states."""
    scene = scene_of(attributes)
    fields = _FIELD_BUILDERS[scene](attributes, rng)
    if attributes.get("background"):
        fields["bg"] = attributes["background"]
    usable = [t for t in _TEMPLATES[scene] if t[1] <= _have(fields)]
    template, mentions = rng.choice(usable)
    return template.format(**fields), _stated(attributes, mentions)


def _have(fields: dict[str, str]) -> set[str]:
    """Which optional facts the fields can state."""
    have = set()
    if {"a_sized", "a_sA", "size"} & fields.keys():
        have.add("size")
    if "pos" in fields:
        have.add("cell")
    if "bg" in fields:
        have.add("background")
    return have


def caption_for(attributes: dict, rng: random.Random) -> str:
    """A caption that is true of the scene: templates only state facts present in `attributes`."""
    return _describe(attributes, rng)[0]


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    caption: str
    attributes: dict


def _check_scenes(scenes: tuple[str, ...], weights: tuple[float, ...] | None) -> None:
    if not scenes:
        raise ValueError("scenes must name at least one scene type")
    for scene in scenes:
        check_choice("scene", scene, SCENES)
    if weights is not None and (len(weights) != len(scenes) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"scene_weights must be {len(scenes)} non-negative numbers with a positive sum, "
                         f"got {weights}")


class ShapesDataset:
    """Infinite map-style dataset: sample i is a pure function of (seed, split, i).

    `length` only sets `len()` (an epoch for samplers); any index >= 0 works."""

    def __init__(self, size: int = 64, split: Split = "train", seed: int = 0, length: int = 1_000_000,
                 scenes: tuple[str, ...] = ("single", "relation", "count"),
                 scene_weights: tuple[float, ...] | None = None) -> None:
        _check_size(size)
        check_choice("split", split, ("train", "heldout"))
        _check_scenes(tuple(scenes), scene_weights)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.size, self.split, self.seed, self.length = size, split, seed, length
        self.scenes, self.scene_weights = tuple(scenes), scene_weights

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        """Iterate one epoch; without this, Python would iterate __getitem__ forever."""
        return (self[i] for i in range(self.length))

    def draw(self, index: int, stream: str = "sample") -> tuple[dict, str, dict]:
        """(attributes, caption, stated attributes) of sample `index`, without rendering.

        `stream` salts the random stream so evaluation prompts differ from training samples."""
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"ShapesDataset index must be >= 0, got {index}")
        rng = random.Random(f"shapes/{stream}/{self.seed}/{self.split}/{index}")
        scene = rng.choices(self.scenes, weights=self.scene_weights)[0]
        attributes = _sample_attributes(rng, scene, self.split, self.size)
        caption, stated = _describe(attributes, rng)
        return attributes, caption, stated

    def __getitem__(self, index: int) -> ShapeSample:
        attributes, caption, _ = self.draw(index)
        return ShapeSample(render_scene(attributes, self.size), caption, attributes)


def write_samples(out_dir: str | os.PathLike, n: int, *, size: int = 64, split: str = "train",
                  seed: int = 0) -> Path:
    """Write n PNGs (000000.png, ...) and captions.jsonl, e.g. to inspect the data or feed tools."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(size=size, split=split, seed=seed)
    path = out / "captions.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            sample, name = dataset[i], f"{i:06d}.png"
            sample.image.save(out / name)
            record = {"file": name, "caption": sample.caption, "attributes": sample.attributes}
            f.write(json.dumps(record) + "\n")
    return path


def prompt_set(split: Split, n: int, seed: int = 0) -> list[dict]:
    """Prompts for alignment evaluation; `expect` holds exactly what each prompt states and
    `attributes` the full scene its caption was written from (one draw of what the prompt leaves open).

    Drawn from a separate random stream, so train-split prompts are in-distribution but are not
    the training captions themselves."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dataset = ShapesDataset(split=split, seed=seed)
    prompts = []
    for i in range(n):
        attributes, caption, stated = dataset.draw(i, stream="prompt")
        prompts.append({"id": f"{split}-{seed}-{i:05d}", "prompt": caption, "expect": stated,
                        "attributes": attributes})
    return prompts

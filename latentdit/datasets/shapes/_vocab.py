"""The `shapes` world's vocabulary (colours, shapes, sizes, cells, relations, held-out pairs,
caption phrases) and the checks of an attribute dict against it."""

from __future__ import annotations

from typing import Literal

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
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


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


def relation_between(center_a: tuple[float, float], center_b: tuple[float, float]) -> str:
    """Relation of A to B along the dominant axis ("left of" means A is left of B)."""
    dx, dy = center_b[0] - center_a[0], center_b[1] - center_a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"

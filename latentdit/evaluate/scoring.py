"""Pass/fail per category of what a prompt states (the dataset's attribute schema) against what
``checker.read_attributes`` read from an image, and the accuracies over many images. GenEval
(Ghosh et al. 2023, arXiv:2310.11513) scores prompts the same way: per category from detected objects."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
from PIL import Image

from ..datasets.shapes import (
    BACKGROUNDS,
    COLORS,
    INVERSE_RELATION,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    check_choice,
    relation_between,
    scene_of,
)
from .checker import read_attributes

CATEGORIES: tuple[str, ...] = (
    "color", "shape", "position", "size", "single_all", "relation", "count", "background",
)
_MAX_MATCHED = 8  # objects considered when matching a prompt's objects (largest first)
_KEY_CATEGORY = {"color": "color", "shape": "shape", "size": "size", "cell": "position"}


def _match_score(expected: dict, found: dict) -> int:
    """Colour+shape beats colour alone beats shape alone: how a prompt's object is identified."""
    return 2 * (found["color"] == expected.get("color")) + (found["shape"] == expected.get("shape"))


def _match(expected: list[dict], found: list[dict]) -> list[dict | None]:
    """Assign distinct found objects to expected ones, maximising the total match score."""
    pool = found[:_MAX_MATCHED]
    if len(pool) < len(expected):
        pool = pool + [None] * (len(expected) - len(pool))
    best, best_total = None, -1
    for chosen in itertools.permutations(pool, len(expected)):
        total = sum(_match_score(e, f) for e, f in zip(expected, chosen) if f is not None)
        if total > best_total:
            best, best_total = list(chosen), total
    return best


def _attribute_checks(pairs: list[tuple[dict, dict | None]]) -> dict[str, bool]:
    """Per category: every expected object that states it has a found object that agrees."""
    results = {}
    for key, category in _KEY_CATEGORY.items():
        stated = [(e, f) for e, f in pairs if key in e]
        if stated:
            results[category] = all(f is not None and f[key] == e[key] for e, f in stated)
    return results


def _score_single(found: list[dict], expect: dict) -> dict[str, bool]:
    """A single-object prompt is held to the largest object, so extra junk cannot help it pass."""
    wanted = expect["objects"][0]
    results = _attribute_checks([(wanted, found[0] if found else None)])
    if {"color", "shape", "cell"} <= wanted.keys():
        results["single_all"] = results["color"] and results["shape"] and results["position"]
    return results


def _score_relation(found: list[dict], expect: dict) -> dict[str, bool]:
    expected = expect["objects"][:2]
    matched = _match(expected, found)
    results = _attribute_checks(list(zip(expected, matched)))
    if expect.get("relation"):
        a, b = matched
        results["relation"] = (a is not None and b is not None
                               and relation_between(a["center"], b["center"]) == expect["relation"])
    return results


RELATION_OUTCOMES: tuple[str, ...] = ("right", "swapped", "other axis", "objects wrong")


def relation_outcome(found: list[dict], expect: dict) -> str:
    """Why a relation image passes or fails its relation check: "objects wrong" unless both of the
    prompt's objects were found with every colour and shape it states; else where the first lies
    from the second: "right", "swapped" (the opposite side: the two objects' places exchanged) or
    "other axis" (side by side where one was asked above the other, or the reverse)."""
    expected = expect["objects"][:2]
    matched = _match(expected, found)
    if any(f is None or any(f[k] != e[k] for k in ("color", "shape") if k in e) for e, f in zip(expected, matched)):
        return "objects wrong"
    got = relation_between(matched[0]["center"], matched[1]["center"])
    want = expect["relation"]
    return "right" if got == want else "swapped" if got == INVERSE_RELATION[want] else "other axis"


def _score_count(found: list[dict], expect: dict) -> dict[str, bool]:
    """Every object found must look as asked; positions (if stated) must match as a multiset."""
    wanted = expect["objects"][0]
    results = {}
    for key, category in _KEY_CATEGORY.items():
        if key == "cell" and all("cell" in o for o in expect["objects"]):
            wanted_cells = Counter(o["cell"] for o in expect["objects"])
            results[category] = Counter(o["cell"] for o in found) == wanted_cells
        elif key in wanted and key != "cell":
            results[category] = bool(found) and all(f[key] == wanted[key] for f in found)
    return results


_SCORERS = {"single": _score_single, "relation": _score_relation, "count": _score_count}


def score(image: Image.Image | np.ndarray, expect: dict) -> dict[str, bool]:
    """Pass/fail per category for what `expect` (dataset attribute schema, any subset) states."""
    return score_read(read_attributes(image), expect)


_EXPECT_KEYS = {"scene", "objects", "relation", "count", "background", "canvas"}  # a full scene is fine too
_OBJECT_VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "cell": POSITIONS}
_OBJECT_GEOMETRY = {"center", "bbox"}  # in a full scene's objects; not checked


def check_expect(expect: object) -> dict:
    """``expect`` if it follows the attribute schema the checker scores; else a ValueError naming
    the first key or value that does not (a typo would otherwise score as a silent miss)."""
    if not isinstance(expect, dict) or not isinstance(expect.get("objects"), list) or not expect["objects"]:
        raise ValueError("expect must be an object with a non-empty 'objects' list")
    unknown = sorted(set(expect) - _EXPECT_KEYS)
    if unknown:
        raise ValueError(f"expect has unknown key(s) {unknown}; known: {sorted(_EXPECT_KEYS)}")
    for obj in expect["objects"]:
        if not isinstance(obj, dict):
            raise ValueError(f"each of expect's objects must be an object, got {obj!r}")
        for key, value in obj.items():
            if key in _OBJECT_GEOMETRY:
                continue
            if key not in _OBJECT_VALUES:
                raise ValueError(f"an expected object has unknown key {key!r}; known: {sorted(_OBJECT_VALUES)}")
            check_choice(key, value, _OBJECT_VALUES[key])
    if expect.get("relation") is not None:
        check_choice("relation", expect["relation"], RELATIONS)
    count = expect.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if "background" in expect:
        check_choice("background", expect["background"], BACKGROUNDS)
    scene = scene_of(expect)
    if scene == "relation" and len(expect["objects"]) < 2:
        raise ValueError("a relation scene needs two expected objects")
    return expect


def score_read(read: dict, expect: dict, *, checked: bool = False) -> dict[str, bool]:
    """``score`` on what ``read_attributes`` already read from an image. ``checked=True`` skips
    ``check_expect`` for a caller that validated every expectation once, before scoring."""
    if not checked:
        check_expect(expect)
    results = _SCORERS[scene_of(expect)](read["objects"], expect)
    if "count" in expect:
        results["count"] = read["count"] == expect["count"]
    if "background" in expect:
        results["background"] = read["background"] == expect["background"]
    return results


def evaluate_images(items: list[tuple[Image.Image | np.ndarray, dict]]) -> dict:
    """Accuracy per category, overall (mean over all checks) and per image (all checks right)."""
    if not items:
        raise ValueError("evaluate_images needs at least one (image, expect) pair")
    return aggregate([score(image, expect) for image, expect in items])


def aggregate(results: list[dict[str, bool]]) -> dict:
    """Combine per-image ``score`` results into the accuracies ``evaluate_images`` reports."""
    if not results:
        raise ValueError("aggregate needs at least one scored image")
    passes: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    all_right = []
    for results_one in results:
        for category, ok in results_one.items():
            passes[category].append(ok)
        all_right.append(all(results_one.values()))
    checks = [ok for values in passes.values() for ok in values]
    return {
        "n": len(results),
        "overall": float(np.mean(checks)) if checks else float("nan"),
        "image_accuracy": float(np.mean(all_right)),
        "per_category": {c: float(np.mean(v)) for c, v in passes.items() if v},
        "checks": {c: len(v) for c, v in passes.items() if v},
    }

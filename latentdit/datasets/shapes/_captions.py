"""Captions of `shapes` scenes: templates that state only facts present in the attributes, and the
attribute subset each caption states (what evaluation may hold a generated image to)."""

from __future__ import annotations

import random
import re

from ._captions_zh import caption_zh
from ._vocab import _NUMBERS, INVERSE_RELATION, POSITION_PHRASES, RELATION_PHRASES, SIZE_WORDS, check_choice, scene_of

LANGUAGES = ("en", "zh")

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
              "inv": rng.choice(RELATION_PHRASES[INVERSE_RELATION[relation]])}
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


def _describe(attributes: dict, rng: random.Random, lang: str = "en") -> tuple[str, dict]:
    """A caption drawn from the scene's templates, and the attribute subset it states.

    lang "zh" draws exactly what English draws (same template, same stated facts), then writes the
    Chinese counterpart of that template; English captions do not depend on `lang`."""
    check_choice("caption language", lang, LANGUAGES)
    scene = scene_of(attributes)
    fields = _FIELD_BUILDERS[scene](attributes, rng)
    if attributes.get("background"):
        fields["bg"] = attributes["background"]
    usable = [i for i, t in enumerate(_TEMPLATES[scene]) if t[1] <= _have(fields)]
    index = rng.choice(usable)
    template, mentions = _TEMPLATES[scene][index]
    text = template.format(**fields) if lang == "en" else caption_zh(scene, index, attributes, rng)
    return text, _stated(attributes, mentions)


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


def caption_for(attributes: dict, rng: random.Random, lang: str = "en") -> str:
    """A caption that is true of the scene: templates only state facts present in `attributes`."""
    return _describe(attributes, rng, lang)[0]


def caption_regions(attributes: dict, caption: str) -> list[dict]:
    """Where an English caption names each object: one region per (colour, shape) pair, with the
    character spans of its noun phrases ("a small red circle" -> "small red circle") and the
    boxes of the objects it names as fractions of the canvas. [] when the caption does not name
    every object that way (Chinese captions) or an object has no box."""
    canvas, groups = attributes.get("canvas"), {}
    for obj in attributes.get("objects", []):
        if "bbox" not in obj or "color" not in obj or "shape" not in obj or not canvas:
            return []
        groups.setdefault((obj["color"], obj["shape"]), []).append([v / canvas for v in obj["bbox"]])
    sizes = "|".join(w for words in SIZE_WORDS.values() for w in words)
    regions = []
    for (color, shape), boxes in groups.items():
        pattern = rf"\b(?:(?:{sizes}) )?{re.escape(color)} {re.escape(shape)}(?:es|s)?\b"
        spans = [m.span() for m in re.finditer(pattern, caption)]
        if not spans:
            return []
        regions.append({"spans": spans, "boxes": boxes})
    return regions

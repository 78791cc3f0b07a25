"""The procedural `shapes` world (DESIGN §5): coloured shapes on plain backgrounds, with captions.

Why procedural: no image-caption set exists offline, and a world whose every attribute is known lets
evaluation check text-image alignment from pixels alone (`latentdit.evaluate`). Every sample is a
pure function of (seed, split, index), so any dataloader worker can draw any sample without shared
state, and the held-out (colour, shape) pairs measure compositional generalisation.

Coordinates are continuous pixels: pixel (i, j) covers [i, i+1) x [j, j+1); x grows to the right,
y grows downwards. An object's `bbox` is the box its shape fills, `center` the centre of that box.

The world lives in private parts (``_vocab``, ``_draw``, ``_captions``); every public name is
imported from ``latentdit.datasets.shapes``.
"""

from __future__ import annotations

import json
import operator
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ._captions import LANGUAGES, _describe, caption_for, caption_regions
from ._draw import COUNT_LAYOUTS, _sample_attributes, render_scene, shape_coverage
from ._vocab import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    INVERSE_RELATION,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SCENES,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Split,
    _check_size,
    check_choice,
    relation_between,
    scene_of,
)

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

    `length` only sets `len()` (an epoch for samplers); any index >= 0 works. `lang` is the caption
    language: "en", "zh", or "en+zh" (each sample's language drawn with even odds); the scenes do
    not depend on it. `count_layout` "distinct" keeps two or three copies out of the corner layout
    that four large copies always take (`_count_scene`); "any" is the world as specified."""

    def __init__(self, size: int = 64, split: Split = "train", seed: int = 0, length: int = 1_000_000,
                 scenes: tuple[str, ...] = ("single", "relation", "count"),
                 scene_weights: tuple[float, ...] | None = None, lang: str = "en",
                 count_layout: str = "any") -> None:
        _check_size(size)
        check_choice("caption language", lang, (*LANGUAGES, "en+zh"))
        check_choice("count layout", count_layout, COUNT_LAYOUTS)
        check_choice("split", split, ("train", "heldout"))
        _check_scenes(tuple(scenes), scene_weights)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.size, self.split, self.seed, self.length = size, split, seed, length
        self.scenes, self.scene_weights, self.lang = tuple(scenes), scene_weights, lang
        self.count_layout = count_layout

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
        attributes = _sample_attributes(rng, scene, self.split, self.size, self.count_layout)
        caption, stated = _describe(attributes, rng, self._lang_of(index, stream))
        return attributes, caption, stated

    def _lang_of(self, index: int, stream: str) -> str:
        if self.lang != "en+zh":
            return self.lang
        coin = random.Random(f"shapes/lang/{stream}/{self.seed}/{self.split}/{index}").random()
        return "zh" if coin < 0.5 else "en"

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


def prompt_set(split: Split, n: int, seed: int = 0, lang: str = "en") -> list[dict]:
    """Prompts for alignment evaluation; `expect` holds exactly what each prompt states and
    `attributes` the full scene its caption was written from (one draw of what the prompt leaves open).

    Drawn from a separate random stream, so train-split prompts are in-distribution but are not
    the training captions themselves. `lang` "zh" gives the same scenes and checks with Chinese
    prompts, so the two languages are compared prompt for prompt."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_choice("caption language", lang, LANGUAGES)
    dataset = ShapesDataset(split=split, seed=seed, lang=lang)
    prompts = []
    for i in range(n):
        attributes, caption, stated = dataset.draw(i, stream="prompt")
        prompts.append({"id": f"{split}-{seed}-{i:05d}", "prompt": caption, "expect": stated,
                        "attributes": attributes})
    return prompts


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELDOUT_PAIRS",
    "INVERSE_RELATION",
    "LANGUAGES",
    "POSITIONS",
    "POSITION_PHRASES",
    "RELATIONS",
    "RELATION_PHRASES",
    "SCENES",
    "SHAPES",
    "SIZES",
    "SIZE_WORDS",
    "ShapeSample",
    "ShapesDataset",
    "Split",
    "caption_for",
    "caption_regions",
    "check_choice",
    "prompt_set",
    "relation_between",
    "render_scene",
    "scene_of",
    "shape_coverage",
    "write_samples",
]

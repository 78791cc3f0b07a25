"""Prompt-alignment benchmark: generate for prompts with known expectations, read the images back
with the pixel checker, report per-category accuracy.

Prompts file (JSONL), one object per line::

    {"id": "p0", "prompt": "a red circle in the top left",
     "expect": {"scene": "single", "objects": [{"color": "red", "shape": "circle", "cell": "top left"}]}}

``expect`` uses the shapes attribute schema; only the keys it states are checked. An optional
``attributes`` (the same schema, complete) is the scene a reference render draws (``score_references``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..datasets.shapes import scene_of
from ..lines import read_jsonl
from ..plan import prompt_seeds
from .checker import read_attributes
from .scoring import RELATION_OUTCOMES, aggregate, check_expect, relation_outcome, score_read

HELDOUT_PAIRS_KEY = "heldout_pairs"


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a prompts JSONL file."""
    items = []
    for n, item in read_jsonl(path):
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("expect"), dict):
            raise ValueError(f"{path}:{n} needs a string 'prompt' and an object 'expect'")
        if not isinstance(item.get("attributes", {}), dict):
            raise ValueError(f"{path}:{n}: 'attributes', when given, must be an object (the full scene)")
        if not isinstance(item.get("negative", ""), str):
            raise ValueError(f"{path}:{n}: 'negative', when given, must be a string (the prompt to guide away from)")
        try:
            check_expect(item["expect"])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        items.append({"id": str(item.get("id", n)), "prompt": item["prompt"], "expect": item["expect"],
                      **{k: item[k] for k in ("attributes", "negative") if k in item}})
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def order_swapped(item: dict[str, Any]) -> str | None:
    """The prompt of a two-object relation with its objects exchanged ("a red star left of a blue
    cross" -> "a blue cross left of a red star"), or None where that cannot be written: another
    scene, an object without both colour and shape, or a "colour shape" phrase not named exactly
    once. As a negative prompt it asks whether the model's condition carries which object goes where."""
    objects = item["expect"].get("objects", [])
    if item["expect"].get("scene") != "relation" or len(objects) != 2 \
            or not all("color" in o and "shape" in o for o in objects):
        return None
    a, b = (f"{o['color']} {o['shape']}" for o in objects)
    prompt = item["prompt"]
    if a == b or prompt.count(a) != 1 or prompt.count(b) != 1:
        return None
    return fix_articles(re.sub(f"{re.escape(a)}|{re.escape(b)}", lambda m: b if m.group(0) == a else a, prompt))


def fix_articles(text: str) -> str:
    """Each "a" / "an" made to agree with the word after it, after words were exchanged."""
    return re.sub(r"\b(a|an) (\w+)", lambda m: ("an " if m.group(2)[0] in "aeiou" else "a ") + m.group(2), text)


def has_heldout_pair(expect: dict) -> bool:
    from ..datasets.shapes import HELDOUT_PAIRS

    return any((o.get("color"), o.get("shape")) in HELDOUT_PAIRS for o in expect.get("objects", []))


def run_alignment(pipe, items: Sequence[dict[str, Any]], *, samples: int = 4, steps: int = 20,
                  guidance_scale: float | None = None, guidance_interval: tuple[float, float] | None = None,
                  sampler: str | None = None, seed: int = 0, batch_size: int = 16,
                  out_dir: str | Path | None = None, count_contrast: float | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Generate ``samples`` images per prompt and score them (``sampler``, ``guidance_scale``,
    ``guidance_interval`` and ``count_contrast`` default to the pipeline's sampling config).
    Writes ``report.json`` and ``grid.png`` into ``out_dir`` when given. The report's
    ``heldout_pairs`` is the overall accuracy on prompts naming a held-out colour-shape pair. Items
    with a ``negative`` prompt are guided away from it instead of from the null condition; every
    item has one or none does."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    _check_items(items)
    negatives = sum("negative" in it for it in items)
    if negatives not in (0, len(items)):
        raise ValueError(f"{negatives} of {len(items)} prompts have a negative prompt: give every prompt one, or none")
    t0 = time.perf_counter()
    images_all = []
    for start in range(0, len(items), max(1, batch_size // samples)):
        chunk = items[start: start + max(1, batch_size // samples)]
        seeds = [s for i in range(len(chunk)) for s in prompt_seeds(seed, start + i, samples)]
        negative = [it["negative"] for it in chunk] if negatives else None
        images_all += pipe([it["prompt"] for it in chunk], negative_prompt=negative,
                           num_images_per_prompt=samples, seed=seeds,
                           steps=steps, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                           sampler=sampler, count_contrast=count_contrast, progress=False)
        if progress:
            print(f"  alignment: {min(start + len(chunk), len(items))}/{len(items)} prompts", flush=True)
    sampling = getattr(pipe, "sampling", None)  # what the pipeline used where the call left it open
    interval = guidance_interval or getattr(sampling, "guidance_interval", None)
    contrast = getattr(sampling, "count_contrast", 0.0) if count_contrast is None else count_contrast
    return _report(items, images_all, samples, t0, out_dir,
                   {"steps": steps, "sampler": sampler or getattr(sampling, "sampler", None),
                    "count_contrast": contrast,
                    "negative_prompts": bool(negatives),
                    "guidance_interval": list(interval) if interval is not None else None})


@torch.no_grad()
def score_references(items: Sequence[dict[str, Any]], pipe=None, *, size: int | None = None, batch_size: int = 32,
                     out_dir: str | Path | None = None) -> dict[str, Any]:
    """The benchmark's ceiling: one ground-truth render per prompt, scored like generated images.

    A prompt is drawn from its full ``attributes`` when it has them (``prompt_set`` keeps the scene
    its caption was written from, so unstated attributes follow the training distribution), else from
    what ``expect`` states, defaults filling the rest. With ``pipe`` every render goes through its
    autoencoder (encode, decode) first: the accuracy of a denoiser that drew exactly the right
    latents, which no model on that autoencoder can beat. The report's ``reference`` says which.
    ``size`` defaults to the model's native image side (64 without ``pipe``)."""
    from ..datasets.shapes import render_scene
    from ..pixels import from_pil, to_pil

    _check_items(items)
    t0 = time.perf_counter()
    if size is None:
        size = 64 if pipe is None else pipe.model.config.base_size * pipe.autoencoder.downsample
    renders = []
    for it in items:
        try:
            renders.append(render_scene(it.get("attributes", it["expect"]), size))
        except ValueError as e:
            raise ValueError(f"prompt {it['id']}: no reference render can be drawn from its scene: {e}") from None
    if pipe is None:
        return _report(items, renders, 1, t0, out_dir, {"reference": "renders"})
    images = []
    for start in range(0, len(renders), batch_size):
        pixels = from_pil(renders[start: start + batch_size]).to(pipe.device)
        images += to_pil(pipe.autoencoder.decode(pipe.autoencoder.encode(pixels)))
    return _report(items, images, 1, t0, out_dir, {"reference": "autoencoder"})


def _check_items(items: Sequence[dict[str, Any]]) -> None:
    """Every expectation valid, before any image is made or scored (``_report`` relies on it)."""
    if not items:
        raise ValueError("no prompts to evaluate")
    for item in items:
        check_expect(item["expect"])


def _report(items: Sequence[dict[str, Any]], images: list, samples: int, t0: float,
            out_dir: str | Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Score ``samples`` consecutive images per item; the report (and files, given ``out_dir``)."""
    reads = [read_attributes(image) for image in images[: len(items) * samples]]
    rows = [{"id": item["id"], "prompt": item.get("prompt"), "sample": k,
             "checks": score_read(reads[i * samples + k], item["expect"], checked=True),
             "heldout": has_heldout_pair(item["expect"]), "read": _brief(reads[i * samples + k])}
            for i, item in enumerate(items) for k in range(samples)]
    report = aggregate([r["checks"] for r in rows])
    held = [r["checks"] for r in rows if r["heldout"]]
    report[HELDOUT_PAIRS_KEY] = aggregate(held)["overall"] if held else None
    report["confusion"] = single_object_confusion(items, reads, samples)
    report["relation_layout"] = relation_layout(items, reads, samples)
    report.update({"prompts": len(items), "samples_per_prompt": samples, **extra,
                   "seconds": round(time.perf_counter() - t0, 1)})
    if out_dir is not None:
        _write(Path(out_dir), report, rows, images, samples)
    return report


def _brief(read: dict) -> dict[str, Any]:
    """What a row records of what the checker read: background, count and each object's attributes."""
    keep = ("color", "shape", "size", "cell")
    return {"background": read["background"], "count": read["count"],
            "objects": [{k: o[k] for k in keep} for o in read["objects"]]}


def single_object_confusion(items: Sequence[dict[str, Any]], reads: Sequence[dict], samples: int = 1
                            ) -> dict[str, dict[str, dict[str, int]]]:
    """For single-object prompts: how often each stated colour and shape was read as each value
    (the largest object, as scoring holds them to it; "none" where no object was found).
    ``reads[i * samples + k]`` is ``read_attributes`` of item i's k-th image."""
    table: dict[str, dict[str, dict[str, int]]] = {"color": {}, "shape": {}}
    for i, item in enumerate(items):
        expect = item["expect"]
        if scene_of(expect) != "single":
            continue
        wanted = expect["objects"][0]
        for k in range(samples):
            found = reads[i * samples + k]["objects"]
            for key, counts in table.items():
                if key in wanted:
                    got = found[0][key] if found else "none"
                    row = counts.setdefault(wanted[key], {})
                    row[got] = row.get(got, 0) + 1
    return table


def relation_layout(items: Sequence[dict[str, Any]], reads: Sequence[dict], samples: int = 1) -> dict[str, int]:
    """For prompts that state a relation: how many images drew both objects as asked and placed
    them right, swapped or on the other axis, and how many got an object wrong (`relation_outcome`).
    ``reads[i * samples + k]`` is ``read_attributes`` of item i's k-th image."""
    table = dict.fromkeys(RELATION_OUTCOMES, 0)
    for i, item in enumerate(items):
        if item["expect"].get("relation"):
            for k in range(samples):
                table[relation_outcome(reads[i * samples + k]["objects"], item["expect"])] += 1
    return table


def _write(out: Path, report: dict, rows: list[dict], images: list, samples: int) -> None:
    from ..pixels import image_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "rows": rows}, indent=1))
    image_grid(images[: 16 * samples], cols=samples * 4).save(out / "grid.png")

"""Prompt-alignment benchmark: generate for prompts with known expectations, read the images back
with the pixel checker, report per-category accuracy.

Prompts file (JSONL), one object per line::

    {"id": "p0", "prompt": "a red circle in the top left",
     "expect": {"scene": "single", "objects": [{"color": "red", "shape": "circle", "cell": "top left"}]}}

``expect`` uses the shapes attribute schema; only the keys it states are checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checker import aggregate, score

HELDOUT_PAIRS_KEY = "heldout_pairs"


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a prompts JSONL file."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
                or not isinstance(item.get("expect"), dict):
            raise ValueError(f"{path}:{n} needs a string 'prompt' and an object 'expect'")
        items.append({"id": str(item.get("id", n)), "prompt": item["prompt"], "expect": item["expect"]})
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def has_heldout_pair(expect: dict) -> bool:
    from ..datasets.shapes import HELDOUT_PAIRS

    return any((o.get("color"), o.get("shape")) in HELDOUT_PAIRS for o in expect.get("objects", []))


def run_alignment(pipe, items: Sequence[dict[str, Any]], *, samples: int = 4, steps: int = 20,
                  guidance_scale: float | None = None, guidance_interval: tuple[float, float] | None = None,
                  seed: int = 0, batch_size: int = 16, out_dir: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Generate ``samples`` images per prompt and score them. Writes ``report.json`` and
    ``grid.png`` into ``out_dir`` when given. The report's ``heldout_pairs`` is the overall
    accuracy on prompts naming a held-out colour-shape pair."""
    t0 = time.perf_counter()
    images_all, rows = [], []
    for start in range(0, len(items), max(1, batch_size // samples)):
        chunk = items[start: start + max(1, batch_size // samples)]
        seeds = [seed + 1000 * (start + i) + k for i in range(len(chunk)) for k in range(samples)]
        images = pipe([it["prompt"] for it in chunk], num_images_per_prompt=samples, seed=seeds,
                      steps=steps, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                      progress=False)
        for i, item in enumerate(chunk):
            for k in range(samples):
                img = images[i * samples + k]
                images_all.append(img)
                rows.append({"id": item["id"], "sample": k, "checks": score(img, item["expect"]),
                             "heldout": has_heldout_pair(item["expect"])})
        if progress:
            print(f"  alignment: {min(start + len(chunk), len(items))}/{len(items)} prompts", flush=True)
    report = aggregate([r["checks"] for r in rows])
    held = [r["checks"] for r in rows if r["heldout"]]
    report[HELDOUT_PAIRS_KEY] = aggregate(held)["overall"] if held else None
    sampling = getattr(pipe, "sampling", None)
    interval = guidance_interval or (sampling.guidance_interval if sampling is not None else None)
    report.update({"prompts": len(items), "samples_per_prompt": samples, "steps": steps,
                   "guidance_interval": list(interval) if interval is not None else None,
                   "seconds": round(time.perf_counter() - t0, 1)})
    if out_dir is not None:
        _write(Path(out_dir), report, rows, images_all, samples)
    return report


def _write(out: Path, report: dict, rows: list[dict], images: list, samples: int) -> None:
    from ..pipeline import image_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "rows": rows}, indent=1))
    image_grid(images[: 16 * samples], cols=samples * 4).save(out / "grid.png")

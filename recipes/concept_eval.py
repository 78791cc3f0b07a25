"""How often a concept-tuned model draws the new shape (docs/concept.md).

    python recipes/concept_eval.py --model shapes --adapter OUT [--images DIR] [--samples 16]
        [--picture docs/concept.png]

For each prompt below, ``--samples`` images (seeds 0..N-1 of that prompt); the crescent reader
(``latentdit.evaluate.novel``) reads each image's largest object and says which of the seven
templates (six known shapes + the crescent) explains it best. Prints per prompt and overall: the
share read as the crescent ("shape"), and as the crescent in the asked colour and cell ("all").
Without ``--adapter`` it measures the base model on the same prompts (the reference).
``--picture``: the instance images in the top row, then four samples of each prompt a row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from latentdit.evaluate.novel import hit_rates
from latentdit.pipeline import Text2Image
from latentdit.pixels import image_grid
from latentdit.plan import prompt_seeds

# (template, colour, cell): no instance image of recipes/concept_images.py has these colour-cell pairs.
PROMPTS = (
    ("a red {t} {c} in the top left", "red", "top left"),
    ("a green {t} {c} in the center", "green", "center"),
    ("a blue {t} {c} in the top right", "blue", "top right"),
    ("a yellow {t} {c} at the bottom", "yellow", "bottom"),
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--adapter", default=None)
    p.add_argument("--token", default="sks")
    p.add_argument("--class-word", default="shape")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", default=None, help="the instance images, for --picture's top row")
    p.add_argument("--picture", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    pipe = Text2Image.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    report, rows = {}, []
    for i, (template, colour, cell) in enumerate(PROMPTS):
        prompt = template.format(t=args.token, c=args.class_word)
        images = pipe(prompt, num_images_per_prompt=args.samples, seed=prompt_seeds(args.seed, i, args.samples),
                      progress=False)
        report[prompt] = hit_rates(images, colour, cell)
        rows.append(images[:4])
    n = sum(r["images"] for r in report.values())
    overall = {k: round(sum(r[k] * r["images"] for r in report.values()) / n, 4) for k in ("shape", "all")}
    print(json.dumps({"model": args.model, "adapter": args.adapter, "per_prompt": report, "overall": overall,
                      "images": n, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    if args.picture:
        _picture(args, rows)


def _picture(args: argparse.Namespace, rows: list[list[Image.Image]]) -> None:
    top = []
    if args.images:
        top = [Image.open(f).convert("RGB") for f in sorted(Path(args.images).glob("*.png"))][:5]
    cols = 5  # the five instance images; each prompt's four samples and a blank
    blank = Image.new("RGB", (top or rows[0])[0].size, (255, 255, 255))
    cells = top + [blank] * (cols - len(top)) if top else []
    for row in rows:
        cells += row + [blank] * (cols - len(row))
    grid = image_grid(cells, cols)
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(args.picture)
    print(args.picture)


if __name__ == "__main__":
    main()

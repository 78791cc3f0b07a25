"""Inpainting with any model (re-imposing the known region) vs the inpainting variant, on shapes.

Each case renders "a A to the left of a B" with the ground-truth renderer, masks the right half
(where B stands) and asks both methods to repaint it from the same prompt and seed. Reported:

- filled-region alignment: the pixel checker's verdict on the whole result (both objects, the
  relation, the background); "B found" is the share of results holding B's colour and shape in the
  right half;
- seam: the mean jump in pixel value (0..255) across the mask's edge (columns 31 | 32), next to
  the same jump one column away on either side; a visible seam is a boundary jump well above them.

    python benchmarks/bench_inpaint.py --base shapes --variant runs/inpaint/model --n 24

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from PIL import Image

from latentdit.datasets.shapes import BACKGROUNDS, COLORS, SHAPES, render_scene
from latentdit.edit import inpaint
from latentdit.evaluate import read_attributes, score
from latentdit.pipeline import Text2Image

SIZE, EDGE = 64, 32


def cases(n: int, seed: int) -> list[dict]:
    """n relation scenes with two different (colour, shape) objects and a background of another colour."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        (ca, cb), (sa, sb) = rng.sample(tuple(COLORS), 2), rng.sample(SHAPES, 2)
        background = rng.choice([b for b in BACKGROUNDS if b not in (ca, cb)])
        objects = [{"color": ca, "shape": sa, "cell": "left"}, {"color": cb, "shape": sb, "cell": "right"}]
        expect = {"scene": "relation", "relation": "left of", "objects": objects, "background": background}
        prompt = f"{_a(ca)} {ca} {sa} to the left of {_a(cb)} {cb} {sb} on {_a(background)} {background} background"
        out.append({"prompt": prompt,
                    "expect": expect, "image": render_scene(expect, SIZE)})
    return out


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def seam(image: Image.Image) -> tuple[float, float]:
    """(jump across the mask edge, mean jump one column inside either side)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    jump = lambda c: float(np.abs(a[:, c] - a[:, c - 1]).mean())  # noqa: E731
    return jump(EDGE), (jump(EDGE - 1) + jump(EDGE + 1)) / 2


def b_found(image: Image.Image, expect: dict) -> bool:
    b = expect["objects"][1]
    return any(o["color"] == b["color"] and o["shape"] == b["shape"] and o["center"][0] >= EDGE / SIZE
               for o in read_attributes(image)["objects"])


def run(pipe: Text2Image, items: list[dict], mask: Image.Image, steps: int) -> dict:
    t0, checks, found, seams = time.perf_counter(), [], [], []
    for k, item in enumerate(items):
        out = inpaint(pipe, item["image"], mask, item["prompt"], steps=steps, seed=k)[0]
        checks.append(score(out, item["expect"]))
        found.append(b_found(out, item["expect"]))
        seams.append(seam(out))
    flat = [v for c in checks for v in c.values()]
    return {"overall": float(np.mean(flat)), "all_right": float(np.mean([all(c.values()) for c in checks])),
            "b_found": float(np.mean(found)), "seam_jump": float(np.mean([s[0] for s in seams])),
            "interior_jump": float(np.mean([s[1] for s in seams])), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="shapes", help="any model: inpainting by re-imposing")
    ap.add_argument("--variant", required=True, help="the inpainting variant (extra mask channels)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    items = cases(args.n, args.seed)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (EDGE, 0, SIZE, SIZE))
    truth = {"seam_jump": float(np.mean([seam(i["image"])[0] for i in items])),
             "checker_on_truth": float(np.mean([all(score(i["image"], i["expect"]).values()) for i in items]))}
    result = {"n": args.n, "steps": args.steps, "ground_truth": truth,
              "reimpose": run(Text2Image.from_pretrained(args.base), items, mask, args.steps),
              "variant": run(Text2Image.from_pretrained(args.variant), items, mask, args.steps)}
    print(f"{'method':10s} {'overall':>8s} {'all right':>9s} {'B found':>8s} {'seam jump':>9s} {'interior':>8s}")
    for name in ("reimpose", "variant"):
        r = result[name]
        print(f"{name:10s} {r['overall']:8.3f} {r['all_right']:9.3f} {r['b_found']:8.3f} "
              f"{r['seam_jump']:9.2f} {r['interior_jump']:8.2f}")
    print(f"ground truth: seam jump {truth['seam_jump']:.2f}, checker all right {truth['checker_on_truth']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Control adherence of a control model against its base model, on held-out shapes scenes.

Each held-out prompt's scene is rendered by the dataset's own renderer, its control map derived
with ``latentdit.control.control_map`` (what ``--control-from`` does), and three images are drawn
with the prompt's seed: the base model (no map), the control model with the map, and the control
model without it (scale 0). Reported per method:

- IoU: intersection over union of the generated image's object pixels (the alignment checker's
  object masks) with the scene's silhouette; the base model, which never sees the map, is the
  reference for what the prompt alone achieves;
- colour: the checker's colour accuracy on what each prompt states (``evaluate.score``);
- checker on the rendered scenes: the IoU ceiling (how well the checker's objects and the map agree
  on the ground truth itself).

    python benchmarks/bench_control.py --model runs/control/model --base shapes --n 64 --picture docs/control.png

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from latentdit.control import control_map, silhouette
from latentdit.datasets.shapes import prompt_set, render_scene
from latentdit.evaluate import score
from latentdit.evaluate.checker import _as_rgb, _background, _object_masks
from latentdit.pipeline import Text2Image
from latentdit.pixels import image_grid

SIZE = 64


def object_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) bool: the union of the objects the alignment checker finds."""
    rgb = _as_rgb(image)
    name, bg = _background(rgb)
    out = np.zeros(rgb.shape[:2], dtype=bool)
    for mask in _object_masks(rgb, bg, name):
        out |= mask
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def figures(images: list[Image.Image], items: list[dict], truth: list[np.ndarray]) -> dict:
    ious = [iou(object_pixels(im), t) for im, t in zip(images, truth)]
    colour = [score(im, it["expect"]).get("color") for im, it in zip(images, items)]
    colour = [c for c in colour if c is not None]
    return {"iou": float(np.mean(ious)), "iou_median": float(np.median(ious)),
            "iou_ge_0.8": float(np.mean([v >= 0.8 for v in ious])), "color": float(np.mean(colour)),
            "color_n": len(colour)}


def generate(pipe: Text2Image, prompts: list[str], steps: int, **control) -> tuple[list[Image.Image], float]:
    t0 = time.perf_counter()
    images = pipe(prompts, seed=list(range(len(prompts))), steps=steps, progress=False, **control)
    return images, time.perf_counter() - t0


def picture(items: list[dict], maps: torch.Tensor, rows: dict[str, list[Image.Image]], k: int, path: str) -> None:
    """Columns: k scenes; rows: the rendered scene, its map, then each method's image (2x, nearest)."""
    tiles = [it["image"] for it in items[:k]]
    tiles += [Image.fromarray((m[0].numpy() * 255).astype(np.uint8)).convert("RGB") for m in maps[:k]]
    for images in rows.values():
        tiles += images[:k]
    grid = image_grid(tiles, cols=k)
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the control model")
    ap.add_argument("--base", default="shapes", help="the base model it was fine-tuned from")
    ap.add_argument("--n", type=int, default=64, help="held-out scenes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--picture", default=None, help="write maps beside results to this PNG")
    ap.add_argument("--picture-n", type=int, default=8)
    args = ap.parse_args()
    control_pipe = Text2Image.from_pretrained(args.model, device="cpu")
    kind = control_pipe.model.config.control
    if kind is None:
        raise SystemExit(f"{args.model} is not a control model")
    items = prompt_set(args.split, args.n)
    for it in items:
        it["image"] = render_scene(it["attributes"], SIZE)
    truth = [silhouette(it["image"]) for it in items]
    maps = torch.from_numpy(np.stack([control_map(it["image"], kind) for it in items])[:, None].astype(np.float32))
    prompts = [it["prompt"] for it in items]
    rows, seconds = {}, {}
    rows["base"], seconds["base"] = generate(Text2Image.from_pretrained(args.base, device="cpu"), prompts, args.steps)
    rows["control"], seconds["control"] = generate(control_pipe, prompts, args.steps, control=maps)
    rows["control_scale_0"], seconds["control_scale_0"] = generate(control_pipe, prompts, args.steps, control=maps,
                                                                  control_scale=0.0)
    result = {"n": args.n, "split": args.split, "steps": args.steps, "kind": kind,
              "checker_on_rendered_scenes_iou": float(np.mean([iou(object_pixels(it["image"]), t)
                                                             for it, t in zip(items, truth)]))}
    print(f"{'method':16s} {'IoU':>6s} {'median':>6s} {'>=0.8':>6s} {'colour':>7s} {'seconds':>8s}")
    for name, images in rows.items():
        r = figures(images, items, truth) | {"seconds": round(seconds[name], 1)}
        result[name] = r
        print(f"{name:16s} {r['iou']:6.3f} {r['iou_median']:6.3f} {r['iou_ge_0.8']:6.3f} {r['color']:7.3f} "
              f"{r['seconds']:8.1f}")
    if args.picture:
        picture(items, maps, rows, args.picture_n, args.picture)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Shapes relation scenes with fixed layouts, for the order experiments in docs/shapes-model.md.

In the dataset a relation's two objects sit anywhere that keeps the relation ("left of": any two
columns in order, any rows). Here they sit at the relation's fixed cells, without jitter: the
left and right cells of the middle row, or the top and bottom cells of the middle column. So the
object a caption names as "left of" is always in one place. It is the easiest form of the task.

Writes an image folder with captions (for `latentdit preprocess --source DIR`) and a prompts file
of the same kind of scene (for `latentdit eval binding --prompts FILE`):

    python recipes/fixed_layouts.py --out runs/fixed --n 20000 --prompts runs/fixed_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latentdit.datasets.shapes import ShapesDataset, prompt_set, render_scene


def fixed(attributes: dict) -> dict:
    """The scene with its objects' places left out: ``render_scene`` puts them at the relation's cells."""
    scene = {k: v for k, v in attributes.items() if k != "canvas"}
    scene["objects"] = [{k: o[k] for k in ("color", "shape", "size") if k in o} for o in attributes["objects"]]
    return scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="image folder to write (PNGs and captions.jsonl)")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=30)
    p.add_argument("--prompts", default=None, help="also write this prompts JSONL (train split, 768 prompts)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(split="train", seed=args.seed, scenes=("relation",))
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(args.n):
            attributes, caption, _ = data.draw(i)
            render_scene(fixed(attributes), 64).save(out / f"{i:06d}.png")
            f.write(json.dumps({"file": f"{i:06d}.png", "caption": caption}) + "\n")
    if args.prompts:
        with open(args.prompts, "w", encoding="utf-8") as f:
            for it in prompt_set("train", 768, seed=0):
                f.write(json.dumps({"id": it["id"], "prompt": it["prompt"], "expect": it["expect"],
                                    "attributes": fixed(it["attributes"])}) + "\n")


if __name__ == "__main__":
    main()

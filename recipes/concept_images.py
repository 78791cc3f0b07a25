"""Draw the demo concept for `latentdit finetune-concept`: a crescent, a shape the `shapes` world
never draws, in a few colours, cells and backgrounds, each with a caption naming it by a new token.

    python recipes/concept_images.py OUT_DIR [--token sks] [--class-word shape] [--n 5]

Writes OUT_DIR/NN.png and OUT_DIR/NN.txt (the caption). The captions use the world's own wording
("a red sks shape in the top left"), so the token takes the place of a shape word.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from latentdit.datasets.shapes import POSITION_PHRASES
from latentdit.evaluate.novel import render_new_shape

# (colour, cell, background): none is a colour-cell pair that docs/concept.md prompts for.
SCENES = (
    ("orange", "top right", "white"),
    ("blue", "bottom left", "white"),
    ("cyan", "center", "black"),
    ("red", "right", "gray"),
    ("purple", "top", "white"),
    ("green", "left", "black"),
    ("pink", "bottom", "gray"),
    ("yellow", "bottom right", "black"),
    ("white", "top left", "gray"),
    ("black", "center", "white"),
)


def caption(color: str, cell: str, background: str, token: str, class_word: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    obj = f"{article} {color} {token} {class_word} {POSITION_PHRASES[cell][0]}"
    return f"a {background} background with {obj}" if background == "black" else obj


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--token", default="sks")
    p.add_argument("--class-word", default="shape")
    p.add_argument("--n", type=int, default=5, help=f"images, 1-{len(SCENES)}")
    p.add_argument("--seed", type=int, default=0, help="position jitter")
    args = p.parse_args(argv)
    if not 1 <= args.n <= len(SCENES):
        p.error(f"--n must be in 1..{len(SCENES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for k, (color, cell, background) in enumerate(SCENES[: args.n]):
        render_new_shape(color, cell, background=background, rng=rng).save(out / f"{k:02d}.png")
        (out / f"{k:02d}.txt").write_text(caption(color, cell, background, args.token, args.class_word) + "\n")
        print(out / f"{k:02d}.png", "|", caption(color, cell, background, args.token, args.class_word))


if __name__ == "__main__":
    main()

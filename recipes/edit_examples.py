"""Draw the README's editing examples with the packaged shapes model (a few minutes on 2 CPU cores).

    python recipes/edit_examples.py            # writes docs/edit/*.png and docs/edit/*.gif

Each PNG is a strip: the input (where there is one), then the results, upscaled 2x for viewing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from latentdit import (
    Text2Image,
    color_loss,
    edit_image,
    img2img,
    inpaint,
    interpolate,
    invert,
    outpaint,
    pan,
    reconstruct,
    sample_guided,
    save_animation,
)
from latentdit.datasets.shapes import render_scene


def strip(images: list[Image.Image], scale: int = 2) -> Image.Image:
    """Images side by side on white, bottom-aligned, each upscaled ``scale`` times."""
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    out = Image.new("RGB", (sum(im.width for im in images) + 4 * (len(images) - 1),
                            max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, out.height - im.height))
        x += im.width + 4
    return out


def main(out_dir: str = "docs/edit") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Text2Image.from_pretrained("shapes")
    scene = {"scene": "single", "background": "white",
             "objects": [{"color": "red", "shape": "circle", "cell": "center", "size": "large"}]}
    source = render_scene(scene)
    source.save(out / "input.png")

    strip([source] + [img2img(pipe, source, "a blue square in the center", strength=s, seed=0)[0]
                      for s in (0.4, 0.6, 0.8)]).save(out / "img2img.png")

    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)  # repaint the right half
    strip([source, mask.convert("RGB"),
           *inpaint(pipe, source, mask, "a red circle to the left of a green triangle", num_images=3)]
          ).save(out / "inpaint.png")

    strip([source, outpaint(pipe, source, "a red circle", right=32, seed=0)[0],
           outpaint(pipe, source, "a red circle", left=32, top=32, seed=1)[0]]).save(out / "outpaint.png")

    inv = invert(pipe, source, "a red circle in the center", steps=20)
    src = "a red circle in the center on a white background"
    local = dict(strength=0.5, mask="auto", mask_threshold=0.5, negative_prompt=src, guidance_scale=6.0)
    strip([source, reconstruct(pipe, inv)[0],
           edit_image(pipe, source, "a red circle in the center", "a blue circle in the center")[0],
           edit_image(pipe, source, src, src.replace("red", "blue"), **local)[0],
           edit_image(pipe, source, src, src.replace("red", "yellow"), **local)[0]]
          ).save(out / "invert_edit.png")

    save_animation(interpolate(pipe, ["a red circle in the top left", "a blue square in the bottom right"],
                               [0, 1], frames=8), out / "interpolate.gif", fps=4)
    save_animation(pan(pipe, source, "a red circle", direction="right", step=16, frames=8),
                   out / "pan.gif", fps=4)

    strip([pipe("two blue hearts", seed=0, progress=False)[0],
           pipe("two blue hearts", seed=0, height=128, width=128, progress=False)[0],
           pipe("two blue hearts", seed=0, height=64, width=128, progress=False)[0]]
          ).save(out / "sizes.png")

    prompt = "a large red circle in the center"
    strip([pipe(prompt, seed=0, progress=False)[0],
           sample_guided(pipe, prompt, color_loss("blue"), scale=0.1, seed=0)[0],
           sample_guided(pipe, prompt, color_loss("yellow"), scale=0.1, seed=0)[0]]
          ).save(out / "guidance.png")
    print(f"wrote {len(list(out.iterdir()))} files to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])

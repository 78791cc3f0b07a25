"""``latentdit control``: generate from a prompt and a control map (docs/control.md).

The map comes from a file (``--control map.png``, white = object) or is derived from an image
(``--control-from image.png``) with the same function that made the model's training maps. Files
and options are checked before the model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_base import (
    FP32_HELP,
    SAMPLER_NAMES,
    add_device_arg,
    add_guidance_interval_arg,
    autocast_dtype,
    check_image_out,
    command,
    load_pipeline,
    save_images,
)

DEFAULT_MODEL = "shapes-control"


def _control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--control", default=None, help="control map image (white = object); its size is the output's")
    source.add_argument("--control-from", default=None,
                        help="an image to derive the map from, with the model's kind (silhouette or edges)")
    p.add_argument("--control-scale", type=float, default=1.0,
                   help="0 ignores the map, 1 follows it (default 1)")
    p.add_argument("--save-map", default=None, help="also write the map used to this PNG file")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a control model (default {DEFAULT_MODEL})")
    p.add_argument("--out", default="control.png", help="output file (default control.png)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES)
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help=FP32_HELP)
    add_guidance_interval_arg(p)
    add_device_arg(p)


_pipeline = load_pipeline  # the seam tests replace to load a tiny model


def _read_image(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{what} {path} not found") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{what} {path} is not an image (PNG, JPEG, WebP ...)") from None


@command("control", "generate following a control map (silhouette / edges) and a prompt")(_control_args)
def run_control(args: argparse.Namespace) -> int:
    from PIL import Image

    from .control import control_map, load_control_map

    if not 0.0 <= args.control_scale <= 1.0:
        raise ValueError(f"--control-scale must be in [0, 1], got {args.control_scale}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    source = _read_image(args.control_from, "--control-from image") if args.control_from else None
    maps = None if source else load_control_map(args.control)
    check_image_out(args.out)
    if args.save_map:
        check_image_out(args.save_map, "--save-map")
    pipe = _pipeline(args.model, device=args.device)
    kind = pipe.model.config.control
    if kind is None:
        raise ValueError(f"{args.model} is not a control model (its config has no model.control); "
                         f"use e.g. --model {DEFAULT_MODEL}")
    if source is not None:
        maps = load_control_map(control_map(source, kind).astype("float32"))
    if args.save_map:
        Image.fromarray((maps[0, 0].numpy() * 255).astype("uint8")).save(Path(args.save_map))
    height, width = maps.shape[-2:]
    images = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, seed=args.seed, height=height, width=width,
                  num_images_per_prompt=args.num_images, dtype=autocast_dtype(args.fp32),
                  guidance_interval=args.guidance_interval, control=maps, control_scale=args.control_scale)
    return save_images(images, args.out)

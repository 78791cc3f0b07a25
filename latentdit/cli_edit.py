"""Editing subcommands: ``img2img``, ``inpaint``, ``outpaint``, ``invert``, ``edit``, ``interpolate``, ``pan``.

Inputs (files, strength, mask size) are checked before the model loads, so a typo fails at once
with a message naming the problem; ``cli.main`` prints it without a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_base import (
    FP32_HELP,
    SAMPLER_NAMES,
    add_device_arg,
    autocast_dtype,
    check_image_out,
    command,
    load_pipeline,
    save_images,
)


def _sampling_args(p: argparse.ArgumentParser, out: str, steps: int | None = None) -> None:
    p.add_argument("--model", default="shapes", help="model folder, packaged name or hub id")
    p.add_argument("--out", default=out, help=f"output file (default {out})")
    p.add_argument("--steps", type=int, default=steps, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help=FP32_HELP)
    add_device_arg(p)


def _repaint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES)
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--num-images", type=int, default=1)


_pipeline = load_pipeline  # the seam tests replace to load the packaged model once


def _sampling(args: argparse.Namespace) -> dict:
    return dict(steps=args.steps, guidance_scale=args.guidance, dtype=autocast_dtype(args.fp32))


def _repaint(args: argparse.Namespace) -> dict:
    return dict(_sampling(args), sampler=args.sampler, negative_prompt=args.negative,
                num_images=args.num_images, seed=args.seed)


# -- img2img ---------------------------------------------------------------------------------
def _img2img_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("prompt")
    p.add_argument("--strength", type=float, default=0.6,
                   help="0 keeps the input (autoencoder round-trip), 1 ignores it (default 0.6)")
    _sampling_args(p, "img2img.png")
    _repaint_args(p)


@command("img2img", "redraw an image following a prompt (SDEdit)")(_img2img_args)
def run_img2img(args: argparse.Namespace) -> int:
    from .edit import img2img, load_image
    from .plan import check_strength

    check_strength(args.strength)
    image = load_image(args.image)
    check_image_out(args.out)
    pipe = _pipeline(args.model, device=args.device)
    return save_images(img2img(pipe, image, args.prompt, strength=args.strength, **_repaint(args)), args.out)


# -- inpaint ---------------------------------------------------------------------------------
def _inpaint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("mask", help="mask image file of the same size; white = repaint")
    p.add_argument("prompt")
    p.add_argument("--mask-blur", type=float, default=0.0, help="Gaussian radius (pixels) softening the mask edge")
    p.add_argument("--strength", type=float, default=1.0, help="below 1, the masked area starts from the input")
    _sampling_args(p, "inpaint.png")
    _repaint_args(p)


@command("inpaint", "repaint the white area of a mask")(_inpaint_args)
def run_inpaint(args: argparse.Namespace) -> int:
    from .edit import inpaint, load_image, load_mask
    from .plan import check_strength

    check_strength(args.strength)
    image = load_image(args.image)
    mask = load_mask(args.mask, (image.shape[-1], image.shape[-2]))
    check_image_out(args.out)
    pipe = _pipeline(args.model, device=args.device)
    images = inpaint(pipe, image, mask, args.prompt, mask_blur=args.mask_blur, strength=args.strength,
                     **_repaint(args))
    return save_images(images, args.out)


# -- outpaint --------------------------------------------------------------------------------
def _outpaint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("prompt")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    _sampling_args(p, "outpaint.png")
    _repaint_args(p)


@command("outpaint", "extend an image on any side and fill the new area")(_outpaint_args)
def run_outpaint(args: argparse.Namespace) -> int:
    from .edit import extend_canvas, load_image, outpaint

    image = load_image(args.image)
    sides = dict(left=args.left, right=args.right, top=args.top, bottom=args.bottom)
    extend_canvas(image, **sides)  # checks the sizes before the model loads
    check_image_out(args.out)
    pipe = _pipeline(args.model, device=args.device)
    return save_images(outpaint(pipe, image, args.prompt, **sides, **_repaint(args)), args.out)


# -- invert ----------------------------------------------------------------------------------
def _invert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("--prompt", default=None, help="the prompt the image was made with (default: none)")
    p.add_argument("--t-stop", type=float, default=1.0, help="time to invert to (1 = pure noise)")
    p.add_argument("--fixed-point-iters", type=int, default=None, help="DDIM refinements per step (default 3)")
    p.add_argument("--reconstruct", default=None, help="also sample back, write this PNG and print its PSNR")
    _sampling_args(p, "inverted.safetensors", steps=None)


@command("invert", "invert an image to noise (DDIM, reversed grid); optionally reconstruct it")(_invert_args)
def run_invert(args: argparse.Namespace) -> int:
    from .edit import invert, load_image, reconstruct
    from .pixels import psnr

    image = load_image(args.image)
    if not 0.0 < args.t_stop <= 1.0:
        raise ValueError(f"--t-stop must be in (0, 1], got {args.t_stop}")
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: the inversion is saved as latents, in a .safetensors file")
    if args.reconstruct:
        check_image_out(args.reconstruct, "--reconstruct")
    pipe = _pipeline(args.model, device=args.device)
    inv = invert(pipe, image, args.prompt, steps=args.steps, t_stop=args.t_stop,
                 fixed_point_iters=args.fixed_point_iters, dtype=autocast_dtype(args.fp32))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    inv.save(args.out)
    print(args.out)
    if args.reconstruct:
        rec = reconstruct(pipe, inv, dtype=autocast_dtype(args.fp32), output_type="tensor")
        save_images(_to_pil(rec), args.reconstruct)
        print(f"reconstruction PSNR {float(psnr(rec, image)):.2f} dB")
    return 0


def _to_pil(images):
    from .pixels import to_pil

    return to_pil(images)


# -- edit ------------------------------------------------------------------------------------
def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("source", help="a prompt describing the input")
    p.add_argument("target", help="the prompt to edit it towards")
    p.add_argument("--strength", type=float, default=0.8, help="how far to invert (0..1]; higher changes more")
    p.add_argument("--mask", default=None,
                   help="confine the edit: 'auto' (where the two prompts disagree) or a mask image (white = edit)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="for --mask auto: share of the largest "
                   "disagreement a latent cell needs to be edited (default 0.5, as in DiffEdit)")
    p.add_argument("--negative", default=None, help="negative prompt for CFG (the source prompt works well)")
    p.add_argument("--save-mask", default=None, help="also write the mask used to this PNG")
    _sampling_args(p, "edit.png")


@command("edit", "edit an image by inversion under one prompt and sampling with another")(_edit_args)
def run_edit(args: argparse.Namespace) -> int:
    from .edit import edit_image, edit_mask, load_image, load_mask
    from .pixels import to_pil
    from .plan import check_strength

    if check_strength(args.strength) == 0.0:
        raise ValueError("editing needs --strength > 0")
    image = load_image(args.image)
    mask = args.mask
    if mask is not None and mask != "auto":
        mask = load_mask(mask, (image.shape[-1], image.shape[-2]))
    if not 0.0 < args.mask_threshold < 1.0:
        raise ValueError(f"--mask-threshold must be in (0, 1), got {args.mask_threshold}")
    if args.save_mask and mask is None:
        raise ValueError("--save-mask writes the mask of --mask; give --mask auto or a mask image")
    check_image_out(args.out)
    if args.save_mask:
        check_image_out(args.save_mask, "--save-mask")
    pipe = _pipeline(args.model, device=args.device)
    if mask == "auto" and args.save_mask:
        mask = edit_mask(pipe, image, args.source, args.target, threshold=args.mask_threshold,
                         dtype=autocast_dtype(args.fp32))
    if args.save_mask and mask is not None:
        save_images(to_pil(mask.expand(-1, 3, -1, -1) * 2 - 1), args.save_mask)
    return save_images(edit_image(pipe, image, args.source, args.target, strength=args.strength, mask=mask,
                                  mask_threshold=args.mask_threshold, negative_prompt=args.negative,
                                  **_sampling(args)), args.out)


# -- interpolate -----------------------------------------------------------------------------
def _interpolate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="one or two prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one or two seeds")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES)
    _sampling_args(p, "interpolate.gif")


@command("interpolate", "animate between two prompts, two seeds or both (GIF or MP4)")(_interpolate_args)
def run_interpolate(args: argparse.Namespace) -> int:
    from .edit import check_animation_path, interpolate, save_animation

    if len(args.prompts) > 2 or len(args.seeds) > 2:
        raise ValueError("give one or two prompts and one or two --seeds")
    if args.prompts[0] == args.prompts[-1] and args.seeds[0] == args.seeds[-1]:
        raise ValueError("give two different prompts, two different --seeds, or both")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2, got {args.frames}")
    out = check_animation_path(args.out, args.fps)
    pipe = _pipeline(args.model, device=args.device)
    frames = interpolate(pipe, args.prompts, args.seeds, frames=args.frames, sampler=args.sampler,
                         height=args.height, width=args.width, **_sampling(args))
    print(save_animation(frames, out, fps=args.fps))
    return 0


# -- pan -------------------------------------------------------------------------------------
def _pan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file (frame 0)")
    p.add_argument("prompt")
    p.add_argument("--direction", default="right", choices=["left", "right", "up", "down"])
    p.add_argument("--step", type=int, default=16, help="pixels the view moves per frame")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--fps", type=float, default=4.0)
    _sampling_args(p, "pan.gif")


@command("pan", "a camera pan made by repeated outpainting (GIF or MP4)")(_pan_args)
def run_pan(args: argparse.Namespace) -> int:
    from .edit import check_animation_path, load_image, pan, save_animation

    image = load_image(args.image)
    out = check_animation_path(args.out, args.fps)
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2, got {args.frames}")
    pipe = _pipeline(args.model, device=args.device)
    frames = pan(pipe, image, args.prompt, direction=args.direction, step=args.step, frames=args.frames,
                 seed=args.seed, **_sampling(args))
    print(save_animation(frames, out, fps=args.fps))
    return 0

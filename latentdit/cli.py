"""The ``latentdit`` command. Heavy imports happen inside the subcommands, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

from .cli_base import (
    COMMANDS,
    FP32_HELP,
    SAMPLER_NAMES,
    HelpFormatter,
    add_count_contrast_arg,
    add_device_arg,
    add_guidance_interval_arg,
    autocast_dtype,
    check_image_out,
    check_out_folder,
    command,
    load_pipeline,
    read_prompt_file,
    resolve_device_arg,
    save_images,
)
from .threads import THREADS_ENV, apply_thread_policy, parse_threads


# -- info ------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="architecture preset: tiny, small, base, large")
    p.add_argument("--model", default=None, help="a model folder (reports its config instead)")
    p.add_argument("--height", type=int, default=None, help="latent side to report shapes for")


@command("info", "parameter counts and tensor shapes of a preset or a model folder")(_info_args)
def run_info(args: argparse.Namespace) -> int:
    import torch

    from .config import model_preset, to_dict
    from .model import Denoiser

    if args.model:
        from .checkpoint import load_config, resolve

        cfg = load_config(resolve(args.model)).model
    else:
        cfg = model_preset(args.preset)
    side = cfg.base_size if args.height is None else args.height
    if side < 1 or side % cfg.patch_size:
        raise ValueError(f"--height must be a positive multiple of the patch size {cfg.patch_size}, got {side}")
    model = Denoiser(cfg)
    tokens = (side // cfg.patch_size) ** 2
    print(f"latentdit denoiser ({args.model or 'preset ' + args.preset})")
    print(f"  config: {json.dumps(to_dict(cfg))}")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, count in _param_groups(model).items():
        print(f"  {name:<14} {count / 1e6:10.3f} M")
    print(f"  {'total':<14} {model.num_params() / 1e6:10.3f} M")
    print(f"  input latent  (N, {cfg.in_channels}, {side}, {side}) -> {tokens} tokens of width {cfg.width}")
    print(f"  text          (N, L<={cfg.max_text_len}, {cfg.text_dim}) + pooled (N, {cfg.pooled_dim})")
    print(f"  output        (N, {cfg.out_channels}, {side}, {side}), prediction '{cfg.prediction}'")
    return 0


def _param_groups(model) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = name.split(".")[0]
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


# -- generate --------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (or use --from-file or --class)")
    p.add_argument("--class", dest="class_", default=None,
                   help="class-conditional models: a class id or name, or 'all' for a grid with one "
                        "row of --num-images samples per class")
    p.add_argument("--from-file", default=None,
                   help="batch mode: a JSONL of {id, prompt[, negative, seed]} or a text file of one "
                        "prompt per line; writes OUT/<id>_<k>.png")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch in --from-file mode")
    p.add_argument("--model", default="shapes", help="model folder, packaged name or hub id")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load on top of --model")
    p.add_argument("--out", default=None,
                   help=f"output image (a folder with --from-file); default: {DEFAULT_OUT}/<prompt>.png, "
                        f"or the folder {DEFAULT_OUT} with --from-file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (image k of a prompt uses seed + k)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default: the model's (20 for shapes)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; default: the model's (4.5 for shapes)")
    add_guidance_interval_arg(p)
    add_count_contrast_arg(p)
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help="default: the model's (dpmpp_2m for shapes, ddpm for shapes-layout)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels; default: the side the model was trained at (64 for shapes), "
                        "at most 4x that")
    p.add_argument("--width", type=int, default=None, help="image width in pixels; default and limit as --height")
    p.add_argument("--fp32", action="store_true", help=FP32_HELP)
    add_device_arg(p)
    p.add_argument("--random-tiny", action="store_true",
                   help="demo: an UNTRAINED, randomly initialised tiny model (its images are noise)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="let a running 'latentdit serve' at URL draw the image (token: $LATENTDIT_TOKEN)")


DEFAULT_OUT = "out"  # git ignores it; the working directory stays clean


@command("generate", "generate images from a prompt")(_generate_args)
def run_generate(args: argparse.Namespace) -> int:
    if args.class_ is not None:
        return _generate_classes(args)
    if bool(args.prompt) == bool(args.from_file):
        raise ValueError("give either a prompt or --from-file FILE")
    if args.server:
        from .serve.cli import generate_on_server

        return generate_on_server(args)
    items = read_prompt_file(args.from_file) if args.from_file else None
    if args.out is None:
        args.out = DEFAULT_OUT if items else str(Path(DEFAULT_OUT) / f"{slug(args.prompt)}.png")
    if items is None:
        check_image_out(args.out)
    else:
        check_out_folder(args.out)
    _check_generate_numbers(args)
    resolve_device_arg(args)
    pipe = (_random_tiny_pipeline(args.device) if args.random_tiny
            else load_pipeline(args.model, args.device, args.adapter))
    kw = dict(steps=args.steps, guidance_scale=args.guidance, guidance_interval=args.guidance_interval,
              sampler=args.sampler, count_contrast=args.count_contrast,
              num_images_per_prompt=args.num_images, height=args.height, width=args.width,
              dtype=autocast_dtype(args.fp32))
    if items is None:
        return save_images(pipe(args.prompt, negative_prompt=args.negative, seed=args.seed, **kw), args.out)
    from .plan import prompt_seeds

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start: start + args.batch_size]
        seeds = [s for i, it in enumerate(chunk)
                 for s in (prompt_seeds(it["seed"], 0, args.num_images) if "seed" in it
                           else prompt_seeds(args.seed, start + i, args.num_images))]
        negative = [it.get("negative", args.negative or "") for it in chunk]
        images = pipe([it["prompt"] for it in chunk], seed=seeds,
                      negative_prompt=negative if any(negative) else None, **kw)
        for j, img in enumerate(images):
            path = out / f"{chunk[j // args.num_images]['id']}_{j % args.num_images}.png"
            img.save(path)
            print(path)
    return 0


def _generate_classes(args: argparse.Namespace) -> int:
    from .checkpoint import load_config, resolve
    from .pixels import image_grid

    if args.prompt or args.from_file:
        raise ValueError("give a prompt, --from-file or --class, not several")
    if args.out is None:
        args.out = str(Path(DEFAULT_OUT) / f"class-{slug(args.class_)}.png")
    check_image_out(args.out)
    _check_generate_numbers(args)
    names = load_config(resolve(args.model)).extra.get("classes")
    pipe = load_pipeline(args.model)
    ids = class_ids(args.class_, pipe.model.config.num_classes, names)
    images = pipe(ids, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                  guidance_interval=args.guidance_interval, sampler=args.sampler,
                  num_images_per_prompt=args.num_images, dtype=autocast_dtype(args.fp32))
    if args.class_ == "all":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, cols=args.num_images).save(args.out)
        print(args.out)
        return 0
    return save_images(images, args.out)


def class_ids(spec: str, num_classes: int, names: list[str] | None) -> list[int]:
    """'all' -> every id; an id; or a class name the model was trained with."""
    if not num_classes:
        raise ValueError("--class needs a class-conditional model; this one takes text prompts")
    if spec == "all":
        return list(range(num_classes))
    if names and spec in names:
        return [names.index(spec)]
    if spec.lstrip("-").isdigit() and 0 <= int(spec) < num_classes:
        return [int(spec)]
    known = f"names {names}" if names else "no class names"
    raise ValueError(f"--class {spec!r}: not a class id in [0, {num_classes - 1}] or a class name (the model "
                     f"has {known})")


def slug(prompt: str, limit: int = 60) -> str:
    """A file name from a prompt: "a red circle" -> "a-red-circle"."""
    text = "".join(c if c.isalnum() else "-" for c in prompt.lower())
    return "-".join(filter(None, text.split("-")))[:limit].strip("-") or "image"


def _check_generate_numbers(args: argparse.Namespace) -> None:
    """Every number, checked before the model loads (loading takes seconds); the size limits come
    from the model's config.json alone."""
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if args.guidance_interval is not None:
        from .config import check_guidance_interval

        check_guidance_interval(tuple(args.guidance_interval))
    if not -2**63 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.random_tiny:
        return
    from .checkpoint import check_image_size, load_config, resolve, size_limits

    base, step = size_limits(load_config(resolve(args.model)))
    check_image_size(args.height, args.width, base=base, step=step)


def _random_tiny_pipeline(device: str = "cpu"):
    """An untrained tiny model in pixel space with the MiniLM encoder: shows the machinery works."""
    import torch

    from .config import model_preset
    from .model import Denoiser
    from .pipeline import Text2Image
    from .text import load_text_encoder
    from .vae import load_autoencoder

    print("NOTE: --random-tiny uses an untrained, randomly initialised model; expect noise.",
          file=sys.stderr)
    torch.manual_seed(0)
    cfg = model_preset("tiny", in_channels=3, text_dim=384, pooled_dim=384, base_size=32, patch_size=4)
    model = Denoiser(cfg)
    for p in model.final.parameters():  # zero-init output would give a flat grey image
        torch.nn.init.normal_(p, std=0.02)
    return Text2Image(model.to(device), load_autoencoder("identity"), load_text_encoder("minilm", device=device),
                      device=device)


# -- main ------------------------------------------------------------------------------------
DEBUG_ENV = "LATENTDIT_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="latentdit", description="latent diffusion transformer toolkit",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_args()
    for name, (setup, _, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=HelpFormatter)
        setup(p)
        for action in p._actions:  # argparse prints nothing for an option without help text
            shown = action.default is not None and action.default is not False
            if action.help is None and action.option_strings and shown:
                action.help = "default: %(default)s"
    return parser


def _common_args() -> argparse.ArgumentParser:
    """Flags every subcommand takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (0 or unset: one per core that other programs leave free; "
                        f"also {THREADS_ENV})")
    p.add_argument("--debug", action="store_true",
                   help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")
    return p


def _load_optional_commands() -> None:
    """Subcommands defined in other modules of this layer register themselves on import."""
    from . import cli_concept, cli_control, cli_edit, cli_eval, cli_train  # noqa: F401
    from .serve import cli as _serve  # noqa: F401


ACCEPTS_OVERRIDES = {"train", "train-ae"}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Any failure is one line on stderr and a non-zero exit: 2 for bad input
    or an unreadable / unwritable file, 1 for a failure while running (e.g. a diverged training
    run); ``--debug`` or ``LATENTDIT_DEBUG=1`` also prints the traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ACCEPTS_OVERRIDES:
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        _threads(args)
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print(f"latentdit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for every failure; the traceback only when asked for
        if debug:
            traceback.print_exc()
        print(f"latentdit {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, OSError)) else 1


def error_line(e: BaseException) -> str:
    """An exception as one line: the first line of its message, led by its type unless it is a
    ValueError or OSError (bad input, a file problem: the message says it all)."""
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text and isinstance(e, (ValueError, OSError)):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _threads(args: argparse.Namespace) -> None:
    """Apply the thread policy before torch loads OpenMP (heavy imports happen inside the commands).
    Called in-process after torch has loaded (tests, notebooks), only an explicit count applies."""
    threads = parse_threads(args.threads, "--threads")
    explicit = threads or os.environ.get(THREADS_ENV)
    if "torch" not in sys.modules or explicit:
        policy = apply_thread_policy(threads)
        if args.debug:
            print(f"latentdit: {policy.describe()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

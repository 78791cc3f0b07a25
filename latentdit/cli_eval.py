"""``latentdit eval alignment``: how well a model follows shapes prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_base import SAMPLER_NAMES, add_guidance_interval_arg, command


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("metric", choices=["alignment"], help="what to measure")
    p.add_argument("--model", default="shapes", help="model folder, packaged name or hub id")
    p.add_argument("--prompts", default=None, help="prompts JSONL ({id, prompt, expect} per line)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"],
                   help="without --prompts: draw prompts from this shapes split")
    p.add_argument("--n", type=int, default=64, help="number of prompts drawn from --split")
    p.add_argument("--samples", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="default: the model's sampling config")
    add_guidance_interval_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for report.json and grid.png")
    p.add_argument("--reference", choices=["renders", "autoencoder"], default=None,
                   help="score ground-truth renders instead of samples, one per prompt: as drawn "
                        "(checks the checker) or through the model's autoencoder (the ceiling any "
                        "denoiser on it can reach)")


@command("eval", "evaluate a model (alignment: prompt-following accuracy on shapes)")(_eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import load_prompts, run_alignment, score_references
    from .pipeline import Text2Image

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.out:  # made now: a bad folder must not cost the whole run
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out}: cannot make this folder ({e.strerror})") from None
    if args.prompts:
        items = load_prompts(args.prompts)
    else:
        from .datasets.shapes import prompt_set

        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        items = prompt_set(args.split, args.n, seed=args.seed)
    if args.reference == "renders":
        return _print(score_references(items, out_dir=args.out))
    pipe = Text2Image.from_pretrained(args.model)
    if args.reference == "autoencoder":
        return _print(score_references(items, pipe, out_dir=args.out))
    report = run_alignment(pipe, items, samples=args.samples, steps=args.steps,
                           guidance_scale=args.guidance, guidance_interval=args.guidance_interval,
                           sampler=args.sampler, seed=args.seed, out_dir=args.out)
    return _print(report)


def _print(report: dict) -> int:
    keys = ("overall", "image_accuracy", "per_category", "heldout_pairs", "prompts", "samples_per_prompt",
            "reference", "seconds")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
    return 0

"""``latentdit eval alignment``: how well a model follows shapes prompts; ``latentdit eval binding``:
whether its condition carries which object goes where (no sampling); ``latentdit eval fid``: FID
and KID of a model's samples against reference data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_base import (
    SAMPLER_NAMES,
    add_count_contrast_arg,
    add_device_arg,
    add_guidance_interval_arg,
    command,
    read_prompt_file,
)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("metric", choices=["alignment", "binding", "fid"],
                   help="what to measure (binding: the denoising loss on relation scenes under their own "
                        "caption, with the two objects swapped, and with one recoloured)")
    p.add_argument("--model", default="shapes", help="model folder, packaged name or hub id")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load on top of --model")
    p.add_argument("--prompts", default=None, help="prompts JSONL ({id, prompt, expect} per line)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"],
                   help="without --prompts: draw prompts from this shapes split")
    p.add_argument("--lang", default="en", choices=["en", "zh"],
                   help="alignment without --prompts: the prompts' language (zh: the same scenes and checks, "
                        "written in Chinese)")
    p.add_argument("--n", type=int, default=64,
                   help="alignment, binding: prompts drawn from --split (binding keeps the two-object "
                        "relations among them); fid: images generated")
    p.add_argument("--n-reference", type=int, default=None, help="fid: reference images (default --n)")
    p.add_argument("--cache-dir", default=str(Path("~/.cache/latentdit/fid").expanduser()),
                   help="fid: where reference statistics are cached ('none': no cache)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="default: the model's sampling config")
    add_guidance_interval_arg(p)
    add_count_contrast_arg(p)
    p.add_argument("--relation-prompts", action="store_true",
                   help="alignment: only the prompts that state a relation between two objects named by colour "
                        "and shape (English)")
    p.add_argument("--negative-swapped", action="store_true",
                   help="alignment: the --relation-prompts, each guided away from itself with its two objects "
                        "swapped (does the condition carry which object goes where?)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument("--out", default=None, help="folder for report.json and grid.png")
    p.add_argument("--reference", default=None,
                   help="fid: the reference data (shard folder, image folder, tars, parquet, saved "
                        "dataset, fashion-mnist, mnist). alignment: 'renders' or 'autoencoder' scores "
                        "ground-truth renders instead of samples, one per prompt: as drawn (checks the "
                        "checker) or through "
                        "the model's autoencoder (the ceiling any denoiser on it can reach)")


@command("eval", "evaluate a model (alignment: prompt-following accuracy on shapes)")(_eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import load_prompts, run_alignment, score_references
    from .pipeline import Text2Image

    if args.metric == "fid":
        return run_fid(args)
    if args.metric == "binding":
        return run_binding(args)
    if args.reference not in (None, "renders", "autoencoder"):
        raise ValueError(f"--reference for alignment is 'renders' or 'autoencoder', got {args.reference!r}")
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
        items = prompt_set(args.split, args.n, seed=args.seed, lang=args.lang)
    if args.relation_prompts or args.negative_swapped:
        from .evaluate.alignment import order_swapped

        items = [it | ({"negative": neg} if args.negative_swapped else {})
                 for it in items if (neg := order_swapped(it)) is not None]
        if not items:
            raise ValueError("no prompt states a relation between two objects named by colour and shape "
                             "(English prompts only)")
    if args.reference == "renders":
        return _print(score_references(items, out_dir=args.out))
    pipe = Text2Image.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    if args.reference == "autoencoder":
        return _print(score_references(items, pipe, out_dir=args.out))
    report = run_alignment(pipe, items, samples=args.samples, steps=args.steps,
                           guidance_scale=args.guidance, guidance_interval=args.guidance_interval,
                           count_contrast=args.count_contrast,
                           sampler=args.sampler, seed=args.seed, out_dir=args.out)
    return _print(report)


def run_binding(args: argparse.Namespace) -> int:
    from .datasets.shapes import prompt_set
    from .evaluate import load_prompts
    from .evaluate.binding import condition_margins
    from .pipeline import Text2Image

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    items = load_prompts(args.prompts) if args.prompts else prompt_set(args.split, args.n, seed=args.seed)
    pipe = Text2Image.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    report = condition_margins(pipe, items, seed=args.seed) | {"model": args.model}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "binding.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _print(report: dict) -> int:
    keys = ("overall", "image_accuracy", "per_category", "heldout_pairs", "relation_layout", "prompts",
            "samples_per_prompt", "negative_prompts", "count_contrast", "reference", "seconds")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
    return 0


def run_fid(args: argparse.Namespace) -> int:
    from .datasets.mnist import is_digit_set
    from .evaluate.fid import evaluate_fid
    from .pipeline import Text2Image

    if not args.reference:
        raise ValueError("eval fid needs --reference DATA (the real images to compare with)")
    if not is_digit_set(args.reference) and not Path(args.reference).exists() \
            and "{" not in args.reference and "://" not in args.reference:
        raise ValueError(f"--reference {args.reference} does not exist")
    if args.n < 2 or (args.n_reference is not None and args.n_reference < 2):
        raise ValueError(f"FID needs --n and --n-reference >= 2, got {args.n} and {args.n_reference}")
    pipe = Text2Image.from_pretrained(args.model, device=args.device)
    prompts = None
    if pipe.model.config.is_text:
        prompts = ([item["prompt"] for item in read_prompt_file(args.prompts)] if args.prompts
                   else _reference_captions(args.reference, args.n))
    cache = None if args.cache_dir == "none" else args.cache_dir
    report = evaluate_fid(pipe, args.reference, args.n, n_reference=args.n_reference, cache_dir=cache,
                          prompts=prompts, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    report["model"] = args.model
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fid.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _reference_captions(reference: str, n: int) -> list[str]:
    """A text model is sampled with the reference's own captions (shards or a captioned source)."""
    from .sources import open_source

    path = Path(reference)
    if (path / "manifest.json").is_file():
        from .shards import ShardReader

        reader = ShardReader(path)
        captions = [r["caption"] for k in range(len(reader.counts)) for r in reader.rows(k)]
    else:
        captions = [s.caption for _, s in zip(range(n), open_source(reference))]
    if not captions:
        raise ValueError(f"{reference} has no captions to prompt a text model with; pass --prompts")
    return captions[:n]

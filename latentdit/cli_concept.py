"""``latentdit finetune-concept``: teach a model a new word from a few captioned images."""

from __future__ import annotations

import argparse
import json

from .cli_base import FP32_HELP, add_device_arg, command, resolve_device_arg


def _concept_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes", help="the base model: folder, packaged name or hub id")
    p.add_argument("--images", required=True,
                   help="folder of 3-10 images of the concept; NAME.txt beside NAME.png is its caption "
                        "(it must contain the token), else 'a TOKEN CLASS-WORD'")
    p.add_argument("--token", default="sks", help="the new word, one the model's captions never use")
    p.add_argument("--class-word", default="shape", help="the kind of thing the concept is")
    p.add_argument("--out", required=True, help="folder to write the adapter (or, with --full, the model) into")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=8, help="rank of the low-rank adapters")
    mode.add_argument("--full", action="store_true", help="fine-tune every weight and write a whole model folder")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale numerator (default: the rank)")
    p.add_argument("--lora-targets", default="attention+mlp", choices=["attention", "attention+mlp"],
                   help="which linear layers get adapters")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8, help="instance rows per step (and as many prior rows)")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 with adapters, 2e-5 with --full")
    p.add_argument("--prior-images", type=int, default=None,
                   help="prior-preservation images (default: 1024 renders, or 96 generated: ~1 s each here)")
    p.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior loss (0: no prior)")
    p.add_argument("--prior-source", default="renders", choices=["renders", "generated"],
                   help="prior images for training-split captions: their scenes' ground-truth renders "
                        "through the autoencoder, or the base model's own samples")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"],
                   help="how the written adapter or model is stored (float16: half the file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help=FP32_HELP)
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")


@command("finetune-concept", "teach a model a new concept from 3-10 images (DreamBooth, LoRA)")(_concept_args)
def run_concept(args: argparse.Namespace) -> int:
    from .concept import ConceptConfig, finetune_concept
    from .lora import TARGET_SETS, LoRAConfig

    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    lora = None if args.full else LoRAConfig(rank=args.lora_rank, targets=TARGET_SETS[args.lora_targets],
                                             alpha=float(args.lora_alpha or args.lora_rank))
    cfg = ConceptConfig(token=args.token, class_word=args.class_word, steps=args.steps, batch_size=args.batch_size,
                        prior_images=_prior_images(args), prior_weight=args.prior_weight,
                        prior_source=args.prior_source, lora=lora, lr=args.lr, seed=args.seed,
                        mixed_precision="no" if args.fp32 else "auto", save_dtype=args.save_dtype)
    resolve_device_arg(args)
    summary = finetune_concept(args.model, args.images, args.out, cfg, device=args.device,
                               progress=not args.no_progress)
    last = summary["history"][-1]
    print(json.dumps({"out": args.out, "images": len(summary["images"]), "skipped": summary["skipped"],
                      "instance_loss": last["instance_loss"], "prior_loss": last["prior_loss"],
                      "seconds": summary["seconds"]}, indent=1))
    flag = f"--model {args.out}" if args.full else f"--model {args.model} --adapter {args.out}"
    print(f'use it: latentdit generate {flag} "a {args.token} {args.class_word}"')
    return 0


def _prior_images(args: argparse.Namespace) -> int:
    if args.prior_images is not None:
        return args.prior_images
    return 0 if args.prior_weight == 0 else (1024 if args.prior_source == "renders" else 96)

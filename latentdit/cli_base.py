"""What the ``latentdit`` subcommand modules share: the command registry, the sampler names,
loading a pipeline and writing its images.

``cli.py`` builds the parser from ``COMMANDS``; ``cli_train``, ``cli_eval`` and ``cli_edit``
register their subcommands here, so no subcommand module imports ``cli.py`` back.
"""

from __future__ import annotations

import argparse
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path

from .config import SamplerName
from .lines import read_jsonl

Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Setup, Run, str]] = {}
SAMPLER_NAMES = list(typing.get_args(SamplerName))  # the config's names; samplers.py need not load


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default (unless it is None, False or already in the help
    text) and keeps epilogs' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or "default" in help.lower() or action.option_strings == []
                or default is None or default is False or default == argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)" if help else "default: %(default)s"


def command(name: str, help: str):
    """Register ``setup(parser)`` under ``name``; the decorated function runs it."""
    def wrap(setup):
        def deco(run):
            COMMANDS[name] = (setup, run, help)
            return run
        return deco
    return wrap


def check_image_out(out: str | Path, flag: str = "--out") -> Path:
    """An image path to write to, checked before any work is done: PIL knows how to write its
    suffix (none means PNG) and its folder exists or can be made."""
    from PIL import Image

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give an image file name such as {out / 'out.png'}")
    Image.init()
    formats = Image.registered_extensions()
    if out.suffix and formats.get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"{flag} {out}: cannot write images as {out.suffix!r}; use .png, .jpg or .webp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot make its folder ({e.strerror})") from None
    check_writable(out.parent, f"{flag} {out}")
    return out


def check_out_folder(out: str | Path, flag: str = "--out") -> Path:
    """A folder to write files into, checked before any work: not a file, creatable, writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; with --from-file it names the folder to write into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot make this folder ({e.strerror})") from None
    check_writable(out, f"{flag} {out}")
    return out


def check_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: a read-only or full disk is found before the model
    runs, not after minutes of sampling."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".latentdit-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {folder} ({e.strerror or e})") from None


def write_images(images, out: Path) -> list[Path]:
    """Save one image at ``out``, or several as ``out_0.png``, ``out_1.png``, ..."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out = out if out.suffix else out.with_name(out.name + ".png")
    if len(images) == 1:
        images[0].save(out)
        return [out]
    paths = [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
    return paths


def save_images(images, out: str | Path) -> int:
    """``write_images`` and print each path written; a subcommand's exit status."""
    for path in write_images(images, Path(out)):
        print(path)
    return 0


def load_pipeline(model: str, device: str = "auto", adapter: str | None = None):
    """A ``Text2Image`` for a model folder, packaged name or hub id, on ``device``, with an
    optional LoRA ``adapter`` folder loaded on top."""
    from .pipeline import Text2Image

    return Text2Image.from_pretrained(model, device=device, adapter=adapter)


DEVICE_HELP = "auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` of every command that runs a model, resolved when the model is about to load
    (argument errors stay quick: no torch import)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def resolve_device_arg(args: argparse.Namespace) -> None:
    """Replace ``args.device`` by the device it names; a device that is not there is a ValueError
    (one line from ``cli.main``) before any model loads."""
    if getattr(args, "device", None) is not None:
        from .device import resolve_device

        args.device = str(resolve_device(args.device))


def add_guidance_interval_arg(p: argparse.ArgumentParser) -> None:
    """``--guidance-interval LO HI`` of the commands that sample from noise as ``pipe(...)`` does."""
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only while LO <= t <= HI (t = 1 is pure noise); default: the model's "
                        "sampling config")


def add_count_contrast_arg(p: argparse.ArgumentParser) -> None:
    """``--count-contrast S`` of the commands that sample from a prompt as ``pipe(...)`` does."""
    p.add_argument("--count-contrast", type=float, default=None, metavar="S",
                   help="guide prompts that name a count away from the count one higher, at scale S "
                        "(0: off); default: the model's sampling config")


FP32_HELP = ("compute in fp32 (default: bf16 autocast where the device computes bf16 natively, fp32 "
             "elsewhere; LATENTDIT_BF16=1 or 0 overrides that choice)")


def autocast_dtype(fp32: bool) -> str | None:
    """The sampling dtype of ``--fp32``: None (fp32, no autocast) or "auto" (bf16 where native)."""
    return None if fp32 else "auto"


def read_prompt_file(path: str) -> list[dict]:
    """JSONL lines ``{"id", "prompt", ...}`` (id defaults to the line number) or plain text, one
    prompt per line (id = line number). Blank lines are skipped but still counted."""
    items, lines = [], {}
    for n, item in read_jsonl(path, holds="one prompt or JSON object per line", plain=True):
        if isinstance(item, str):
            item = {"id": str(n), "prompt": item}
        else:
            if not isinstance(item.get("prompt"), str):
                raise ValueError(f"{path}:{n} has no string 'prompt'")
            if "seed" in item and (not isinstance(item["seed"], int) or isinstance(item["seed"], bool)):
                raise ValueError(f"{path}:{n}: 'seed' must be an integer, got {item['seed']!r}")
            if not isinstance(item.get("negative", ""), str):
                raise ValueError(f"{path}:{n}: 'negative' must be a string")
            item["id"] = _safe_id(str(item.get("id", n)), path, n)
        if item["id"] in lines:
            raise ValueError(f"{path}:{n}: id {item['id']!r} repeats line {lines[item['id']]}; ids name "
                             "the output files, so each must be unique")
        lines[item["id"]] = n
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _safe_id(value: str, path: str, n: int) -> str:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{path}:{n}: id {value!r} cannot be used as a file name")
    return value

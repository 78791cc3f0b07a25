"""What the ``latentdit`` subcommand modules share: the command registry and the image writer.

``cli.py`` builds the parser from ``COMMANDS``; ``cli_train``, ``cli_eval`` and ``cli_edit``
register their subcommands here, so no subcommand module imports ``cli.py`` back.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Setup, Run, str]] = {}


def command(name: str, help: str):
    """Register ``setup(parser)`` under ``name``; the decorated function runs it."""
    def wrap(setup):
        def deco(run):
            COMMANDS[name] = (setup, run, help)
            return run
        return deco
    return wrap


def write_images(images, out: Path) -> list[Path]:
    """Save one image at ``out``, or several as ``out_0.png``, ``out_1.png``, ..."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return [out]
    paths = [out.with_name(f"{out.stem}_{k}{out.suffix or '.png'}") for k in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
    return paths

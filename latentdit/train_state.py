"""Resumable training state: atomic checkpoint folders of safetensors + JSON, never pickles.

A checkpoint ``checkpoints/step-0000500/`` holds the raw weights, the EMA weights, the optimiser
moments, one RNG state per process and ``state.json`` (step, skip counters, optimiser hyper-
parameters, the run config). It is written into a hidden temp folder and renamed into place, so a
crash mid-write never leaves a half checkpoint that ``--resume latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    generator: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0
    bad_streak: int = 0
    bad_total: int = 0


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors (safetensors) and plain values (JSON)."""
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(out: Path, acc, model: torch.nn.Module, ema: dict[str, Tensor], opt, state: TrainState,
               config: dict[str, Any]) -> Path:
    """Every process writes its RNG state; the main one writes the rest and renames."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{state.step:07d}", root / f".tmp-step-{state.step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_file({"generator": state.generator.get_state()}, tmp / f"rng-rank{acc.process_index}.safetensors")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_main(tmp, model, ema, opt, state, config, acc.num_processes)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()
    return final


def _write_main(tmp: Path, model, ema, opt, state: TrainState, config: dict[str, Any], world: int) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    tensors, meta = flatten_optimizer(opt.state_dict())
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
    info = {"step": state.step, "bad_streak": state.bad_streak, "bad_total": state.bad_total,
            "world_size": world, "optimizer": meta, "config": config}
    (tmp / "state.json").write_text(json.dumps(info, indent=1))


class CheckpointDamaged(ValueError):
    """A checkpoint file that cannot be read back as written (truncated, corrupt, non-finite)."""


@dataclass
class _Loaded:
    info: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: Tensor | None


def read_info(folder: Path) -> dict[str, Any]:
    """``state.json``, or CheckpointDamaged naming it and what is wrong."""
    file = folder / "state.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{file} is unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointDamaged(f"{file} is not valid JSON ({e.msg} at line {e.lineno})") from None
    need = ("step", "bad_streak", "bad_total", "optimizer", "config")
    missing = [k for k in need if not isinstance(info, dict) or k not in info]
    if missing:
        raise CheckpointDamaged(f"{file} lacks {', '.join(missing)}")
    return info


def read_checkpoint(folder: Path, rank: int = 0) -> _Loaded:
    """Every file of a checkpoint, read and checked before any of it is applied."""
    rng = folder / f"rng-rank{rank}.safetensors"
    return _Loaded(read_info(folder), read_tensors(folder / "model.safetensors"),
                   read_tensors(folder / "ema.safetensors"), read_tensors(folder / "optimizer.safetensors"),
                   read_tensors(rng, finite=False)["generator"] if rng.exists() else None)


def load_state(folder: Path, model: torch.nn.Module, ema: dict[str, Tensor], opt, state: TrainState,
               rank: int) -> None:
    apply_checkpoint(folder, read_checkpoint(folder, rank), model, ema, opt, state, rank)


def apply_checkpoint(folder: Path, loaded: _Loaded, model: torch.nn.Module, ema: dict[str, Tensor], opt,
                     state: TrainState, rank: int) -> None:
    info = loaded.info
    try:
        model.load_state_dict(loaded.model)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"{folder} holds weights for a different architecture than this run's "
                         f"model config ({first}); resume with the options the run started with") from None
    for name, value in loaded.ema.items():
        ema[name].copy_(value)
    opt.load_state_dict(unflatten_optimizer(loaded.optimizer, info["optimizer"]))
    state.step, state.bad_streak, state.bad_total = info["step"], info["bad_streak"], info["bad_total"]
    if loaded.rng is not None:
        state.generator.set_state(loaded.rng)
    else:  # resumed on more processes than were saved: new ranks get a fresh, distinct stream
        state.generator.manual_seed(10_007 * (rank + 1) + state.step)


def resume_state(out: Path, spec: str, model: torch.nn.Module, ema: dict[str, Tensor], opt,
                 state: TrainState, rank: int) -> Path | None:
    """Load ``spec`` ("latest" or a folder) into the run. "latest" skips damaged checkpoints with
    a warning naming each and resumes from the newest good one; None if the run has none yet."""
    if spec != "latest":
        folder = find_checkpoint(out, spec)
        apply_checkpoint(folder, read_checkpoint(folder, rank), model, ema, opt, state, rank)
        return folder
    found = newest_good(out, lambda folder: read_checkpoint(folder, rank))
    if found is None:
        return None
    apply_checkpoint(*found, model, ema, opt, state, rank)
    return found[0]


def newest_good(out: Path, read: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """(folder, read(folder)) of the newest checkpoint ``read`` accepts; each damaged one is
    named on stderr. Raises if there are checkpoints and every one is damaged."""
    damaged = []
    for _, folder in reversed(list_checkpoints(out)):
        try:
            return folder, read(folder)
        except CheckpointDamaged as e:
            damaged.append(folder)
            print(f"warning: skipping damaged checkpoint {folder}: {e}", file=sys.stderr)
    if damaged:
        raise CheckpointDamaged(f"every checkpoint in {out / 'checkpoints'} is damaged "
                                f"({len(damaged)}: newest {damaged[0].name}); see the warnings above")
    return None


def read_tensors(file: Path, finite: bool = True) -> dict[str, Tensor]:
    """A checkpoint's safetensors file, or CheckpointDamaged naming it (missing, truncated,
    corrupt, or non-finite values where ``finite``)."""
    try:
        tensors = load_file(file)
    except FileNotFoundError:
        raise CheckpointDamaged(f"checkpoint file {file} is missing") from None
    except Exception as e:
        raise CheckpointDamaged(f"checkpoint file {file} is unreadable or truncated ({_first_line(e)})") from None
    for name, v in tensors.items() if finite else ():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointDamaged(f"checkpoint file {file} is damaged: {name} holds non-finite values")
    return tensors


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "state.json").exists())


def find_checkpoint(out: Path, spec: str) -> Path | None:
    """``latest`` -> the newest complete checkpoint (or None); anything else must be a folder."""
    if spec == "latest":
        found = list_checkpoints(out)
        return found[-1][1] if found else None
    folder = Path(spec)
    if not (folder / "state.json").exists():
        raise ValueError(f"{spec} is not a training checkpoint folder (no state.json)")
    return folder


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (retention limit)."""
    for _, folder in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)

"""Resumable training state: atomic checkpoint folders of safetensors + JSON, never pickles; what
the loop reads only now and then (skip counters, logged losses), kept on the device; and the
device set-up around the step (accelerator, host->device copies, compile).

A checkpoint ``checkpoints/step-0000500/`` holds the raw weights, the EMA weights, the optimiser
moments, one RNG state per process and ``state.json`` (step, skip counters, optimiser hyper-
parameters, the run config). It is written into a hidden temp folder and renamed into place, so a
crash mid-write never leaves a half checkpoint that ``--resume latest`` would pick up.
"""

from __future__ import annotations

import json
import math
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

from .device import mixed_bf16, resolve_device
from .lines import first_line, read_json
from .shards import Batch
from .text import TextEmbeddings

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


def checkpoint_paths(out: Path, step: int) -> tuple[Path, Path]:
    """(final, hidden temporary) folder of the checkpoint of ``step``."""
    root = out / "checkpoints"
    return root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"


def write_files(folder: Path, tensors: dict[str, dict[str, Tensor]], info: dict[str, Any]) -> None:
    """``NAME.safetensors`` for each entry of ``tensors`` (on the CPU) and ``state.json``."""
    for name, values in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, folder / f"{name}.safetensors")
    (folder / "state.json").write_text(json.dumps(info, indent=1))


def commit(tmp: Path, final: Path) -> Path:
    """Rename a fully written checkpoint folder into place (replacing one of the same step)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_checkpoint(out: Path, step: int, tensors: dict[str, dict[str, Tensor]], info: dict[str, Any]) -> Path:
    """A single-process checkpoint ``out/checkpoints/step-N/``, written beside and renamed."""
    final, tmp = checkpoint_paths(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_files(tmp, tensors, info)
    return commit(tmp, final)


def save_state(out: Path, acc, model: torch.nn.Module, ema: dict[str, Tensor], opt, state: TrainState,
               config: dict[str, Any]) -> Path:
    """Every process writes its RNG state; the main one writes the rest and renames."""
    final, tmp = checkpoint_paths(out, state.step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_file({"generator": state.generator.get_state()}, tmp / f"rng-rank{acc.process_index}.safetensors",
              metadata={"device": state.generator.device.type})
    acc.wait_for_everyone()
    if acc.is_main_process:
        optim, meta = flatten_optimizer(opt.state_dict())
        info = {"step": state.step, "bad_streak": state.bad_streak, "bad_total": state.bad_total,
                "world_size": acc.num_processes, "optimizer": meta, "config": config}
        write_files(tmp, {"model": model.state_dict(), "ema": ema, "optimizer": optim}, info)
        commit(tmp, final)
    acc.wait_for_everyone()
    return final


class CheckpointDamaged(ValueError):
    """A checkpoint file that cannot be read back as written (truncated, corrupt, non-finite)."""


@dataclass
class _Loaded:
    info: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: Tensor | None


_DENOISER_KEYS = ("step", "bad_streak", "bad_total", "optimizer", "config")


def read_info(folder: Path, need: tuple[str, ...] = _DENOISER_KEYS) -> dict[str, Any]:
    """``state.json``, or CheckpointDamaged naming it and what is wrong (unreadable, or lacking a
    key of ``need``)."""
    file = folder / "state.json"
    try:
        info = read_json(file)
    except ValueError as e:
        raise CheckpointDamaged(str(e)) from None
    missing = [k for k in need if k not in info]
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
    rng = folder / f"rng-rank{rank}.safetensors"
    if loaded.rng is not None and _rng_device(rng) == state.generator.device.type:
        state.generator.set_state(loaded.rng)
    else:  # more processes than were saved, or another device type: a fresh, distinct stream
        if loaded.rng is not None:
            print(f"{rng} holds a {_rng_device(rng)} generator and this run draws on "
                  f"{state.generator.device.type}: the random stream restarts from a new seed")
        state.generator.manual_seed(10_007 * (rank + 1) + state.step)


def _rng_device(file: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return (f.metadata() or {}).get("device", "cpu")  # written before devices were recorded: cpu


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
        raise CheckpointDamaged(f"checkpoint file {file} is unreadable or truncated ({first_line(e)})") from None
    for name, v in tensors.items() if finite else ():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointDamaged(f"checkpoint file {file} is damaged: {name} holds non-finite values")
    return tensors


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


# -- what every trainer's step shares -----------------------------------------------------------
def warmup_cosine(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  constant: bool = False) -> float:
    """The learning rate of ``step``: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps`` (or ``lr`` from then on with ``constant``)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if constant:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_for(device: torch.device, mixed: str):
    """bf16 autocast on ``device`` when ``mixed`` is "bf16", or "auto" where the device computes
    bf16 natively (``latentdit.device.mixed_bf16``); else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_bf16(device, mixed))


# -- the device around the step -------------------------------------------------------------
def make_accelerator(device: str = "auto"):
    """An ``accelerate.Accelerator`` on the device ``--device`` names: ``cpu`` forces the CPU, and
    ``cuda:N`` picks one GPU for a single process (under ``accelerate launch`` each rank has its own)."""
    from accelerate import Accelerator

    want = resolve_device(device)
    if want.type == "cpu":
        return Accelerator(cpu=True)
    if want.type == "cuda" and want.index is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {device} names one GPU, but this is a multi-process launch where "
                             "each process takes its own: use --device cuda or auto")
        torch.cuda.set_device(want.index)
    acc = Accelerator()
    if acc.device.type != want.type:
        raise ValueError(f"--device {device}: accelerate chose {acc.device} (check `accelerate config`)")
    return acc


def check_parallelism(acc) -> None:
    """Data parallel (DDP) only: the EMA, the condition dropout (outside the forward) and the
    checkpoint writer read whole parameters, which FSDP/DeepSpeed shard (docs/performance.md)."""
    kind = getattr(acc.distributed_type, "name", str(acc.distributed_type))
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"accelerate is configured for {kind}, but latentdit trains data-parallel only "
                         "(the EMA and checkpoints need whole parameters): launch with "
                         "`accelerate launch --multi_gpu ...` (see docs/performance.md)")


def compile_denoiser(model: torch.nn.Module, acc) -> bool:
    """``torch.compile`` the denoiser in place (parameter names, hence EMA and checkpoints, stay as
    they are). On one CUDA process the shapes are static, so CUDA graphs ("reduce-overhead") remove
    the per-kernel launch cost; with DDP/FSDP plain inductor. Returns whether CUDA graphs are on."""
    graphs = acc.device.type == "cuda" and acc.num_processes == 1
    model.compile(mode="reduce-overhead" if graphs else None)
    return graphs


def to_device(batch: Batch, device: torch.device, pin: bool | None = None) -> Batch:
    """Host -> device without blocking the host: on CUDA through pinned memory, so the copy
    overlaps the previous step's kernels. On the CPU the batch is returned as it is."""
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda" if pin is None else pin

    def move(t: Tensor) -> Tensor:
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    text = TextEmbeddings(move(batch.text.tokens), move(batch.text.mask), move(batch.text.pooled))
    return Batch(move(batch.latents), text, batch.captions, move(batch.index),
                 None if batch.labels is None else move(batch.labels),
                 None if batch.control is None else move(batch.control))

"""What both trainers log and check now and then, never on every step: a progress bar,
TensorBoard and ``metrics.jsonl`` (strict JSON, each step once across resumes), and the skip
counters that stop a diverged run. Values accumulate as device tensors between log lines, so the
hot loop never waits for a ``.item()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last checkpoint before them is kept."""


class Window:
    """Per-step values summed on the device since the last log line, so the loop never waits for
    them; a step with ``ok`` False (skipped, its values maybe NaN) is left out of the means."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.total: Tensor | None = None
        self.count = torch.zeros((), device=self.device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, values: Tensor, ok: Tensor | None = None) -> None:
        values = values.detach().float()
        if ok is not None:
            values = torch.where(ok, values, 0.0)
        self.total = values if self.total is None else self.total + values
        self.count = self.count + (1 if ok is None else ok)
        self.steps += 1

    def means(self) -> list[float] | None:
        """The mean of each value over the good steps (one host sync), None if there were none."""
        count = int(self.count)
        if not count or self.total is None:
            return None
        return [v / count for v in self.total.reshape(-1).tolist()]

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


class StepCounters:
    """Non-finite (skipped) steps, counted on the device so the loop never waits for the check;
    ``check`` reads them (one sync) and stops a run that has diverged."""

    def __init__(self, device: torch.device, streak: int = 0, total: int = 0) -> None:
        self.streak = torch.tensor(streak, device=device)
        self.worst = self.streak.clone()
        self.total = torch.tensor(total, device=device)

    def add(self, ok: Tensor) -> None:
        bad = (~ok).long()
        self.streak.add_(1).mul_(bad)  # +1 on a skipped step, back to 0 on a good one
        torch.maximum(self.worst, self.streak, out=self.worst)
        self.total.add_(bad)

    def check(self, state, max_bad: int) -> None:
        """Copy the counts into ``state`` (bad_streak, bad_total) and raise once ``max_bad`` skipped
        steps came in a row."""
        state.bad_streak, state.bad_total = int(self.streak), int(self.total)
        worst = int(self.worst)
        if worst >= max_bad:
            raise TrainingDiverged(
                f"{worst} non-finite steps in a row by step {state.step}: training diverged. "
                "Lower optim.lr, keep mixed_precision bf16 off fp16, or check the data for NaNs.")


class MetricsLog:
    """The sinks of one run folder: a tqdm bar over ``total`` steps, TensorBoard in ``out/tb``
    (when installed) and ``out/metrics.jsonl``, one strict-JSON row per log line. Rows after
    ``start`` (the resume point, whose steps run again) are dropped when it opens. ``enabled``
    False (a non-main process) makes every call a no-op."""

    def __init__(self, out: Path, total: int, start: int, progress: bool, desc: str, enabled: bool = True) -> None:
        self.enabled, self.history = enabled, []
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        out.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=start, disable=not progress, desc=desc)
        self.tb = tensorboard_writer(out / "tb")
        self.jsonl = open(_metrics_upto(out / "metrics.jsonl", start), "a")

    def tick(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def row(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        """One log line: ``values`` (floats, ints or None) go to the jsonl file, the numbers to
        TensorBoard as ``prefix/key``; the bar shows them."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        self.history.append(row)
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        self.scalars(step, {f"{prefix}/{k}": v for k, v in values.items()})
        shown = {k: "-" if v is None else f"{v:.4g}" for k, v in values.items() if isinstance(v, (float, type(None)))}
        self.bar.set_postfix(shown)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class Logger:
    """The denoiser's log: the mean loss of the good steps since the last line, the gradient norm,
    the learning rate, images per second and the skipped-step count."""

    def __init__(self, cfg, acc, start: int, progress: bool):
        self.cfg, self.world = cfg, acc.num_processes
        self.sink = MetricsLog(Path(cfg.out), cfg.steps, start, progress, "train", enabled=acc.is_main_process)
        self.window, self.images = Window(acc.device), 0

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.sink.history

    def step(self, state, loss: Tensor, norm: Tensor, ok: Tensor, lr: float, micro) -> None:
        """``loss``, ``norm``, ``ok``: tensors of this step, read only on a logging step."""
        self.window.add(loss, ok)
        self.images += sum(b.latents.shape[0] for b in micro) * self.world
        if not self.sink.enabled:
            return
        self.sink.tick()
        if state.step % self.cfg.log_every == 0:
            self._emit(state, norm, lr)

    def _emit(self, state, norm: Tensor, lr: float) -> None:
        # Strict JSON: a window of only skipped steps has no loss, a non-finite norm is null.
        means = self.window.means()
        self.sink.row(state.step, {
            "loss": means[0] if means else None, "lr": lr,
            "grad_norm": float(norm) if bool(torch.isfinite(norm)) else None,
            "images_per_s": self.images / self.window.seconds(), "skipped": state.bad_total})
        self.window.reset()
        self.images = 0

    def close(self) -> None:
        self.sink.close()


def _metrics_upto(file: Path, step: int) -> Path:
    """Drop rows after ``step`` (the resume point: those steps run again) and any line a kill cut
    short, so the log holds each step once."""
    if not file.exists():
        return file
    keep = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(file, "".join(keep).encode())
    return file


def tensorboard_writer(folder: Path):
    """A TensorBoard writer for ``folder``, or None where tensorboard is not installed (it is
    optional: the trainers log to metrics.jsonl as well)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), flush_secs=30)

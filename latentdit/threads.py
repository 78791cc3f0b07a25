"""How many CPU threads to use, and how idle OpenMP threads wait, chosen for the machine as it is now.

OpenMP's default lets idle worker threads spin for a while before sleeping: fastest on an idle
machine, but on a shared one a spinning worker takes the core a busy thread needs, and every
parallel region waits for the slowest, descheduled thread (see docs/reliability.md for the
measurements). So: on an idle machine keep the default and every core; when other programs keep
cores busy, use only the free ones and let idle workers sleep at once (``OMP_WAIT_POLICY=PASSIVE``).

The wait policy is read once, when torch loads OpenMP, so ``apply_thread_policy`` must run before
``import torch`` (the CLI calls it first thing); the thread count can change later
(``set_torch_threads``), which is what a long-lived server does per request. This module imports
nothing heavy.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

THREADS_ENV = "LATENTDIT_THREADS"
# Threads a CPU sampling batch is split across by rows (latentdit/rows.py); unset: torch's count.
ROW_THREADS_ENV = "LATENTDIT_ROW_THREADS"
# Another program's use of a core above this fraction counts it as busy.
BUSY_THRESHOLD = 0.5


@dataclass(frozen=True)
class ThreadPolicy:
    threads: int
    passive: bool  # idle OpenMP workers sleep at once instead of spinning
    cores: int  # the cores this process may run on
    busy: float  # cores other programs kept busy when the policy was chosen
    source: str  # "override" (--threads / LATENTDIT_THREADS), "OMP_NUM_THREADS" or "measured"
    rows: int = 1  # threads a CPU sampling batch is split across by rows (latentdit/rows.py)

    def describe(self) -> str:
        wait = "passive" if self.passive else "default"
        return (f"{self.threads} of {self.cores} threads ({self.source}; {self.busy:.1f} cores busy; "
                f"OpenMP wait {wait}; sampling rows over {self.rows})")


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask), e.g. [1] under ``taskset -c 1``."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            values = [float(v) for v in parts[1:9]]
            idle = values[3] + values[4]  # idle + iowait
            total += sum(values)
            busy += sum(values) - idle
    return (busy, total) if total else None


def busy_cores(cpus: list[int] | None = None, sample_s: float = 0.1) -> float:
    """How many of ``cpus`` other programs keep busy right now: the non-idle share of a short
    /proc/stat sample (this process is idle while it sleeps). Falls back to the 1-minute load
    average where /proc/stat is missing, which lags a change in load by about a minute."""
    cpus = usable_cores() if cpus is None else cpus
    first = _cpu_times(cpus)
    if first is not None:
        time.sleep(sample_s)
        second = _cpu_times(cpus)
        if second is not None and second[1] > first[1]:
            return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return min(float(len(cpus)), os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def parse_threads(value: object, where: str) -> int | None:
    """A thread count from a flag or the environment: None when unset or 0 (automatic)."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a whole number of threads (0 = automatic), got {value!r}") from None
    if n < 0:
        raise ValueError(f"{where} must be >= 0 (0 = automatic), got {n}")
    return n or None


def choose_threads(threads: int | None = None, *, busy: float | None = None,
                   cores: int | None = None, env: MutableMapping[str, str] | None = None) -> ThreadPolicy:
    """The policy for this moment: ``threads`` (or ``LATENTDIT_THREADS``, or an ``OMP_NUM_THREADS``
    already set) if given, else one thread per core that other programs leave free (at least one).
    Waiting is passive whenever fewer threads than cores run or some core is busy; an explicit
    ``OMP_WAIT_POLICY`` wins. Sampling splits its rows over that given count, else over every
    core, busy or not: row threads never wait for each other inside an operator, so a core
    shared with another program still adds its share (docs/reliability.md);
    ``LATENTDIT_ROW_THREADS`` wins."""
    env = os.environ if env is None else env
    cores = len(usable_cores()) if cores is None else cores
    override = threads if threads else parse_threads(env.get(THREADS_ENV), THREADS_ENV)
    # A launcher (accelerate, torchrun) or the user may have set OpenMP's count already.
    inherited = _int_or_none(env.get("OMP_NUM_THREADS"))
    busy = busy_cores() if busy is None else busy
    if override:
        n, source = override, "override"
    elif inherited:
        n, source = inherited, "OMP_NUM_THREADS"
    else:
        taken = int(busy + 1 - BUSY_THRESHOLD)  # cores others use more than BUSY_THRESHOLD of
        n, source = max(1, cores - taken), "measured"
    loaded = busy >= BUSY_THRESHOLD or n < cores
    wait = env.get("OMP_WAIT_POLICY", "").upper()
    passive = wait == "PASSIVE" or (wait != "ACTIVE" and loaded)
    return ThreadPolicy(n, passive, cores, round(busy, 2), source, row_threads(override or inherited or cores, env))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value and int(value) > 0 else None
    except ValueError:
        return None


def apply_thread_policy(threads: int | None = None, *, env: MutableMapping[str, str] | None = None,
                        busy: float | None = None) -> ThreadPolicy:
    """Choose a policy and export it to the environment OpenMP and MKL read when torch loads
    (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY``) and the pipeline reads
    (``LATENTDIT_ROW_THREADS``); call before ``import torch``. If torch is already loaded only the
    thread counts can still change, and they are set."""
    env = os.environ if env is None else env
    policy = choose_threads(threads, busy=busy, env=env)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(policy.threads)
    env[ROW_THREADS_ENV] = str(policy.rows)
    if policy.passive:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import sys

    if "torch" in sys.modules and env is os.environ:
        set_torch_threads(policy.threads)
    return policy


def set_torch_threads(n: int) -> None:
    """Change torch's intra-op thread count (a server may do this per request)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def row_threads(default: int, env: MutableMapping[str, str] | None = None) -> int:
    """How many threads split a CPU sampling batch by rows: ``LATENTDIT_ROW_THREADS`` (1 = one
    call with torch's own intra-op threads, as before rows were split) or else ``default``
    (the pipeline passes torch's count, the policy its own choice)."""
    env = os.environ if env is None else env
    return parse_threads(env.get(ROW_THREADS_ENV), ROW_THREADS_ENV) or default

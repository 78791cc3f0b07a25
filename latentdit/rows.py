"""One CPU forward pass split by batch rows across Python threads, each with one intra-op thread.

Sampling with guidance runs the denoiser on 2 x images rows at every step, a few small matrices
at a time. With OpenMP's threads inside each operator, every operator ends in a barrier where all
threads wait for the slowest, so a thread the scheduler puts aside on a shared machine stalls all
of them. Giving each thread its own rows instead keeps every thread independent until the rows
are joined once per step: as fast as OpenMP's threads on an idle machine, and without the
barriers' losses on a busy one (docs/reliability.md has the measurements). Torch releases the
GIL inside its operators, so the threads compute in parallel.

Autocast and ``no_grad`` are per thread, so the callable given to ``RowThreads.run`` must enter
whatever contexts it needs itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

Inputs = Mapping[str, Tensor | None]


def split_rows(inputs: Inputs, parts: int) -> list[dict[str, Tensor | None]]:
    """``inputs`` cut into ``parts`` (at most one per row) consecutive slices of their rows; every
    tensor must have the same number of rows; None passes through."""
    rows = {name: v.shape[0] for name, v in inputs.items() if v is not None}
    if not rows or len(set(rows.values())) != 1:
        raise ValueError(f"inputs split by rows need one shared first dimension, got {rows}")
    n = next(iter(rows.values()))
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [{name: None if v is None else v[a:b] for name, v in inputs.items()}
            for a, b in zip(edges, edges[1:])]


def _one_thread() -> None:
    # OpenMP's thread count is per thread: this worker runs its operators alone. (torch also
    # keeps the count as the default for threads it has not seen yet; ``_workers`` restores that.)
    torch.set_num_threads(1)
    torch.get_num_threads()  # torch reads its default once per thread, on first use: now, while it is 1


class RowThreads:
    """Runs ``fn(inputs)`` on slices of the rows of ``inputs`` in up to ``threads`` worker threads
    and joins the results along the first dimension. ``threads <= 1``, or a single row, runs
    ``fn`` once on the calling thread. The workers start on first use and are reused."""

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"row threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def run(self, fn: Callable[[dict[str, Tensor | None]], Tensor], inputs: Inputs) -> Tensor:
        parts = split_rows(inputs, self.threads)
        if len(parts) == 1:
            return fn(parts[0])
        pool = self._workers()
        futures = [pool.submit(fn, part) for part in parts]
        return torch.cat([f.result() for f in futures])

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pid != os.getpid():  # a forked child has none of its parent's threads
                self._pool, self._pid = None, os.getpid()
            if self._pool is None:
                caller = torch.get_num_threads()
                pool = ThreadPoolExecutor(self.threads, thread_name_prefix="latentdit-rows",
                                          initializer=_one_thread)
                # Start every worker now (each waits for the others, so each task gets its own
                # thread), then give threads started later the caller's count again.
                ready = threading.Barrier(self.threads)
                for future in [pool.submit(ready.wait) for _ in range(self.threads)]:
                    future.result()
                torch.set_num_threads(caller)
                self._pool = pool
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

"""Dynamic batching: requests that arrive together run as one pipeline call on one worker thread.

A request becomes a ``Job`` with a key. The worker takes the oldest job, waits up to ``max_wait``
seconds for more jobs with the same key, and runs up to ``max_batch`` images of them in one call
(jobs with key None always run alone). One worker means one model call at a time: on a CPU two
concurrent calls only fight over the cores, and on a GPU one larger batch is what is fast.
The queue is bounded (``QueueFull`` beyond it); a cancelled job that has not started costs nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

BatchFn = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """More jobs are waiting than the queue holds; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    key: Hashable | None  # None: run alone, ``payload`` is a callable
    payload: Any
    images: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    batch_size: int = 0  # images in the call this job ran in
    cancelled: bool = False


@dataclass
class Stats:
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    rejected: int = 0
    busy_seconds: float = 0.0


class Batcher:
    """``run(key, payloads) -> results`` runs one batch of jobs that share ``key``, one result each."""

    def __init__(self, run: BatchFn, max_batch: int = 16, max_wait: float = 0.01, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or not max_wait >= 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.stats = Stats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- client side ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="latentdit-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, key: Hashable | None, payload: Any, images: int = 1) -> Job:
        """Queue a job (raises ``QueueFull``). Key None: ``payload()`` runs alone."""
        job = Job(key, payload, images)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(self.retry_after())
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it has not started (a running batch finishes)."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self.stats.cancelled += 1
        job.future.cancel()

    def queued(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        per_batch = self.stats.busy_seconds / self.stats.batches if self.stats.batches else 1.0
        return max(1, math.ceil(per_batch * (len(self._pending) / self.max_batch + 1)))

    async def wait(self, job: Job, timeout: float, disconnected: Callable[[], Any] | None = None,
                   poll: float = 0.1) -> Any:
        """The job's result; cancels it on timeout (``TimeoutError``) or when ``await
        disconnected()`` turns true (``ConnectionAbortedError``)."""
        fut = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, min(poll, left)))
            if done:
                return fut.result()
            if left <= 0:
                self.cancel(job)
                raise TimeoutError(f"no result within {timeout:g} s")
            if disconnected is not None and await disconnected():
                self.cancel(job)
                raise ConnectionAbortedError("the client disconnected")

    # -- worker side ------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and, within ``max_wait``, later jobs with its key."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            deadline = time.monotonic() + self.max_wait
            while True:
                batch = self._matching(first)
                left = deadline - time.monotonic()
                full = sum(j.images for j in batch) >= self.max_batch
                if first.key is None or full or left <= 0 or self._stopping or first not in self._pending:
                    break
                self._cond.wait(left)
            batch = [j for j in self._matching(first) if j in self._pending] if first in self._pending else []
            for job in batch:
                self._pending.remove(job)
            return batch

    def _matching(self, first: Job) -> list[Job]:
        if first.key is None:
            return [first]
        batch, images = [], 0
        for job in self._pending:
            if job.key == first.key and (not batch or images + job.images <= self.max_batch):
                batch.append(job)
                images += job.images
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[Job]) -> None:
        images = sum(j.images for j in batch)
        for job in batch:
            job.batch_size = images
        start = time.perf_counter()
        try:
            results, error = self._call(batch), None
        except Exception as e:  # noqa: BLE001 - handed to the waiting request, which maps it to a status
            results, error = None, e
        self.stats.busy_seconds += time.perf_counter() - start
        if error is not None and len(batch) > 1:  # one bad job must not fail the others
            for job in batch:
                self._execute([job])
            return
        self.stats.batches += 1
        self.stats.images += images
        self.stats.largest_batch = max(self.stats.largest_batch, images)
        if error is not None:
            _deliver(batch[0], exception=error)
            return
        for job, result in zip(batch, results):
            _deliver(job, result=result)

    def _call(self, batch: list[Job]) -> Sequence[Any]:
        if batch[0].key is None:
            return [batch[0].payload()]
        results = self.run(batch[0].key, [j.payload for j in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} jobs")
        return results


def _deliver(job: Job, result: Any = None, exception: BaseException | None = None) -> None:
    if job.future.cancelled():
        return
    try:
        if exception is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(exception)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass

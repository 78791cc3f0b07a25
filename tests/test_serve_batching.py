"""The batching worker alone, with a fake batch function: what is merged, what is not, the bound,
cancellation of waiting jobs and of jobs whose client went away."""

from __future__ import annotations

import asyncio
import threading

import pytest

from latentdit.serve.batching import Batcher, QueueFull


class Recorder:
    """A batch function that records its batches and can be held until released."""

    def __init__(self):
        self.batches, self.release = [], threading.Event()
        self.release.set()

    def __call__(self, key, payloads):
        self.release.wait(10)
        self.batches.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]


def _hold(b: Batcher) -> threading.Event:
    """Keep the worker busy with a solo job until the returned event is set."""
    go, started = threading.Event(), threading.Event()
    b.submit(None, lambda: (started.set(), go.wait(10)))
    assert started.wait(10)
    return go


@pytest.fixture
def rec():
    return Recorder()


def test_jobs_that_arrive_together_share_a_call_and_other_keys_wait_their_turn(rec):
    b = Batcher(rec, max_batch=4, max_wait=0.0)
    b.start()
    try:
        go = _hold(b)
        jobs = [b.submit("a", i) for i in range(3)] + [b.submit("b", 9)] + [b.submit("a", 3)]
        go.set()
        assert [j.future.result(10) for j in jobs] == ["a:0", "a:1", "a:2", "b:9", "a:3"]
        assert rec.batches == [("a", [0, 1, 2, 3]), ("b", [9])]
        assert [j.batch_size for j in jobs] == [4, 4, 4, 1, 4]
    finally:
        b.stop()


def test_max_batch_counts_images_and_splits_the_rest_into_the_next_call(rec):
    b = Batcher(rec, max_batch=4, max_wait=0.0)
    b.start()
    try:
        go = _hold(b)
        jobs = [b.submit("k", i, images=3) for i in range(3)]
        go.set()
        [j.future.result(10) for j in jobs]
        assert [len(p) for _, p in rec.batches] == [1, 1, 1]  # 3 + 3 images would pass 4
    finally:
        b.stop()


def test_the_worker_waits_max_wait_for_company(rec):
    b = Batcher(rec, max_batch=8, max_wait=0.3)
    b.start()
    try:
        first = b.submit("k", 0)
        threading.Timer(0.05, lambda: b.submit("k", 1)).start()
        first.future.result(10)
        assert rec.batches == [("k", [0, 1])]
    finally:
        b.stop()


def test_the_queue_is_bounded(rec):
    b = Batcher(rec, max_batch=2, max_queue=2)
    b.start()
    try:
        go = _hold(b)
        b.submit("k", 0), b.submit("k", 1)
        with pytest.raises(QueueFull) as e:
            b.submit("k", 2)
        assert e.value.retry_after >= 1 and b.stats.rejected == 1
        go.set()
    finally:
        b.stop()


def test_a_cancelled_waiting_job_never_runs(rec):
    b = Batcher(rec, max_wait=0.0)
    b.start()
    try:
        go = _hold(b)
        gone, kept = b.submit("k", "gone"), b.submit("k", "kept")
        b.cancel(gone)
        go.set()
        assert kept.future.result(10) == "k:kept"
        assert rec.batches == [("k", ["kept"])] and gone.future.cancelled() and b.stats.cancelled == 1
    finally:
        b.stop()


def test_wait_cancels_the_job_when_the_client_disconnects_or_time_runs_out(rec):
    b = Batcher(rec, max_wait=0.0)
    b.start()
    try:
        go = _hold(b)
        job = b.submit("k", "x")
        calls = []

        async def disconnected():
            calls.append(1)
            return len(calls) >= 2

        with pytest.raises(ConnectionAbortedError):
            asyncio.run(b.wait(job, timeout=10, disconnected=disconnected, poll=0.01))
        late = b.submit("k", "y")
        with pytest.raises(TimeoutError):
            asyncio.run(b.wait(late, timeout=0.05, poll=0.01))
        assert b.queued() == 0 and b.stats.cancelled == 2
        go.set()
        done = b.submit("k", "z")
        assert asyncio.run(b.wait(done, timeout=10)) == "k:z" and rec.batches == [("k", ["z"])]
    finally:
        b.stop()


def test_one_failing_job_does_not_fail_its_batch():
    def run(key, payloads):
        if "bad" in payloads:
            raise ValueError("bad payload")
        return list(payloads)

    b = Batcher(run, max_wait=0.0)
    b.start()
    try:
        go = _hold(b)
        jobs = [b.submit("k", p) for p in ("ok", "bad", "fine")]
        go.set()
        assert jobs[0].future.result(10) == "ok" and jobs[2].future.result(10) == "fine"
        with pytest.raises(ValueError, match="bad payload"):
            jobs[1].future.result(10)
        assert b.submit("k", "after").future.result(10) == "after"  # the worker lives on
    finally:
        b.stop()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(lambda k, p: p, max_batch=0)
    with pytest.raises(ValueError):
        Batcher(lambda k, p: p, max_queue=0)

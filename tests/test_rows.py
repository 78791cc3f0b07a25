"""Splitting the denoiser's batch rows across threads: the same result, run where it says."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import tiny_pipeline

from latentdit.rows import RowThreads, split_rows


def test_rows_are_cut_into_consecutive_near_equal_slices():
    x, t = torch.arange(7.0), torch.arange(7.0) * 10
    parts = split_rows({"x": x, "t": t, "labels": None}, 3)
    assert [p["x"].tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0, 4.0], [5.0, 6.0]]
    assert [p["t"].tolist() for p in parts] == [[0.0, 10.0], [20.0, 30.0, 40.0], [50.0, 60.0]]
    assert all(p["labels"] is None for p in parts)
    assert len(split_rows({"x": torch.zeros(2, 3)}, 8)) == 2  # never an empty slice


def test_inputs_that_disagree_on_rows_are_refused():
    with pytest.raises(ValueError, match="one shared first dimension"):
        split_rows({"x": torch.zeros(4, 2), "t": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match="one shared first dimension"):
        split_rows({"x": None}, 2)
    with pytest.raises(ValueError, match=">= 1"):
        RowThreads(0)


def test_each_worker_runs_its_rows_alone_and_the_callers_threads_are_kept():
    caller = torch.get_num_threads()
    rows = RowThreads(2)
    seen = []
    barrier = threading.Barrier(2, timeout=10)  # both slices must be running at the same time

    def fn(inputs):
        barrier.wait()
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return inputs["x"] * 2

    out = rows.run(fn, {"x": torch.arange(6.0)})
    rows.close()
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert sorted(name for name, _ in seen) == ["latentdit-rows_0", "latentdit-rows_1"]
    assert all(n == 1 for _, n in seen)
    assert torch.get_num_threads() == caller
    later = []  # a thread started afterwards gets the caller's count, not the workers' one
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [caller]


def test_one_row_or_one_thread_runs_on_the_calling_thread():
    me = threading.current_thread().name
    names = []

    def fn(inputs):
        names.append(threading.current_thread().name)
        return inputs["x"]

    RowThreads(4).run(fn, {"x": torch.zeros(1, 3)})
    RowThreads(1).run(fn, {"x": torch.zeros(5, 3)})
    assert names == [me, me]


def test_a_workers_error_reaches_the_caller():
    def fn(inputs):
        if inputs["x"][0] > 0:
            raise FloatingPointError("slice two failed")
        return inputs["x"]

    with pytest.raises(FloatingPointError, match="slice two failed"):
        RowThreads(2).run(fn, {"x": torch.arange(4.0)})


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 3e-2)])
def test_the_guided_denoiser_gives_the_same_x0_split_or_whole(tiny_clip, tiny_vae, dtype, tol):
    pipe = tiny_pipeline(tiny_clip, tiny_vae, seed=1)
    cond, uncond = pipe.encode(["a red circle", "two blue hearts", "a green star"])
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 0.6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pipe.row_threads().threads == 1
        whole = pipe.denoiser(cond, uncond, 3.0, dtype=dtype)(x, t)
        torch.set_num_threads(2)
        assert pipe.row_threads().threads == 2
        split = pipe.denoiser(cond, uncond, 3.0, dtype=dtype)(x, t)
        scalar_t = pipe.denoiser(cond, uncond, 3.0, dtype=dtype)(x, torch.tensor(0.6))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(split, whole, atol=tol, rtol=tol)
    torch.testing.assert_close(scalar_t, split)


_PARENT_ROWS: list[RowThreads] = []


def test_a_forked_child_starts_its_own_workers():
    import multiprocessing

    rows = RowThreads(2)
    rows.run(lambda inputs: inputs["x"], {"x": torch.zeros(4)})  # the parent's workers exist now
    _PARENT_ROWS.append(rows)
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            out = pool.apply_async(_sum_in_rows).get(timeout=30)  # hangs if it reused the parent's
    finally:
        _PARENT_ROWS.clear()
        rows.close()
    assert out == 6.0


def _sum_in_rows() -> float:
    return float(_PARENT_ROWS[0].run(lambda inputs: inputs["x"] * 2, {"x": torch.ones(3)}).sum())

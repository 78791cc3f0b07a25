"""The thread policy: every core on an idle machine, the free ones (waiting passively) on a busy one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentdit.threads import (
    apply_thread_policy,
    busy_cores,
    choose_threads,
    parse_threads,
    row_threads,
    usable_cores,
)


@pytest.mark.parametrize("busy, threads, passive", [
    (0.0, 4, False), (0.4, 4, False), (0.6, 3, True), (1.0, 3, True), (2.5, 1, True), (4.0, 1, True), (9.0, 1, True),
])
def test_threads_follow_the_free_cores(busy, threads, passive):
    policy = choose_threads(busy=busy, cores=4, env={})
    assert (policy.threads, policy.passive, policy.source) == (threads, passive, "measured")


def test_an_override_wins_and_the_environment_counts():
    assert choose_threads(2, busy=0.0, cores=4, env={}).threads == 2
    policy = choose_threads(busy=3.0, cores=4, env={"LATENTDIT_THREADS": "3"})
    assert (policy.threads, policy.source, policy.passive) == (3, "override", True)
    assert choose_threads(busy=0.0, cores=4, env={"LATENTDIT_THREADS": "0"}).source == "measured"


def test_a_launchers_openmp_count_is_kept_unless_overridden():
    assert choose_threads(busy=0.0, cores=4, env={"OMP_NUM_THREADS": "1"}).source == "OMP_NUM_THREADS"
    assert choose_threads(busy=0.0, cores=4, env={"OMP_NUM_THREADS": "1"}).threads == 1
    assert choose_threads(3, busy=0.0, cores=4, env={"OMP_NUM_THREADS": "1"}).threads == 3


def test_an_explicit_wait_policy_is_kept():
    assert choose_threads(busy=0.0, cores=2, env={"OMP_WAIT_POLICY": "passive"}).passive
    assert not choose_threads(busy=2.0, cores=2, env={"OMP_WAIT_POLICY": "ACTIVE"}).passive


def test_apply_exports_what_openmp_reads():
    env: dict[str, str] = {}
    apply_thread_policy(None, env=env, busy=2.0)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {}
    apply_thread_policy(None, env=env, busy=0.0)
    assert "OMP_WAIT_POLICY" not in env and env["OMP_NUM_THREADS"] == str(len(usable_cores()))
    assert env["LATENTDIT_ROW_THREADS"] == str(len(usable_cores()))


def test_sampling_rows_use_every_core_unless_a_count_is_given():
    # Busy cores cut OpenMP's threads (each operator waits for the slowest) but not the row threads.
    assert (choose_threads(busy=2.0, cores=2, env={}).threads, choose_threads(busy=2.0, cores=2, env={}).rows) == (1, 2)
    assert choose_threads(1, busy=0.0, cores=4, env={}).rows == 1
    assert choose_threads(busy=0.0, cores=4, env={"OMP_NUM_THREADS": "3"}).rows == 3
    assert choose_threads(busy=0.0, cores=4, env={"LATENTDIT_ROW_THREADS": "1"}).rows == 1
    assert "sampling rows over 2" in choose_threads(busy=2.0, cores=2, env={}).describe()


def test_the_pipelines_row_count_follows_torch_unless_set():
    assert row_threads(2, env={}) == 2
    assert row_threads(2, env={"LATENTDIT_ROW_THREADS": "1"}) == 1
    assert row_threads(1, env={"LATENTDIT_ROW_THREADS": "3"}) == 3
    assert row_threads(2, env={"LATENTDIT_ROW_THREADS": "0"}) == 2  # 0: automatic
    with pytest.raises(ValueError, match="LATENTDIT_ROW_THREADS must be a whole number"):
        row_threads(2, env={"LATENTDIT_ROW_THREADS": "two"})


@pytest.mark.parametrize("value, message", [("x", "whole number"), ("-2", ">= 0")])
def test_bad_thread_counts_are_named(value, message):
    with pytest.raises(ValueError, match=f"LATENTDIT_THREADS must be .*{message}"):
        parse_threads(value, "LATENTDIT_THREADS")


def test_busy_cores_is_a_share_of_the_usable_cores():
    assert 0.0 <= busy_cores(sample_s=0.02) <= len(usable_cores())


def test_the_command_applies_the_count_before_torch_loads():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LATENTDIT_THREADS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-m", "latentdit", "info", "--preset", "tiny", "--debug"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert ", 1 threads" in r.stdout and "latentdit: 1 of" in r.stderr and "(override;" in r.stderr

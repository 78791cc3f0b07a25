"""benchmarks/bench_generate.py: rows split across threads against one call, and the settings
its --contended run compares."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_generate.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contended_settings_pair_each_way_with_one_call():
    settings = _bench_module().settings(2, compare=True)
    assert settings["policy"] == ("policy", {})
    assert settings["policy, one call"] == ("policy", {"LATENTDIT_ROW_THREADS": "1"})
    one_call = {name for name, (_, env) in settings.items() if env.get("LATENTDIT_ROW_THREADS") == "1"}
    assert one_call == {"policy, one call", "default wait, one call", "passive, one call"}
    assert list(_bench_module().settings(2, compare=False)) == ["policy"]


def test_one_call_sets_and_restores_the_row_count(monkeypatch):
    bench = _bench_module()
    monkeypatch.setenv("LATENTDIT_ROW_THREADS", "3")
    with bench.one_call():
        assert os.environ["LATENTDIT_ROW_THREADS"] == "1"
    assert os.environ["LATENTDIT_ROW_THREADS"] == "3"
    monkeypatch.delenv("LATENTDIT_ROW_THREADS")
    with bench.one_call():
        assert os.environ["LATENTDIT_ROW_THREADS"] == "1"
    assert "LATENTDIT_ROW_THREADS" not in os.environ


@pytest.mark.slow
def test_compare_rows_times_both_ways_on_the_packaged_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           "LATENTDIT_ROW_THREADS": "2"}
    r = subprocess.run([sys.executable, str(BENCH), "--steps", "1", "--repeats", "1", "--compare-rows"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["row_threads"] == 2 and res["busy"] is False
    assert res["seconds"] > 0 and res["one_call_s"] > 0 and res["bf16_s"] > 0 and res["fp32_s"] > 0
    assert res["seconds"] == res[f"{res['dtype']}_s"]  # the default precision is the one timed first
    # the times are printed to the millisecond and the speedup is taken before rounding: at one step
    # (tens of milliseconds) the printed times' rounding alone moves their ratio by over 1%
    rounding = 0.0005 / res["one_call_s"] + 0.0005 / res["seconds"]
    assert res["rows_speedup"] == pytest.approx(res["one_call_s"] / res["seconds"], rel=rounding + 0.002)
    assert "the same as one call with 2 OpenMP threads" in r.stdout


def test_count_contrast_and_a_sampler_are_timed_against_the_models_default(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(BENCH), "--model", "shapes-layout", "--steps", "2", "--repeats", "1",
                        "--count-contrast", "0", "--sampler", "dpmpp_2m"], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["count_contrast"] == 0.0 and res["model_count_contrast"] == 1.5
    assert res["count_contrast_s"] > 0
    assert res["count_contrast_ratio"] == pytest.approx(res["count_contrast_s"] / res["seconds"], rel=0.05)
    assert "count contrast 0.0 (the model's: 1.5)" in r.stdout
    assert res["sampler"] == "dpmpp_2m" and res["model_sampler"] == "ddpm" and res["sampler_s"] > 0
    assert res["sampler_ratio"] == pytest.approx(res["sampler_s"] / res["seconds"], rel=0.05)
    assert "sampler dpmpp_2m (the model's: ddpm)" in r.stdout


def test_the_floor_counts_every_row_of_the_call(tiny_clip, tiny_vae, monkeypatch):
    """The FLOP counter sees only its own thread: rows split across threads would be missed, and a
    second step would then add nothing to the count."""
    from tiny import tiny_pipeline

    monkeypatch.setenv("LATENTDIT_ROW_THREADS", "2")
    bench = _bench_module()
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    assert pipe.row_threads().threads == 2  # the rows would be split, but for the floor's one call
    one, two = bench.call_gflop(pipe, 1), bench.call_gflop(pipe, 2)
    assert two > one > 0
    peaks = bench.matmul_peaks(64)
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())

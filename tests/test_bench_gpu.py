"""benchmarks/bench_gpu.py --smoke: every item runs on the CPU and the last line is its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_item_and_ends_with_json(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["device"] == "cpu" and res["smoke"] is True
    items = ("matmul", "train_small", "train_base", "pixart", "sample_36x15", "packaged_4x20")
    errors = {k: res[k]["error"] for k in items if "error" in res[k]}
    assert not errors, errors
    assert res["matmul"]["tflops"] > 0
    for key in ("train_small", "train_base"):
        t = res[key]
        assert t["images_per_s"] == pytest.approx(t["batch"] / t["step_s"], rel=0.01)
        assert 0 < t["mfu"] < 1 and t["gflop_per_image"] > 0
    assert res["train_base"]["tokens"] > res["train_small"]["tokens"]  # the two sizes differ
    assert res["pixart"]["train_ratio"] > 0 and res["pixart"]["forward_ratio"] > 0
    s = res["sample_36x15"]
    assert s["seconds"] > 0 and s["denoiser_only_s"] > 0 and s["cfg_batch"] == 2 * s["images"]
    assert res["packaged_4x20"]["seconds"] > 0 and 0 < res["packaged_4x20"]["text_kv_share"] < 1
    assert list(tmp_path.iterdir()) == []  # writes nothing

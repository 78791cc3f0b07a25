"""End to end over real HTTP on a free loopback port: the Python client, ``generate --server``,
concurrent clients being batched, and (slow) the ``latentdit serve`` command with the packaged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import free_port, running_server, tiny_pipe

pytest.importorskip("uvicorn")

from latentdit.cli import main  # noqa: E402
from latentdit.serve.app import create_app  # noqa: E402
from latentdit.serve.client import Client, ServerError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url(tiny_clip, tiny_vae):
    pipe = tiny_pipe(tiny_clip, tiny_vae)
    with running_server(create_app(pipe, name="tiny", token="tok", max_wait=0.2)) as u:
        yield u


def test_client_generates_and_reports_errors_by_field(url):
    c = Client(url, token="tok")
    assert c.model()["model"] == "tiny"
    images, seeds = c.generate("a red circle", num_images=2, seed=11)
    assert seeds == [11, 12] and [im.size for im in images] == [(16, 16)] * 2
    with pytest.raises(ServerError, match="steps"):
        c.generate("a red circle", steps=0)
    with pytest.raises(ServerError, match="401"):
        Client(url).model()
    with pytest.raises(ServerError, match="cannot reach"):
        Client(f"http://127.0.0.1:{free_port()}", timeout=2).model()
    with pytest.raises(ValueError, match="http"):
        Client("127.0.0.1:8000")


def test_generate_command_draws_on_the_server(url, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIT_TOKEN", "tok")
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--server", url, "--seed", "5", "--out", str(out)]) == 0
    drawn = np.asarray(Image.open(out).convert("RGB"))
    images, _ = Client(url, token="tok").generate("a red circle", seed=5)
    assert np.array_equal(drawn, np.asarray(images[0]))
    assert main(["generate", "a red circle", "--server", url, "--steps", "0", "--out", str(out)]) == 2


def test_concurrent_http_clients_are_batched(url):
    results, errors = [], []

    def one(i):
        try:
            results.append(Client(url, token="tok").generate("a star", seed=i, steps=2))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    stats = Client(url, token="tok").model()["batching"]
    assert stats["largest_batch"] >= 2  # gathered within max_wait into one sampler call


@pytest.mark.slow
def test_serve_command_with_the_packaged_model(tmp_path):
    """``latentdit serve`` as a user starts it: loads the model, binds loopback, answers, stops."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    env.pop("LATENTDIT_TOKEN", None)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "latentdit", "serve", "--port", str(port), "--device", "cpu"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server did not come up in 120 s"
                time.sleep(0.5)
        images, seeds = Client(base).generate("a large red circle in the center", seed=3, steps=4)
        assert images[0].size == (64, 64) and seeds == [3]
        assert Client(base).model()["default_size"] == [64, 64]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert "http://127.0.0.1" in (tmp_path / "serve.log").read_text()

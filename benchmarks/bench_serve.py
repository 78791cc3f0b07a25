"""Serving under load: N concurrent clients against a real ``latentdit serve`` on loopback.

For each client count (default 1, 4, 16, 64) every client sends ``POST /v1/generate`` (one image,
the model's default settings, its own seed) back to back for ``--seconds``; requests still in flight
then finish. Reports images/s, p50/p99 latency, the share of non-2xx answers (and of 5xx), and the
server's RSS, then one JSON line. ``--soak S`` adds S seconds of 16 clients sampling RSS every 10 s
(memory must not grow). Bounded: loopback only, at most ``--max-requests`` per client and level.

    taskset -c 1 python benchmarks/bench_serve.py            # the figures in docs/serving.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def start_server(args, port: int, log) -> subprocess.Popen:
    cpus = len(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(cpus))
    cmd = [sys.executable, "-m", "latentdit", "serve", "--model", args.model, "--port", str(port),
           "--device", args.device, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
           "--timeout", "600"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            status, _ = request(port, "GET", "/healthz")
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not start within 180 s")


def request(port: int, method: str, path: str, body: dict | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        if own:
            conn.close()


def run_level(port: int, clients: int, seconds: float, max_requests: int, body: dict, seed0: int) -> dict:
    latencies, codes, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        n = 0
        while time.monotonic() < stop_at and n < max_requests:
            t0 = time.perf_counter()
            try:
                status, _ = request(port, "POST", "/v1/generate", body | {"seed": seed0 + 1000 * k + n}, conn)
            except OSError:
                status = 0  # connection refused or reset
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
            with lock:
                latencies.append(time.perf_counter() - t0)
                codes.append(status)
            n += 1
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [lat for lat, c in zip(latencies, codes) if 200 <= c < 300]
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [ok[0] if ok else float("nan")] * 99
    return {"clients": clients, "requests": len(codes), "images": len(ok), "seconds": round(wall, 2),
            "images_per_s": round(len(ok) / wall, 3), "p50_s": round(statistics.median(ok), 3) if ok else None,
            "p99_s": round(q[98], 3) if ok else None,
            "non_2xx_share": round(1 - len(ok) / max(1, len(codes)), 4),
            "5xx": sum(1 for c in codes if c >= 500), "429": codes.count(429), "failed": codes.count(0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=30.0, help="sending time per client count")
    p.add_argument("--max-requests", type=int, default=200, help="per client and level")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--soak", type=float, default=0.0, help="seconds of 16 clients watching RSS")
    args = p.parse_args()
    port = free_port()
    body = {"prompt": "a large red circle in the center"} | ({"steps": args.steps} if args.steps else {})
    print(f"cpus {sorted(os.sched_getaffinity(0))}, model {args.model}, max batch {args.max_batch}, "
          f"max queue {args.max_queue}, {args.seconds:g} s per level", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        proc = start_server(args, port, log)
        try:
            request(port, "POST", "/v1/generate", body)  # warm
            levels, rss_start = [], rss_mb(proc.pid)[0]
            for n in args.clients:
                r = run_level(port, n, args.seconds, args.max_requests, body, seed0=10_000 * n)
                r["rss_mb"], r["peak_rss_mb"] = (round(v, 1) for v in rss_mb(proc.pid))
                levels.append(r)
                print(f"{n:>3} clients: {r['images_per_s']:6.3f} images/s, p50 {r['p50_s']} s, p99 {r['p99_s']} s, "
                      f"non-2xx {r['non_2xx_share']:.1%} (5xx {r['5xx']}, 429 {r['429']}), "
                      f"RSS {r['rss_mb']} MiB (peak {r['peak_rss_mb']})", flush=True)
            soak = soak_run(port, proc.pid, args.soak, body) if args.soak else None
            _, stats = request(port, "GET", "/v1/model")
        finally:
            proc.terminate()
            proc.wait(30)
    by = {r["clients"]: r for r in levels}
    ratio = by[16]["images_per_s"] / by[1]["images_per_s"] if 1 in by and 16 in by else None
    if ratio is not None:
        print(f"batching: 16 clients get {ratio:.2f}x the images/s of 1 client")
    print(json.dumps({"bench": "serve", "model": args.model, "cpus": len(os.sched_getaffinity(0)),
                      "levels": levels, "ratio_16_vs_1": None if ratio is None else round(ratio, 2),
                      "rss_start_mb": round(rss_start, 1), "soak": soak,
                      "server_batching": json.loads(stats)["batching"]}))


def soak_run(port: int, pid: int, seconds: float, body: dict) -> dict:
    samples, done = [], threading.Event()

    def watch():
        while not done.wait(10):
            samples.append(round(rss_mb(pid)[0], 1))

    watcher = threading.Thread(target=watch)
    watcher.start()
    r = run_level(port, 16, seconds, 10**6, body, seed0=7_000_000)
    done.set()
    watcher.join()
    print(f"soak {seconds:g} s, 16 clients: {r['images']} images, RSS every 10 s: {samples}", flush=True)
    return {"seconds": seconds, "images": r["images"], "5xx": r["5xx"], "rss_samples_mb": samples}


if __name__ == "__main__":
    main()

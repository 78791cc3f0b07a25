"""Generation latency of a model on this machine: 4 images, 20 steps, guidance on, after load.

Reports the load time and the median over repeats of one 4-image call in the precision the
pipeline picks by default (bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere),
and in the other one, measured in the same run. Ends with one JSON line of every figure.

    python benchmarks/bench_generate.py                # the packaged shapes model
    python benchmarks/bench_generate.py --model DIR
    python benchmarks/bench_generate.py --guidance-interval 0.25 1   # also: guide only for t in [0.25, 1]
    python benchmarks/bench_generate.py --model shapes-layout --count-contrast 0   # also: without its count contrast
    python benchmarks/bench_generate.py --model shapes-layout --sampler dpmpp_2m   # also: another sampler
    python benchmarks/bench_generate.py --compare-rows [--busy]   # rows split across threads vs one call
    python benchmarks/bench_generate.py --floor    # also: the call's FLOPs over this CPU's matmul peak

``--contended`` times generation on a busy machine against an idle one, in the same run: each
measurement is a fresh process (as a user's command would be) that applies the thread policy the
``latentdit`` command applies, started once on the machine as it is and once while another
process keeps every core busy. ``--compare`` adds fixed settings (OpenMP's default wait with
every core, ``OMP_WAIT_POLICY=PASSIVE`` with every core, one thread) beside that policy.
Run it without ``taskset``: it needs every core.

    python benchmarks/bench_generate.py --contended --repeats 3
    python benchmarks/bench_generate.py --contended --compare --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from latentdit.threads import ROW_THREADS_ENV, THREADS_ENV

PROMPTS = ["a red circle above a blue square", "three yellow stars",
           "a small green triangle in the top left", "a purple heart on a black background"]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", THREADS_ENV,
               ROW_THREADS_ENV)


def time_once(pipe, dtype, steps: int, seed: int, interval: tuple[float, float] | None = None,
              count_contrast: float | None = None, sampler: str | None = None) -> float:
    t0 = time.perf_counter()
    pipe(PROMPTS, steps=steps, guidance_scale=4.5, seed=seed, dtype=dtype, progress=False,
         guidance_interval=interval, count_contrast=count_contrast, sampler=sampler)
    return time.perf_counter() - t0


def time_call(pipe, repeats: int, dtype, steps: int) -> list[float]:
    time_once(pipe, dtype, steps, 0)  # the first call warms up kernels and caches
    return [time_once(pipe, dtype, steps, i) for i in range(1, repeats + 1)]


def plain(args: argparse.Namespace) -> None:
    import torch

    from latentdit.device import compute_dtype
    from latentdit.pipeline import Text2Image

    t0 = time.perf_counter()
    pipe = Text2Image.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    default = compute_dtype(pipe.device, "auto")  # what a call without dtype runs in
    name, other, other_name = ("bf16", None, "fp32") if default else ("fp32", torch.bfloat16, "bf16")
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    runs, interval_runs, one_call_runs, contrast_runs, sampler_runs = [], [], [], [], []
    time_once(pipe, default, args.steps, 0)  # warm-up
    burners = start_burners(os.cpu_count() or 1) if args.busy else []
    try:
        for i in range(1, args.repeats + 1):  # interleaved, so that a change in machine speed hits all alike
            runs.append(time_once(pipe, default, args.steps, i))
            if interval:
                interval_runs.append(time_once(pipe, default, args.steps, i, interval))
            if args.count_contrast is not None:
                contrast_runs.append(time_once(pipe, default, args.steps, i, count_contrast=args.count_contrast))
            if args.sampler:
                sampler_runs.append(time_once(pipe, default, args.steps, i, sampler=args.sampler))
            if args.compare_rows:
                with one_call():
                    one_call_runs.append(time_once(pipe, default, args.steps, i))
        other_s = statistics.median(time_call(pipe, args.repeats, other, args.steps))
    finally:
        stop(burners)
    main_s = statistics.median(runs)
    figures = {"model": args.model, "steps": args.steps, "images": len(PROMPTS), "load_s": round(load_s, 2),
               "dtype": name, "seconds": round(main_s, 3),
               "seconds_4_images_20_steps": round(main_s, 3) if args.steps == 20 else None,
               f"{name}_s": round(main_s, 3), f"{other_name}_s": round(other_s, 3),
               "threads": torch.get_num_threads()}
    figures["row_threads"] = pipe.row_threads().threads
    print(f"load {load_s:.2f} s; 4 images x {args.steps} steps with guidance: "
          f"{name} (the default here) {main_s:.2f} s, {other_name} {other_s:.2f} s "
          f"(rows over {figures['row_threads']} threads"
          f"{', every core kept busy by other processes' if args.busy else ''})")
    if args.compare_rows:
        whole = statistics.median(one_call_runs)
        figures.update(busy=args.busy, one_call_s=round(whole, 3), rows_speedup=round(whole / main_s, 3))
        print(f"the same as one call with {torch.get_num_threads()} OpenMP threads: {name} {whole:.2f} s "
              f"(rows split {whole / main_s:.2f}x faster)")
    if interval:
        limited = statistics.median(interval_runs)
        figures.update(guidance_interval=list(interval), interval_s=round(limited, 3),
                       interval_ratio=round(limited / main_s, 3))
        print(f"guidance only for t in [{interval[0]}, {interval[1]}]: {name} {limited:.2f} s "
              f"({limited / main_s:.2f}x the default's time)")
    if contrast_runs:
        contrast_s = statistics.median(contrast_runs)
        figures.update(count_contrast=args.count_contrast, model_count_contrast=pipe.sampling.count_contrast,
                       count_contrast_s=round(contrast_s, 3), count_contrast_ratio=round(contrast_s / main_s, 3))
        print(f"count contrast {args.count_contrast} (the model's: {pipe.sampling.count_contrast}): {name} "
              f"{contrast_s:.2f} s ({contrast_s / main_s:.2f}x the default's time)")
    if sampler_runs:
        sampler_s = statistics.median(sampler_runs)
        figures.update(sampler=args.sampler, model_sampler=pipe.sampling.sampler, sampler_s=round(sampler_s, 3),
                       sampler_ratio=round(sampler_s / main_s, 3))
        print(f"sampler {args.sampler} (the model's: {pipe.sampling.sampler}): {name} {sampler_s:.2f} s "
              f"({sampler_s / main_s:.2f}x the default's time)")
    if args.floor:
        figures.update(floor(pipe, args.steps, default))
        print(f"one call is {figures['gflop']:.0f} GFLOP; matmul {FLOOR_MATMUL}^3 peak: fp32 "
              f"{figures['peak_gflops_fp32']:.0f} GFLOP/s, bf16 {figures['peak_gflops_bf16']:.0f} GFLOP/s; "
              f"at the {name} peak the call takes at least {figures['floor_s']:.2f} s "
              f"({figures['floor_s'] / main_s:.0%} of the measured time)")
    print(json.dumps(figures))


FLOOR_MATMUL = 1024  # the side of the square matmul whose rate stands for the CPU's peak


def floor(pipe, steps: int, default) -> dict:
    """The call's FLOPs over the matmul peak of the default precision: a lower bound on its time."""
    gflop, peaks = call_gflop(pipe, steps), matmul_peaks(FLOOR_MATMUL)
    peak = peaks["bf16" if default is not None else "fp32"]
    return {"gflop": round(gflop, 1), "peak_gflops_fp32": round(peaks["fp32"], 1),
            "peak_gflops_bf16": round(peaks["bf16"], 1), "floor_s": round(gflop / peak, 3)}


def call_gflop(pipe, steps: int) -> float:
    """One call's GFLOPs as torch counts them. The counter sees only its own thread, so the rows run
    in it (one call) rather than split across threads."""
    from torch.utils.flop_counter import FlopCounterMode

    with one_call(), FlopCounterMode(display=False) as counter:
        pipe(PROMPTS, steps=steps, guidance_scale=4.5, seed=0, dtype=None, progress=False)
    return counter.get_total_flops() / 1e9


def matmul_peaks(size: int) -> dict[str, float]:
    """GFLOP/s of a square matmul in fp32 and in bf16 on every torch thread, median of 5 after one."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            runs.append(time.perf_counter() - t0)
        peaks[name] = 2 * size**3 / statistics.median(runs) / 1e9
    return peaks


# -- contended ---------------------------------------------------------------------------------
def settings(cores: int, compare: bool) -> dict[str, tuple[str, dict[str, str]]]:
    """Name -> (worker kind, environment): "policy" applies the latentdit command's thread policy
    first, "fixed" only the environment. Rows of a batch are split across threads unless
    LATENTDIT_ROW_THREADS=1 ("one call": OpenMP's threads inside each operator, as before)."""
    one_call = {ROW_THREADS_ENV: "1"}
    fixed = {"policy, one call": ("policy", one_call),
             "default wait, all cores": ("fixed", {"OMP_NUM_THREADS": str(cores)}),
             "default wait, one call": ("fixed", {"OMP_NUM_THREADS": str(cores), **one_call}),
             "passive wait, all cores": ("fixed", {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}),
             "passive, one call": ("fixed", {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE",
                                             **one_call}),
             "one thread": ("fixed", {"OMP_NUM_THREADS": "1"})}
    return {"policy": ("policy", {}), **(fixed if compare else {})}


def worker(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: thread policy, then torch, load, warm-up, repeats.
    Prints one JSON line per event as it happens, so a run cut short still tells how far it got."""
    policy = None
    if args.worker == "policy":
        from latentdit.threads import apply_thread_policy

        policy = apply_thread_policy().describe()
    import torch

    from latentdit.pipeline import Text2Image

    t0 = time.perf_counter()
    pipe = Text2Image.from_pretrained(args.model)
    print(json.dumps({"loaded_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                      "row_threads": pipe.row_threads().threads, "policy": policy}), flush=True)
    time_once(pipe, "auto", args.steps, 0)  # warm-up
    print(json.dumps({"warm": True}), flush=True)
    for i in range(1, args.repeats + 1):
        print(json.dumps({"run_s": time_once(pipe, "auto", args.steps, i)}), flush=True)


def measure(args: argparse.Namespace, name: str, kind: str, extra: dict[str, str]) -> dict:
    """The worker's events folded into {median_s, runs, threads, policy, timed_out}; a worker past
    ``--timeout`` is stopped and its median is over the calls it finished (None if none)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", kind,
           "--model", args.model, "--steps", str(args.steps), "--repeats", str(args.repeats)]
    timed_out = False
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode:
            raise SystemExit(f"{name}: the worker failed:\n{done.stderr[-2000:]}")
        out = done.stdout
    except subprocess.TimeoutExpired as e:  # a setting that collapses under load
        timed_out = True
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    head = next((ev for ev in events if "loaded_s" in ev), {})
    runs = [ev["run_s"] for ev in events if "run_s" in ev]
    return {"median_s": statistics.median(runs) if runs else None, "runs": runs, "timed_out": timed_out,
            "timeout": args.timeout,
            "threads": head.get("threads"), "row_threads": head.get("row_threads"), "policy": head.get("policy"),
            "warm": any("warm" in ev for ev in events)}


def one_call():
    """Sampling as one call with OpenMP's threads inside each operator (rows not split)."""
    return mock.patch.dict(os.environ, {ROW_THREADS_ENV: "1"})


def stop(burners: list[subprocess.Popen]) -> None:
    for b in burners:
        b.kill()
        b.wait()


def start_burners(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy, allowed on every core."""
    every = list(range(os.cpu_count() or 1))
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             preexec_fn=lambda: os.sched_setaffinity(0, every)) for _ in range(n)]


def _show(m: dict) -> str:
    if m["median_s"] is None:
        return f"no call done in {m['timeout']:.0f} s" if "timeout" in m else "no call done"
    cut = f", stopped after {len(m['runs'])} calls" if m["timed_out"] else ""
    split = f", rows over {m['row_threads']}" if (m.get("row_threads") or 1) > 1 else ", one call"
    return f"{m['median_s']:6.2f} s ({m['threads']} threads{split}{cut})"


def contended(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    rows = {}
    for name, (kind, extra) in settings(cores, args.compare).items():
        idle = measure(args, name, kind, extra)
        burners = start_burners(cores)
        try:
            time.sleep(1.0)  # let the scheduler spread them
            busy = measure(args, name, kind, extra)
        finally:
            stop(burners)
        ratio = busy["median_s"] / idle["median_s"] if busy["median_s"] and idle["median_s"] else None
        rows[name] = {"idle": idle, "contended": busy, "ratio": None if ratio is None else round(ratio, 2)}
        print(f"{name:<24} idle {_show(idle)}   {cores} busy processes {_show(busy)}   "
              f"ratio {'-' if ratio is None else f'{ratio:.2f}x'}")
    print(json.dumps({"model": args.model, "images": len(PROMPTS), "steps": args.steps,
                      "repeats": args.repeats, "cores": cores, "settings": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="also time guidance limited to LO <= t <= HI, interleaved with the model default")
    ap.add_argument("--count-contrast", type=float, default=None, metavar="S",
                    help="also time count contrast S (latentdit.counts), interleaved with the model default")
    ap.add_argument("--sampler", default=None, help="also time this sampler, interleaved with the model default")
    ap.add_argument("--compare-rows", action="store_true",
                    help="also time sampling as one call (rows not split across threads), interleaved")
    ap.add_argument("--floor", action="store_true",
                    help="also count the call's FLOPs and time a matmul in both precisions: the fastest "
                         "this CPU could run the call at its matmul peak")
    ap.add_argument("--busy", action="store_true",
                    help="time while other processes keep every core busy (after load and warm-up)")
    ap.add_argument("--contended", action="store_true",
                    help="time the command's thread policy idle and while every core is kept busy")
    ap.add_argument("--compare", action="store_true", help="with --contended: also fixed thread settings")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="with --contended: seconds one worker (load, warm-up, repeats) may run; one cut "
                         "short reports the median of the calls it finished")
    ap.add_argument("--worker", choices=["policy", "fixed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.contended:
        contended(args)
    else:
        plain(args)


if __name__ == "__main__":
    main()

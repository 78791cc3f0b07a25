"""Generation latency of a model on this machine: 4 images, 20 steps, guidance on, after load.

Reports the load time and the median over repeats of one 4-image call, in bf16 autocast and in
fp32, measured in the same run. Ends with one JSON line of every figure.

    python benchmarks/bench_generate.py                # the packaged shapes model
    python benchmarks/bench_generate.py --model DIR
    python benchmarks/bench_generate.py --guidance-interval 0.25 1   # also: guide only for t in [0.25, 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentdit.pipeline import Text2Image

PROMPTS = ["a red circle above a blue square", "three yellow stars",
           "a small green triangle in the top left", "a purple heart on a black background"]


def time_once(pipe: Text2Image, dtype: torch.dtype | None, steps: int, seed: int,
              interval: tuple[float, float] | None = None) -> float:
    t0 = time.perf_counter()
    pipe(PROMPTS, steps=steps, guidance_scale=4.5, seed=seed, dtype=dtype, progress=False,
         guidance_interval=interval)
    return time.perf_counter() - t0


def time_call(pipe: Text2Image, repeats: int, dtype: torch.dtype | None, steps: int) -> list[float]:
    time_once(pipe, dtype, steps, 0)  # the first call warms up kernels and caches
    return [time_once(pipe, dtype, steps, i) for i in range(1, repeats + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="also time guidance limited to LO <= t <= HI, interleaved with the model default")
    args = ap.parse_args()

    t0 = time.perf_counter()
    pipe = Text2Image.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    bf16_runs, interval_runs = [], []
    time_once(pipe, torch.bfloat16, args.steps, 0)  # warm-up
    for i in range(1, args.repeats + 1):  # interleaved, so that a change in machine speed hits both alike
        bf16_runs.append(time_once(pipe, torch.bfloat16, args.steps, i))
        if interval:
            interval_runs.append(time_once(pipe, torch.bfloat16, args.steps, i, interval))
    bf16 = statistics.median(bf16_runs)
    fp32 = statistics.median(time_call(pipe, args.repeats, None, args.steps))
    figures = {"model": args.model, "steps": args.steps, "images": len(PROMPTS), "load_s": round(load_s, 2),
               "seconds_4_images_20_steps": round(bf16, 3) if args.steps == 20 else None,
               "bf16_s": round(bf16, 3), "fp32_s": round(fp32, 3), "threads": torch.get_num_threads()}
    print(f"load {load_s:.2f} s; 4 images x {args.steps} steps with guidance: "
          f"bf16 {bf16:.2f} s, fp32 {fp32:.2f} s")
    if interval:
        limited = statistics.median(interval_runs)
        figures.update(guidance_interval=list(interval), bf16_interval_s=round(limited, 3),
                       interval_ratio=round(limited / bf16, 3))
        print(f"guidance only for t in [{interval[0]}, {interval[1]}]: bf16 {limited:.2f} s "
              f"({limited / bf16:.2f}x the default's time)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

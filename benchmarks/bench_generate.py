"""Generation latency of a model on this machine: 4 images, 20 steps, guidance on, after load.

Reports the load time and the median over repeats of one 4-image call, in bf16 autocast and in
fp32, measured in the same run. Ends with one JSON line of every figure.

    python benchmarks/bench_generate.py                # the packaged shapes model
    python benchmarks/bench_generate.py --model DIR
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


def time_call(pipe: Text2Image, repeats: int, dtype: torch.dtype | None, steps: int) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first call warms up kernels and caches
        t0 = time.perf_counter()
        pipe(PROMPTS, steps=steps, guidance_scale=4.5, seed=i, dtype=dtype, progress=False)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    pipe = Text2Image.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    bf16 = statistics.median(time_call(pipe, args.repeats, torch.bfloat16, args.steps))
    fp32 = statistics.median(time_call(pipe, args.repeats, None, args.steps))
    figures = {"model": args.model, "steps": args.steps, "images": len(PROMPTS), "load_s": round(load_s, 2),
               "seconds_4_images_20_steps": round(bf16, 3) if args.steps == 20 else None,
               "bf16_s": round(bf16, 3), "fp32_s": round(fp32, 3), "threads": torch.get_num_threads()}
    print(f"load {load_s:.2f} s; 4 images x {args.steps} steps with guidance: "
          f"bf16 {bf16:.2f} s, fp32 {fp32:.2f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

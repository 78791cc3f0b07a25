"""Training throughput of a preset on shapes-sized latents: images/s in fp32 and bf16 autocast.

Runs the real training step (``latentdit.train.train_step``: condition dropout, loss, backward,
clipping, AdamW) on synthetic latents/text of the shapes model's sizes, the two precisions
interleaved so background load hits both alike. Ends with one JSON line of every figure.

    python benchmarks/bench_train.py --preset small --batch 64
    python benchmarks/bench_train.py --recipes shapes-small shapes-tld   # bf16 step time per recipe

With ``--recipes`` it times named training recipes instead (bf16, as they train), interleaved
round by round, and reports each one's step time relative to the first: the step ratio that makes
an equal-wall-clock comparison of two recipes (``steps_b = steps_a * step_a / step_b``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentdit.config import model_preset
from latentdit.model import Denoiser
from latentdit.schedules import NoisePath
from latentdit.shards import Batch
from latentdit.train import TrainConfig, make_optimizer, train_step
from latentdit.train_config import make_config, recipe_dict


class _SingleProcess:
    """The slice of ``accelerate.Accelerator`` that train_step uses, for one CPU process."""

    device = torch.device("cpu")

    def no_sync(self, model):
        return _Null()

    def backward(self, loss):
        loss.backward()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_batch(n: int, latent: tuple[int, int, int], text_len: int, dim: int, pooled_dim: int | None = None
               ) -> Batch:
    pooled_dim = dim if pooled_dim is None else pooled_dim
    return Batch(latents=torch.randn(n, *latent), tokens=torch.randn(n, text_len, dim),
                 mask=torch.ones(n, text_len, dtype=torch.bool), pooled=torch.randn(n, pooled_dim),
                 captions=[""] * n, index=torch.arange(n))


def time_steps(cfg: TrainConfig, batch: Batch, repeats: int, warmup: int) -> list[float]:
    model = Denoiser(cfg.model).train()
    opt = make_optimizer(model, cfg)
    gen, acc, path = torch.Generator().manual_seed(0), _SingleProcess(), NoisePath(cfg.diffusion.path)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        train_step(acc, model, opt, [batch], path, cfg, gen, step=1000)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def compare_recipes(args: argparse.Namespace) -> None:
    """bf16 step time of each named recipe, interleaved; ratios against the first."""
    cfgs, batches = {}, {}
    for name in args.recipes:
        data = recipe_dict(name)
        data["batch_size"], data["mixed_precision"] = args.batch, "bf16"
        cfgs[name] = cfg = make_config(data)
        m = cfg.model
        batches[name] = make_batch(args.batch, (m.in_channels, m.base_size, m.base_size), m.max_text_len,
                                   m.text_dim, m.pooled_dim)
    results: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(args.rounds):
        for name, cfg in cfgs.items():
            results[name] += time_steps(cfg, batches[name], args.repeats, args.warmup)
    med = {name: statistics.median(ts) for name, ts in results.items()}
    first = args.recipes[0]
    print(f"{'recipe':<16}{'step (s)':>10}{'images/s':>10}{'vs ' + first:>20}")
    for name, t in med.items():
        print(f"{name:<16}{t:>10.3f}{args.batch / t:>10.1f}{t / med[first]:>20.3f}")
    print(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(),
                      "step_s": {n: round(t, 4) for n, t in med.items()},
                      "step_ratio": {n: round(t / med[first], 3) for n, t in med.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--latent", type=int, default=16, help="latent side (shapes: 64 px / 4)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved fp32/bf16 (or recipe) rounds")
    ap.add_argument("--recipes", nargs="+", metavar="NAME",
                    help="time these training recipes (e.g. shapes-small shapes-tld) instead of --preset")
    args = ap.parse_args()
    if args.recipes:
        compare_recipes(args)
        return

    torch.manual_seed(0)
    mcfg = model_preset(args.preset, in_channels=args.channels, base_size=args.latent)
    batch = make_batch(args.batch, (args.channels, args.latent, args.latent), args.text_len, mcfg.text_dim)
    results: dict[str, list[float]] = {"no": [], "bf16": []}
    for _ in range(args.rounds):
        for mp in results:
            cfg = TrainConfig(model=mcfg, mixed_precision=mp, batch_size=args.batch)
            results[mp] += time_steps(cfg, batch, args.repeats, args.warmup)
    med = {mp: statistics.median(ts) for mp, ts in results.items()}
    figures = {
        "preset": args.preset, "params_m": round(Denoiser(mcfg).num_params() / 1e6, 2),
        "batch": args.batch, "latent": [args.channels, args.latent, args.latent],
        "tokens": (args.latent // mcfg.patch_size) ** 2, "threads": torch.get_num_threads(),
        "fp32_step_s": round(med["no"], 4), "bf16_step_s": round(med["bf16"], 4),
        "fp32_images_per_s": round(args.batch / med["no"], 2),
        "bf16_images_per_s": round(args.batch / med["bf16"], 2),
        "bf16_speedup": round(med["no"] / med["bf16"], 2),
    }
    print(f"{'precision':<10}{'step (s)':>10}{'images/s':>10}")
    for mp, name in (("no", "fp32"), ("bf16", "bf16")):
        print(f"{name:<10}{med[mp]:>10.3f}{args.batch / med[mp]:>10.1f}")
    print(f"bf16 speed-up: {figures['bf16_speedup']:.2f}x  ({figures['params_m']} M params, "
          f"{figures['tokens']} tokens, batch {args.batch})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

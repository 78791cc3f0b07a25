"""Training throughput of a preset on shapes-sized latents: images/s in fp32 and bf16 autocast.

Runs the real training step (``latentdit.train.train_step``: condition dropout, loss, backward,
clipping, AdamW, then the EMA update) on synthetic latents/text of the shapes model's sizes, the two precisions
interleaved so background load hits both alike. Ends with one JSON line of every figure.

    python benchmarks/bench_train.py --preset small --batch 64
    python benchmarks/bench_train.py --recipes shapes-small shapes-tld   # bf16 step time per recipe
    python benchmarks/bench_train.py --parts                              # EMA and AdamW variants
    python benchmarks/bench_train.py --against /tmp/before --repeats 20   # this tree vs another

With ``--parts`` it times the step's bookkeeping on the preset's parameters instead: the EMA update
(one ``lerp_`` per parameter, the multi-tensor one, the device-gated one) and the AdamW step
(fused, foreach, per-parameter loop), interleaved.

With ``--against DIR`` it compares this tree's bf16 step with the one of another checkout (DIR
holds its ``latentdit/``, e.g. from ``git archive COMMIT latentdit | tar -x -C DIR``): both
load in one process and their steps alternate, so a busy machine slows both alike.

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
from latentdit.text import TextEmbeddings
from latentdit.train import make_optimizer, train_step, update_ema
from latentdit.train_config import TrainConfig, make_config, recipe_dict


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
    text = TextEmbeddings(torch.randn(n, text_len, dim), torch.ones(n, text_len, dtype=torch.bool),
                          torch.randn(n, pooled_dim))
    return Batch(latents=torch.randn(n, *latent), text=text, captions=[""] * n, index=torch.arange(n))


def time_steps(cfg: TrainConfig, batch: Batch, repeats: int, warmup: int) -> list[float]:
    model = Denoiser(cfg.model).train()
    opt = make_optimizer(model, cfg)
    gen, acc, path = torch.Generator().manual_seed(0), _SingleProcess(), NoisePath(cfg.diffusion.path)
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        train_step(acc, model, opt, [batch], path, cfg, gen, step=1000)
        update_ema(ema, model, cfg.ema_decay)
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


def time_parts(args: argparse.Namespace) -> None:
    """EMA and AdamW variants on the preset's parameters (random gradients), interleaved."""
    torch.manual_seed(0)
    model = Denoiser(model_preset(args.preset))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    ok = torch.tensor(True)

    def per_param_ema():
        for n, p in model.named_parameters():
            ema[n].lerp_(p.detach().float(), 1e-3)

    opts = {kind: torch.optim.AdamW(params, lr=1e-6, **{kind: True} if kind != "loop" else {"foreach": False})
            for kind in ("fused", "foreach", "loop")}
    fns = {"ema_per_parameter": per_param_ema, "ema_foreach": lambda: update_ema(ema, model, 0.999),
           "ema_foreach_gated": lambda: update_ema(ema, model, 0.999, ok),
           **{f"adamw_{k}": o.step for k, o in opts.items()}}
    results: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (creates the optimiser states)
    for _ in range(args.rounds * args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            results[name].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v) * 1e3, 2) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k:<20}{v:>10.2f} ms")
    print(json.dumps({"preset": args.preset, "params_m": round(model.num_params() / 1e6, 2),
                      "threads": torch.get_num_threads(), "ms": med}))


def compare_trees(args: argparse.Namespace) -> None:
    """bf16 step (train_step + EMA) of this tree and of the tree at ``--against``, alternated."""
    import importlib
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    src = Path(args.against) / "latentdit"
    if not (src / "train.py").is_file():
        raise SystemExit(f"--against {args.against}: no latentdit/train.py there")
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(src, tmp / "latentdit_ref")  # relative imports: the copy loads its own modules
    sys.path.insert(0, str(tmp))
    mods = {"this": importlib.import_module("latentdit.train"), "ref": importlib.import_module("latentdit_ref.train")}
    mcfg = model_preset(args.preset, in_channels=args.channels, base_size=args.latent)
    batch = make_batch(args.batch, (args.channels, args.latent, args.latent), args.text_len, mcfg.text_dim)
    steps = {name: _one_step(mod, mcfg, batch, args.batch) for name, mod in mods.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in (("this", "ref") if r % 2 == 0 else ("ref", "this")):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'tree':<6}{'step (s)':>10}{'images/s':>10}")
    for name, t in med.items():
        print(f"{name:<6}{t:>10.4f}{args.batch / t:>10.1f}")
    print(json.dumps({"preset": args.preset, "batch": args.batch, "against": args.against, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "this_step_s": round(med["this"], 4),
                      "ref_step_s": round(med["ref"], 4), "this_over_ref": round(med["this"] / med["ref"], 3)}))


def _one_step(mod, mcfg, batch: Batch, n: int):
    torch.manual_seed(0)
    cfg = mod.TrainConfig(model=mcfg, mixed_precision="bf16", batch_size=n)
    model = mod.Denoiser(mcfg).train()
    opt, gen = mod.make_optimizer(model, cfg), torch.Generator().manual_seed(0)
    ema = {k: p.detach().float().clone() for k, p in model.named_parameters()}
    path, acc = NoisePath(cfg.diffusion.path), _SingleProcess()

    def step():
        mod.train_step(acc, model, opt, [batch], path, cfg, gen, step=1000)
        mod.update_ema(ema, model, cfg.ema_decay)
    return step


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
    ap.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"],
                    help="mixed_precision settings to time (default both; 'no' is fp32)")
    ap.add_argument("--recipes", nargs="+", metavar="NAME",
                    help="time these training recipes (e.g. shapes-small shapes-tld) instead of --preset")
    ap.add_argument("--parts", action="store_true", help="time the EMA and AdamW variants instead")
    ap.add_argument("--against", metavar="DIR", help="compare this tree's step with the checkout in DIR")
    args = ap.parse_args()
    if args.parts:
        time_parts(args)
        return
    if args.against:
        compare_trees(args)
        return
    if args.recipes:
        compare_recipes(args)
        return

    torch.manual_seed(0)
    mcfg = model_preset(args.preset, in_channels=args.channels, base_size=args.latent)
    batch = make_batch(args.batch, (args.channels, args.latent, args.latent), args.text_len, mcfg.text_dim)
    results: dict[str, list[float]] = {mp: [] for mp in args.precisions}
    for _ in range(args.rounds):
        for mp in results:
            cfg = TrainConfig(model=mcfg, mixed_precision=mp, batch_size=args.batch)
            results[mp] += time_steps(cfg, batch, args.repeats, args.warmup)
    med = {mp: statistics.median(ts) for mp, ts in results.items()}
    figures = {
        "preset": args.preset, "params_m": round(Denoiser(mcfg).num_params() / 1e6, 2),
        "batch": args.batch, "latent": [args.channels, args.latent, args.latent],
        "tokens": (args.latent // mcfg.patch_size) ** 2, "threads": torch.get_num_threads(),
    }
    print(f"{'precision':<10}{'step (s)':>10}{'images/s':>10}")
    for mp, ts in med.items():
        name = "fp32" if mp == "no" else mp
        figures[f"{name}_step_s"] = round(ts, 4)
        figures[f"{name}_images_per_s"] = round(args.batch / ts, 2)
        print(f"{name:<10}{ts:>10.3f}{args.batch / ts:>10.1f}")
    if len(med) == 2:
        figures["bf16_speedup"] = round(med["no"] / med["bf16"], 2)
        print(f"bf16 speed-up: {figures['bf16_speedup']:.2f}x  ({figures['params_m']} M params, "
              f"{figures['tokens']} tokens, batch {args.batch})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

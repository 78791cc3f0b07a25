"""Benchmark our ``Denoiser`` against diffusers' ``PixArtTransformer2DModel`` at an equal config.

Same width, depth, heads, patch size, latent size (so tokens), in/out channels, text length and
text dim; GELU MLP on both (our ``mlp="gelu"``), no pooled-text input on ours (PixArt has none).
Ours keeps its defaults: a QK norm in self-attention (``qk_norm="layer"``; PixArt has none; with
``qk_norm="none"`` it is timed too), none in cross-attention (as PixArt), and the exact GELU
(PixArt: the tanh approximation, ~4x slower on CPU in bf16; ``--gelu tanh`` times ours with it).

Measured in one run, interleaved: forward (inference) and training step (forward + MSE loss +
backward + AdamW step), in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, plus a
large fp32 and bf16 matmul whose rate is the "peak" our achieved GFLOP/s is compared with.

How the timing copes with a shared CPU: every round runs each group (e.g. "train bf16") once,
groups in shuffled order; inside a group the models run back to back in a shuffled order and then
mirrored (A B C C B A), and a model's round time is the faster of its two runs. The ratio
PixArt / ours is taken within each round, and its median over rounds is reported. /proc/stat
tells how many cores other processes kept busy during each round; rounds above ``--quiet`` cores
are set aside (if fewer than 3 rounds stay under it, the least loaded third is used).

    python benchmarks/bench_denoiser.py --quick          # smoke run, seconds
    python benchmarks/bench_denoiser.py                  # preset "small", batch 8, 16x16 latent

The last line printed is one JSON object holding every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import latentdit.model  # noqa: E402
from latentdit.config import ModelConfig, model_preset  # noqa: E402
from latentdit.model import Denoiser  # noqa: E402

BF16 = torch.bfloat16
Step = Callable[[], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=16, help="latent side (16 -> 16x16 latent)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the peak-rate matmul")
    p.add_argument("--quiet", type=float, default=0.3,
                   help="use rounds during which other processes kept at most this many cores busy")
    p.add_argument("--no-qk-off", action="store_true", help='skip the extra qk_norm="none" model')
    p.add_argument("--gelu", default="exact", choices=["exact", "tanh"],
                   help="our MLP activation (default: ours, exact; tanh: PixArt's approximation)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny preset and sizes: a smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.batch, a.latent, a.text_len = "tiny", 2, 8, 8
        a.repeats, a.warmup, a.matmul_size = 3, 1, 512
    if min(a.batch, a.latent, a.text_len, a.repeats) < 1 or a.warmup < 0:
        p.error("batch, latent, text-len and repeats must be >= 1, warmup >= 0")
    return a


# -- models ------------------------------------------------------------------------------------
def build_ours(args: argparse.Namespace, qk_norm: str | None = None) -> Denoiser:
    extra = {} if qk_norm is None else {"qk_norm": qk_norm}
    cfg = model_preset(args.preset, mlp="gelu", gelu=args.gelu, pooled_dim=0, max_text_len=args.text_len, **extra)
    if args.latent % cfg.patch_size:
        raise SystemExit(f"--latent {args.latent} is not a multiple of the patch size {cfg.patch_size}")
    return Denoiser(cfg)


def build_pixart(cfg: ModelConfig, latent: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads,
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,  # no learned sigma, like ours
        num_layers=cfg.depth, cross_attention_dim=cfg.width, caption_channels=cfg.text_dim,
        patch_size=cfg.patch_size, sample_size=latent, activation_fn="gelu-approximate",
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    )


class PixArtAdapter(nn.Module):
    """PixArt behind our call signature: (x, t in [0, 1], text, text_mask) -> prediction."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, text, text_mask):
        return self.model(
            x, encoder_hidden_states=text, timestep=t * 1000.0, encoder_attention_mask=text_mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]


def num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -- inputs, steps, FLOPs ------------------------------------------------------------------------
def make_inputs(args: argparse.Namespace, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    n, s, length = args.batch, args.latent, args.text_len
    lengths = torch.randint(max(1, length // 2), length + 1, (n,), generator=g)
    return dict(
        x=torch.randn(n, cfg.in_channels, s, s, generator=g),
        t=torch.rand(n, generator=g),
        text=torch.randn(n, length, cfg.text_dim, generator=g),
        text_mask=torch.arange(length)[None] < lengths[:, None],  # padded captions
        target=torch.randn(n, cfg.in_channels, s, s, generator=g),
    )


def forward_step(model: nn.Module, inp: dict, bf16: bool) -> Step:
    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16, enabled=bf16):
            model(inp["x"], inp["t"], inp["text"], inp["text_mask"])
    return run


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inp: dict, bf16: bool) -> Step:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            pred = model(inp["x"], inp["t"], inp["text"], inp["text_mask"])
            loss = F.mse_loss(pred.float(), inp["target"])
        loss.backward()
        opt.step()
    return run


def matmul_step(size: int, dtype: torch.dtype) -> tuple[Step, float]:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


def count_flops(model: nn.Module, inp: dict) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one batch, counted by FlopCounterMode.

    SDPA is pinned to its math backend here: FlopCounterMode has no formula for the CPU flash
    kernel and would count attention as free for a model that calls SDPA, not for one that
    multiplies explicitly."""
    args = (inp["x"], inp["t"], inp["text"], inp["text_mask"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(*args)
    fwd = fc.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        F.mse_loss(model(*args), inp["target"]).backward()
    model.zero_grad(set_to_none=True)
    return float(fwd), float(fc.get_total_flops())


# -- timing on a shared CPU ----------------------------------------------------------------------
def timed(fn: Step) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_clock() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process), None off Linux.

    Two readings tell how many cores other processes kept busy in between. With 2 OpenMP threads
    on 2 shared cores a round is slowed far beyond the others' share (every op's barrier waits for
    a descheduled thread), so loaded rounds are set aside."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return time.perf_counter(), (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def others_cores(a, b) -> float:
    if a is None or b is None:
        return 0.0
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / max(b[0] - a[0], 1e-9))


def quiet_rounds(load: list[float], limit: float) -> list[int]:
    """Rounds with other-process load <= ``limit`` cores, else the least loaded third (>= 3)."""
    quiet = [i for i, c in enumerate(load) if c <= limit]
    if len(quiet) >= min(3, len(load)):
        return quiet
    keep = max(min(3, len(load)), -(-len(load) // 3))
    return sorted(sorted(range(len(load)), key=load.__getitem__)[:keep])


def measure(groups: dict[str, dict[str, Step]], args: argparse.Namespace):
    """-> (times[group/model] per round, others' load per group per round)."""
    rng = random.Random(args.seed)
    for _ in range(args.warmup):
        for group in groups.values():
            for fn in group.values():
                fn()
    times = {f"{g}/{k}": [] for g, grp in groups.items() for k in grp}
    load: dict[str, list[float]] = {g: [] for g in groups}
    names = list(groups)
    for _ in range(args.repeats):
        rng.shuffle(names)
        for g in names:
            order = list(groups[g])
            rng.shuffle(order)
            got = dict.fromkeys(order, math.inf)
            c0 = cpu_clock()
            for k in order + order[::-1]:
                got[k] = min(got[k], timed(groups[g][k]))
            load[g].append(others_cores(c0, cpu_clock()))
            for k, v in got.items():
                times[f"{g}/{k}"].append(v)
    return times, load


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    models: dict[str, nn.Module] = {"ours": build_ours(args)}
    cfg = models["ours"].config
    if not args.no_qk_off:
        models["ours_noqk"] = build_ours(args, qk_norm="none")
    models["pixart"] = PixArtAdapter(build_pixart(cfg, args.latent))
    for m in models.values():
        m.train()
    params = {k: num_params(m) for k, m in models.items()}
    param_diff = params["ours"] / params["pixart"] - 1.0
    tokens = (args.latent // cfg.patch_size) ** 2
    print(f"config: preset={args.preset} width={cfg.width} depth={cfg.depth} heads={cfg.heads} "
          f"patch={cfg.patch_size} latent={args.latent}x{args.latent} (tokens={tokens}) "
          f"channels={cfg.in_channels} text={args.text_len}x{cfg.text_dim} batch={args.batch} mlp=gelu")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    for k, v in params.items():
        print(f"params {k:10s} {v:>12,d}")
    print(f"param count ours vs pixart: {100 * param_diff:+.2f}%")
    if abs(param_diff) > 0.05:
        print("WARNING: parameter counts differ by more than 5%")

    inp = make_inputs(args, cfg)
    fwd_flops, train_flops = count_flops(models["ours"], inp)
    fwd_flops_px, train_flops_px = count_flops(models["pixart"], inp)

    groups: dict[str, dict[str, Step]] = {}
    for k, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        for bf16 in (False, True):
            prec = "bf16" if bf16 else "fp32"
            groups.setdefault(f"forward/{prec}", {})[k] = forward_step(m, inp, bf16)
            groups.setdefault(f"train/{prec}", {})[k] = train_step(m, opt, inp, bf16)
    mm = {prec: matmul_step(args.matmul_size, dt) for prec, dt in (("fp32", torch.float32), ("bf16", BF16))}
    groups["matmul"] = {prec: fn for prec, (fn, _) in mm.items()}

    load_start = os.getloadavg()[0]
    times, load = measure(groups, args)
    load_end = os.getloadavg()[0]

    used = {g: quiet_rounds(load[g], args.quiet) for g in groups}
    sel = {name: [v[i] for i in used[name.rsplit("/", 1)[0]]] for name, v in times.items()}
    med = {name: statistics.median(v) for name, v in sel.items()}
    best = {name: min(v) for name, v in times.items()}

    def paired_ratio(g: str, a: str, b: str) -> float:
        """Median over the rounds used of time(a) / time(b), both measured in the same round."""
        return statistics.median(x / y for x, y in zip(sel[f"{g}/{a}"], sel[f"{g}/{b}"]))

    peak = {prec: mm[prec][1] / med[f"matmul/{prec}"] / 1e9 for prec in mm}
    peak_best = {prec: mm[prec][1] / best[f"matmul/{prec}"] / 1e9 for prec in mm}
    others_used = {g: statistics.mean(load[g][i] for i in v) for g, v in used.items()}
    model_file = Path(latentdit.model.__file__)

    result: dict = dict(
        config=dict(preset=args.preset, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                    patch_size=cfg.patch_size, latent=args.latent, tokens=tokens,
                    in_channels=cfg.in_channels, text_len=args.text_len, text_dim=cfg.text_dim,
                    batch=args.batch, mlp="gelu", gelu=cfg.gelu, cross_norm=cfg.cross_norm, qk_norm=cfg.qk_norm,
                    pooled_dim=0, repeats=args.repeats,
                    warmup=args.warmup, threads=torch.get_num_threads(), torch=torch.__version__,
                    model_py_md5=hashlib.md5(model_file.read_bytes()).hexdigest()),
        params=params, param_diff_pct=round(100 * param_diff, 3),
        flops=dict(ours_forward=fwd_flops, ours_train_fwd_bwd=train_flops,
                   pixart_forward=fwd_flops_px, pixart_train_fwd_bwd=train_flops_px),
        matmul_size=args.matmul_size,
        matmul_peak_gflops={p: round(v, 1) for p, v in peak.items()},
        matmul_best_gflops={p: round(v, 1) for p, v in peak_best.items()},
        loadavg_1min=dict(start=round(load_start, 2), end=round(load_end, 2)),
        quiet_limit_cores=args.quiet,
        rounds_used={g: len(v) for g, v in used.items()},
        other_cores_in_used_rounds={g: round(v, 3) for g, v in others_used.items()},
        other_cores_all_rounds={g: [round(c, 2) for c in v] for g, v in load.items()},
        median_ms={k: round(1e3 * v, 3) for k, v in sorted(med.items())},
        best_ms={k: round(1e3 * v, 3) for k, v in sorted(best.items())},
    )

    noqk = "ours_noqk" in models
    print(f"\nmatmul {args.matmul_size}^3: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"(median); best round {peak_best['fp32']:.0f} / {peak_best['bf16']:.0f}")
    busy = max(others_used.values())
    print(f"load average {load_start:.1f} at start, {load_end:.1f} at end; other processes kept "
          f"{busy:.2f} cores busy in the rounds used"
          + ("  <- shared CPU: medians are inflated, see 'best' columns" if busy > args.quiet else ""))
    print("rounds used: " + ", ".join(f"{g} {len(v)}/{args.repeats}" for g, v in used.items()))
    print("ms = median over the rounds used; ratio = PixArt time / our time in the same round, median "
          "over rounds (>1: we are faster); best = ratio of the fastest runs\n")
    header = (f"{'measure':13s} {'ours ms':>8s} {'PixArt ms':>9s} {'ratio':>6s} {'best':>5s} "
              f"{'ours img/s':>10s} {'PixArt img/s':>12s} {'GFLOP/s':>8s} {'% peak':>7s}")
    if noqk:
        header += f" | {'noqk ms':>8s} {'ratio':>6s} {'best':>5s}"
    print(header)
    print("-" * len(header))
    for mode in ("forward", "train"):
        for prec in ("fp32", "bf16"):
            g = f"{mode}/{prec}"
            ours, px = med[f"{g}/ours"], med[f"{g}/pixart"]
            gflops = (fwd_flops if mode == "forward" else train_flops) / ours / 1e9
            row = dict(ours_ms=1e3 * ours, pixart_ms=1e3 * px, ratio=paired_ratio(g, "pixart", "ours"),
                       ratio_of_medians=px / ours, ratio_best=best[f"{g}/pixart"] / best[f"{g}/ours"],
                       ours_img_s=args.batch / ours, pixart_img_s=args.batch / px,
                       ours_best_ms=1e3 * best[f"{g}/ours"], pixart_best_ms=1e3 * best[f"{g}/pixart"],
                       ours_gflops=gflops, ours_pct_peak=100 * gflops / peak[prec])
            line = (f"{mode + ' ' + prec:13s} {row['ours_ms']:8.1f} {row['pixart_ms']:9.1f} "
                    f"{row['ratio']:6.2f} {row['ratio_best']:5.2f} {row['ours_img_s']:10.1f} "
                    f"{row['pixart_img_s']:12.1f} {gflops:8.1f} {row['ours_pct_peak']:6.1f}%")
            if noqk:
                nq = med[f"{g}/ours_noqk"]
                row.update(ours_noqk_ms=1e3 * nq, noqk_ratio=paired_ratio(g, "pixart", "ours_noqk"),
                           noqk_ratio_best=best[f"{g}/pixart"] / best[f"{g}/ours_noqk"],
                           ours_noqk_img_s=args.batch / nq)
                line += f" | {1e3 * nq:8.1f} {row['noqk_ratio']:6.2f} {row['noqk_ratio_best']:5.2f}"
            print(line)
            result[f"{mode}_{prec}"] = {k: round(v, 4) for k, v in row.items()}
    print("GFLOP/s: ours, FLOPs from FlopCounterMode (train: forward + backward); % peak: of the "
          "same-precision matmul median; noqk: ours with qk_norm=\"none\"")
    for key, name in (("train_bf16", "train_bf16"), ("forward_bf16", "infer_bf16"),
                      ("train_fp32", "train_fp32"), ("forward_fp32", "infer_fp32")):
        result[f"{name}_speedup_vs_pixart"] = result[key]["ratio"]
        result[f"{name}_speedup_vs_pixart_best"] = result[key]["ratio_best"]
        if noqk:
            result[f"{name}_speedup_vs_pixart_noqk"] = result[key]["noqk_ratio"]
    result["train_bf16_target_met"] = result["train_bf16"]["ratio"] >= 1.2
    print()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

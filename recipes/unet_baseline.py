"""The diffusers class-conditional UNet baseline, on the same shards as our class-conditional DiT.

The model is the one of the Hugging Face diffusion course's class-conditioned MNIST example: a
`UNet2DModel` (block channels 32/64/64, attention in the two lower levels, two layers a block)
that sees the class as 4 embedding channels concatenated to its input, trained to predict the
noise of a 1000-step DDPM (`squaredcos_cap_v2`) with Adam at lr 1e-3, batch 128, no EMA and no
classifier-free guidance. Training stops after `--steps` or after `--seconds` of wall-clock, so
that it can be given exactly the minutes our DiT took. Sampling takes as many steps as ours, so
the two are compared at equal sampling cost too: DDIM (`--sampler ddim`, the default) or
DPM-Solver++ (2M) (`dpm`), each clipping its estimate of the clean image to [-1, 1] as the
course's DDPM sampler does; without that clipping DPM-Solver++ diverges on this schedule.

    python recipes/unet_baseline.py train --data SHARDS --out DIR --seconds 1200
    python recipes/unet_baseline.py fid --model DIR --reference SHARDS --n 500 --out DIR/fid
    python recipes/unet_baseline.py grid --model DIR --out grid.png

`recipes/dit_vs_unet.sh` runs both models at equal minutes (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__":  # threads and OpenMP's wait policy are chosen before torch loads, as the CLI does
    from latentdit.threads import apply_thread_policy

    apply_thread_policy()

import torch
from safetensors.torch import load_file
from torch import nn

from latentdit.checkpoint import atomic_save_tensors, atomic_write_bytes
from latentdit.pixels import image_grid, to_pil
from latentdit.plan import seed_list
from latentdit.shards import ShardReader
from latentdit.vae import load_autoencoder


@dataclass
class UNetConfig:
    num_classes: int = 10
    channels: int = 3
    size: int = 32
    class_emb_size: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    train_timesteps: int = 1000


class ClassConditionedUNet(nn.Module):
    """A diffusers UNet2DModel that sees the class as extra input channels."""

    def __init__(self, cfg: UNetConfig) -> None:
        from diffusers import UNet2DModel

        super().__init__()
        self.config = cfg
        self.class_emb = nn.Embedding(cfg.num_classes, cfg.class_emb_size)
        levels = len(cfg.block_out_channels)
        self.unet = UNet2DModel(
            sample_size=cfg.size, in_channels=cfg.channels + cfg.class_emb_size, out_channels=cfg.channels,
            layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
            up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cond = self.class_emb(labels)[:, :, None, None].expand(n, -1, h, w)
        return self.unet(torch.cat([x, cond], 1), t).sample


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=True)


def _dpm(config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, thresholding=True, dynamic_thresholding_ratio=1.0,
                                                   sample_max_value=1.0)


SAMPLERS = {"ddim": _ddim, "dpm": _dpm}


def _scheduler(cfg: UNetConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2")


def train(data: str | Path, out: str | Path, *, steps: int | None = None, seconds: float | None = None,
          batch_size: int = 128, lr: float = 1e-3, seed: int = 0, log_every: int = 50,
          bf16: bool = True) -> dict:
    """Train until `steps` or `seconds` (whichever comes first; at least one must be given), then
    write `model.safetensors`, `config.json` and `result.json` into `out`."""
    if steps is None and seconds is None:
        raise ValueError("give --steps or --seconds (or both)")
    reader = ShardReader(data)
    classes = reader.manifest.get("labels")
    if not classes:
        raise ValueError(f"{data} holds no class labels; preprocess with --labels")
    c, h, _ = reader.latent_shape
    cfg = UNetConfig(num_classes=int(classes["num_classes"]), channels=c, size=h)
    torch.manual_seed(seed)
    model = ClassConditionedUNet(cfg).train()
    sched = _scheduler(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log, step, t0 = [], 0, time.perf_counter()
    for batch in reader.batches(batch_size, seed=seed):
        x0, labels = batch.latents, batch.labels
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.train_timesteps, (len(x0),), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(sched.add_noise(x0, noise, t), t, labels)
        loss = (pred.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        if step % log_every == 0:
            log.append({"step": step, "loss": loss.item(), "seconds": round(elapsed, 1)})
            print(json.dumps(log[-1]), flush=True)
        if (steps is not None and step >= steps) or (seconds is not None and elapsed >= seconds):
            break
    atomic_save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                        out / "model.safetensors")
    atomic_write_bytes(out / "config.json", json.dumps(asdict(cfg), indent=1).encode())
    result = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "batch_size": batch_size,
              "parameters": sum(p.numel() for p in model.parameters()), "log": log}
    atomic_write_bytes(out / "result.json", json.dumps(result, indent=1).encode())
    return result


class UNetPipeline:
    """Class ids -> PIL images, called as `Text2Image` is, so `evaluate.fid` can score it."""

    def __init__(self, folder: str | Path, steps: int = 20, sampler: str = "ddim") -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        folder = Path(folder)
        raw = json.loads((folder / "config.json").read_text())
        cfg = UNetConfig(**{**raw, "block_out_channels": tuple(raw["block_out_channels"])})
        self.net = ClassConditionedUNet(cfg).eval()
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.steps, self.sampler = steps, sampler
        # what evaluate.fid reads: the class count, the latent size and the autoencoder's factor
        self.model = SimpleNamespace(config=SimpleNamespace(num_classes=cfg.num_classes, base_size=cfg.size))
        self.autoencoder = load_autoencoder("identity")

    @torch.no_grad()
    def __call__(self, labels: list[int], *, seed: list[int] | int = 0, steps: int | None = None,
                 guidance_scale: float | None = None, progress: bool = False) -> list:
        cfg = self.net.config
        if any(not 0 <= int(y) < cfg.num_classes for y in labels):
            raise ValueError(f"class ids must be in [0, {cfg.num_classes}), got {labels}")
        seeds = seed_list(seed, len(labels))
        x = torch.stack([torch.randn(cfg.channels, cfg.size, cfg.size, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
        sched = SAMPLERS[self.sampler](_scheduler(cfg).config)
        sched.set_timesteps(steps or self.steps)
        y = torch.tensor([int(v) for v in labels])
        for t in sched.timesteps:
            x = sched.step(self.net(x, t.expand(len(x)), y), t, x).prev_sample
        return to_pil(self.autoencoder.decode(x))


def class_grid(pipe: UNetPipeline, per_class: int = 8, seed: int = 0):
    """One row per class, `per_class` samples a row."""
    n = pipe.model.config.num_classes
    images = pipe([k for k in range(n) for _ in range(per_class)], seed=seed)
    return image_grid(images, cols=per_class)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--seconds", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("fid")
    f.add_argument("--model", required=True)
    f.add_argument("--reference", required=True)
    f.add_argument("--n", type=int, default=500)
    f.add_argument("--steps", type=int, default=20)
    f.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    f.add_argument("--out", required=True)
    f.add_argument("--cache-dir", default=str(Path("~/.cache/latentdit/fid").expanduser()))
    g = sub.add_parser("grid")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--per-class", type=int, default=8)
    args = p.parse_args(argv)
    try:
        if args.cmd == "train":
            result = train(args.data, args.out, steps=args.steps, seconds=args.seconds,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)
            print(f"{result['steps']} steps in {result['seconds']} s -> {args.out}")
        elif args.cmd == "fid":
            from latentdit.evaluate.fid import evaluate_fid

            report = evaluate_fid(UNetPipeline(args.model, args.steps, args.sampler), args.reference, args.n,
                                  cache_dir=args.cache_dir)
            report["sampler"] = args.sampler
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "fid.json").write_text(json.dumps(report, indent=1))
            print(json.dumps(report))
        else:
            class_grid(UNetPipeline(args.model), args.per_class).save(args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

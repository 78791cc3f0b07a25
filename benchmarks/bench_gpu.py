"""The accelerator path in one run: training throughput, ours vs PixArt, sampling with decode, MFU.

Measures, on the device ``--device`` names (default: the accelerator when there is one):

- ``matmul``: the measured matmul peak (TFLOP/s) that MFU is taken against, in the precision the
  items compute in (bf16 where the device has it natively: every GPU; fp32 on a CPU without it);
- ``train_small`` / ``train_base``: images/s of the real training step (device RNG, fused AdamW,
  clipping, gated multi-tensor EMA, no host sync) for the ``small`` preset (batch 256, 16x16
  latent = 64 tokens) and the base size (768 wide, 12 deep; batch 256, 32x32 latent = 256
  tokens), each without and with ``--compile``, and their MFU from counted FLOPs;
- ``pixart``: ours vs diffusers' PixArt at an equal config (width 384, depth 12, 6 heads, batch
  256, 256 tokens, 64 text tokens, bf16 autocast), train-step and forward ratios (PixArt / ours);
- ``sample_36x15``: 36 images x 15 steps with guidance (batch 72) from the base-size denoiser at
  32x32 latents, with the decode by a randomly initialised SD-VAE-sized decoder, and without it;
- ``packaged_4x20``: 4 images x 20 steps with the packaged ``shapes`` model, and the share of it
  spent on text-only work (projection, cross-attention K/V): what caching them across steps saves.

Every item is timed after warm-up with the device synchronised; an item that cannot run here
(no diffusers, no packaged text encoder) records its error and the rest still run. The last line
printed is one JSON object holding every figure.

    python benchmarks/bench_gpu.py                 # the accelerator present, a few minutes
    python benchmarks/bench_gpu.py --smoke         # CPU, tiny sizes, seconds (tested)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_denoiser import PixArtAdapter, build_pixart, count_flops, make_inputs  # noqa: E402
from bench_train import make_batch  # noqa: E402

from latentdit.config import SamplingConfig, model_preset  # noqa: E402
from latentdit.device import compute_dtype, resolve_device, synchronize  # noqa: E402
from latentdit.model import Denoiser  # noqa: E402
from latentdit.schedules import NoisePath  # noqa: E402
from latentdit.train import make_optimizer, train_step, update_ema  # noqa: E402
from latentdit.train_config import TrainConfig  # noqa: E402
from latentdit.train_state import compile_denoiser, to_device  # noqa: E402

BF16 = torch.bfloat16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, no compile: checks the script in seconds")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per item")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--batch", type=int, default=256, help="training batch")
    p.add_argument("--no-compile", action="store_true", help="skip the --compile timings")
    p.add_argument("--skip", nargs="*", default=[], help="items to leave out (e.g. pixart packaged_4x20)")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.repeats, a.warmup, a.batch, a.no_compile = "cpu", 2, 1, 2, True
    return a


# -- timing ------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.cache
def compute(device: torch.device) -> torch.dtype:
    """bf16 where the device computes bf16 natively (every GPU here), fp32 elsewhere: a CPU without
    bf16 hardware would time slow reference kernels, not the model. Decided once, outside timings."""
    return compute_dtype(device) or torch.float32


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=BF16, enabled=compute(device) == BF16)


def matmul_peak(device: torch.device, size: int, args) -> dict:
    """The matmul peak in the precision the items compute in, so that MFU compares like with like."""
    dtype = compute(device)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    s = timed(lambda: torch.mm(a, b), device, args.warmup, args.repeats * 3)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * size**3 / s / 1e12, 3)}


# -- training ------------------------------------------------------------------------------------
class _Acc:
    """The slice of ``accelerate.Accelerator`` train_step uses, for one process on one device."""

    num_processes = 1

    def __init__(self, device: torch.device):
        self.device = device

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def train_item(preset: str, latent: int, text_len: int, device: torch.device, args, peak: float | None,
               compile: bool) -> dict:
    mcfg = model_preset(preset, base_size=latent, max_text_len=text_len, **({"text_dim": 384, "pooled_dim": 384}
                                                                            if preset != "tiny" else {}))
    cfg = TrainConfig(model=mcfg, mixed_precision="auto", batch_size=args.batch)
    torch.manual_seed(0)
    model = Denoiser(mcfg).to(device).train()
    opt, acc = make_optimizer(model, cfg), _Acc(device)
    ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    batch = to_device(make_batch(args.batch, (mcfg.in_channels, latent, latent), text_len, mcfg.text_dim,
                                 mcfg.pooled_dim), device)
    gen, path, sync_free = torch.Generator(device=device).manual_seed(0), NoisePath("flow"), device.type != "cpu"
    one = {k: v[:1] for k, v in _flop_inputs(mcfg, latent, text_len, device).items()}
    _, train_flops = count_flops(_WithPooled(model, one["pooled"]), one)  # before compiling: counted eagerly
    graphs = compile_denoiser(model, acc) if compile else False

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        _, _, ok = train_step(acc, model, opt, [batch], path, cfg, gen, 1000, sync_free=sync_free)
        update_ema(ema, model, cfg.ema_decay, ok)

    s = timed(step, device, args.warmup + (3 if compile else 0), args.repeats)
    out = {"preset": preset, "batch": args.batch, "tokens": (latent // mcfg.patch_size) ** 2,
           "text_tokens": text_len, "params_m": round(model.num_params() / 1e6, 2), "compile": compile,
           "step_s": round(s, 5), "images_per_s": round(args.batch / s, 1),
           "gflop_per_image": round(train_flops / 1e9, 3)}
    if peak:
        out["mfu"] = round(args.batch / s * train_flops / (peak * 1e12), 4)
    return out


class _WithPooled(torch.nn.Module):
    """Our denoiser behind bench_denoiser's (x, t, text, text_mask) call, with a pooled vector."""

    def __init__(self, model: Denoiser, pooled: torch.Tensor):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, x, t, text, text_mask):
        return self.model(x, t, text, text_mask, self.pooled)


def _flop_inputs(mcfg, latent: int, text_len: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: v.to(device) for k, v in dict(
        x=torch.randn(2, mcfg.in_channels, latent, latent, generator=g), t=torch.rand(2, generator=g),
        text=torch.randn(2, text_len, mcfg.text_dim, generator=g), text_mask=torch.ones(2, text_len, dtype=torch.bool),
        pooled=torch.randn(2, mcfg.pooled_dim, generator=g),
        target=torch.randn(2, mcfg.in_channels, latent, latent, generator=g)).items()}


# -- ours vs PixArt ------------------------------------------------------------------------------
def pixart_item(device: torch.device, args) -> dict:
    """Interleaved: forward and train step of both models at the same config; ratios PixArt / ours."""
    side, text_len, batch = (8, 8, 2) if args.smoke else (32, 64, args.batch)
    cfg = model_preset("tiny" if args.smoke else "small", mlp="gelu", pooled_dim=0, max_text_len=text_len,
                       **({} if args.smoke else {"depth": 12}))
    inp = {k: v.to(device) for k, v in make_inputs(SimpleNamespace(seed=0, batch=batch, latent=side,
                                                                    text_len=text_len), cfg).items()}
    torch.manual_seed(0)
    models = {"ours": Denoiser(cfg).to(device), "pixart": PixArtAdapter(build_pixart(cfg, side)).to(device)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type != "mps") for k, m in models.items()}

    def fwd(m):
        def run():
            with torch.inference_mode(), autocast(device):
                m(inp["x"], inp["t"], inp["text"], inp["text_mask"])
        return run

    def trn(m, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                loss = F.mse_loss(m(inp["x"], inp["t"], inp["text"], inp["text_mask"]).float(), inp["target"])
            loss.backward()
            opt.step()
        return run

    res: dict[str, list[float]] = {f"{k}_{w}": [] for k in models for w in ("forward", "train")}
    for _ in range(1 if args.smoke else 3):  # rounds interleave the models: a change in clock hits both
        for k, m in models.items():
            res[f"{k}_forward"].append(timed(fwd(m), device, args.warmup, args.repeats))
            res[f"{k}_train"].append(timed(trn(m, opts[k]), device, args.warmup, args.repeats))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"width": cfg.width, "depth": cfg.depth, "heads": cfg.heads, "batch": batch,
            "tokens": (side // cfg.patch_size) ** 2, "text_tokens": text_len,
            **{f"{k}_s": round(v, 5) for k, v in med.items()},
            "train_ratio": round(med["pixart_train"] / med["ours_train"], 3),
            "forward_ratio": round(med["pixart_forward"] / med["ours_forward"], 3)}


# -- sampling ----------------------------------------------------------------------------------
def random_text_encoder(dim: int, length: int, device: torch.device):
    """A TextEncoder of random token embeddings of a fixed length (text encoding is not what is
    timed here); a real subclass, so the pipeline's prompt checks apply to it as to any encoder."""
    from latentdit.text import TextEmbeddings, TextEncoder

    class RandomTextEncoder(TextEncoder):
        name, path = "random", None

        def __init__(self) -> None:
            self.dim = self.pooled_dim = dim
            self.max_length, self.device = length, device

        @property
        def loaded(self) -> bool:
            return True

        def _release(self) -> None:
            pass

        def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
            g = torch.Generator().manual_seed(len(prompts))
            n = len(prompts)
            return TextEmbeddings(torch.randn(n, self.max_length, self.dim, generator=g).to(self.device),
                                  torch.ones(n, self.max_length, dtype=torch.bool, device=self.device),
                                  torch.randn(n, self.dim, generator=g).to(self.device))

    return RandomTextEncoder()


def sd_sized_decoder(device: torch.device, smoke: bool):
    """A diffusers AutoencoderKL with SD's shape (4 latent channels, 8x down, 128-512 wide), random."""
    from diffusers import AutoencoderKL

    from latentdit.vae import KLAutoencoder

    widths = (8, 8, 16, 16) if smoke else (128, 256, 512, 512)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=widths,
                        layers_per_block=2, norm_num_groups=8 if smoke else 32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return KLAutoencoder(vae.to(device).eval())


def sample_item(device: torch.device, args) -> dict:
    from latentdit.pipeline import Text2Image

    images, steps, side = (2, 2, 8) if args.smoke else (36, 15, 32)
    mcfg = model_preset("tiny" if args.smoke else "base", base_size=side,
                        **({} if args.smoke else {"text_dim": 384, "pooled_dim": 384, "max_text_len": 64}))
    torch.manual_seed(0)
    pipe = Text2Image(Denoiser(mcfg).to(device), sd_sized_decoder(device, args.smoke),
                      random_text_encoder(mcfg.text_dim, mcfg.max_text_len, device), NoisePath("flow"),
                      SamplingConfig(), device=device)
    prompts = [f"prompt {i}" for i in range(images)]

    def run(output_type):
        return lambda: pipe(prompts, steps=steps, guidance_scale=4.5, output_type=output_type, progress=False,
                            guidance_interval=(0.0, 1.0))

    with_decode = timed(run("tensor"), device, args.warmup, max(3, args.repeats // 2))
    denoise_only = timed(run("latent"), device, args.warmup, max(3, args.repeats // 2))
    return {"images": images, "steps": steps, "latent": [4, side, side], "cfg_batch": 2 * images,
            "params_m": round(pipe.model.num_params() / 1e6, 1), "seconds": round(with_decode, 4),
            "denoiser_only_s": round(denoise_only, 4), "decode_s": round(with_decode - denoise_only, 4)}


def packaged_item(device: torch.device, args) -> dict:
    from latentdit.pipeline import Text2Image

    pipe = Text2Image.from_pretrained("shapes", device=device)
    prompts = ["a red circle above a blue square", "three yellow stars", "a small green triangle in the top left",
               "a purple heart on a black background"]
    steps = 2 if args.smoke else 20
    call = lambda: pipe(prompts, steps=steps, guidance_scale=4.5, progress=False, output_type="tensor")  # noqa: E731
    s = timed(call, device, args.warmup, args.repeats)
    return {"images": 4, "steps": steps, "seconds": round(s, 4), "text_kv_share": text_kv_share(pipe, call, device)}


def text_kv_share(pipe, call: Callable[[], object], device: torch.device) -> float:
    """Share of a sampling call spent on work that depends on the text only (its projection,
    cross-attention K/V and their norm), which a K/V cache across steps would save at most.
    Timed by module hooks that synchronise the device, in a separate untimed-for-speed call."""
    spent, handles = [0.0], []

    def pre(module, _):
        synchronize(device)
        module._t0 = time.perf_counter()

    def post(module, _, __):
        synchronize(device)
        spent[0] += time.perf_counter() - module._t0

    for name, module in pipe.inference_model("auto").named_modules():  # the copy that samples
        if name == "text_proj" or name.endswith(("cross.kv", "cross.k_norm")):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        t0 = time.perf_counter()
        call()
        synchronize(device)
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return round(spent[0] / total, 4)


# -- main --------------------------------------------------------------------------------------
def run_item(name: str, fn: Callable[[], dict], results: dict, skip: list[str]) -> None:
    if name in skip:
        results[name] = {"skipped": "--skip"}
        return
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # one item failing (a missing package) must not lose the others
        traceback.print_exc(file=sys.stderr)
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(results[name])}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    res: dict = {"device": str(device), "name": _device_name(device), "torch": torch.__version__,
                 "smoke": args.smoke}
    run_item("matmul", lambda: matmul_peak(device, 256 if args.smoke else 8192, args), res, args.skip)
    peak = res["matmul"].get("tflops")
    small = ("tiny", 8, 8) if args.smoke else ("small", 16, 64)
    base = ("tiny", 16, 8) if args.smoke else ("base", 32, 64)
    for compile in (False,) if args.no_compile else (False, True):
        tag = "_compile" if compile else ""
        run_item(f"train_small{tag}", lambda c=compile: train_item(*small, device, args, peak, c), res, args.skip)
        run_item(f"train_base{tag}", lambda c=compile: train_item(*base, device, args, peak, c), res, args.skip)
    run_item("pixart", lambda: pixart_item(device, args), res, args.skip)
    run_item("sample_36x15", lambda: sample_item(device, args), res, args.skip)
    run_item("packaged_4x20", lambda: packaged_item(device, args), res, args.skip)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return res


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


if __name__ == "__main__":
    main()

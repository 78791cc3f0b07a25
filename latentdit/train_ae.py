"""Train the image autoencoder: a small diffusers `AutoencoderKL` from scratch.

No pretrained image autoencoder exists offline (DESIGN §4), and SD's is overkill for 64x64 flat
shapes. The recipe is the KL-regularised autoencoder of LDM (Rombach et al. 2022,
arXiv:2112.10752, Sec. 3 and App. G) without its perceptual and GAN terms: an L1 (or L2)
reconstruction loss, optionally weighted towards object pixels (`object_weight`), plus a tiny KL
pull towards N(0, I), AdamW with linear warm-up and cosine decay.

    out_dir/checkpoints/step-N/      model + optimizer safetensors and state.json (step, seconds,
                                     config, the optimiser's plain values), as the denoiser's
    out_dir/autoencoder/             AutoencoderKL.from_pretrained / load_autoencoder("kl", ...)
    out_dir/metrics.json             {"psnr", "scaling_factor", "shift_factor", "steps", "seconds", ...}
    out_dir/metrics.jsonl            one row per log line (loss, rec, kl, lr, steps_per_s)
    out_dir/reconstructions.png      held-out originals, each row above its reconstructions
    out_dir/tb/                      TensorBoard: train/loss, train/rec, train/kl, train/lr, eval/psnr

Batch k holds samples k * batch_size ... (k + 1) * batch_size - 1 and the KL noise of step k is
seeded by (seed, k), so a resumed run is the same run: no data-loader or RNG state to restore.

Latent normalisation: after training, `shift_factor` = mean and `scaling_factor` = 1 / std of the
posterior means over `scale_batches` training batches (SD's recipe for 0.18215; the mean is only
subtracted with `center_latents`, as SD3/Flux do). Both go into the exported config, so
`latentdit.vae` hands the denoiser latents of mean ~0 and std ~1.

`init_from` starts from a trained autoencoder instead of random weights; with `decoder_only` only
its decoder trains, on the frozen encoder's posterior means, and the export keeps its latent
statistics: a denoiser trained in its latent space reads the result unchanged, and decodes
sharper (SD's fine-tuned VAE decoders are made so).

Speeds, widths and the quality each preset reaches: docs/training.md ("The autoencoder").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes
from .config import from_dict, to_dict
from .device import mixed_bf16
from .lines import first_line
from .pixels import from_pil, psnr, to_pil
from .sources import ImageSource, make_source, train_batch
from .train_config import AEConfig, ae_preset
from .train_log import MetricsLog, TrainingDiverged, Window
from .train_state import (
    CheckpointDamaged,
    autocast_for,
    flatten_optimizer,
    newest_good,
    prune_checkpoints,
    read_info,
    read_tensors,
    unflatten_optimizer,
    warmup_cosine,
    write_checkpoint,
)

if TYPE_CHECKING:
    from PIL import Image

_LEGACY = "checkpoint.safetensors"  # the single-file checkpoint of earlier versions
_KEEP = 2  # checkpoints kept: the newest, and one to fall back on
EXPORT_DIR = "autoencoder"
# Posterior log-variance at initialisation. diffusers starts it near 0 (std ~1) while the encoder's
# means have std ~0.3, so the sampled latents are mostly noise and the decoder first learns to ignore
# them: a plateau at a grey image for hundreds of steps. Starting nearly deterministic (std ~0.02)
# removes it; the KL term is free to raise the variance again.
_INIT_LOGVAR = -8.0
# Fields a resumed run may change (they do not touch the weights); every other field must match the
# checkpoint. A new `steps` re-stretches the cosine schedule from the current step: extending a
# finished run raises the learning rate again, which is how a run is continued for more quality.
_RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "log_every", "checkpoint_every", "eval_images",
                                "scale_batches", "center_latents"})


# ----------------------------------------------------------------------------- model


def norm_groups(widths: tuple[int, ...], most: int = 32) -> int:
    """The largest GroupNorm group count <= `most` that divides every width."""
    common = math.gcd(*widths)
    return max(g for g in range(1, most + 1) if common % g == 0)


def build_autoencoder(cfg: AEConfig) -> torch.nn.Module:
    """A randomly initialised AutoencoderKL, seeded by cfg.seed without touching the global RNG;
    with ``cfg.init_from``, that autoencoder's weights (the architecture must match)."""
    from diffusers import AutoencoderKL

    if cfg.init_from:
        return _initial_autoencoder(cfg)

    n = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=norm_groups(cfg.block_out_channels),
            sample_size=cfg.image_size, scaling_factor=1.0)
    with torch.no_grad():  # see _INIT_LOGVAR
        vae.quant_conv.bias[cfg.latent_channels:] = _INIT_LOGVAR
    return vae


def autoencoder_folder(name: str) -> str:
    """The folder of the autoencoder ``name`` names: an ``AutoencoderKL.save_pretrained`` folder,
    or a model (folder or packaged name) whose autoencoder to take."""
    from .checkpoint import base_folder, component_path, load_config, resolve

    path = Path(name)
    if (path / "config.json").is_file():
        try:
            own = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"init_from {name!r}: {path / 'config.json'} is not readable JSON") from None
        if isinstance(own, dict) and "_class_name" in own:  # diffusers writes it, latentdit models do not
            return str(path)
    folder = resolve(name)
    config = load_config(folder)
    desc = component_path(folder, config.autoencoder, base_folder(folder, config))
    if not desc or desc.get("kind") != "kl" or not desc.get("path"):
        raise ValueError(f"init_from {name!r}: its model has no trained (kind 'kl') autoencoder to start from")
    return str(desc["path"])


_ARCHITECTURE = ("latent_channels", "block_out_channels", "layers_per_block", "image_size")


def _initial_autoencoder(cfg: AEConfig) -> torch.nn.Module:
    """init_from's AutoencoderKL in float32, after checking it has the architecture cfg describes."""
    from .vae import load_autoencoder

    folder = autoencoder_folder(cfg.init_from)
    vae = load_autoencoder("kl", folder).vae.float()
    theirs = {**vae.config, "image_size": vae.config.sample_size}
    theirs = {k: tuple(theirs[k]) if isinstance(theirs[k], list) else theirs[k] for k in _ARCHITECTURE}
    differ = [f"{k} {theirs[k]!r} (config {getattr(cfg, k)!r})" for k in _ARCHITECTURE if theirs[k] != getattr(cfg, k)]
    if differ:
        raise ValueError(f"init_from {cfg.init_from!r} ({folder}) has {', '.join(differ)}: set the "
                         "config's fields to match it")
    return vae


def _trained_parameters(vae: torch.nn.Module, cfg: AEConfig) -> list[torch.nn.Parameter]:
    """What the optimiser moves: everything, or with ``decoder_only`` the decoder and its input
    convolution (the rest is frozen)."""
    if not cfg.decoder_only:
        return list(vae.parameters())
    vae.requires_grad_(False)
    trained = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).requires_grad_(True)
    return list(trained.parameters())


# ----------------------------------------------------------------------------- loss and step


def learning_rate(step: int, cfg: AEConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr: the denoiser's schedule."""
    return warmup_cosine(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                         min_lr_ratio=cfg.min_lr_ratio)


def ae_losses(vae: torch.nn.Module, x: Tensor, cfg: AEConfig,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(reconstruction, KL), both per pixel: LDM's summed losses divided by 3 * H * W, so
    `kl_weight` keeps LDM's meaning. The posterior is read in float32 even under bf16."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if cfg.decoder_only:  # the frozen encoder's posterior means in float32, as a denoiser was trained on
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        with autocast_for(x.device, cfg.mixed_precision):
            recon = vae.decode(z).sample.float()
        return _reconstruction_error(recon, x, cfg), x.new_zeros(())
    with autocast_for(x.device, cfg.mixed_precision):
        moments = vae.encode(x).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.float())
        recon = vae.decode(posterior.sample(generator=generator)).sample.float()  # (N, 3, H, W)
    kl = posterior.kl().mean() / x[0].numel()
    return _reconstruction_error(recon, x, cfg), kl


def _reconstruction_error(recon: Tensor, x: Tensor, cfg: AEConfig) -> Tensor:
    error = recon - x
    error = error.abs() if cfg.loss == "l1" else error.square()
    if cfg.object_weight:
        error = error * (1 + cfg.object_weight * object_mask(x))
    return error.mean()


def object_mask(x: Tensor, threshold: float = 0.1) -> Tensor:
    """(N, 1, H, W) 1.0 on pixels unlike their image's border colour, grown by one pixel so that
    edges count too; 0.0 elsewhere. On plain-background data (shapes) that marks the objects, whose
    thin parts (star points, small triangles) an unweighted loss gives up: they are a few percent
    of the pixels. `threshold` is in the [-1, 1] pixel scale, per channel."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]  # (N, 3, 1, 1)
    unlike = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return torch.nn.functional.max_pool2d(unlike, 3, stride=1, padding=1)


def _noise(cfg: AEConfig, step: int, device: torch.device) -> torch.Generator:
    """The posterior-sampling noise of step k depends only on (seed, k): exact resume."""
    return torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)


def train_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, cfg: AEConfig,
               step: int) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW step; returns detached (loss, reconstruction loss, KL)."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(step, cfg)
    rec, kl = ae_losses(vae, x, cfg, _noise(cfg, step, x.device))
    loss = rec + cfg.kl_weight * kl
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)  # frozen weights have no gradient
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), rec.detach(), kl.detach()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, x: Tensor) -> Tensor:
    """Posterior mode -> decoder, in float32, clamped to [-1, 1] (what latentdit.vae returns)."""
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train(was_training)
    return recon


def evaluate(vae: torch.nn.Module, x: Tensor) -> float:
    """Mean per-image reconstruction PSNR of the held-out batch."""
    return float(psnr(reconstruct(vae, x), x).mean())


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, source: ImageSource, cfg: AEConfig,
                      device: torch.device) -> tuple[float, float]:
    """(mean, std) of the posterior means over the first `scale_batches` training batches."""
    zs = [vae.encode(train_batch(source, k, cfg.batch_size).to(device)).latent_dist.mode().float()
          for k in range(cfg.scale_batches)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def reconstruction_grid(originals: Tensor, recons: Tensor, cols: int = 8) -> Image.Image:
    """Rows of `cols` originals, each above its reconstructions."""
    from PIL import Image


    n, h, w = originals.shape[0], originals.shape[-2], originals.shape[-1]
    cols = min(cols, n)
    pairs = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * w, 2 * pairs * h), (255, 255, 255))
    for row, images in enumerate((to_pil(originals), to_pil(recons))):
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * w, (2 * (i // cols) + row) * h))
    return grid


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, vae: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    seconds: float, cfg: AEConfig) -> Path:
    """``out/checkpoints/step-N/`` (weights, AdamW moments, state.json), the denoiser's format,
    written beside and renamed; the previous one is kept in case this one is damaged later."""
    optim, meta = flatten_optimizer(opt.state_dict())
    info = {"step": step, "seconds": seconds, "optimizer": meta, "config": to_dict(cfg)}
    folder = write_checkpoint(out, step, {"model": vae.state_dict(), "optimizer": optim}, info)
    prune_checkpoints(out, _KEEP)
    for legacy in (_LEGACY, "checkpoint.json"):  # an earlier version's checkpoint, now superseded
        (out / legacy).unlink(missing_ok=True)
    return folder


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    return (read_info(folder, ("step", "seconds", "optimizer", "config")),
            read_tensors(folder / "model.safetensors"), read_tensors(folder / "optimizer.safetensors"))


def load_checkpoint(out: Path, vae: torch.nn.Module, opt: torch.optim.Optimizer,
                    cfg: AEConfig) -> tuple[int, float] | None:
    """Restore weights and AdamW state from the newest good checkpoint (each damaged one is named
    and skipped); returns (step, seconds trained so far), or None when the run has none yet."""
    found = newest_good(out, _read)
    if found is None:
        if not (out / _LEGACY).exists():
            return None
        found = out / _LEGACY, _read_legacy(out / _LEGACY)
    where, (info, model, optim) = found
    _check_same_run(from_dict(AEConfig, info["config"]), cfg, where)
    vae.load_state_dict(model)
    opt.load_state_dict(unflatten_optimizer(optim, info["optimizer"]))
    return int(info["step"]), float(info["seconds"])


def _read_legacy(file: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """The single-file checkpoint of earlier versions (metadata "state", model./optim. prefixes),
    so their runs resume; the next save replaces it with a checkpoint folder."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            info = json.loads((f.metadata() or {})["state"])
    except Exception as e:  # truncated or corrupt bytes: name the file, never a safetensors traceback
        raise CheckpointDamaged(f"checkpoint file {file} is unreadable or damaged ({first_line(e)}); "
                                "delete it to start over") from None
    tensors = read_tensors(file)
    return (info, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})


def _check_same_run(saved: AEConfig, cfg: AEConfig, file: Path) -> None:
    old, new = to_dict(saved), to_dict(cfg)
    changed = sorted(k for k in new if old.get(k) != new[k] and k not in _RESUMABLE_CHANGES)
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ValueError(f"{file} was written by a different run ({diff}); use another out_dir "
                         "or resume=False to start over")


# ----------------------------------------------------------------------------- export


def export_autoencoder(vae: torch.nn.Module, directory: Path, shift: float | None, scale: float) -> Path:
    """A `save_pretrained` folder with the data's latent statistics in its config, swapped in
    atomically (written beside, then renamed)."""
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        _drop_source_path(tmp / "config.json")
        _readable(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _drop_source_path(config: Path) -> None:
    """A model loaded from a folder (``init_from``) saves that folder's path in its config: this
    machine's, meaningless elsewhere, so it is left out."""
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; an exported model is meant to be shared."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


# ----------------------------------------------------------------------------- logging


class _Log:
    """The autoencoder's log: mean loss, reconstruction and KL terms since the last line, the
    learning rate and steps per second (train_log.MetricsLog writes them)."""

    def __init__(self, out: Path, cfg: AEConfig, start: int, progress: bool) -> None:
        self.cfg, self.window = cfg, Window()
        self.sink = MetricsLog(out, cfg.steps, start, progress, "train-ae")

    def step(self, step: int, losses: tuple[Tensor, Tensor, Tensor], lr: float) -> None:
        self.window.add(torch.stack(losses))  # stays on the device until a log line
        self.sink.tick()
        if step % self.cfg.log_every == 0:
            self._emit(step, lr)

    def _emit(self, step: int, lr: float) -> None:
        loss, rec, kl = self.window.means()
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {step} (loss {loss}); lower lr or use "
                                   "mixed_precision 'no'")
        rate = self.window.steps / self.window.seconds()
        self.sink.row(step, {"loss": loss, "rec": rec, "kl": kl, "lr": lr, "steps_per_s": rate})
        self.window.reset()


# ----------------------------------------------------------------------------- the loop


def train_autoencoder(config: AEConfig, out_dir: str | os.PathLike, *, progress: bool = True,
                      resume: bool = True, stop_after: int | None = None,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train (resuming from out_dir's checkpoint unless `resume=False`), then export.

    `stop_after`: stop after this many steps of this call with a checkpoint, as a crash would; the
    export happens only once `config.steps` is reached. Returns the metrics written to
    out_dir/metrics.json (without export keys when stopped early)."""
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 (or None), got {stop_after}")
    out, device = Path(out_dir), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    source, vae = make_source(config), build_autoencoder(config).to(device).train()
    # beta2 0.99: the second moment adapts within ~100 steps, which matters in runs of a few thousand
    opt = torch.optim.AdamW(_trained_parameters(vae, config), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    found = load_checkpoint(out, vae, opt, config) if resume else None
    step, seconds = found or (0, 0.0)
    heldout = from_pil(source.heldout).to(device)
    first, last = step, min(config.steps, step + stop_after) if stop_after is not None else config.steps
    log, evals, t0, cpu0 = _Log(out, config, step, progress), [], time.perf_counter(), time.process_time()
    while step < last:
        x = train_batch(source, step, config.batch_size).to(device)
        losses = train_step(vae, opt, x, config, step)
        step += 1
        log.step(step, losses, opt.param_groups[0]["lr"])
        if step % config.eval_every == 0 or step == config.steps:
            evals.append(_eval(vae, heldout, step, log))
        if step % config.checkpoint_every == 0 or step == last:
            save_checkpoint(out, vae, opt, step, seconds + time.perf_counter() - t0, config)
    log.sink.close()
    elapsed = time.perf_counter() - t0
    metrics = {"steps": step, "seconds": round(seconds + elapsed, 1), "evals": evals, "log": log.sink.history,
               "steps_per_s": (step - first) / elapsed if step > first else None,
               "cpu_seconds": round(time.process_time() - cpu0, 1),  # this call, all threads
               "bf16": mixed_bf16(device, config.mixed_precision)}
    if step < config.steps:
        return metrics
    return _finish(out, vae, source, heldout, config, metrics, device)


def _eval(vae: torch.nn.Module, heldout: Tensor, step: int, log: _Log) -> dict[str, float]:
    value = evaluate(vae, heldout)
    log.sink.scalars(step, {"eval/psnr": value})
    log.sink.write(f"step {step}: held-out PSNR {value:.2f} dB")
    return {"step": step, "psnr": value}


def _finish(out: Path, vae: torch.nn.Module, source: ImageSource, heldout: Tensor, cfg: AEConfig,
            metrics: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Latent statistics, export, reconstruction grid and metrics.json."""
    vae.eval()
    mean, std = latent_statistics(vae, source, cfg, device)
    shift, scale = mean if cfg.center_latents else None, 1.0 / std
    if cfg.decoder_only:  # the latent space is init_from's, and so are its statistics, to the bit
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    export_autoencoder(vae, out / EXPORT_DIR, shift, scale)
    recons = reconstruct(vae, heldout)
    reconstruction_grid(heldout.cpu(), recons.cpu()).save(out / "reconstructions.png")
    metrics = {"psnr": float(psnr(recons, heldout).mean()), "scaling_factor": scale,
               "shift_factor": shift, "latent_mean": mean, "latent_std": std, **metrics,
               "autoencoder": str(out / EXPORT_DIR), "config": to_dict(cfg)}
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    return metrics


__all__ = ["AEConfig", "ae_preset", "train_autoencoder", "build_autoencoder",
           "learning_rate", "norm_groups", "export_autoencoder"]

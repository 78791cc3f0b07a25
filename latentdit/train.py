"""Training a denoiser on precomputed shards, on one CPU or many GPUs through ``accelerate``.

The loss is three small pieces (SiT / EDM style): draw t from the density, noise along the path,
regress the prediction target. Everything a resume needs (weights, EMA, optimiser, RNG, step; the
data position and the LR follow from the step) goes into an atomic checkpoint folder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointConfig, atomic_write_bytes, is_low_rank_factor, merge_low_rank, save_pretrained
from .condition import Condition
from .config import ModelConfig, to_dict
from .control import training_control
from .device import mixed_bf16
from .grounding import grounding_loss, layout_loss, placed_targets
from .inpainting import is_inpainting, training_mask_latent
from .lora import TARGET_SETS, LoRAConfig, add_lora, as_stored
from .model import Denoiser, is_planner_weight
from .schedules import NoisePath, add_noise, from_x0_eps, sample_time
from .shards import Batch, ShardReader
from .train_config import TrainConfig
from .train_log import Logger, StepCounters
from .train_state import (
    TrainState,
    autocast_for,
    check_parallelism,
    compile_denoiser,
    make_accelerator,
    prune_checkpoints,
    resume_state,
    save_state,
    to_device,
    warmup_cosine,
)


# -- the loss ----------------------------------------------------------------------------------
def diffusion_loss(model: torch.nn.Module, batch: Batch, path: NoisePath, cfg: TrainConfig,
                   gen: torch.Generator) -> Tensor:
    """Mean squared error between the network output and the target named by its config. The
    randomness (times, noise, condition dropout) is drawn on the generator's device, so an
    accelerator never waits for the CPU to draw it and copy it over."""
    x0 = batch.latents
    n, device = x0.shape[0], gen.device
    t = sample_time(n, cfg.diffusion.time_density, shift=cfg.diffusion.time_shift, generator=gen, device=device)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    drop = torch.rand(n, generator=gen, device=device) < cfg.cond_dropout
    target = from_x0_eps(x0, eps, t, path, cfg.model.prediction)
    c = Condition.from_text(batch.text, cfg.model)
    text, mask, pooled = _unwrap(model).drop_condition(c.text, c.mask, c.pooled, drop)
    extra = {}
    if cfg.model.control:  # the control variant sees its map, dropped as often as the text
        extra["mask_latent"] = training_control(batch.control, x0, cfg.model, cfg.cond_dropout, gen)
    elif cfg.model.extra_in_channels:  # the inpainting variant: the clean latents outside a random box, the box
        extra["mask_latent"] = training_mask_latent(x0, _host_generator(gen))
    if cfg.model.num_classes:  # class dropout: the null class (the embedding's last row) for CFG
        extra["labels"] = torch.where(drop, cfg.model.num_classes, batch.labels)
    maps: list[Tensor] | None = [] if cfg.grounding_weight else None
    layouts: list[Tensor] | None = [] if planner_learns(_unwrap(model)) else None
    pred = model(add_noise(x0, eps, t, path), t, text, mask, pooled, **extra, attention_maps=maps,
                 layouts=layouts)
    err = (pred.float() - target).pow(2)
    if cfg.object_weight:
        fade = (1 - t).view(-1, 1, 1, 1) if cfg.object_weight_fade else 1.0
        err = err * object_weights(x0, cfg.object_weight, fade)
    loss = err.mean()
    if layouts is not None:
        loss = loss + cfg.layout_weight * layout_loss(layouts[0], *batch.grounding, mask, ~drop)
        planner = _unwrap(model).planner
        planner.observe(placed_targets(*batch.grounding, mask, ~drop, planner.grid))
    if maps is None:
        return loss
    p = cfg.model.patch_size
    hw = (x0.shape[-2] // p, x0.shape[-1] // p)
    keep = ~drop & (t >= cfg.grounding_min_t)
    return loss + cfg.grounding_weight * grounding_loss(maps, *batch.grounding, hw, keep)


def object_weights(x0: Tensor, strength: float, fade: Tensor | float = 1.0) -> Tensor:
    """(N, 1, H, W) loss weights, mean 1 over the batch: a cell's distance from its image's median
    cell (the background, in scenes of a few objects), divided by the image's largest distance,
    gives ``1 + strength * fade * d``. A uniform image weighs every cell alike. ``fade`` (per
    image, e.g. 1 - t) scales the extra weight, so that it acts on fine detail at low noise and
    leaves the layout decided at high noise to the plain loss."""
    x = x0.float()
    background = x.flatten(2).median(dim=-1).values[..., None, None]
    d = (x - background).pow(2).sum(1, keepdim=True).sqrt()
    d = d / d.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    w = 1.0 + strength * fade * d
    return w / w.mean()


def _host_generator(gen: torch.Generator) -> torch.Generator:
    """The box masks are drawn on the CPU: a device generator seeds a CPU one (one small sync,
    for the inpainting variant only); a CPU generator is used as it is."""
    if gen.device.type == "cpu":
        return gen
    seed = torch.randint(0, 2**62, (), generator=gen, device=gen.device)
    return torch.Generator().manual_seed(int(seed))


def _unwrap(model: torch.nn.Module) -> Denoiser:
    return model.module if hasattr(model, "module") else model


# -- schedule, EMA -------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr (or constant)."""
    o = cfg.optim
    return warmup_cosine(step, lr=o.lr, warmup_steps=o.warmup_steps, total_steps=cfg.steps,
                         min_lr_ratio=o.min_lr_ratio, constant=o.schedule == "constant")


def ema_decay(step: int, cfg: TrainConfig) -> float:
    """With warm-up the EMA forgets the random init quickly: min(decay, (1 + n) / (10 + n))."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


@torch.no_grad()
def update_ema(ema: dict[str, Tensor], model: Denoiser, decay: float, ok: Tensor | None = None) -> None:
    """EMA matched by parameter name, so a reordered or wrapped model cannot misalign it; one
    multi-tensor kernel per step instead of one per parameter. ``ok`` (a bool tensor): update
    only if it is True, decided on the device without a host sync (a skipped step keeps the EMA)."""
    for name, stat in model.named_buffers():  # running statistics (the planner's reference): kept as they are
        ema[name].copy_(stat)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # frozen: EMA == weight
    targets = [ema[name] for name, _ in trained]
    params = [p.detach().float() for _, p in trained]
    if ok is None:
        torch._foreach_lerp_(targets, params, 1 - decay)
        return
    weight = ok.to(device=targets[0].device, dtype=torch.float32) * (1 - decay)
    diff = torch._foreach_sub(params, targets)
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(targets, diff)


# -- one optimisation step -----------------------------------------------------------------------
def train_step(acc, model, opt, batches: list[Batch], path: NoisePath, cfg: TrainConfig,
               gen: torch.Generator, step: int, *, sync_free: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Accumulate over micro-batches, clip, and step unless the gradient is not finite.
    Returns (mean loss, grad norm, stepped) as tensors on the device; the norm is all-reduced,
    so every rank agrees. ``sync_free`` (default: on any accelerator) skips a non-finite step
    inside the fused optimiser (``found_inf``) instead of reading the check on the host."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(step, cfg)
    total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(batches):
        sync = acc.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
        with sync, autocast_for(acc.device, cfg.mixed_precision):
            loss = diffusion_loss(model, batch, path, cfg, gen) / len(batches)
        acc.backward(loss)
        total += loss.detach().float()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    ok = torch.isfinite(norm) & torch.isfinite(total)
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps the optimiser
    if sync_free is None:
        sync_free = acc.device.type != "cpu"
    if sync_free and _is_fused(inner):
        inner.found_inf = (~ok).float()  # the fused kernel skips the update, step count included
        try:
            opt.step()
        finally:
            del inner.found_inf
    elif bool(ok):  # a host sync: free on the CPU, the fallback for unfused optimisers
        opt.step()
    opt.zero_grad(set_to_none=True)
    return total, norm.detach().float(), ok


def _is_fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.param_groups[0].get("fused"))


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True,
          stop_after: int | None = None, device: str = "auto", compile: bool = False) -> dict[str, Any]:
    """Train, checkpoint, preview and export. ``resume``: "latest" or a checkpoint folder.
    ``stop_after``: stop (with a checkpoint) after this many steps of this call, as a crash would.
    ``device``: as ``--device``; under ``accelerate launch`` each process takes its own GPU.
    ``compile``: ``torch.compile`` the denoiser (CUDA graphs on one CUDA process)."""
    acc = make_accelerator(device)
    check_parallelism(acc)
    reader = ShardReader(cfg.data)
    model, ema, opt, state = _setup(cfg, reader, acc, resume)
    model, opt = acc.prepare(model, opt)
    graphs = compile_denoiser(_unwrap(model), acc) if compile else False
    log = Logger(cfg, acc, state.step, progress)
    bad = StepCounters(acc.device, state.bad_streak, state.bad_total)
    sync_free = _sync_free(acc)
    check_every = cfg.log_every if sync_free else 1
    stream = _batches(reader, cfg, acc, state.step)
    path = NoisePath(cfg.diffusion.path)
    last = min(cfg.steps, state.step + stop_after) if stop_after else cfg.steps
    while state.step < last:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        micro = [next(stream) for _ in range(cfg.optim.grad_accum)]
        loss, norm, ok = train_step(acc, model, opt, micro, path, cfg, state.generator, state.step,
                                    sync_free=sync_free)
        bad.add(ok)
        if sync_free:  # gated on the device: no sync, a few more passes over the weights
            update_ema(ema, _unwrap(model), ema_decay(state.step, cfg), ok)
        elif bool(ok):
            update_ema(ema, _unwrap(model), ema_decay(state.step, cfg))
        state.step += 1
        if state.step % check_every == 0 or state.step % cfg.checkpoint_every == 0 or state.step == last:
            bad.check(state, cfg.max_bad_steps)
        log.step(state, loss, norm, ok, opt.param_groups[0]["lr"], micro)
        _periodic(cfg, acc, model, ema, opt, state, reader, last)
    log.close()
    return _finish(cfg, acc, model, ema, reader, state, log)


def _sync_free(acc) -> bool:
    """Keep the step's checks on the device: on accelerators; on the CPU reading a flag is free."""
    return acc.device.type != "cpu"


def _periodic(cfg, acc, model, ema, opt, state, reader, last) -> None:
    if state.step % cfg.checkpoint_every == 0 or state.step == last:
        save_state(Path(cfg.out), acc, _unwrap(model), ema, opt, state, to_dict(cfg))
        if acc.is_main_process:
            prune_checkpoints(Path(cfg.out), cfg.keep_checkpoints)
    if cfg.preview_every and state.step % cfg.preview_every == 0 and acc.is_main_process:
        write_preview(cfg, ema, reader, Path(cfg.out) / "previews" / f"step-{state.step:07d}.png")


def planner_learns(model: torch.nn.Module) -> bool:
    """Whether the model has a layout planner that trains: its weights, and with them the reference
    it keeps of where placed words are. A planner ``train_only`` froze whole stays as it was, and
    needs no grounding boxes."""
    planner = getattr(model, "planner", None)
    return planner is not None and any(p.requires_grad for p in planner.parameters())


def check_data(reader: ShardReader, mcfg: ModelConfig, grounding_weight: float = 0.0,
               planner_trains: bool | None = None) -> None:
    """The shards must carry what the model consumes, at the sizes it expects. `planner_trains`
    (default: whether the model has a planner) says whether a layout planner needs boxes."""
    m = reader.manifest
    for key in ("text_dim", "pooled_dim"):
        want = getattr(mcfg, key)
        if want and m.get(key) != want:
            raise ValueError(f"model.{key} = {want} but the shards in {reader.directory} were encoded "
                             f"with {m['text_encoder'].get('name')} ({key} {m.get(key)})")
    if mcfg.num_classes and not mcfg.num_classes >= reader.num_classes > 0:
        raise ValueError(f"model.num_classes = {mcfg.num_classes} but the shards in {reader.directory} hold "
                         + (f"{reader.num_classes} classes" if reader.num_classes else
                            "no class labels; preprocess with --labels"))
    if m["latent_shape"][0] != mcfg.in_channels:
        raise ValueError(f"model.in_channels = {mcfg.in_channels} but the shards hold "
                         f"{m['latent_shape'][0]}-channel latents")
    if grounding_weight and not reader.grounding:
        raise ValueError(f"grounding_weight > 0 but the shards in {reader.directory} hold no grounding; "
                         "preprocess with --grounding")
    if (mcfg.layout_planner if planner_trains is None else planner_trains) and not reader.grounding:
        raise ValueError(f"model.layout_planner learns from grounding boxes, but the shards in "
                         f"{reader.directory} hold none; preprocess with --grounding")
    if mcfg.control:
        _check_control_data(reader, mcfg)
    elif mcfg.extra_in_channels and not is_inpainting(mcfg):
        raise ValueError(f"model.extra_in_channels = {mcfg.extra_in_channels}: training knows one kind "
                         f"of extra input, the inpainting variant's masked latent + mask "
                         f"({mcfg.in_channels + 1} channels)")


def _check_control_data(reader: ShardReader, mcfg: ModelConfig) -> None:
    if reader.control != mcfg.control:
        raise ValueError(f"model.control = {mcfg.control!r} but the shards in {reader.directory} hold "
                         + (f"{reader.control!r} maps" if reader.control else
                            f"no control maps; preprocess with --control {mcfg.control}"))


def _setup(cfg: TrainConfig, reader: ShardReader, acc, resume: str | None):
    torch.manual_seed(cfg.seed)
    model = Denoiser(cfg.model)
    if cfg.init_from:
        load_init_weights(model, cfg.init_from)
    if cfg.train_only:
        freeze_except(model, cfg.train_only)
    if cfg.lora_rank:
        add_adapters(model, cfg)
    check_data(reader, cfg.model, cfg.grounding_weight, planner_trains=planner_learns(model))
    model.to(acc.device).train()
    ema = {n: p.detach().float().clone() for n, p in [*model.named_parameters(), *model.named_buffers()]}
    opt = make_optimizer(model, cfg)
    # Drawn on the device: the stream differs from the CPU's, but is as reproducible and resumable.
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    state = TrainState(generator=gen)
    if resume:
        found = resume_state(Path(cfg.out), resume, model, ema, opt, state, acc.process_index)
        if found is not None and acc.is_main_process:
            print(f"resumed from {found} at step {state.step}")
    return model, ema, opt, state


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it: on this CPU the per-parameter loop of the
    default implementation costs more than the model's own backward pass (measured 2.5x per step
    for the small preset)."""
    kw = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


# The weights that read the text condition: swapping the text encoder (e.g. for a multilingual one)
# only needs these relearned; the image pathway stays as it was trained.
PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "text": ("text_proj.*", "text_pos", "text_refiner.*", "planner.*", "pooled_proj.*", "null_text", "null_pooled",
             "blocks.*.cross.kv.*", "blocks.*.cross.k_norm.*"),
}


def freeze_except(model: torch.nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Train only the parameters whose names match `patterns` (fnmatch, or a PARAM_GROUPS name);
    returns their names. A pattern that matches nothing is an error, not a silent no-op."""
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    matches = {p: {n for n in names for q in PARAM_GROUPS.get(p, (p,)) if fnmatch.fnmatchcase(n, q)}
               for p in patterns}
    unmatched = [p for p, found in matches.items() if not found]
    if unmatched:
        raise ValueError(f"train_only: {unmatched} match no parameter of this model "
                         f"(groups: {', '.join(PARAM_GROUPS)}; e.g. {names[0]!r})")
    chosen = set().union(*matches.values())
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def add_adapters(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Low-rank adapters (``lora.py``) of rank ``cfg.lora_rank`` on the ``cfg.lora_targets`` layers
    of the denoiser (a layout planner's are left alone: it learns from boxes, not from the denoising
    loss); every other weight is frozen, except those ``train_only`` named, which train beside them."""
    keep = [p for p in model.parameters() if p.requires_grad] if cfg.train_only else []
    targets = tuple(t for name in cfg.lora_targets for t in TARGET_SETS.get(name, (name,)))
    add_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha or float(cfg.lora_rank), targets=targets))
    for p in keep:
        p.requires_grad_(True)


def load_init_weights(model: Denoiser, folder: str) -> None:
    """Fine-tuning start: copy every weight by name; a wider input conv keeps the new channels at
    zero (the inpainting variant starts as the base model), and text-refiner blocks the base does
    not have keep their identity init (the grown model starts as the base). Any other difference
    in architecture is refused, naming the config fields that differ, so that no trained weight
    is dropped."""
    from dataclasses import asdict

    from .checkpoint import load_config, load_state, resolve

    directory = resolve(folder)
    own = model.state_dict()
    config = load_config(directory)
    weights = load_state(directory, config)  # a delta comes with its base's weights
    problems = [f"{n} has shape {tuple(w.shape)}, the new model needs {tuple(own[n].shape)}"
                for n, w in weights.items() if n in own and own[n].shape != w.shape
                and not (n == "patch.weight" and own[n].shape[1] > w.shape[1])]
    problems += [f"{n} is not in the new model" for n in weights if n not in own]
    grown = model.config.text_refiner > config.model.text_refiner
    planned = model.config.layout_planner and not config.model.layout_planner
    problems += [f"{n} is missing from it" for n in own if n not in weights
                 and not (grown and (n == "text_pos" or n.startswith("text_refiner.")))
                 and not (planned and is_planner_weight(n))
                 and n != "planner.reference"]  # saved before planners had one: an even spread, as then
    if problems:
        theirs = asdict(config.model)
        ours = asdict(model.config)
        grown_fields = ("extra_in_channels", "control", "text_refiner", "layout_planner", "layout_gain")
        hint = ", ".join(f"--model.{k} {json.dumps(v)}" for k, v in theirs.items()
                         if k not in grown_fields and ours.get(k) != v)
        raise ValueError(f"cannot fine-tune from {folder}: its architecture differs ("
                         + "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
                         + ")" + (f". Its model config differs in: {hint}" if hint else ""))
    for name, w in weights.items():
        target = own[name] if own[name].shape == w.shape else own[name][:, : w.shape[1]]
        target.copy_(w)


def _batches(reader: ShardReader, cfg: TrainConfig, acc, step: int) -> Iterator[Batch]:
    """The deterministic stream from the resume position; micro-steps count as stream steps."""
    accum = cfg.optim.grad_accum
    stream = reader.batches(cfg.batch_size, seed=cfg.seed, start_step=step * accum,
                            rank=acc.process_index, world_size=acc.num_processes)
    for batch in stream:
        yield to_device(batch, acc.device)


# -- previews, export ----------------------------------------------------------------------------
def ema_weights(cfg: TrainConfig, ema: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA under the plain model's names; a run with adapters adds their updates as low-rank
    factors beside the base weights (``checkpoint.merge_low_rank``)."""
    if not cfg.lora_rank:
        return ema
    return as_stored(ema, (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank)


def ema_model(cfg: TrainConfig, ema: dict[str, Tensor], merge: bool = True) -> Denoiser:
    """The EMA weights as a plain denoiser: adapters' updates added in, or (``merge=False``) left out."""
    weights = ema_weights(cfg, ema)
    weights = merge_low_rank(weights) if merge else {k: v for k, v in weights.items() if not is_low_rank_factor(k)}
    model = Denoiser(cfg.model)
    missing = model.load_state_dict(weights, strict=False).missing_keys
    buffers = [k for k in missing if k in dict(model.named_parameters())]
    if buffers:
        raise ValueError(f"EMA is missing parameters {buffers[:3]}")
    return model.eval()


@torch.no_grad()
def write_preview(cfg: TrainConfig, ema: dict[str, Tensor], reader: ShardReader, out: Path) -> Path:
    """A grid from fixed prompts and seeds with the EMA weights: the same picture every time, so
    previews across steps are comparable."""
    from .pipeline import Text2Image
    from .pixels import image_grid
    from .vae import load_autoencoder

    text = cfg.model.is_text
    pipe = Text2Image(ema_model(cfg, ema), load_autoencoder(**_ae_args(reader)),
                      _preview_encoder(reader) if text else None, NoisePath(cfg.diffusion.path), cfg.sampling)
    # A class model's preview: one row per class (up to 10), four samples each.
    prompts = list(cfg.preview_prompts) if text else list(range(min(10, cfg.model.num_classes)))
    per = 2 if text else 4
    images = pipe(prompts, seed=0, num_images_per_prompt=per, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=4).save(out)  # text: 2 prompts a row; classes: one class a row
    return out


_ENCODERS: dict[str, Any] = {}


def _preview_encoder(reader: ShardReader):
    """The shards' text encoder, loaded once per process (MiniLM takes seconds to load)."""
    from .text import load_text_encoder

    desc = reader.manifest["text_encoder"]
    key = json.dumps(desc, sort_keys=True)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_text_encoder(**{k: desc[k] for k in ("name", "path", "max_length") if k in desc})
    return _ENCODERS[key]


def _ae_args(reader: ShardReader) -> dict[str, Any]:
    desc = reader.manifest["autoencoder"]
    return {k: desc[k] for k in ("kind", "path") if k in desc}


def export(cfg: TrainConfig, ema: dict[str, Tensor], reader: ShardReader, out: Path,
           dtype: torch.dtype | None = None) -> Path:
    """EMA weights -> a ``from_pretrained`` folder, with the autoencoder copied in so the folder
    works on its own. Adapters' updates are stored as their low-rank factors."""
    ae = dict(reader.manifest["autoencoder"])
    extra = {}
    if ae.get("kind") == "kl" and ae.get("path") and Path(ae["path"]).is_dir():
        extra["vae"] = Path(ae["path"])
        ae["path"] = "vae"
    text = reader.manifest["text_encoder"] if cfg.model.is_text else None  # a class model reads no text
    classes = {"classes": reader.classes} if cfg.model.num_classes and reader.classes else {}
    config = CheckpointConfig(model=cfg.model, diffusion=cfg.diffusion, sampling=cfg.sampling,
                              text_encoder=text, autoencoder=ae,
                              extra={"train": {"steps": cfg.steps, "data": cfg.data}, **classes})
    factors = {k: v for k, v in ema_weights(cfg, ema).items() if is_low_rank_factor(k)}
    return save_pretrained(ema_model(cfg, ema, merge=False), out, config, dtype=dtype, extra_dirs=extra,
                           low_rank=factors)


def _finish(cfg, acc, model, ema, reader, state, log) -> dict[str, Any]:
    result = {"step": state.step, "skipped_steps": state.bad_total, "bf16": mixed_bf16(acc.device, cfg.mixed_precision),
              "history": log.history}
    if acc.is_main_process and state.step >= cfg.steps:
        result["model"] = str(export(cfg, ema, reader, Path(cfg.out) / "model"))
        atomic_write_bytes(Path(cfg.out) / "result.json",
                           json.dumps({k: v for k, v in result.items() if k != "history"}).encode())
    acc.wait_for_everyone()
    return result

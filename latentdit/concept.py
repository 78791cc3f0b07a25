"""Few-image concept fine-tuning (DreamBooth, Ruiz et al. 2022, arXiv:2208.12242) with prior
preservation, on low-rank adapters (``lora.py``) or on every weight.

A handful of instance images, captioned with a rare token ("a red sks shape in the top left"),
teach the model the token. Every step also regresses prior rows, images for the base model's own
training-split captions, weighted by ``prior_weight``: that term holds the model to the prompts it
already knew while it learns the new word. The prior images are either the ground-truth renders
of those captions' scenes through the autoencoder ("renders", the default: the very distribution
the base was trained on) or the base model's own samples for them ("generated", DreamBooth's
choice where no class images exist; docs/concept.md compares the two). The loss is the trainer's
``diffusion_loss``, the LR follows its ``learning_rate`` schedule, the step runs under the same
bf16 autocast.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .checkpoint import CheckpointConfig, atomic_write_bytes, base_folder, component_path, save_pretrained
from .config import DiffusionConfig, MixedPrecision, from_dict
from .lora import ATTENTION_TARGETS, MLP_TARGETS, LoRAConfig, adapters_of, add_lora, save_adapter
from .pipeline import Text2Image
from .pixels import IMAGE_SUFFIXES, from_pil
from .schedules import NoisePath
from .shards import Batch
from .train import diffusion_loss, learning_rate
from .train_config import OptimConfig, TrainConfig
from .train_state import autocast_for

MIN_IMAGES, MAX_IMAGES = 3, 10
PriorSource = Literal["generated", "renders"]


@dataclass
class ConceptConfig:
    """What ``finetune_concept`` trains. ``lora=None``: every weight (full fine-tune).
    ``lr=None``: 2e-3 for adapters, 2e-5 for every weight. Defaults: docs/concept.md's run."""

    token: str = "sks"
    class_word: str = "shape"
    steps: int = 800
    batch_size: int = 8  # instance rows per step; as many prior rows beside them
    prior_images: int = 1024
    prior_weight: float = 1.0
    prior_source: PriorSource = "renders"
    prior_steps: int = 20  # sampling steps of each generated prior image
    lora: LoRAConfig | None = field(default_factory=lambda: LoRAConfig(targets=ATTENTION_TARGETS + MLP_TARGETS))
    lr: float | None = None
    warmup_steps: int = 20
    cond_dropout: float = 0.1  # as the base trained: keeps the null condition (CFG) in step
    seed: int = 0
    mixed_precision: MixedPrecision = "auto"
    save_dtype: Literal["float32", "float16"] = "float32"  # of the written weights (float16: half the size)
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "prior_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.prior_images, bool) or not isinstance(self.prior_images, int) or self.prior_images < 0:
            raise ValueError(f"prior_images must be an integer >= 0, got {self.prior_images!r}")
        if not math.isfinite(self.prior_weight) or self.prior_weight < 0:
            raise ValueError(f"prior_weight must be a number >= 0, got {self.prior_weight!r}")
        if self.prior_weight > 0 and self.prior_images == 0:
            raise ValueError("prior preservation needs prior_images > 0 (or prior_weight 0 to turn it off)")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        check_token(self.token, self.class_word)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.lora else 2e-5)


# -- the words --------------------------------------------------------------------------------
@functools.cache
def known_words(n: int = 3000) -> frozenset[str]:
    """Every word of the shapes world's training captions (``n`` of them, all templates drawn)."""
    from .datasets.shapes import ShapesDataset

    data = ShapesDataset(split="train")
    words = set()
    for i in range(n):
        words.update(data.draw(i, stream="vocabulary")[1].replace(",", " ").replace(":", " ").split())
    return frozenset(words)


def check_token(token: str, class_word: str) -> None:
    """The token must be one new word: a word the captions already use would be taught a second
    meaning, overwriting the first."""
    for what, word in (("token", token), ("class word", class_word)):
        if not isinstance(word, str) or not word.isalnum():
            raise ValueError(f"the {what} must be one word of letters or digits, got {word!r}")
    if token.lower() == class_word.lower():
        raise ValueError(f"the token and the class word must differ, both are {token!r}")
    if token.lower() in known_words():
        raise ValueError(f"the token {token!r} is already a word of the model's captions; choose a rare "
                         "word it has never seen, such as 'sks'")


# -- instance images --------------------------------------------------------------------------
@dataclass
class Instances:
    images: list[Image.Image]
    captions: list[str]
    files: list[str]
    skipped: list[str]


def read_instances(folder: str | Path, token: str, class_word: str, size: int) -> Instances:
    """The images of ``folder`` (3-10), each with its ``name.txt`` caption or "a {token}
    {class_word}"; unreadable images are skipped and counted. Images of another size are
    centre-cropped to a square and resized to ``size``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    images, captions, files, skipped = [], [], [], []
    for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(file) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            skipped.append(file.name)
            continue
        images.append(_fit(image, size))
        captions.append(_caption(file, token, class_word))
        files.append(file.name)
    note = f" ({len(skipped)} unreadable skipped: {', '.join(skipped[:3])})" if skipped else ""
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{folder} holds {len(images)} readable images{note}; concept fine-tuning needs "
                         f"{MIN_IMAGES}-{MAX_IMAGES}")
    if len(images) > MAX_IMAGES:
        raise ValueError(f"{folder} holds {len(images)} images; concept fine-tuning takes {MIN_IMAGES}-"
                         f"{MAX_IMAGES} (more would be ordinary fine-tuning: latentdit train --init-from)")
    return Instances(images, captions, files, skipped)


def _caption(file: Path, token: str, class_word: str) -> str:
    side = file.with_suffix(".txt")
    if not side.exists():
        return f"a {token} {class_word}"
    try:
        caption = " ".join(side.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"caption {side} is unreadable ({e})") from None
    if token.lower() not in caption.lower().split():
        raise ValueError(f"caption {side} ({caption!r}) does not contain the token {token!r}: the image "
                         "would teach the model nothing about it")
    return caption


def _fit(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS)


# -- the two kinds of rows --------------------------------------------------------------------
def prior_prompts(n: int, seed: int = 0) -> list[str]:
    """Training-split captions of the shapes world (every scene type): the prompts the base model
    was trained on, so preserving its answers to them preserves what it knew."""
    from .datasets.shapes import ShapesDataset

    data = ShapesDataset(split="train", seed=seed)
    return [data.draw(i, stream="concept-prior")[1] for i in range(n)]


@torch.no_grad()
def prior_latents(pipe: Text2Image, prompts: list[str], source: PriorSource, *, steps: int = 20,
                  seed: int = 0, batch_size: int = 16) -> Tensor:
    """Latents of the prior rows: the base model's own samples for ``prompts`` ("generated"),
    or ground-truth renders of the scenes those captions were written from ("renders")."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        if source == "generated":
            seeds = [seed * 100_000 + start + i for i in range(len(chunk))]
            rows.append(pipe(chunk, seed=seeds, steps=steps, output_type="latent", progress=False))
        else:
            rows.append(pipe.encode_image(from_pil(_renders(chunk, start, seed, pipe))))
    return torch.cat(rows).float()


def _renders(chunk: list[str], start: int, seed: int, pipe: Text2Image) -> list[Image.Image]:
    from .datasets.shapes import ShapesDataset, render_scene

    data, size = ShapesDataset(split="train", seed=seed), pipe.model.config.base_size * pipe.autoencoder.downsample
    return [render_scene(data.draw(start + i, stream="concept-prior")[0], size) for i in range(len(chunk))]


def encode_rows(pipe: Text2Image, latents: Tensor, captions: list[str]) -> Batch:
    """A ``Batch`` (the trainer's row format) of latents and their encoded captions."""
    emb = pipe.text_encoder.encode(captions).to(pipe.device)
    return Batch(latents.to(pipe.device), emb.to(dtype=torch.float32), list(captions), torch.arange(len(captions)))


def pick(rows: Batch, n: int, gen: torch.Generator) -> Batch:
    """``n`` rows drawn with replacement (a few instance images fill a batch)."""
    idx = torch.randint(len(rows), (n,), generator=gen)
    take = idx.to(rows.latents.device)
    return Batch(rows.latents[take], rows.text[take], [rows.captions[i] for i in idx.tolist()], rows.index[idx])


# -- training ---------------------------------------------------------------------------------
def train_config(cfg: ConceptConfig, pipe: Text2Image, diffusion: DiffusionConfig) -> TrainConfig:
    """The trainer's config for this run, so ``diffusion_loss`` and ``learning_rate`` apply as is."""
    optim = OptimConfig(lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps, schedule="cosine", min_lr_ratio=0.1)
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
                       cond_dropout=cfg.cond_dropout, model=pipe.model.config, diffusion=diffusion, optim=optim)


def train_rows(pipe: Text2Image, instances: Batch, prior: Batch | None, cfg: ConceptConfig,
               diffusion: DiffusionConfig, *, progress: bool = True, on_step=None) -> list[dict[str, float]]:
    """Fine-tune ``pipe.model`` in place: adapters added to it (``cfg.lora``) or every weight.
    Each step: ``batch_size`` instance rows + ``batch_size`` prior rows, loss = instance loss +
    prior_weight * prior loss. ``on_step(step, inst, prior)`` sees each step's two batches.
    Returns the logged history (mean losses per ``log_every`` steps)."""
    model = pipe.model
    params = _trainable(model, cfg)
    tcfg = train_config(cfg, pipe, diffusion)
    opt = torch.optim.AdamW(params, lr=tcfg.optim.lr, weight_decay=0.0, betas=(0.9, 0.99))
    path = NoisePath(diffusion.path)
    host = torch.Generator().manual_seed(cfg.seed)
    gen = torch.Generator(device=pipe.device).manual_seed(cfg.seed + 1)
    use_prior = prior is not None and cfg.prior_weight > 0
    history, sums = [], torch.zeros(2, device=pipe.device)
    model.train()
    bar = _bar(cfg.steps, progress)
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, tcfg)
            inst = pick(instances, cfg.batch_size, host)
            rows = pick(prior, cfg.batch_size, host) if use_prior else None
            if on_step is not None:
                on_step(step, inst, rows)
            with autocast_for(pipe.device, cfg.mixed_precision):
                loss_i = diffusion_loss(model, inst, path, tcfg, gen)
                loss_p = diffusion_loss(model, rows, path, tcfg, gen) if use_prior else torch.zeros_like(loss_i)
            (loss_i + cfg.prior_weight * loss_p).backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sums += torch.stack([loss_i.detach().float(), loss_p.detach().float()])
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                n = (step % cfg.log_every) + 1
                history.append({"step": step + 1, "instance_loss": round(float(sums[0]) / n, 5),
                                "prior_loss": round(float(sums[1]) / n, 5) if use_prior else None})
                bar.set_postfix(inst=history[-1]["instance_loss"], prior=history[-1]["prior_loss"])
                sums.zero_()
    finally:
        bar.close()
        model.eval()
    return history


def _trainable(model: torch.nn.Module, cfg: ConceptConfig) -> list[torch.nn.Parameter]:
    if cfg.lora is not None:
        if not adapters_of(model):
            add_lora(model, cfg.lora)
        return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    model.requires_grad_(True)
    return list(model.parameters())


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="finetune-concept")


# -- the whole run ----------------------------------------------------------------------------
def finetune_concept(base: str | Path, images: str | Path, out: str | Path, cfg: ConceptConfig, *,
                     device: str = "auto", pipe: Text2Image | None = None, progress: bool = True) -> dict[str, Any]:
    """Read and check everything, build the prior, train, and write ``out``: an adapter folder
    (``--adapter out`` on top of ``base``) or, with ``cfg.lora=None``, a whole model folder.
    ``pipe``: the base already loaded (it is modified in place). Returns the run's summary."""
    from .checkpoint import load_config, resolve, size_limits

    t0 = time.perf_counter()
    folder = resolve(base)
    base_cfg = load_config(folder)
    if not base_cfg.model.text_dim and not base_cfg.model.pooled_dim:
        raise ValueError(f"{base} is not a text-conditional model: a concept is taught through a caption")
    inst = read_instances(images, cfg.token, cfg.class_word, size_limits(base_cfg)[0])  # before the slow load
    out = _check_out(Path(out))
    pipe = pipe or Text2Image.from_pretrained(folder, device=device)
    torch.manual_seed(cfg.seed)
    prompts = prior_prompts(cfg.prior_images, cfg.seed) if cfg.prior_weight > 0 else []
    t_prior = time.perf_counter()
    prior = None
    if prompts:
        prior = encode_rows(pipe, prior_latents(pipe, prompts, cfg.prior_source, steps=cfg.prior_steps,
                                                seed=cfg.seed), prompts)
    t_train = time.perf_counter()
    rows = encode_rows(pipe, pipe.encode_image(from_pil(inst.images)), inst.captions)
    history = train_rows(pipe, rows, prior, cfg, base_cfg.diffusion, progress=progress)
    summary = {"base": str(base), "images": inst.files, "captions": inst.captions, "skipped": inst.skipped,
               "config": _jsonable(asdict(cfg)), "history": history,
               "seconds": {"prior": round(t_train - t_prior, 1), "train": round(time.perf_counter() - t_train, 1)}}
    _write(pipe, out, cfg, base, base_cfg, folder, summary)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_bytes(out / "concept.json", json.dumps(summary, indent=1).encode())
    return summary


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it names the folder to write the result into")
    if out.is_dir() and any(out.iterdir()) and not (out / "concept.json").exists():
        raise ValueError(f"--out {out} is a folder with other files in it; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make this folder ({e.strerror})") from None
    return out


def _write(pipe: Text2Image, out: Path, cfg: ConceptConfig, base, base_cfg: CheckpointConfig, folder: Path,
           summary: dict[str, Any]) -> None:
    extra = {"concept": {k: summary[k] for k in ("images", "captions")} | {"token": cfg.token,
                                                                          "class_word": cfg.class_word}}
    if cfg.lora is not None:
        save_adapter(pipe.model, out, cfg.lora, str(base), pipe.model.config, extra=extra,
                     dtype=getattr(torch, cfg.save_dtype))
        return
    # A whole model: the base's components travel with it, so the folder stands on its own.
    copies = {}
    config = from_dict(CheckpointConfig, base_cfg.to_json())
    config.base = config.base_digest = None  # every weight is written, whether the base is a delta or not
    base_base = base_folder(folder, base_cfg)
    for name in ("autoencoder", "text_encoder"):
        desc = getattr(base_cfg, name)
        local = component_path(folder, desc, base_base)
        if desc and desc.get("path") and local and Path(local["path"]).exists():
            copies[desc["path"]] = Path(local["path"])
    config.extra = {**config.extra, **extra}
    save_pretrained(pipe.model, out, config, dtype=getattr(torch, cfg.save_dtype), extra_dirs=copies)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


__all__ = ["ConceptConfig", "Instances", "check_token", "encode_rows", "finetune_concept", "known_words", "pick",
           "prior_latents", "prior_prompts", "read_instances", "train_rows"]

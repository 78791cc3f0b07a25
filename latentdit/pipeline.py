"""``Text2Image``: prompts -> images with classifier-free guidance and any sampler.

Guidance lives here (not in the model, not in the samplers): one batched pass over
[conditional, unconditional] rows, mixed in x0 space. Because x0, eps and v are affine in the
network output for a fixed x_t, mixing x0 equals mixing eps or v.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointConfig, check_image_size, component_path, load_denoiser
from .config import SamplingConfig, check_guidance_interval
from .inpainting import is_inpainting, masked_condition
from .model import Denoiser
from .samplers import get_sampler, time_grid
from .schedules import NoisePath, to_x0
from .text import TextEncoder, load_text_encoder
from .vae import Autoencoder, load_autoencoder, to_pil


@dataclass
class Condition:
    """What the denoiser is conditioned on, for a batch of rows."""

    text: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    labels: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        return Condition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in dataclasses.fields(self)})

    def repeat(self, k: int) -> Condition:
        """Each row k times in a row (num_images_per_prompt)."""
        return self.map(lambda v: v.repeat_interleave(k, dim=0))

    @staticmethod
    def cat(a: Condition, b: Condition) -> Condition:
        return Condition(**{f.name: None if getattr(a, f.name) is None
                            else torch.cat([getattr(a, f.name), getattr(b, f.name)])
                            for f in dataclasses.fields(a)})

    def kwargs(self) -> dict[str, Tensor | None]:
        return {"text": self.text, "text_mask": self.mask, "pooled": self.pooled, "labels": self.labels}


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and CUDA (2-4x faster on this CPU); ``None``/fp32 disables it."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Text2Image:
    """A latent text-to-image (or class-to-image) pipeline around a ``Denoiser``."""

    def __init__(self, model: Denoiser, autoencoder: Autoencoder, text_encoder: TextEncoder | None = None,
                 path: NoisePath | None = None, sampling: SamplingConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.path = path or NoisePath("flow")
        self.sampling = sampling or SamplingConfig()
        self.device = torch.device(device)
        self._cast: tuple[tuple, Denoiser] | None = None
        if model.config.is_text and text_encoder is None:
            raise ValueError("this model is text-conditional: pass a text_encoder")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "shapes", device: str | torch.device = "cpu",
                        text_encoder: TextEncoder | None = None,
                        autoencoder: Autoencoder | None = None) -> Text2Image:
        """Load a model folder, a packaged model name (``shapes``) or a hub id, with the encoders
        its config names (override either by passing an instance)."""
        model, config, directory = load_denoiser(name_or_path, device)
        return cls(model, autoencoder or _load_ae(config, directory, device),
                   text_encoder or _load_text(config, directory, device),
                   NoisePath(config.diffusion.path), config.sampling, device)

    # -- conditioning -----------------------------------------------------------------------
    def encode(self, prompts: Sequence[str | int],
               negative: Sequence[str] | None = None) -> tuple[Condition, Condition]:
        """(conditional, unconditional) rows. Without a negative prompt the unconditional row
        is the model's learned null condition, as in training."""
        n = len(prompts)
        if self.model.config.num_classes:
            labels = _class_labels(prompts, self.model.config.num_classes, self.device)
            null = torch.full_like(labels, self.model.config.num_classes)
            return Condition(labels=labels), Condition(labels=null)
        texts = [_check_prompt(p) for p in prompts] + list(negative or [])
        emb = self.text_encoder.encode(texts).to(self.device)
        cfg = self.model.config
        rows = Condition(emb.tokens[:, : cfg.max_text_len] if cfg.text_dim else None,
                         emb.mask[:, : cfg.max_text_len] if cfg.text_dim else None,
                         emb.pooled if cfg.pooled_dim else None)
        cond = rows.map(lambda v: v[:n])
        if negative:
            return cond, rows.map(lambda v: v[n:])
        length = rows.text.shape[1] if rows.text is not None else 1
        null = Condition(*self.model.null_condition(n, length))
        return cond, null.map(lambda v: v.detach())

    def denoiser(self, cond: Condition, uncond: Condition | None, guidance_scale: float,
                 dtype: torch.dtype | None = torch.bfloat16, mask_latent: Tensor | None = None,
                 guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's (x_t, t) -> x0 callable, with CFG when guidance_scale != 1 and
        ``guidance_interval[0] <= t <= guidance_interval[1]`` (one conditional pass elsewhere).
        ``mask_latent``: an inpainting variant's extra input channels, one row per image."""
        guidance_scale = _finite(guidance_scale, "guidance scale")
        guided = uncond is not None and guidance_scale != 1.0
        lo, hi = check_guidance_interval(guidance_interval)
        both = Condition.cat(cond, uncond) if guided else cond
        prediction = self.model.config.prediction
        model = self.inference_model(dtype)
        extra = {} if mask_latent is None else {"mask_latent": mask_latent}

        def run(x: Tensor, t: Tensor, c: Condition, kw: dict[str, Tensor]) -> Tensor:
            with autocast(self.device, dtype):
                pred = model(x, t, **c.kwargs(), **kw)
            return to_x0(pred.float(), x, t, self.path, prediction)

        @torch.no_grad()
        def denoise(x: Tensor, t: Tensor) -> Tensor:
            if not guided or not lo <= float(t.reshape(-1)[0]) <= hi:
                return run(x, t, cond, extra)
            doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
            x0 = run(torch.cat([x, x]), torch.cat([t, t]), both, doubled)
            x0_c, x0_u = x0.chunk(2)
            return x0_u + guidance_scale * (x0_c - x0_u)

        return denoise

    def inference_model(self, dtype: torch.dtype | None) -> Denoiser:
        """The denoiser for sampling under ``autocast(dtype)``: a copy whose linear and conv
        weights are stored in ``dtype``, which is exactly what autocast would cast them to on
        every call (on CPU those casts were ~12% of a sampling run). Rebuilt when the model's
        weights change; the model itself is returned for fp32."""
        if dtype is None or dtype == torch.float32:
            return self.model
        key = (dtype, tuple((p.data_ptr(), p._version) for p in self.model.parameters()))
        if self._cast is None or self._cast[0] != key:
            cast = copy.deepcopy(self.model).requires_grad_(False)
            for module in cast.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.to(dtype)
            self._cast = (key, cast)
        return self._cast[1]

    # -- sampling ---------------------------------------------------------------------------
    def resolve_guidance(self, guidance_scale: float | None) -> float:
        """``guidance_scale``, or the sampling config's when None (``denoiser`` checks it)."""
        return self.sampling.guidance_scale if guidance_scale is None else guidance_scale

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        d = self.autoencoder.downsample
        height, width = check_image_size(height, width, base=self.model.config.base_size * d,
                                         step=d * self.model.config.patch_size)
        return self.model.config.in_channels, height // d, width // d

    def noise(self, seeds: Sequence[int], shape: tuple[int, int, int]) -> Tensor:
        """One independently seeded noise tensor per image, so an image does not depend on the
        batch it was drawn in."""
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(self.device)

    def grid(self, steps: int, grid: str | None = None, shift: float | None = None,
             t_start: float = 1.0) -> Tensor:
        grid = grid or self.sampling.grid
        shift = self.sampling.shift if shift is None else shift
        return time_grid(steps, self.path, grid, shift=shift, t_max=t_start)

    def sample(self, x: Tensor, denoise: Callable, ts: Tensor, *, sampler: str, seed: int = 0,
               on_step: Callable | None = None, progress: bool = True, **opts: Any) -> Tensor:
        """Run a sampler over grid ``ts`` from x, with an optional progress bar."""
        fn = get_sampler(sampler)
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        bar = _progress(len(ts) - 1, progress)

        def hook(i: int, t: Tensor, x_next: Tensor, x0: Tensor) -> Tensor | None:
            bar.update(1)
            check_finite_sample(x_next, f"step {i + 1} of {len(ts) - 1}")
            return on_step(i, t, x_next, x0) if on_step else None

        try:
            return fn(denoise, x, ts.to(x.device), self.path, generator=gen, on_step=hook, **opts)
        finally:
            bar.close()

    @torch.no_grad()
    def __call__(self, prompts: str | int | Sequence[str | int], negative_prompt: str | Sequence[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                 seed: int | Sequence[int] = 0, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, dtype: torch.dtype | None = torch.bfloat16,
                 output_type: str = "pil", progress: bool = True, shift: float | None = None,
                 grid: str | None = None, eta: float | None = None,
                 guidance_interval: tuple[float, float] | None = None) -> list[Image.Image] | Tensor:
        """Generate ``num_images_per_prompt`` images per prompt. ``seed``: an int (image i uses
        seed + i) or one seed per image. ``output_type``: "pil", "tensor" ([-1, 1]) or "latent".
        ``guidance_interval``: guide only for t in [lo, hi] (default: the sampling config's)."""
        if hasattr(prompts, "tolist") and not isinstance(prompts, (str, int)):  # an array of class ids
            prompts = prompts.tolist()
        if isinstance(prompts, (str, int)):
            prompts = [prompts]
        elif isinstance(prompts, Sequence):
            prompts = list(prompts)
        else:
            raise ValueError(f"prompts must be a string, a class id or a list of them, got {prompts!r}")
        if not prompts:
            raise ValueError("no prompts given")
        k = _positive(num_images_per_prompt, "num_images_per_prompt")
        steps = _positive(self.sampling.steps if steps is None else steps, "steps")
        g = self.resolve_guidance(guidance_scale)
        negative = _negatives(negative_prompt, len(prompts))
        seeds = _seeds(seed, len(prompts) * k)
        cond, uncond = self.encode(prompts, negative)
        x = self.noise(seeds, self.latent_shape(height, width))
        # An inpainting variant generating from nothing: everything is to be painted.
        repaint_all = (masked_condition(torch.zeros_like(x), torch.ones_like(x[:, :1]))
                       if is_inpainting(self.model.config) else None)
        interval = self.sampling.guidance_interval if guidance_interval is None else guidance_interval
        denoise = self.denoiser(cond.repeat(k), uncond.repeat(k), g, dtype, repaint_all, interval)
        name = sampler or self.sampling.sampler
        opts = {"eta": self.sampling.eta if eta is None else eta} if name == "ddim" else {}
        latents = self.sample(x, denoise, self.grid(steps, grid, shift), sampler=name,
                              seed=seeds[0], progress=progress, **opts)
        return self.decode(latents, output_type)

    def decode(self, latents: Tensor, output_type: str = "pil") -> list[Image.Image] | Tensor:
        if output_type == "latent":
            return latents
        check_finite_sample(latents, "the end of sampling")
        images = self.autoencoder.decode(latents.float())
        check_finite_sample(images, "decoding")
        if output_type == "tensor":
            return images
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent', got {output_type!r}")
        return to_pil(images)


def check_finite_sample(x: Tensor, where: str) -> None:
    """A non-finite sample would be written as a black or garbage image: stop and say where."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"sampling produced non-finite values (NaN or inf) at {where}; the model "
                                 "weights may be damaged, or try --fp32")


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Paste equally sized images into rows of ``cols``."""
    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def _load_ae(config: CheckpointConfig, directory: Path, device) -> Autoencoder:
    desc = component_path(directory, config.autoencoder) or {"kind": "identity"}
    return load_autoencoder(**desc, device=device)  # recorded channels/downsample are checked


def _load_text(config: CheckpointConfig, directory: Path, device) -> TextEncoder | None:
    desc = component_path(directory, config.text_encoder)
    if not desc:
        return None
    return load_text_encoder(**desc, device=str(device))  # recorded dims are checked


def _check_prompt(p: Any) -> str:
    if not isinstance(p, str):
        raise ValueError(f"prompts must be strings for a text model, got {type(p).__name__}")
    return p


def _class_labels(prompts: Sequence[Any], num_classes: int, device) -> Tensor:
    try:
        labels = [int(p) for p in prompts]
    except (TypeError, ValueError):
        raise ValueError("this is a class-conditional model: prompts must be class ids") from None
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"class ids must be in [0, {num_classes - 1}], got {labels}")
    return torch.tensor(labels, device=device)


def _negatives(negative: str | Sequence[str] | None, n: int) -> list[str] | None:
    if negative is None:
        return None
    negative = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negative) != n:
        raise ValueError(f"got {len(negative)} negative prompts for {n} prompts")
    return negative


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral):
        seeds = [int(seed) + i for i in range(n)]
    elif isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise ValueError(f"seed must be an integer or one integer per image, got {seed!r}")
    else:
        seeds = [int(s) if isinstance(s, numbers.Integral) else s for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images (prompts x num_images_per_prompt)")
    for s in seeds:
        if not isinstance(s, int) or not -2**63 <= s < 2**64:
            raise ValueError(f"seeds must be integers in [-2**63, 2**64), got {s!r}")
    return seeds


def _finite(v: float, name: str) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def _positive(v: int, name: str) -> int:
    if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, desc="sampling")

"""What every editing function shares: encoding with a size check, noising to a time, the
conditioned denoiser, one sampler run and decoding (with the known pixels pasted back)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..pipeline import Condition, Text2Image
from ..samplers import Denoise, OnStep
from ..vae import to_pil

OutputType = Literal["pil", "tensor", "latent"]


def encode(pipe: Text2Image, images: Tensor) -> Tensor:
    """Scaled latents of (N, 3, H, W) images in [-1, 1], after checking the size suits the model."""
    h, w = images.shape[-2:]
    step = pipe.autoencoder.downsample * pipe.model.config.patch_size
    if h % step or w % step:
        raise ValueError(f"the image is {w}x{h} (width x height); this model needs both sides to be "
                         f"multiples of {step}: resize or crop it")
    return pipe.autoencoder.encode(images.to(pipe.device))


def noised(pipe: Text2Image, x0: Tensor, noise: Tensor, t: float) -> Tensor:
    """x_t = alpha(t) x0 + sigma(t) noise on the pipeline's path (exactly ``noise`` at flow's t = 1)."""
    alpha, sigma = pipe.path.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(alpha) * x0 + float(sigma) * noise


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return float(strength)


def resolve_steps(pipe: Text2Image, steps: int | None) -> int:
    steps = pipe.sampling.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def partial_steps(steps: int, strength: float) -> int:
    """Steps actually run from t = strength: diffusers' img2img count, but at least one."""
    return max(1, round(steps * strength))


def seed_list(seed: int, n: int) -> list[int]:
    """Image i of a call uses seed + i, as in ``Text2Image.__call__``."""
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {n}")
    return [int(seed) + i for i in range(n)]


def prompt_denoiser(pipe: Text2Image, prompt: str | int | None, negative_prompt: str | None,
                    guidance_scale: float | None, dtype: torch.dtype | None, k: int = 1,
                    mask_latent: Tensor | None = None,
                    guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Denoise:
    """The CFG denoiser for one prompt repeated k times; ``prompt=None`` is the model's null
    condition alone (unconditional, no CFG). ``mask_latent``: an inpainting variant's channels.
    Edits guide on every step; tools that sample from noise as ``pipe(...)`` does pass the
    model's ``sampling.guidance_interval``."""
    if prompt is None:
        null = pipe.encode([0 if pipe.model.config.num_classes else ""])[1]
        return pipe.denoiser(null.repeat(k), None, 1.0, dtype, mask_latent)
    g = pipe.resolve_guidance(guidance_scale)
    cond, uncond = pipe.encode([prompt], None if negative_prompt is None else [negative_prompt])
    return pipe.denoiser(cond.repeat(k), uncond.repeat(k), g, dtype, mask_latent, guidance_interval)


def null_like(pipe: Text2Image, cond: Condition) -> Condition:
    """The learned null condition with the rows and token length of ``cond``: what
    ``Text2Image.encode`` pairs with it when there is no negative prompt."""
    rows = next(v for v in (cond.text, cond.pooled, cond.labels) if v is not None).shape[0]
    if cond.labels is not None:
        return Condition(labels=torch.full_like(cond.labels, pipe.model.config.num_classes))
    length = cond.text.shape[1] if cond.text is not None else 1
    return Condition(*pipe.model.null_condition(rows, length)).map(lambda v: v.detach())


def run_sampler(pipe: Text2Image, x: Tensor, denoise: Denoise, ts: Tensor, sampler: str | None, seed: int,
                on_step: OnStep | None = None, progress: bool = False) -> Tensor:
    """One sampler run over ``ts``, with the pipeline's sampler (and DDIM eta) by default."""
    name = sampler or pipe.sampling.sampler
    opts = {"eta": pipe.sampling.eta} if name == "ddim" else {}
    return pipe.sample(x, denoise, ts, sampler=name, seed=seed, on_step=on_step, progress=progress, **opts)


def check_output(output_type: str) -> None:
    """Fail before sampling, not after, on an unknown output type."""
    if output_type not in ("pil", "tensor", "latent"):
        raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent', got {output_type!r}")


def finish(pipe: Text2Image, latents: Tensor, output_type: OutputType,
           paste: tuple[Tensor, Tensor] | None = None):
    """Decode to ``output_type``; with ``paste = (pixels, mask)`` the pixels where the mask is 0
    are put back exactly (blended where it is soft)."""
    check_output(output_type)
    if output_type == "latent":
        return latents
    images = pipe.decode(latents, "tensor")
    if paste is not None:
        pixels, mask = (v.to(images.device) for v in paste)
        images = mask * images + (1 - mask) * pixels
    return images if output_type == "tensor" else to_pil(images)

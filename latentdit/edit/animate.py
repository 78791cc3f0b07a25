"""Interpolation between two prompts (embeddings and pooled vectors), two seeds (noise) or both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..condition import Condition
from ..device import DType
from ..pipeline import Text2Image


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation (Shoemake 1985) between two noise tensors: in-between points keep the
    norm of a Gaussian draw, which a straight line would shrink. Exactly ``a`` at 0, ``b`` at 1."""
    if w == 0:
        return a
    if w == 1:
        return b
    af, bf = a.double().flatten(), b.double().flatten()
    theta = torch.arccos((af @ bf / (af.norm() * bf.norm())).clamp(-1, 1))
    if float(theta) < 1e-4:  # (nearly) parallel: the sphere is flat there
        return torch.lerp(a.double(), b.double(), w).to(a.dtype)
    s = torch.sin(theta)
    mix = torch.sin((1 - w) * theta) / s * a.double() + torch.sin(w * theta) / s * b.double()
    return mix.to(a.dtype)


def mix_conditions(a: Condition, b: Condition, w: float) -> Condition:
    """Linear mix of two prompts' token embeddings and pooled vectors. Tokens are zero-padded to the
    longer prompt and a position is attended if either prompt has a token there; exactly ``a`` at 0
    and ``b`` at 1 (unpadded), so the end frames are the plain samples."""
    if w == 0:
        return a
    if w == 1:
        return b
    if a.labels is not None:
        raise ValueError("prompt interpolation needs a text model; class labels cannot be mixed")
    text = mask = pooled = None
    if a.text is not None:
        length = max(a.text.shape[1], b.text.shape[1])
        (ta, ma), (tb, mb) = _pad_tokens(a, length), _pad_tokens(b, length)
        text, mask = torch.lerp(ta, tb, w), ma | mb
    if a.pooled is not None:
        pooled = torch.lerp(a.pooled, b.pooled, w)
    return Condition(text, mask, pooled)


def _pad_tokens(c: Condition, length: int) -> tuple[Tensor, Tensor]:
    extra = length - c.text.shape[1]
    return F.pad(c.text, (0, 0, 0, extra)), F.pad(c.mask.bool(), (0, extra), value=False)


def _ends(value: Any, what: str) -> tuple[Any, Any]:
    """(start, end) from one value (both ends) or a sequence of one or two."""
    if isinstance(value, (str, int)):
        return value, value
    items = list(value)
    if len(items) not in (1, 2):
        raise ValueError(f"give one or two {what}, got {len(items)}")
    return items[0], items[-1]


@torch.no_grad()
def interpolate(pipe: Text2Image, prompts: str | Sequence[str], seeds: int | Sequence[int] = 0, *,
                frames: int = 8, steps: int | None = None, guidance_scale: float | None = None,
                sampler: str | None = None, height: int | None = None, width: int | None = None,
                dtype: DType = "auto", progress: bool = False) -> list[Image.Image]:
    """Frames between two prompts (embeddings and pooled vectors mixed linearly), two seeds (noise
    mixed spherically) or both at once. The first and last frames are exactly
    ``pipe(prompt, seed=...)`` with the same settings: each frame is sampled alone, as that is."""
    (pa, pb), (sa, sb) = _ends(prompts, "prompts"), _ends(seeds, "seeds")
    if pa == pb and sa == sb:
        raise ValueError("interpolate needs two different prompts, two different seeds, or both")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    plan = pipe.prepare(steps, sampler=sampler, guidance_scale=guidance_scale)  # as pipe(...) samples
    shape = pipe.latent_shape(height, width)
    ends = [pipe.encode([pa])[0], pipe.encode([pb])[0]]
    noise = [pipe.noise([sa], shape), pipe.noise([sb], shape)]
    images = []
    for k in range(frames):
        w = k / (frames - 1)
        cond = ends[0] if pa == pb else mix_conditions(*ends, w)  # seeds only: one prompt (or class)
        denoise = pipe.denoiser(cond, pipe.null_condition(cond), plan.guidance_scale, dtype,
                                guidance_interval=plan.guidance_interval)
        latents = pipe.sample(slerp(*noise, w), denoise, plan, seed=sb if w == 1 else sa, progress=progress)
        images += pipe.decode(latents, "pil")
    return images

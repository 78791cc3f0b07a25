"""Sampling steered by a differentiable loss of the predicted clean image (pixels or latents).

Each x0 estimate takes one gradient step down the loss before the sampler uses it; only x0 is
differentiated, not the denoiser, so a step costs one decoder backward (pixel space) or nothing
(latent space). The sampler's update carries the change into the next x_t. This is the x0-space
form of universal guidance (Bansal et al. 2023, arXiv:2302.07121, "forward guidance" with the
denoiser's Jacobian taken as the identity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..device import DType
from ..pipeline import Text2Image
from ..plan import OutputType, check_output_type, seed_list
from ..samplers import Denoise

LossFn = Callable[[Tensor], Tensor]  # (N, C, H, W) x0, pixels in [-1, 1] or latents -> (N,) or ()


def color_loss(target: str | Sequence[float]) -> LossFn:
    """Per image, the mean squared distance of every pixel to an RGB colour (0..255, or a shapes
    palette name such as "blue"): the built-in example of a pixel-space guidance loss."""
    from ..datasets.shapes import COLORS

    if isinstance(target, str):
        if target not in COLORS:
            raise ValueError(f"unknown colour {target!r}; give (r, g, b) or one of {', '.join(COLORS)}")
        target = COLORS[target]
    rgb = [float(v) for v in target]
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"a colour is three values in 0..255, got {tuple(target)}")
    colour = (torch.tensor(rgb) / 127.5 - 1).view(1, 3, 1, 1)  # the decoder's [-1, 1] range

    def loss(images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"color_loss reads RGB images (N, 3, H, W), got {tuple(images.shape)}; "
                             "use it with space='pixel'")
        return ((images - colour.to(images)) ** 2).mean(dim=(1, 2, 3))

    return loss


def loss_guided(denoise: Denoise, loss_fn: LossFn, scale: float,
                decode: Callable[[Tensor], Tensor] | None = None) -> Denoise:
    """Wrap a denoiser: x0 -> x0 - scale * n * d loss / d x0, the loss read from ``decode(x0)``
    (pixels) or from x0 itself (latents). n, the number of elements of one x0, makes ``scale``
    independent of the image size for a loss that averages over the image."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoise(x, t)
        if scale == 0:
            return x0
        with torch.enable_grad():
            z = x0.detach().float().requires_grad_(True)
            loss = loss_fn(decode(z) if decode is not None else z).sum()
            (grad,) = torch.autograd.grad(loss, z)
        return x0 - (scale * z[0].numel()) * grad.to(x0.dtype)

    return guided


@torch.no_grad()
def sample_guided(pipe: Text2Image, prompt: str | int, loss_fn: LossFn, *, scale: float = 0.1,
                  space: Literal["pixel", "latent"] = "pixel", steps: int | None = None,
                  guidance_scale: float | None = None, sampler: str | None = None, seed: int = 0,
                  negative_prompt: str | None = None, num_images: int = 1, height: int | None = None,
                  width: int | None = None, dtype: DType = "auto",
                  output_type: OutputType = "pil", progress: bool = False):
    """Sample ``prompt`` steered by a differentiable ``loss_fn`` of the predicted clean image in
    ``space`` (pixels in [-1, 1], or latents), with strength ``scale`` (0 = the plain sample; on
    docs/editing.md gives the range that steers the packaged model while staying on its images).
    Example: ``sample_guided(pipe, "a circle", color_loss("blue"), scale=0.1)``."""
    if space not in ("pixel", "latent"):
        raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    check_output_type(output_type)
    seeds = seed_list(seed, num_images)
    plan = pipe.prepare(steps, sampler=sampler, guidance_scale=guidance_scale)  # as pipe(...) samples
    denoise = pipe.prompt_denoiser(prompt, plan, negative_prompt=negative_prompt, dtype=dtype, repeat=len(seeds))
    decode = pipe.autoencoder.decode_differentiable if space == "pixel" else None
    x = pipe.noise(seeds, pipe.latent_shape(height, width))
    latents = pipe.sample(x, loss_guided(denoise, loss_fn, scale, decode), plan, seed=seeds, progress=progress)
    return pipe.decode(latents, output_type)

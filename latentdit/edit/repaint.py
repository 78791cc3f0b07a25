"""img2img, inpainting, outpainting and panning: sampling that starts from, or keeps, a given image.

img2img is SDEdit (Meng et al. 2021, arXiv:2108.01073): noise the input to ``t = strength`` and
sample from there. Inpainting works with any model by re-imposing the known region, noised to the
next grid time, after every step (blended latent diffusion, Avrahami et al. 2022, arXiv:2206.02779),
then pasting the known pixels back after decoding.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..device import DType
from ..inpainting import is_inpainting, masked_condition
from ..pipeline import Text2Image
from ..pixels import to_pil
from ..plan import OutputType, check_output_type, check_strength, seed_list
from ..samplers import OnStep
from .core import EVERY_STEP, decode_pasted
from .images import ImageInput, load_image, load_mask

Direction = Literal["left", "right", "up", "down"]
_PAN_SIDE = {"left": "left", "right": "right", "up": "top", "down": "bottom"}


@torch.no_grad()
def img2img(pipe: Text2Image, image: ImageInput, prompt: str | int, *, strength: float = 0.6,
            steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
            seed: int = 0, negative_prompt: str | None = None, num_images: int = 1,
            dtype: DType = "auto", output_type: OutputType = "pil",
            progress: bool = False):
    """Redraw ``image`` following ``prompt``. ``strength`` in [0, 1] is the time the input is noised
    to and sampling starts from, in ``round(steps * strength)`` steps: 0 returns the autoencoder
    round-trip of the input, 1 ignores it (on the flow path it is then the plain sample of that seed)."""
    strength, seeds = check_strength(strength), seed_list(seed, num_images)
    check_output_type(output_type)
    x0 = pipe.encode_image(load_image(image))
    if strength == 0.0:  # decode the encoding as it is: a copy in another memory layout differs by ~1e-6
        return pipe.decode(x0.expand(len(seeds), -1, -1, -1), output_type)
    plan = pipe.prepare(steps, sampler=sampler, guidance_scale=guidance_scale, guidance_interval=EVERY_STEP,
                        strength=strength)
    x0 = x0.repeat(len(seeds), 1, 1, 1)
    x = pipe.add_noise(x0, pipe.noise(seeds, tuple(x0.shape[1:])), strength)
    denoise = pipe.prompt_denoiser(prompt, plan, negative_prompt=negative_prompt, dtype=dtype, repeat=len(seeds))
    return pipe.decode(pipe.sample(x, denoise, plan, seed=seeds, progress=progress), output_type)


def latent_mask(pipe: Text2Image, mask: Tensor) -> Tensor:
    """Pixel mask (N, 1, H, W) -> latent mask: a latent cell is repainted if any of its pixels is
    (max-pool), so the repainted latents cover every masked pixel."""
    d = pipe.autoencoder.downsample
    return F.max_pool2d(mask, d) if d > 1 else mask


def reimpose(pipe: Text2Image, known: Tensor, noise: Tensor, mask: Tensor) -> OnStep:
    """Inpainting's ``on_step`` hook: after each step, reset the region where ``mask`` is 0 to the known
    latents noised to the step's end time, with the noise the sample started from."""
    keep = 1 - mask

    def hook(i: int, t: Tensor, x_next: Tensor, x0: Tensor) -> Tensor:
        return mask * x_next + keep * pipe.add_noise(known, noise, float(t))

    return hook


def variant_channels(pipe: Text2Image, known: Tensor, mask: Tensor) -> Tensor | None:
    """An inpainting variant also sees the masked latents and the mask as input channels; a plain
    model gets None (and relies on ``reimpose`` alone)."""
    cfg = pipe.model.config
    if not cfg.extra_in_channels:
        return None
    if not is_inpainting(cfg):
        raise ValueError(f"this model takes {cfg.extra_in_channels} extra input channels; inpainting knows "
                         f"only the inpainting variant's {cfg.in_channels + 1} (masked latents + mask)")
    return masked_condition(known, mask)


@torch.no_grad()
def inpaint(pipe: Text2Image, image: ImageInput, mask: ImageInput, prompt: str | int, *,
            mask_blur: float = 0.0, strength: float = 1.0, steps: int | None = None,
            guidance_scale: float | None = None, sampler: str | None = None, seed: int = 0,
            negative_prompt: str | None = None, num_images: int = 1, paste: bool = True,
            dtype: DType = "auto", output_type: OutputType = "pil",
            progress: bool = False):
    """Repaint where ``mask`` is white, with any model (an inpainting variant also gets the masked
    latents and the mask as input channels). The known region is re-imposed after every step;
    with ``paste`` the decoded image keeps the input's pixels exactly where the mask is 0 (blended
    over the edge ``mask_blur`` softens). ``strength`` < 1 starts the masked region from the
    noised input instead of pure noise."""
    strength, seeds = check_strength(strength), seed_list(seed, num_images)
    check_output_type(output_type)
    if strength == 0.0:
        raise ValueError("inpainting needs strength > 0 (at 0 nothing is repainted)")
    plan = pipe.prepare(steps, sampler=sampler, guidance_scale=guidance_scale, guidance_interval=EVERY_STEP,
                        strength=strength)
    pixels = load_image(image)
    m = load_mask(mask, (pixels.shape[-1], pixels.shape[-2]), mask_blur)
    if not bool((m > 0).any()):
        raise ValueError("the mask is all black: nothing to repaint (white = repaint)")
    known = pipe.encode_image(pixels).repeat(len(seeds), 1, 1, 1)
    noise = pipe.noise(seeds, tuple(known.shape[1:]))
    m_lat = latent_mask(pipe, m).to(known.device)
    denoise = pipe.prompt_denoiser(prompt, plan, negative_prompt=negative_prompt, dtype=dtype, repeat=len(seeds),
                                   mask_latent=variant_channels(pipe, known, m_lat))
    x = pipe.add_noise(known, noise, strength)  # the masked region starts from the same noise
    latents = pipe.sample(x, denoise, plan, seed=seeds, on_step=reimpose(pipe, known, noise, m_lat),
                          progress=progress)
    return decode_pasted(pipe, latents, output_type, (pixels, m) if paste else None)


def extend_canvas(pixels: Tensor, left: int = 0, right: int = 0, top: int = 0,
                  bottom: int = 0) -> tuple[Tensor, Tensor]:
    """(canvas, mask): the image padded by edge replication (a neutral start for the encoder) and a
    mask that is 1 exactly on the new area."""
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = {k: v for k, v in pads.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"outpaint sizes must be non-negative integers (pixels), got {bad}")
    if not any(pads.values()):
        raise ValueError("outpaint needs at least one of left, right, top, bottom > 0")
    canvas = F.pad(pixels, (left, right, top, bottom), mode="replicate")
    mask = torch.ones(1, 1, *canvas.shape[-2:])
    mask[..., top: top + pixels.shape[-2], left: left + pixels.shape[-1]] = 0
    return canvas, mask


def outpaint(pipe: Text2Image, image: ImageInput, prompt: str | int, *, left: int = 0, right: int = 0,
             top: int = 0, bottom: int = 0, **options: Any):
    """Extend the canvas by the given numbers of pixels and inpaint the new area; the original area
    is kept exactly (unless ``mask_blur`` is given). ``options``: ``inpaint``'s keyword arguments."""
    pixels = load_image(image)
    canvas, mask = extend_canvas(pixels, left, right, top, bottom)
    step = pipe.autoencoder.downsample * pipe.model.config.patch_size
    (h, w), (ch, cw) = pixels.shape[-2:], canvas.shape[-2:]
    if (ch % step or cw % step) and not (h % step or w % step):
        sides = {k: v for k, v in dict(left=left, right=right, top=top, bottom=bottom).items() if v}
        raise ValueError(f"outpaint sizes must be multiples of {step} pixels for this model, got {sides} "
                         f"(the {w}x{h} image would become {cw}x{ch})")
    return inpaint(pipe, canvas, mask, prompt, **options)


def pan(pipe: Text2Image, image: ImageInput, prompt: str | int, *, direction: Direction = "right",
        step: int = 16, frames: int = 8, seed: int = 0, **options: Any) -> list[Image.Image]:
    """A camera pan by repeated outpainting: each frame extends the previous one by ``step`` pixels
    towards ``direction`` and keeps the input-sized window at that end. Frame 0 is the input.
    ``options``: ``inpaint``'s keyword arguments."""
    if direction not in _PAN_SIDE:
        raise ValueError(f"direction must be one of {', '.join(_PAN_SIDE)}, got {direction!r}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    current = load_image(image)
    out = to_pil(current)
    for k in range(1, frames):
        wide = outpaint(pipe, current, prompt, **{_PAN_SIDE[direction]: step}, seed=seed + k,
                        output_type="tensor", **options)
        current = _far_window(wide, direction, step)
        out += to_pil(current)
    return out


def _far_window(wide: Tensor, direction: str, step: int) -> Tensor:
    """The window of the pre-extension size at the far end of an extended canvas."""
    h, w = wide.shape[-2:]
    if direction == "right":
        return wide[..., :, step:]
    if direction == "left":
        return wide[..., :, : w - step]
    if direction == "down":
        return wide[..., step:, :]
    return wide[..., : h - step, :]

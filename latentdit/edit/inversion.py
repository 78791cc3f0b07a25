"""Inversion of an image to noise, reconstruction from it, and prompt editing from an inverted state.

Inversion is the deterministic sampler on the reversed grid (``samplers.invert``; DDIM inversion,
Song et al. 2020, arXiv:2010.02502, with fixed-point refinement, Pan et al. 2023, arXiv:2309.04907).
Editing samples from the state inverted to ``t = strength`` with a new prompt, so the layout the
early (noisy) steps would have settled is already there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..device import DType
from ..lines import first_line
from ..pipeline import Text2Image
from ..plan import OutputType, check_output_type, check_strength, seed_list
from ..samplers import invert as invert_latents
from .core import EVERY_STEP, decode_pasted
from .images import ImageInput, load_image, load_mask
from .repaint import latent_mask

# Three fixed-point iterations raise the round-trip PSNR by a few dB: docs/editing.md, measured section.
DEFAULT_FIXED_POINT_ITERS = 3
# The inverse step from the clean latent stays naive. Refining it asks the denoiser's x0 estimate at
# the first noise level to return the input exactly, which a well-trained denoiser (it pulls towards
# the data it learnt) reaches only from an atypical state; the sampler's last step then magnifies
# the small errors carried down to that state, and the round trip gets much worse, not better.


@dataclass
class Inversion:
    """An image carried back along the sampler's path: ``latents`` at time ``ts[0]``. Sampling over
    ``ts`` (decreasing) with ``sampler``, conditioned on ``prompt`` without CFG, leads back to it."""

    latents: Tensor
    ts: Tensor
    prompt: str | None
    sampler: str

    @property
    def t(self) -> float:
        return float(self.ts[0])

    def save(self, path: str | os.PathLike) -> None:
        """A safetensors file with the latents, the grid and (as metadata) prompt and sampler."""
        from safetensors.torch import save_file

        meta = {"sampler": self.sampler, **({"prompt": self.prompt} if self.prompt is not None else {})}
        tensors = {"latents": self.latents.detach().cpu().contiguous(), "ts": self.ts.detach().cpu().contiguous()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Inversion:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                return cls(f.get_tensor("latents"), f.get_tensor("ts"), meta.get("prompt"),
                           meta.get("sampler", "ddim"))
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated or corrupt bytes, or not an inversion: name the file
            reason = first_line(e)
            raise ValueError(f"{path} is not a readable inversion file ({reason})") from None


@torch.no_grad()
def invert(pipe: Text2Image, image: ImageInput, prompt: str | None = None, *, steps: int | None = None,
           t_stop: float = 1.0, sampler: str = "ddim", fixed_point_iters: int | None = None,
           dtype: DType = "auto") -> Inversion:
    """Deterministic inversion of ``image`` to the latents at ``t_stop`` (1 = pure noise) that
    ``sampler`` turns back into it in ``steps`` steps. Conditioned on ``prompt`` (None: the null
    condition) without CFG, which would break the round trip. DDIM refines each inverse step but
    the first (from the clean latent) with ``fixed_point_iters`` (default 3) fixed-point
    iterations; other samplers invert naively."""
    if not 0.0 < t_stop <= 1.0:
        raise ValueError(f"t_stop must be in (0, 1], got {t_stop}")
    x0 = pipe.encode_image(load_image(image))
    ts = pipe.grid(pipe.prepare(steps, sampler=sampler).steps, t_start=t_stop)  # all the steps, ending at t_stop
    if fixed_point_iters is None:
        fixed_point_iters = DEFAULT_FIXED_POINT_ITERS if sampler == "ddim" else 0
    denoise = pipe.prompt_denoiser(prompt, None, dtype=dtype)  # no CFG: it would break the round trip
    latents = invert_latents(denoise, x0, ts, pipe.path, sampler=sampler, fixed_point_iters=fixed_point_iters,
                             refine_first_step=False)
    # contiguous, as a saved and loaded copy is: bf16 kernels can differ by layout in the last bit
    return Inversion(latents.contiguous(), ts, prompt, sampler)


@torch.no_grad()
def reconstruct(pipe: Text2Image, inversion: Inversion, *, dtype: DType = "auto",
                output_type: OutputType = "pil", progress: bool = False):
    """Sample back from inverted latents with the inversion's own prompt, grid and sampler."""
    check_output_type(output_type)
    plan = pipe.prepare(sampler=inversion.sampler).with_grid(inversion.ts)
    denoise = pipe.prompt_denoiser(inversion.prompt, None, dtype=dtype)
    return pipe.decode(pipe.sample(inversion.latents.to(pipe.device), denoise, plan, progress=progress), output_type)


@torch.no_grad()
def edit_mask(pipe: Text2Image, image: ImageInput, source_prompt: str | None, target_prompt: str, *,
              threshold: float = 0.5, t: float = 0.5, samples: int = 8, seed: int = 0,
              dtype: DType = "auto") -> Tensor:
    """Where an edit from ``source_prompt`` to ``target_prompt`` should act (DiffEdit, Couairon et
    al. 2022, arXiv:2210.11427): noise the image to ``t`` with ``samples`` seeds, average the
    absolute difference of the two prompts' clean-latent estimates over seeds and channels, and
    keep the latent cells where it reaches ``threshold`` times its maximum. Returns a (1, 1, H, W)
    pixel mask of 0/1 (1 = edit) made of whole latent cells."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
    if not 0.0 < t < 1.0:
        raise ValueError(f"mask noise level t must be in (0, 1), got {t}")
    if samples < 1:
        raise ValueError(f"mask samples must be >= 1, got {samples}")
    x0 = pipe.encode_image(load_image(image))
    x = pipe.add_noise(x0.expand(samples, -1, -1, -1), pipe.noise(seed_list(seed, samples), tuple(x0.shape[1:])), t)
    tt = torch.full((samples,), float(t), device=x.device)
    estimates = [pipe.prompt_denoiser(p, None, dtype=dtype, repeat=samples)(x, tt)
                 for p in (source_prompt, target_prompt)]
    diff = (estimates[0] - estimates[1]).abs().mean(dim=(0, 1))  # (h, w)
    if not bool(diff.max() > 0):
        raise ValueError("the two prompts give the same estimates: there is nothing to locate an edit by")
    cells = (diff >= threshold * diff.max()).float()[None, None]
    return F.interpolate(cells, scale_factor=pipe.autoencoder.downsample, mode="nearest").cpu()


@torch.no_grad()
def edit_image(pipe: Text2Image, image: ImageInput, source_prompt: str | None, target_prompt: str, *,
               strength: float = 0.8, mask: ImageInput | Literal["auto"] | None = None,
               mask_threshold: float = 0.5, negative_prompt: str | None = None, steps: int | None = None,
               guidance_scale: float | None = None, sampler: str = "ddim", fixed_point_iters: int | None = None,
               dtype: DType = "auto", output_type: OutputType = "pil",
               progress: bool = False):
    """Prompt editing: invert ``image`` under ``source_prompt`` to ``t = strength`` (in
    ``round(steps * strength)`` steps), then sample from there with ``target_prompt`` and CFG.
    Lower strength keeps more of the input; higher lets the new prompt change more.

    ``mask`` confines the edit (white = edit; ``"auto"``: ``edit_mask`` with ``mask_threshold``,
    grown by one latent cell): a second row samples ``source_prompt`` from the same inverted state
    without CFG, which retraces the input, and after every step the edited row takes it outside
    the mask; the decoded image keeps the input's pixels there. ``negative_prompt`` replaces the
    null condition in CFG; the source prompt is a good one, so guidance pushes along what the two
    prompts differ in rather than towards the target prompt as a whole."""
    strength = check_strength(strength)
    check_output_type(output_type)
    if strength == 0.0:
        raise ValueError("editing needs strength > 0 (at 0 the image is returned unchanged)")
    plan = pipe.prepare(steps, sampler=sampler, guidance_scale=guidance_scale, guidance_interval=EVERY_STEP,
                        strength=strength)
    pixels = load_image(image)
    if isinstance(mask, str) and mask == "auto":
        region = edit_mask(pipe, pixels, source_prompt, target_prompt, threshold=mask_threshold, dtype=dtype)
    else:
        region = None if mask is None else load_mask(mask, (pixels.shape[-1], pixels.shape[-2]))
    if region is not None and not bool((region > 0).any()):
        raise ValueError("the edit mask is all black: nothing to edit (white = edit)")
    inv = invert(pipe, pixels, source_prompt, steps=plan.steps, t_stop=strength, sampler=sampler,
                 fixed_point_iters=fixed_point_iters, dtype=dtype)
    denoise = pipe.prompt_denoiser(target_prompt, plan, negative_prompt=negative_prompt, dtype=dtype)
    if region is None:
        return pipe.decode(pipe.sample(inv.latents, denoise, plan, progress=progress), output_type)
    cells = F.max_pool2d(latent_mask(pipe, region).to(inv.latents.device), 3, stride=1, padding=1)
    source = pipe.prompt_denoiser(source_prompt, None, dtype=dtype)

    def both(x: Tensor, t: Tensor) -> Tensor:  # row 0 retraces the input, row 1 is the edit
        return torch.cat([source(x[:1], t[:1]), denoise(x[1:], t[1:])])

    def keep_outside(i: int, t: Tensor, x: Tensor, x0: Tensor) -> Tensor:
        return torch.cat([x[:1], cells * x[1:] + (1 - cells) * x[:1]])

    latents = pipe.sample(inv.latents.repeat(2, 1, 1, 1), both, plan, on_step=keep_outside, progress=progress)
    pixel_cells = F.interpolate(cells, scale_factor=pipe.autoencoder.downsample, mode="nearest").cpu()
    return decode_pasted(pipe, latents[1:], output_type, (pixels, pixel_cells))

"""The inpainting variant of a denoiser: the masked latent and the mask enter as extra input channels.

Made from an existing checkpoint by widening the input convolution with zero-initialised channels,
so the variant starts out as the base model, then fine-tuned on random rectangular masks (the
recipe of Stable Diffusion's inpainting model: Rombach et al. 2022, arXiv:2112.10752). Training
and sampling share ``masked_condition``, so the channels mean the same thing in both.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .config import ModelConfig
from .model import Denoiser


def inpainting_config(cfg: ModelConfig) -> ModelConfig:
    """The variant's config: ``in_channels`` masked-latent channels and one mask channel extra."""
    return dataclasses.replace(cfg, extra_in_channels=cfg.in_channels + 1)


def is_inpainting(cfg: ModelConfig) -> bool:
    """Inpainting variants predate an explicit kind: extra channels that are no control map."""
    return cfg.control is None and cfg.extra_in_channels == cfg.in_channels + 1


def to_inpainting(model: Denoiser) -> Denoiser:
    """A copy of ``model`` with the extra input channels, their weights zero: same outputs."""
    if model.config.extra_in_channels:
        raise ValueError(f"the model already takes {model.config.extra_in_channels} extra input channels")
    param = next(model.parameters())
    variant = Denoiser(inpainting_config(model.config)).to(param.device, param.dtype)
    state = model.state_dict()
    w = state["patch.weight"]  # (D, C, p, p)
    state["patch.weight"] = torch.cat([w, w.new_zeros(w.shape[0], model.config.in_channels + 1, *w.shape[2:])], 1)
    variant.load_state_dict(state)
    return variant.train(model.training)


def masked_condition(x0: Tensor, mask: Tensor) -> Tensor:
    """(N, C + 1, h, w) extra channels: the clean latents with the region to repaint (mask 1) zeroed,
    then the mask itself."""
    mask = mask.to(x0.dtype).expand(x0.shape[0], 1, *x0.shape[-2:])
    return torch.cat([x0 * (1 - mask), mask], dim=1)


def random_box_masks(n: int, height: int, width: int, *, generator: torch.Generator | None = None,
                     full: float = 0.1, min_side: float = 0.125, max_side: float = 0.75) -> Tensor:
    """(n, 1, height, width) training masks, each one axis-aligned rectangle of ones with sides drawn
    uniformly between ``min_side`` and ``max_side`` of the canvas at a uniform position; a
    fraction ``full`` is all ones, so the variant keeps generating from nothing."""
    if not 0 < min_side <= max_side <= 1 or not 0 <= full <= 1:
        raise ValueError(f"need 0 < min_side <= max_side <= 1 and 0 <= full <= 1, got "
                         f"{min_side}, {max_side}, {full}")
    u = torch.rand(n, 5, generator=generator)
    masks = torch.zeros(n, 1, height, width)
    for i, (uh, uw, uy, ux, uf) in enumerate(u.tolist()):
        if uf < full:
            masks[i] = 1
            continue
        h = max(1, round(height * (min_side + uh * (max_side - min_side))))
        w = max(1, round(width * (min_side + uw * (max_side - min_side))))
        y, x = int(uy * (height - h + 1)), int(ux * (width - w + 1))
        masks[i, :, y: y + h, x: x + w] = 1
    return masks


def training_mask_latent(x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The extra channels for one training batch of clean latents: random boxes, then
    ``masked_condition``. What the training loss passes as ``mask_latent`` for the variant."""
    masks = random_box_masks(x0.shape[0], *x0.shape[-2:], generator=generator).to(x0.device)
    return masked_condition(x0, masks)

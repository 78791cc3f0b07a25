"""The structure-conditioned variant of a denoiser (ControlNet / depth-to-image style): a control
map of the image to generate enters as extra input channels.

The map is a binary image at full image resolution: ``silhouette`` (pixels that differ from the
background) or ``edges`` (the silhouette's one-pixel outline). ``control_map`` derives it from any
RGB image, both when shards are preprocessed for training and for ``--control-from``, so the two
mean the same thing. It reaches the denoiser losslessly at latent resolution through
``pixel_unshuffle`` (a 64x64 map -> 16 channels at 16x16 for latents at 1/4 of the side), as
{-1, +1}; 0 means "no control", what control dropout trains and what ``scale`` 0 gives. The new
input weights start at zero, so the variant starts as the base model (Zhang et al. 2023,
arXiv:2302.05543, zero-initialised connections; Rombach et al. 2022, arXiv:2112.10752, depth2img's
extra input channels).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .config import ControlKind, ModelConfig
from .model import Denoiser

CONTROL_KINDS: tuple[str, ...] = typing.get_args(ControlKind)
_FOREGROUND = 40.0  # RGB distance from the background that counts as "something is here" (noise ~15)
_COVERED = 0.5  # share of the local full contrast above which a pixel is inside an object
_WINDOW = 5  # pixels: the neighbourhood whose strongest contrast stands for the object's full colour

MapInput = Tensor | np.ndarray | Image.Image | str | Path


def check_kind(kind: str) -> str:
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}; choose one of {', '.join(CONTROL_KINDS)}")
    return kind


# -- maps from images ---------------------------------------------------------------------------
def silhouette(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels at least half covered by something other than the background.

    The background is the median colour of the border. A pixel's coverage is its distance from
    the background relative to the strongest distance nearby (an anti-aliased edge pixel of a red
    object on white is half as far from white as the red interior next to it), so the 50% line
    is found for every colour alike."""
    from scipy import ndimage

    rgb = _rgb(image)
    width = max(1, min(rgb.shape[:2]) // 32)
    border = np.concatenate([rgb[:width].reshape(-1, 3), rgb[-width:].reshape(-1, 3),
                             rgb[:, :width].reshape(-1, 3), rgb[:, -width:].reshape(-1, 3)])
    dist = np.linalg.norm(rgb - np.median(border, axis=0), axis=2)
    local = ndimage.grey_dilation(dist, size=(_WINDOW, _WINDOW))
    inside = (dist > _FOREGROUND / 2) & (local > _FOREGROUND) & (dist >= _COVERED * local)
    return ndimage.binary_fill_holes(inside)


def control_map(image: Image.Image | np.ndarray, kind: str = "silhouette") -> np.ndarray:
    """(H, W) bool control map of ``kind`` derived from an RGB image."""
    from scipy import ndimage

    mask = silhouette(image)
    if check_kind(kind) == "edges":
        mask = mask & ~ndimage.binary_erosion(mask)
    return mask


def control_maps(images: list[Image.Image], kind: str) -> Tensor:
    """(N, 1, H, W) uint8 maps in {0, 1}: what preprocessing stores beside the latents."""
    return torch.from_numpy(np.stack([control_map(im, kind) for im in images])[:, None].astype(np.uint8))


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got an array of shape {array.shape}")
    return array[..., :3].astype(np.float32) * (255.0 if np.issubdtype(array.dtype, np.floating) else 1.0)


def load_control_map(source: MapInput) -> Tensor:
    """A map given as a file, a PIL image (white = 1), an (H, W) array or tensor in [0, 1], or
    (N, 1, H, W) maps -> (N, 1, H, W) float in [0, 1]."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                source = im.convert("L")
        except FileNotFoundError:
            raise ValueError(f"control map {source} not found") from None
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"control map {source} is not an image (PNG, JPEG, WebP ...)") from None
    if isinstance(source, Image.Image):
        return torch.from_numpy((np.asarray(source.convert("L")) > 127).astype(np.float32))[None, None]
    maps = torch.as_tensor(np.asarray(source) if isinstance(source, np.ndarray) else source).float()
    if maps.dim() == 2:
        maps = maps[None, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"a control map is (H, W) or (N, 1, H, W), got shape {tuple(maps.shape)}")
    if not bool(((maps >= 0) & (maps <= 1)).all()):
        raise ValueError("control map values must lie in [0, 1]")
    return maps


# -- the variant ----------------------------------------------------------------------------------
def is_control(cfg: ModelConfig) -> bool:
    return cfg.control is not None


def control_config(cfg: ModelConfig, kind: str, factor: int) -> ModelConfig:
    """The variant's config: ``factor**2`` extra channels carry a map ``factor`` times the latent side."""
    if factor < 1:
        raise ValueError(f"the map / latent side factor must be >= 1, got {factor}")
    return dataclasses.replace(cfg, control=check_kind(kind), extra_in_channels=factor * factor)


def to_control(model: Denoiser, kind: str = "silhouette", factor: int = 4) -> Denoiser:
    """A copy of ``model`` with the control channels, their weights zero: the same outputs."""
    if model.config.extra_in_channels:
        raise ValueError(f"the model already takes {model.config.extra_in_channels} extra input channels")
    param = next(model.parameters())
    variant = Denoiser(control_config(model.config, kind, factor)).to(param.device, param.dtype)
    state = model.state_dict()
    w = state["patch.weight"]  # (D, C, p, p)
    state["patch.weight"] = torch.cat([w, w.new_zeros(w.shape[0], factor * factor, *w.shape[2:])], 1)
    variant.load_state_dict(state)
    return variant.train(model.training)


def control_channels(maps: Tensor, factor: int, scale: float | Tensor = 1.0) -> Tensor:
    """(N, 1, H, W) maps in [0, 1] -> (N, factor**2, H/factor, W/factor) extra channels: the map as
    {-1, +1} times ``scale`` (0: no control, the input control dropout trains)."""
    return F.pixel_unshuffle(maps * 2 - 1, factor) * scale


def training_control(control: Tensor | None, x0: Tensor, cfg: ModelConfig, drop_rate: float,
                     gen: torch.Generator) -> Tensor:
    """A training batch's extra channels: its stored maps, each dropped (zeroed) with probability
    ``drop_rate`` so that scale 0 means "no control" and ``--control-scale`` interpolates."""
    if control is None:
        raise ValueError(f"a {cfg.control} control model trains on shards with control maps: "
                         f"preprocess with --control {cfg.control}")
    f = cfg.control_factor
    if tuple(control.shape[-2:]) != (x0.shape[-2] * f, x0.shape[-1] * f):
        raise ValueError(f"the shards' control maps are {tuple(control.shape[-2:])} for latents "
                         f"{tuple(x0.shape[-2:])}; model.extra_in_channels = {cfg.extra_in_channels} needs "
                         f"maps {f}x the latent side")
    keep = torch.rand(control.shape[0], generator=gen, device=gen.device) >= drop_rate
    return control_channels(control.float(), cfg.control_factor, keep.float()[:, None, None, None])


def control_input(cfg: ModelConfig, control: MapInput | None, n: int, latent_hw: tuple[int, int],
                  scale: float = 1.0, device: torch.device | str = "cpu") -> Tensor | None:
    """The extra channels for sampling ``n`` images with a control model (None for other models):
    the map (one for all images, or one per image) at ``scale`` in [0, 1]; no map: no control."""
    if not is_control(cfg):
        if control is not None:
            raise ValueError("this model is not a control model: it takes no control map "
                             "(fine-tune one with --model.control, docs/control.md)")
        return None
    if not (isinstance(scale, (int, float)) and 0.0 <= scale <= 1.0):
        raise ValueError(f"control scale must be a number in [0, 1], got {scale!r}")
    f, (h, w) = cfg.control_factor, latent_hw
    if control is None:
        return torch.zeros(n, f * f, h, w, device=device)
    maps = load_control_map(control)
    if tuple(maps.shape[-2:]) != (h * f, w * f):
        raise ValueError(f"the control map is {maps.shape[-1]}x{maps.shape[-2]} (width x height); images "
                         f"of {w * f}x{h * f} need a map of that size")
    if maps.shape[0] not in (1, n):
        raise ValueError(f"{maps.shape[0]} control maps for {n} images: give one, or one per image")
    return control_channels(maps.expand(n, -1, -1, -1).to(device), f, float(scale))


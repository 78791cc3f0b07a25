"""Image autoencoders: pixels in [-1, 1] <-> scaled latents the denoiser works in.

Latents are stored scaled, `(z - shift) * scale`, so they have roughly unit variance, which the
noise schedules assume (Rombach et al. 2022, arXiv:2112.10752, Sec. 3 and App. G). scale and shift
come from the autoencoder's config: SD 0.18215, SDXL 0.13025, SD3/Flux add a shift; a config with
per-channel `latents_mean`/`latents_std` uses them as diffusers' pipelines do.

    kl        diffusers AutoencoderKL: a hub id, a local folder, or an already-built object
    identity  pixel-space models: the latent is the image (C=3, downsample 1)

Autoencoders are used frozen: encode/decode run under no_grad, take and return float32 on the
caller's side and cast to the autoencoder's own dtype inside.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from .config import parse_dtype
from .lines import first_line

AutoencoderKind = Literal["kl", "identity"]
AUTOENCODER_KINDS: tuple[str, ...] = ("kl", "identity")
_RANGE_SLACK = 1e-3  # resampling overshoot allowed beyond [-1, 1] before we call it a user error


class AutoencoderNotAvailable(OSError):
    """The autoencoder weights (or diffusers) cannot be found; the message says what to provide."""


# ----------------------------------------------------------------------------- interface


class Autoencoder(ABC):
    """images (N, 3, H, W) in [-1, 1] <-> latents (N, C, H/d, W/d), already scaled."""

    kind: str
    path: str | None
    latent_channels: int
    downsample: int
    shift: torch.Tensor  # (1, C, 1, 1) or scalar: latents = (z - shift) * scale
    scale: torch.Tensor

    def encode(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents; the posterior mode unless `sample` (then a draw, seeded by `generator`)."""
        self._check_images(images)
        with torch.no_grad():
            z = self._encode_raw(images, sample, generator).float()
        return (z - self.shift.to(z.device)) * self.scale.to(z.device)

    def decode(self, latents: torch.Tensor, *, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """Images in [-1, 1]. `tile` (latent pixels) decodes big images piecewise to bound memory,
        blending overlapping tiles with linear ramps so seams do not show."""
        self._check_latents(latents)
        if tile is not None and (overlap < 0 or tile <= overlap):
            raise ValueError(f"decode needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        z = latents.float() / self.scale.to(latents.device) + self.shift.to(latents.device)
        with torch.no_grad():
            if tile is None or (tile >= z.shape[-2] and tile >= z.shape[-1]):
                images = self._decode_raw(z).float()
            else:
                images = _decode_tiled(
                    lambda t: self._decode_raw(t).float(), z, tile, overlap, self.downsample
                )
        return images.clamp(-1, 1)

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from scaled latents with gradients flowing back to the latents, not clamped:
        for guidance by a loss on pixels (``decode`` runs without gradients)."""
        self._check_latents(latents)
        z = latents / self.scale.to(latents) + self.shift.to(latents)
        return self._decode_raw(z).float()

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records so `load_autoencoder(**d)` reloads the same autoencoder."""
        return {
            "kind": self.kind,
            "path": self.path,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }

    @abstractmethod
    def _encode_raw(
        self, images: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Unscaled latents z."""

    @abstractmethod
    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Images from unscaled latents, not clamped."""

    def _check_images(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"encode() takes images (N, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"encode() takes float images in [-1, 1], got {images.dtype}; see from_pil()")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image size {h}x{w} must be a multiple of the downsample factor {self.downsample}"
            )
        lo, hi = torch.aminmax(images)
        if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"encode() takes images in [-1, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]; "
                "map 0..255 pixels with from_pil() or x / 127.5 - 1"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"decode() takes latents (N, {self.latent_channels}, h, w), got {shape}")


# ----------------------------------------------------------------------------- tiling


def _decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, downsample: int
) -> torch.Tensor:
    """Decode `z` in tile x tile latent windows overlapping by at least `overlap`, and blend.

    Each tile is weighted by a ramp that rises over the overlap on its interior edges, so every
    output pixel is a convex mix that favours tiles where it is far from a tile border (where the
    decoder's zero padding and per-tile GroupNorm statistics err most).
    """
    n, _, h, w = z.shape
    d = downsample
    out, weight = None, torch.zeros(1, 1, h * d, w * d, device=z.device)
    for y in _tile_starts(h, tile, tile - overlap):
        for x in _tile_starts(w, tile, tile - overlap):
            part = decode(z[..., y : y + tile, x : x + tile])  # (N, 3, th*d, tw*d)
            if out is None:
                out = torch.zeros(n, part.shape[1], h * d, w * d, device=z.device, dtype=part.dtype)
            wy = _ramp(part.shape[-2], overlap * d, y > 0, y + tile < h, z.device)
            wx = _ramp(part.shape[-1], overlap * d, x > 0, x + tile < w, z.device)
            mix = wy[:, None] * wx[None, :]  # (th*d, tw*d)
            out[..., y * d : y * d + part.shape[-2], x * d : x * d + part.shape[-1]] += part * mix
            weight[..., y * d : y * d + part.shape[-2], x * d : x * d + part.shape[-1]] += mix
    return out / weight


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts covering [0, size); the last window is flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(length: int, width: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """1 in the middle, linear (never 0) over `width` at the edges that border another tile."""
    w = torch.ones(length, device=device)
    if width == 0:
        return w
    edge = (torch.arange(min(width, length), device=device) + 0.5) / width
    if rise:
        w[: edge.numel()] = torch.minimum(w[: edge.numel()], edge)
    if fall:
        w[-edge.numel() :] = torch.minimum(w[-edge.numel() :], edge.flip(0))
    return w


# ----------------------------------------------------------------------------- implementations


class KLAutoencoder(Autoencoder):
    """diffusers AutoencoderKL (SD, SDXL, SD3, Flux, or one trained here)."""

    kind = "kl"

    def __init__(self, vae: torch.nn.Module, path: str | None = None) -> None:
        cfg = vae.config
        self.vae = vae.eval()
        self.path = path
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.shift, self.scale = _latent_normalisation(cfg)

    @property
    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def _encode_raw(
        self, images: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        p = self._param
        posterior = self.vae.encode(images.to(p.device, p.dtype)).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mode()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        p = self._param
        return self.vae.decode(z.to(p.device, p.dtype)).sample


def _latent_normalisation(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with latents = (z - shift) * scale, matching diffusers' pipelines."""
    scaling = float(cfg.scaling_factor)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # per-channel statistics (e.g. Playground v2.5)
        shape = (1, -1, 1, 1)
        return torch.tensor(mean).view(shape).float(), (scaling / torch.tensor(std)).view(shape).float()
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return torch.tensor(float(shift)), torch.tensor(scaling)


class IdentityAutoencoder(Autoencoder):
    """Pixel-space diffusion: the latent is the image itself."""

    kind = "identity"
    path = None
    latent_channels = 3
    downsample = 1

    def __init__(self) -> None:
        self.shift, self.scale = torch.tensor(0.0), torch.tensor(1.0)

    def _encode_raw(
        self, images: torch.Tensor, sample: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        return images.clone()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ----------------------------------------------------------------------------- loading

_LOAD_KW = ("latent_channels", "downsample", "dtype")


def load_autoencoder(
    kind: AutoencoderKind | str, path: str | None = None, device: str | torch.device = "cpu", **kw: Any
) -> Autoencoder:
    """Build an autoencoder; `load_autoencoder(**ae.describe())` reloads the same one.

    path (kind="kl"): a folder written by `AutoencoderKL.save_pretrained`, a diffusers pipeline
    folder with vae/, or a hub id such as "stabilityai/sd-vae-ft-mse". kw: `dtype` (torch dtype or
    its name); `latent_channels` and `downsample`, as a checkpoint recorded them, are checked.
    """
    if kind not in AUTOENCODER_KINDS:
        raise ValueError(f"unknown autoencoder kind {kind!r}; valid kinds: {', '.join(AUTOENCODER_KINDS)}")
    unknown = sorted(set(kw) - set(_LOAD_KW))
    if unknown:
        raise ValueError(f"load_autoencoder got unexpected options {unknown}; valid: {', '.join(_LOAD_KW)}")
    if kind == "identity":
        if path is not None:
            raise ValueError("autoencoder kind 'identity' has no weights and takes no path")
        ae: Autoencoder = IdentityAutoencoder()
    else:
        ae = _load_kl(path, device, parse_dtype(kw.get("dtype")))
    _check_recorded(ae, kw)
    return ae


def _check_recorded(ae: Autoencoder, kw: dict[str, Any]) -> None:
    """A denoiser trained on one latent space cannot read another's: fail loudly."""
    for key in ("latent_channels", "downsample"):
        want, got = kw.get(key), getattr(ae, key)
        if want is not None and int(want) != got:
            raise ValueError(
                f"autoencoder {ae.kind!r} at {ae.path!r} has {key}={got}, but {key}={want} was recorded; "
                "these are not the weights the model was trained with"
            )


def _load_kl(path: str | None, device: str | torch.device, dtype: torch.dtype | None) -> Autoencoder:
    if path is None:
        raise ValueError(
            "autoencoder kind 'kl' needs path=: a folder saved with AutoencoderKL.save_pretrained "
            "or a hub id such as 'stabilityai/sd-vae-ft-mse'"
        )
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise AutoencoderNotAvailable(
            "autoencoder kind 'kl' needs diffusers (pip install diffusers)"
        ) from None
    source = _vae_subfolder(os.path.expanduser(path))
    extra = {} if dtype is None else {"torch_dtype": dtype}
    try:
        vae = _from_local_or_hub(
            lambda local: AutoencoderKL.from_pretrained(source, local_files_only=local, **extra), source
        )
    except Exception as err:
        reason = first_line(err)
        weights = [f for f in _WEIGHT_FILES if os.path.isfile(os.path.join(source, f))]
        if weights and "config" not in reason.lower():  # the files are there, so they are damaged
            raise ValueError(f"the autoencoder weights in {source} are unreadable or truncated "
                             f"({reason})") from None
        if isinstance(err, (OSError, ValueError)):
            raise AutoencoderNotAvailable(_missing_message(path, err)) from None
        raise
    _check_finite_params(vae, source)
    return KLAutoencoder(vae.to(device), path=path)


_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _check_finite_params(vae: torch.nn.Module, source: str) -> None:
    """Damaged weight bytes read as NaN or inf: name the file instead of decoding black images."""
    for name, p in vae.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"the autoencoder weights in {source} are damaged: {name} holds non-finite "
                             "values (NaN or inf)")


def _vae_subfolder(source: str) -> str:
    """A local diffusers pipeline folder keeps the autoencoder in vae/."""
    sub = os.path.join(source, "vae")
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else source


def _from_local_or_hub(load: Callable[[bool], Any], source: str) -> Any:
    """A local folder or the HF cache first (no network); the hub only for an id not cached."""
    local = os.path.isabs(source) or source.startswith(".") or os.path.exists(source)
    if local:
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise OSError(f"no config.json in folder {source!r}")
        return load(True)
    try:
        return load(True)
    except OSError:
        return load(False)


def _missing_message(path: str, err: Exception) -> str:
    reason = first_line(err)
    return (
        f"autoencoder 'kl' is not available from {path!r}: {reason}. Provide a folder with config.json "
        "and diffusion_pytorch_model.safetensors (AutoencoderKL.save_pretrained writes one; "
        "`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR` fetches SD's on a machine "
        "with network), or train one with latentdit"
    )


# ----------------------------------------------------------------------------- storage and PIL


def quantize_latents(latents: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """uint8 codes, symmetric around 128, for storing precomputed latents at 1/4 the size.

    scale=None picks max|latents| / 127 so nothing clips; a fixed scale (shared across shards)
    clips values beyond +-127 * scale. Rounding error is at most scale / 2 inside that range.
    """
    if scale is None:
        peak = float(latents.abs().max()) if latents.numel() else 0.0
        scale = peak / 127 if peak > 0 else 1.0
    if not scale > 0 or not np.isfinite(scale):
        raise ValueError(f"quantize_latents scale must be a positive finite number, got {scale!r}")
    codes = torch.round(latents.float() / scale) + 128
    return codes.clamp(0, 255).to(torch.uint8), float(scale)


def dequantize_latents(q: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 latents back from `quantize_latents` codes."""
    if q.dtype != torch.uint8:
        raise ValueError(f"dequantize_latents takes uint8 codes, got {q.dtype}")
    return (q.float() - 128) * scale

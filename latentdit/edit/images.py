"""Reading images and masks from what users have at hand, and writing animations."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from ..pixels import from_pil

ImageInput = Image.Image | str | os.PathLike | np.ndarray | Tensor


def load_image(image: ImageInput) -> Tensor:
    """(1, 3, H, W) float32 in [-1, 1] from a PIL image, an image file, an (H, W, 3) array (uint8,
    or float in [0, 1]) or a tensor already in [-1, 1], (3, H, W) or (1, 3, H, W)."""
    if torch.is_tensor(image):
        x = image.detach().float().cpu()
        x = x[None] if x.dim() == 3 else x
        if x.dim() != 4 or tuple(x.shape[:2]) != (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        return x
    if isinstance(image, np.ndarray):
        array = _as_uint8(image, "image")
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be (H, W, 3) or (H, W, 4), got {array.shape}")
        return from_pil([Image.fromarray(array[..., :3])])
    return from_pil([_open(image, "image")])


def load_mask(mask: ImageInput, size: tuple[int, int], blur: float = 0.0) -> Tensor:
    """(1, 1, H, W) float32 in [0, 1], white (1) = repaint, from a PIL image, a file, an (H, W)
    array (bool, uint8 or float in [0, 1]) or a tensor; ``size`` is the image's (width, height).
    ``blur`` > 0 softens the edge with a Gaussian of that radius in pixels."""
    if blur < 0:
        raise ValueError(f"mask blur must be >= 0, got {blur}")
    if torch.is_tensor(mask):
        mask = mask.detach().cpu().squeeze().numpy()
    if isinstance(mask, np.ndarray):
        array = _as_uint8(mask, "mask")
        if array.ndim == 3 and array.shape[2] in (3, 4):
            array = np.asarray(Image.fromarray(array[..., :3]).convert("L"))
        if array.ndim != 2:
            raise ValueError(f"a mask array must be (H, W) or (H, W, 3), got {array.shape}")
        img = Image.fromarray(array)
    else:
        img = _open(mask, "mask").convert("L")
    if img.size != tuple(size):
        raise ValueError(f"mask size {img.size[0]}x{img.size[1]} does not match the image size "
                         f"{size[0]}x{size[1]} (width x height)")
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]


def _open(source: Image.Image | str | os.PathLike, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{what} must be a PIL image, a file path, an array or a tensor, "
                         f"got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """0..255 from uint8, bool (True = 255) or float (0..1) arrays; other integer arrays are
    ambiguous (0/1 or 0..255?) and rejected."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise ValueError(f"a float {what} array must lie in [0, 1], got [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]")
        return np.round(a * 255).astype(np.uint8)
    raise ValueError(f"a {what} array must be uint8 (0..255), bool or float (0..1), got {a.dtype}")


def check_animation_path(path: str | os.PathLike, fps: float = 8.0) -> Path:
    """The path, if an animation can be written there at ``fps`` frames a second: .gif always,
    .mp4 with imageio installed. Called before the frames are made, so a bad name fails at once."""
    if not 0 < fps < float("inf"):
        raise ValueError(f"fps must be a positive number, got {fps}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"animations are written as .gif or .mp4, got {path.name!r}")
    if suffix == ".mp4":
        try:
            import imageio  # noqa: F401
        except ImportError:
            raise ValueError("writing MP4 needs imageio (pip install 'imageio[ffmpeg]'); "
                             "or write a .gif, which needs nothing extra") from None
    return path


def save_animation(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write frames as a looping GIF (PIL) or an MP4 (needs imageio with its ffmpeg plugin)."""
    path = check_animation_path(path, fps)
    if not frames:
        raise ValueError("no frames to write")
    if path.suffix.lower() == ".mp4":
        _write_mp4(frames, path, fps)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=round(1000 / fps), loop=0)
    return path


def _write_mp4(frames: Sequence[Image.Image], path: Path, fps: float) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([np.asarray(f.convert("RGB")) for f in frames]), fps=fps)

"""Pixels: PIL images <-> (N, 3, H, W) tensors in [-1, 1], resize-and-crop to a square, PSNR and
image grids.
Every module that turns pictures into tensors or back uses these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # image files every folder reader takes


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> RGB PIL images (values outside the range are clipped)."""
    from PIL import Image

    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"to_pil takes images (N, 3, H, W), got {shape}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return [Image.fromarray(a) for a in array]


def from_pil(images: list[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 in [-1, 1]; size is (width, height), PIL's order.

    Without `size` all images must already share one size (no silent resizing).
    """
    from PIL import Image

    if len(images) == 0:
        raise ValueError("from_pil got an empty list")
    rgb = [im.convert("RGB") for im in images]
    if size is not None:
        rgb = [
            im if im.size == tuple(size) else im.resize(tuple(size), Image.Resampling.LANCZOS) for im in rgb
        ]
    sizes = sorted({im.size for im in rgb})
    if len(sizes) > 1:
        raise ValueError(f"from_pil got images of different sizes {sizes}; pass size=(width, height)")
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in rgb])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def fit_image(image: Image.Image, size: int | None, resample: int | None = None) -> Image.Image:
    """RGB, the short side resized to `size`, then a centred square crop (no distortion, no flips).
    `resample`: a PIL filter, Lanczos by default."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    w, h = image.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((rw, rh), PILImage.Resampling.LANCZOS if resample is None else resample)
    left, top = (rw - size) // 2, (rh - size) // 2
    return image.crop((left, top, left + size, top + size))


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, 10 log10(range^2 / MSE); images in [-1, 1] have range 2."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"psnr needs two batches (N, ...) of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    mse = (x.detach().float() - y.detach().float().to(x.device)).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Paste equally sized images into rows of ``cols``."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid

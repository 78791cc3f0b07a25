"""latentdit: a small, fast latent diffusion transformer for text-to-image.

``from latentdit import Text2Image, Denoiser`` works without importing heavy optional packages:
names resolve lazily on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Denoiser": "model",
    "build_denoiser": "model",
    "ModelConfig": "config",
    "DiffusionConfig": "config",
    "SamplingConfig": "config",
    "model_preset": "config",
    "NoisePath": "schedules",
    "Text2Image": "pipeline",
    "load_text_encoder": "text",
    "load_autoencoder": "vae",
    "save_pretrained": "checkpoint",
    "load_denoiser": "checkpoint",
    "img2img": "edit",
    "inpaint": "edit",
    "outpaint": "edit",
    "invert": "edit",
    "reconstruct": "edit",
    "edit_image": "edit",
    "edit_mask": "edit",
    "interpolate": "edit",
    "pan": "edit",
    "sample_guided": "edit",
    "color_loss": "edit",
    "save_animation": "edit",
    "Inversion": "edit",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'latentdit' has no attribute {name!r}")

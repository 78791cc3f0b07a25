"""The options of one sampling run, resolved and checked (``SamplingPlan``), and the checks of a
call's arguments that every entry point shares: prompts, negative prompts, seeds, strength,
output type. Each names the bad argument in one ``ValueError``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

OutputType = Literal["pil", "tensor", "latent"]


@dataclass(frozen=True)
class SamplingPlan:
    """What ``Text2Image.prepare`` resolves: the options of one sampling run, none left None."""

    steps: int  # steps actually run (fewer than asked when strength < 1)
    ts: Tensor  # decreasing time grid, len steps + 1, ts[0] = strength, ts[-1] = 0
    sampler: str
    options: dict[str, float]  # extra keyword arguments of the sampler (DDIM's eta)
    guidance_scale: float
    guidance_interval: tuple[float, float]
    count_contrast: float = 0.0  # latentdit.counts; only text-to-image sampling (``pipe(...)``) applies it

    @property
    def t_start(self) -> float:
        return float(self.ts[0])

    def with_grid(self, ts: Tensor) -> SamplingPlan:
        """The same options over another grid (an inversion's, to sample back along it)."""
        return dataclasses.replace(self, ts=ts, steps=len(ts) - 1)


def prompt_list(prompts: Any) -> list[str | int]:
    if hasattr(prompts, "tolist") and not isinstance(prompts, (str, int)):  # an array of class ids
        prompts = prompts.tolist()
    if isinstance(prompts, (str, int)):
        prompts = [prompts]
    elif isinstance(prompts, Sequence):
        prompts = list(prompts)
    else:
        raise ValueError(f"prompts must be a string, a class id or a list of them, got {prompts!r}")
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def negative_list(negative: str | Sequence[str] | None, n: int) -> list[str] | None:
    if negative is None:
        return None
    negative = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negative) != n:
        raise ValueError(f"got {len(negative)} negative prompts for {n} prompts")
    return negative


def check_output_type(output_type: str) -> None:
    """Fail before sampling, not after, on an unknown output type."""
    if output_type not in ("pil", "tensor", "latent"):
        raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent', got {output_type!r}")


def check_strength(strength: float) -> float:
    """A number in [0, 1]: the time an edit noises its input to and sampling starts from."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return float(strength)


def prompt_seeds(seed: int, index: int, images: int) -> list[int]:
    """The seeds of the images of prompt number ``index`` in a list of prompts: seed + 1000 * index
    + k, so each prompt keeps its images however the list is batched."""
    return [seed + 1000 * index + k for k in range(images)]


def seed_list(seed: int | Sequence[int], n: int) -> list[int]:
    """The seed of each of n images: ``seed + i`` from an int, or one given seed per image."""
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {n}")
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral):
        seeds = [int(seed) + i for i in range(n)]
    elif isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise ValueError(f"seed must be an integer or one integer per image, got {seed!r}")
    else:
        seeds = [int(s) if isinstance(s, numbers.Integral) else s for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images (prompts x num_images_per_prompt)")
    for s in seeds:
        if not isinstance(s, int) or not -2**63 <= s < 2**64:
            raise ValueError(f"seeds must be integers in [-2**63, 2**64), got {s!r}")
    return seeds


def check_finite(v: float, name: str) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def check_positive(v: int, name: str) -> int:
    if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)

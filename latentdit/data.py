"""Precomputed shards: encode images and captions ONCE, then stream latents + text embeddings.

Training a latent DiT spends most of its time in the autoencoder and the text encoder if they run
every step; PixArt-alpha and SD3 precompute both (Chen et al. 2023, arXiv:2310.00426, Sec. 2.4).

    out_dir/manifest.json              what was encoded, with which encoders, shard list
    out_dir/null.safetensors           the empty prompt "" (for classifier-free guidance dropout)
    out_dir/shard-00000.safetensors    latents (fp16 | uint8 + latent_scale), tokens (N, L, D) fp16,
                                       mask (N, L) uint8, pooled (N, P) fp16
    out_dir/shard-00000.jsonl          {"caption", "attributes"} per row

Every file is written to a temp file and renamed, and the manifest is rewritten after each shard,
so an interrupted `preprocess` resumes after the last complete shard. `ShardReader.batches` is an
infinite stream whose step k depends only on (seed, k): resuming training at step k needs no
replay, and `world_size` ranks split each global batch without overlap.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
import zlib
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as load_tensors

from .checkpoint import atomic_save_tensors, atomic_write_bytes
from .text import TextEmbeddings, TextEncoder
from .vae import Autoencoder, dequantize_latents, from_pil, quantize_latents

if TYPE_CHECKING:
    from PIL import Image

FORMAT = "latentdit-shards"
VERSION = 1
MANIFEST = "manifest.json"
NULL_FILE = "null.safetensors"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LatentFormat = Literal["fp16", "uint8"]
_MAX_PROBLEMS = 100  # file names kept for the report; the count is always exact


@dataclass
class Sample:
    image: Image.Image
    caption: str
    attributes: dict | None = None


# ----------------------------------------------------------------------------- sources


class FolderSource:
    """Iterator over an image-caption folder; unusable files are skipped and counted.

    `skipped` counts images that could not be decoded or have no caption; `problems` names the
    first of them with the reason. `total` is the number of candidate images.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist")
        self.entries = _folder_entries(self.root)  # [(image path, caption or None, attributes)]
        self.total = len(self.entries)
        self.skipped = 0
        self.problems: list[str] = []
        self._next = 0

    def __iter__(self) -> FolderSource:
        return self

    def __next__(self) -> Sample:
        while self._next < self.total:
            file, caption, attributes = self.entries[self._next]
            self._next += 1
            if caption is None:
                self._skip(file, "no caption (.txt file missing)")
                continue
            try:
                image = _open_rgb(file)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
                self._skip(file, f"unreadable image ({type(err).__name__}: {err})")
                continue
            return Sample(image, caption, attributes)
        raise StopIteration

    def _skip(self, file: Path, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{os.path.relpath(file, self.root)}: {reason}")


def folder_source(path: str | os.PathLike) -> FolderSource:
    """Images (png/jpg/webp, searched recursively) with captions from `captions.jsonl`
    (`{"file", "caption"[, "attributes"]}` per line) or a same-named `.txt` per image."""
    return FolderSource(path)


def _folder_entries(root: Path) -> list[tuple[Path, str | None, dict | None]]:
    index = root / "captions.jsonl"
    if index.exists():
        return [(root / r["file"], r["caption"], r.get("attributes")) for r in _read_caption_index(index)]
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(f"{root} has no captions.jsonl and no {'/'.join(IMAGE_EXTENSIONS)} images")
    return [(p, _read_txt(p.with_suffix(".txt")), None) for p in images]


def _read_caption_index(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(
            row.get("caption"), str
        ):
            raise ValueError(f'{path}:{number} needs {{"file": str, "caption": str}}, got {line[:120]!r}')
        rows.append(row)
    return rows


def _read_txt(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _open_rgb(path: Path) -> Image.Image:
    """Decode fully now (so corrupt files fail here), apply EXIF rotation, put alpha on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


class ShapesSource:
    """The procedural shapes world as Samples 0..n-1; `skip(k)` jumps ahead without rendering."""

    def __init__(self, n: int, size: int = 64, split: str = "train", seed: int = 0) -> None:
        from .datasets.shapes import ShapesDataset

        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.dataset = ShapesDataset(size=size, split=split, seed=seed)
        self.total, self._next = n, 0

    def __iter__(self) -> ShapesSource:
        return self

    def __next__(self) -> Sample:
        if self._next >= self.total:
            raise StopIteration
        s = self.dataset[self._next]
        self._next += 1
        return Sample(s.image, s.caption, s.attributes)

    def skip(self, k: int) -> None:
        self._next = min(self.total, self._next + k)


def shapes_source(n: int, *, size: int = 64, split: str = "train", seed: int = 0) -> ShapesSource:
    return ShapesSource(n, size, split, seed)


# ----------------------------------------------------------------------------- text cache


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
            return _half(emb.tokens), emb.mask, _half(emb.pooled)
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
    return _half(emb.tokens[i, :n]), emb.mask[i, :n].clone(), _half(emb.pooled[i])


def _untrim(entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor], length: int):
    tokens, mask, pooled = entry
    extra = length - tokens.shape[0]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False), pooled


def _half(x: torch.Tensor) -> torch.Tensor:
    """fp16 for storage; values beyond fp16's range would silently become inf."""
    y = x.detach().float().cpu().half()
    if not torch.isfinite(y).all():
        raise ValueError(f"values up to {float(x.abs().max()):.3g} overflow fp16; use latent_format='uint8'")
    return y


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
) -> dict:
    """Encode `source` (at most `n` samples in total) into shards in `out_dir`; returns the manifest.

    Re-running on the same `out_dir` with the same encoders resumes after the last complete shard
    (skipping that many source samples; the source must yield the same order). `image_size`
    resizes the short side and centre-crops to a square; without it all images must share a size.
    `caption_cache`: distinct captions whose embeddings are kept (0 disables the cache).
    """
    _check_preprocess_args(n, shard_size, batch_size, latent_format, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, autoencoder, text_encoder, latent_format)
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


def _start_manifest(out: Path, ae: Autoencoder, te: TextEncoder, latent_format: str) -> dict:
    """The existing manifest (checked, with any damaged shards dropped) or a fresh one."""
    ae_desc, te_desc = _jsonable(ae.describe()), _jsonable(te.describe())
    if (out / MANIFEST).exists():
        manifest = _read_manifest(out)
        if manifest["autoencoder"] != ae_desc or manifest["text_encoder"] != te_desc:
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


def _write_null(out: Path, te: TextEncoder) -> TextEmbeddings:
    """The empty prompt, for classifier-free guidance dropout during training."""
    null = fit_length(te.encode([""]), te.max_length)
    atomic_save_tensors({"tokens": null.tokens, "mask": null.mask.to(torch.uint8), "pooled": null.pooled},
                        out / NULL_FILE)
    return null


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _drop_damaged_shards(out: Path, manifest: dict) -> dict:
    """Keep shards up to the first missing/truncated/corrupt one, so a re-run rewrites the rest."""
    for k, entry in enumerate(manifest["shards"]):
        path = out / entry["name"]
        ok = path.is_file() and entry.get("crc32") in (None, _crc(path.read_bytes()))
        if not ok or not _sidecar_ok(out, entry):
            warnings.warn(f"{entry['name']} is missing, truncated or corrupt; re-encoding from it on",
                          stacklevel=3)
            manifest["shards"] = manifest["shards"][:k]
            manifest["num_samples"] = sum(e["count"] for e in manifest["shards"])
            break
    return manifest


def _sidecar_ok(out: Path, entry: dict) -> bool:
    path = out / _sidecar_name(entry["name"])
    return path.is_file() and entry.get("captions_bytes") in (None, path.stat().st_size)


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
        warnings.warn(f"skipped {source.skipped} unusable files, e.g. {problems}", stacklevel=3)


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
        shard = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "tokens", "mask", "pooled")}
        yield shard | {"rows": [row for p in parts for row in p["rows"]]}
        if count < shard_size:
            return


def _encode_batch(samples: list[Sample], manifest: dict, ae: Autoencoder, cache: CaptionCache,
                  image_size: int | None) -> dict:
    images = [_fit_image(s.image, image_size) for s in samples]
    latents = ae.encode(from_pil(_same_size(images)))  # (B, C, H, W) float32
    shape = list(latents.shape[1:])
    if manifest["latent_shape"] is None:
        manifest["latent_shape"] = shape
    elif manifest["latent_shape"] != shape:
        raise ValueError(f"latents of shape {shape} do not match the shards' {manifest['latent_shape']}; "
                         "pass image_size= so every image is resized to one size")
    tokens, mask, pooled = cache.encode([s.caption for s in samples])
    rows = [{"caption": s.caption, "attributes": getattr(s, "attributes", None)} for s in samples]
    return {"latents": latents.cpu(), "tokens": tokens, "mask": mask, "pooled": pooled, "rows": rows}


def _fit_image(image: Image.Image, size: int | None) -> Image.Image:
    """Resize the short side to `size`, then centre-crop a square (no distortion, no flips)."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    w, h = image.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((rw, rh), PILImage.Resampling.LANCZOS)
    left, top = (rw - size) // 2, (rh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _same_size(images: list[Image.Image]) -> list[Image.Image]:
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes {sizes[:4]}; pass image_size= to resize them")
    return images


def _write_shard(out: Path, manifest: dict, shard: dict, latent_format: str, skipped: int) -> None:
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    tensors = {"tokens": shard["tokens"], "mask": shard["mask"].to(torch.uint8), "pooled": shard["pooled"]}
    if latent_format == "uint8":
        tensors["latents"], scale = quantize_latents(shard["latents"])
        tensors["latent_scale"] = torch.tensor(scale, dtype=torch.float32)
    else:
        tensors["latents"] = _half(shard["latents"])
    atomic_save_tensors(tensors, out / name, metadata={"format": "pt"})
    lines = "".join(_json_line(r) for r in shard["rows"]).encode()
    atomic_write_bytes(out / _sidecar_name(name), lines)
    count = len(shard["rows"])
    manifest["shards"].append({"name": name, "count": count, "bytes": (out / name).stat().st_size,
                               "crc32": _crc((out / name).read_bytes()), "captions_bytes": len(lines)})
    manifest["num_samples"] += count
    manifest["skipped"] = skipped
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())


def _json_line(row: dict) -> str:
    try:
        return json.dumps(row, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as err:
        caption = row["caption"]
        raise ValueError(f"attributes of the sample captioned {caption!r} are not JSON: {err}") from None


def _sidecar_name(shard_name: str) -> str:
    return shard_name.removesuffix(".safetensors") + ".jsonl"


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- reading


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, H, W) float32
    tokens: torch.Tensor  # (B, L, D) float32
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, P) float32
    captions: list[str]
    index: torch.Tensor  # (B,) global sample ids (storage order)

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move (and cast the float tensors); mask and index only move."""
        move = dict(device=device, dtype=dtype)
        return Batch(self.latents.to(**move), self.tokens.to(**move), self.mask.to(device=device),
                     self.pooled.to(**move), self.captions, self.index.to(device=device))

    @property
    def text(self) -> TextEmbeddings:
        return TextEmbeddings(self.tokens, self.mask, self.pooled)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} has no {MANIFEST}; run preprocess (latentdit.data.preprocess) first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}); re-run preprocess") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{path} has format version {manifest['version']}; "
                         f"this latentdit reads <= {VERSION}")
    return manifest


_TEXT_KEYS = ("name", "path", "dim", "pooled_dim")
_AE_KEYS = ("kind", "path", "latent_channels", "downsample")


class ShardReader:
    """Validated view of a shard folder, and a deterministic infinite batch stream over it."""

    max_loaded = 2  # shards kept decoded in RAM (the one being read and the next)

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        shards = self.manifest["shards"]
        self.counts = [int(s["count"]) for s in shards]
        self.num_samples = int(self.manifest["num_samples"])
        if sum(self.counts) != self.num_samples:
            raise ValueError(f"{self.directory}/{MANIFEST} lists {sum(self.counts)} samples in its shards "
                             f"but num_samples={self.num_samples}; re-run preprocess")
        if self.num_samples == 0:
            raise ValueError(f"{self.directory} holds no samples yet; run preprocess to completion")
        self.latent_shape = tuple(int(d) for d in self.manifest["latent_shape"])
        self.text_len = int(self.manifest["text_len"])
        self.starts = [0, *itertools.accumulate(self.counts)][:-1]  # global id of each shard's row 0
        for entry in shards:
            self._check_shard(entry)
        self.loads = 0  # how many times a shard was read from disk (for tests and tuning)
        self._loaded: OrderedDict[int, dict] = OrderedDict()
        self._orders: dict[tuple[int, int], tuple[np.ndarray, list[int]]] = {}
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _check_shard(self, entry: dict) -> None:
        """Cheap checks (sizes, header, row counts); contents are checksummed when loaded."""
        name, path = entry["name"], self.directory / entry["name"]
        bad = ValueError(f"{name} is truncated or corrupt; re-run preprocess")
        if not path.is_file() or entry.get("bytes") not in (None, path.stat().st_size):
            raise bad
        if not _sidecar_ok(self.directory, entry):
            raise ValueError(f"{_sidecar_name(name)} is missing or truncated; re-run preprocess")
        try:
            with safe_open(path, "pt") as f:
                rows = {k: f.get_slice(k).get_shape()[0] for k in ("latents", "tokens", "mask", "pooled")}
        except Exception:
            raise bad from None
        if set(rows.values()) != {entry["count"]}:
            raise ValueError(f"{name} holds {rows} rows but the manifest says {entry['count']}; "
                             "re-run preprocess")

    def check_compatible(self, text_encoder: dict | TextEncoder | None = None,
                         autoencoder: dict | Autoencoder | None = None) -> None:
        """ValueError if a model (its recorded encoders) or a config expects other encoders.

        Accepts `describe()` dicts (as a checkpoint's config.json records them) or the encoders.
        The text length is not compared: the stored L is padded and masked.
        """
        self._compare("text encoder", text_encoder, self.manifest["text_encoder"], _TEXT_KEYS)
        self._compare("autoencoder", autoencoder, self.manifest["autoencoder"], _AE_KEYS)

    def _compare(self, what: str, want: Any, have: dict, keys: tuple[str, ...]) -> None:
        if want is None:
            return
        want = _jsonable(want.describe() if hasattr(want, "describe") else dict(want))
        diff = [k for k in keys if k in want and k in have and not _same_value(k, want[k], have[k])]
        if diff:
            raise ValueError(f"{self.directory} was preprocessed with {what} {have}, but {want} is "
                             f"expected (differs in {', '.join(diff)}); re-run preprocess with that {what}")

    def null_condition(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding of the empty prompt "": tokens (1, L, D), mask (1, L) bool, pooled (1, P)."""
        path = self.directory / self.manifest.get("null", NULL_FILE)
        try:
            t = load_tensors(path.read_bytes())
        except Exception:
            raise ValueError(f"{path.name} is missing or corrupt; re-run preprocess") from None
        return t["tokens"].float(), t["mask"].bool(), t["pooled"].float()

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> float:
        return self.num_samples / (batch_size * world_size)

    def batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[Batch]:
        """Infinite stream; step k = rows rank::world_size of global slice [k*B*W, (k+1)*B*W).

        The global order per epoch is a seeded permutation of shards, each shard's rows in a seeded
        permutation, so a shard is read once per epoch and step k depends only on (seed, k).
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed and start_step must be >= 0, got {seed} and {start_step}")
        return self._stream(batch_size, seed, start_step, rank, world_size)

    def _stream(self, batch_size: int, seed: int, step: int, rank: int, world_size: int) -> Iterator[Batch]:
        span = batch_size * world_size
        for k in itertools.count(step):
            positions = range(k * span + rank, (k + 1) * span, world_size)
            yield self._gather([self._locate(p, seed) for p in positions])

    def _locate(self, position: int, seed: int) -> tuple[int, int]:
        """Stream position -> (shard, row in shard)."""
        epoch, offset = divmod(position, self.num_samples)
        order, starts = self._epoch_order(seed, epoch)
        j = bisect_right(starts, offset) - 1
        shard = int(order[j])
        return shard, int(self._row_perm(seed, epoch, shard)[offset - starts[j]])

    def _epoch_order(self, seed: int, epoch: int) -> tuple[np.ndarray, list[int]]:
        if (seed, epoch) not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            order = np.random.default_rng([seed, epoch, 0, 0]).permutation(len(self.counts))
            starts = [0, *itertools.accumulate(self.counts[i] for i in order)][:-1]
            self._orders[seed, epoch] = (order, starts)
        return self._orders[seed, epoch]

    def _row_perm(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        if (seed, epoch, shard) not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            rng = np.random.default_rng([seed, epoch, 1, shard])
            self._perms[seed, epoch, shard] = rng.permutation(self.counts[shard])
        return self._perms[seed, epoch, shard]

    def _gather(self, where: list[tuple[int, int]]) -> Batch:
        parts: dict[str, list] = {k: [] for k in ("latents", "tokens", "mask", "pooled", "captions")}
        for shard, group in itertools.groupby(where, key=lambda sr: sr[0]):
            rows = torch.tensor([r for _, r in group])
            data = self._shard(shard)
            for key in ("latents", "tokens", "mask", "pooled"):
                parts[key].append(data[key][rows])
            parts["captions"] += [data["captions"][r] for r in rows.tolist()]
        index = torch.tensor([self.starts[s] + r for s, r in where])
        return Batch(torch.cat(parts["latents"]).float(), torch.cat(parts["tokens"]).float(),
                     torch.cat(parts["mask"]), torch.cat(parts["pooled"]).float(), parts["captions"], index)

    def _shard(self, k: int) -> dict:
        if k in self._loaded:
            self._loaded.move_to_end(k)
            return self._loaded[k]
        self._loaded[k] = self._load(k)
        self.loads += 1
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return self._loaded[k]

    def _load(self, k: int) -> dict:
        entry = self.manifest["shards"][k]
        raw = (self.directory / entry["name"]).read_bytes()
        bad = ValueError(f"{entry['name']} is truncated or corrupt; re-run preprocess")
        if entry.get("crc32") not in (None, _crc(raw)):
            raise bad
        try:
            t = load_tensors(raw)
        except Exception:
            raise bad from None
        latents = t["latents"]
        if "latent_scale" in t:  # uint8 codes; dequantised here, per shard scale
            latents = dequantize_latents(latents, float(t["latent_scale"]))
        lines = (self.directory / _sidecar_name(entry["name"])).read_text(encoding="utf-8").splitlines()
        if len(lines) != entry["count"]:
            raise ValueError(f"{_sidecar_name(entry['name'])} has {len(lines)} rows, expected "
                             f"{entry['count']}; re-run preprocess")
        captions = [json.loads(line)["caption"] for line in lines]
        return {"latents": latents, "tokens": t["tokens"], "mask": t["mask"].bool(), "pooled": t["pooled"],
                "captions": captions}

    def rows(self, shard: int) -> list[dict]:
        """The sidecar rows ({"caption", "attributes"}) of one shard, in storage order."""
        name = _sidecar_name(self.manifest["shards"][shard]["name"])
        return [json.loads(line) for line in (self.directory / name).read_text(encoding="utf-8").splitlines()]


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key != "path" or a is None or b is None:
        return a == b
    pa, pb = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return os.path.normpath(str(a)) == os.path.normpath(str(b))

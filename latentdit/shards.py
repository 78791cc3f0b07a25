"""The shard format: its manifest, checks, and ``ShardReader``, the deterministic batch stream.

``preprocess`` (data.py) writes a folder of shards; this module reads it. ``ShardReader.batches``
is an infinite stream whose step k depends only on (seed, k): resuming training at step k needs no
replay, and ``world_size`` ranks split each global batch without overlap.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors

from .lines import read_json, read_jsonl
from .text import TextEmbeddings
from .vae import dequantize_latents

if TYPE_CHECKING:
    from .text import TextEncoder
    from .vae import Autoencoder

FORMAT = "latentdit-shards"
VERSION = 1
MANIFEST = "manifest.json"
NULL_FILE = "null.safetensors"
OPTIONAL_KEYS = ("labels", "control", "ground_tokens", "ground_boxes")  # tensors only some shards hold


def jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def sidecar_ok(out: Path, entry: dict) -> bool:
    path = out / sidecar_name(entry["name"])
    return path.is_file() and entry.get("captions_bytes") in (None, path.stat().st_size)


def sidecar_name(shard_name: str) -> str:
    return shard_name.removesuffix(".safetensors") + ".jsonl"


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- reading


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, H, W) float32
    text: TextEmbeddings  # tokens (B, L, D) float32, mask (B, L) bool, pooled (B, P) float32
    captions: list[str]
    index: torch.Tensor  # (B,) global sample ids (storage order)
    labels: torch.Tensor | None = None  # (B,) int64 class ids, for shards preprocessed with labels
    control: torch.Tensor | None = None  # (B, 1, H, W) uint8 control maps, for shards preprocessed with them
    # (region id per text token (B, L) uint8, boxes (B, K, 5) float32), for shards preprocessed with grounding
    grounding: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move (and cast the float tensors); mask and index only move."""
        move = dict(device=device, dtype=dtype)
        labels = None if self.labels is None else self.labels.to(device=device)
        control = None if self.control is None else self.control.to(device=device)
        grounding = None if self.grounding is None else tuple(g.to(device=device) for g in self.grounding)
        return Batch(self.latents.to(**move), self.text.to(device=device, dtype=dtype), self.captions,
                     self.index.to(device=device), labels, control, grounding)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} has no {MANIFEST}; run preprocess (latentdit.data.preprocess) first")
    try:
        manifest = read_json(path)
    except ValueError as err:
        raise ValueError(f"{err}; re-run preprocess") from None
    if manifest.get("format") != FORMAT:
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
        self.manifest = read_manifest(self.directory)
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

    @property
    def num_classes(self) -> int:
        """Classes the shards' labels range over; 0 when they were preprocessed without labels."""
        return int((self.manifest.get("labels") or {}).get("num_classes", 0))

    @property
    def control(self) -> str | None:
        """The kind of control map stored beside each latent, or None."""
        return self.manifest.get("control")

    @property
    def grounding(self) -> bool:
        """Whether each sample's caption tokens are tagged with the image boxes they name."""
        return self.manifest.get("grounding") is not None

    @property
    def classes(self) -> list[str] | None:
        """Class names (index = id) when the source named them (folders, ClassLabel)."""
        return (self.manifest.get("labels") or {}).get("classes")

    def _check_shard(self, entry: dict) -> None:
        """Cheap checks (sizes, header, row counts); contents are checksummed when loaded."""
        name, path = entry["name"], self.directory / entry["name"]
        bad = ValueError(f"shard {path} is truncated or corrupt; re-run preprocess")
        if not path.is_file() or entry.get("bytes") not in (None, path.stat().st_size):
            raise bad
        if not sidecar_ok(self.directory, entry):
            raise ValueError(f"{self.directory / sidecar_name(name)} is missing or truncated; re-run preprocess")
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
        want = jsonable(want.describe() if hasattr(want, "describe") else dict(want))
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
        keys = (("latents", "tokens", "mask", "pooled") + (("labels",) if self.num_classes else ())
                + (("control",) if self.control else ())
                + (("ground_tokens", "ground_boxes") if self.grounding else ()))
        parts: dict[str, list] = {k: [] for k in (*keys, "captions")}
        for shard, group in itertools.groupby(where, key=lambda sr: sr[0]):
            rows = torch.tensor([r for _, r in group])
            data = self._shard(shard)
            for key in keys:
                parts[key].append(data[key][rows])
            parts["captions"] += [data["captions"][r] for r in rows.tolist()]
        index = torch.tensor([self.starts[s] + r for s, r in where])
        text = TextEmbeddings(torch.cat(parts["tokens"]).float(), torch.cat(parts["mask"]),
                              torch.cat(parts["pooled"]).float())
        return Batch(torch.cat(parts["latents"]).float(), text, parts["captions"], index,
                     torch.cat(parts["labels"]).long() if self.num_classes else None,
                     torch.cat(parts["control"]) if self.control else None,
                     (torch.cat(parts["ground_tokens"]), torch.cat(parts["ground_boxes"])) if self.grounding else None)

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
        bad = ValueError(f"shard {self.directory / entry['name']} is truncated or corrupt; re-run preprocess")
        if entry.get("crc32") not in (None, crc(raw)):
            raise bad
        try:
            t = load_tensors(raw)
        except Exception:
            raise bad from None
        latents = t["latents"]
        if "latent_scale" in t:  # uint8 codes; dequantised here, per shard scale
            latents = dequantize_latents(latents, float(t["latent_scale"]))
        captions = [row["caption"] for row in self._sidecar(entry)]
        if self.num_classes and "labels" not in t:
            raise ValueError(f"{entry['name']} has no labels but the manifest says it should; re-run preprocess")
        if self.control and "control" not in t:
            raise ValueError(f"{entry['name']} has no control maps but the manifest says it should; re-run preprocess")
        if self.grounding and not {"ground_tokens", "ground_boxes"} <= t.keys():
            raise ValueError(f"{entry['name']} has no grounding but the manifest says it should; re-run preprocess")
        return {"latents": latents, "tokens": t["tokens"], "mask": t["mask"].bool(), "pooled": t["pooled"],
                "captions": captions, "labels": t.get("labels"), "control": t.get("control"),
                "ground_tokens": t.get("ground_tokens"), "ground_boxes": t.get("ground_boxes")}

    def rows(self, shard: int) -> list[dict]:
        """The sidecar rows ({"caption", "attributes"}) of one shard, in storage order."""
        return self._sidecar(self.manifest["shards"][shard])

    def _sidecar(self, entry: dict) -> list[dict]:
        path = self.directory / sidecar_name(entry["name"])
        try:
            rows = [row for _, row in read_jsonl(path)]
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is corrupt ({err}); re-run preprocess") from None
        if len(rows) != entry["count"] or not all("caption" in r for r in rows):
            raise ValueError(f"{path} has {len(rows)} rows, expected {entry['count']} with captions; "
                             "re-run preprocess")
        return rows


def same_description(a: dict, b: dict) -> bool:
    """Two encoder descriptions with the same keys and values (paths compared as files)."""
    return a.keys() == b.keys() and all(_same_value(k, a[k], b[k]) for k in a)


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key != "path" or a is None or b is None:
        return a == b
    pa, pb = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return os.path.normpath(str(a)) == os.path.normpath(str(b))

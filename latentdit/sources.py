"""Image sources for ``preprocess`` and the autoencoder trainer: captioned folders, class folders,
the procedural shapes data, and (in ``datasets/archives.py``) webdataset tars, img2dataset
output and Hugging Face datasets.

A source is any iterable of ``Sample`` (``samples.py``). Bad inputs are skipped and counted by
kind (``skips``), never fatal; ``problems`` names the first few.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .lines import read_jsonl
from .pixels import IMAGE_SUFFIXES, fit_image, from_pil
from .samples import Sample, Skip, SkipLog, decode_caption, decode_image, decode_label

if TYPE_CHECKING:
    from torch import Tensor

    from .train_config import AEConfig

# ----------------------------------------------------------------------------- folders


class FolderSource(SkipLog):
    """Iterator over an image folder; unusable files are skipped and counted by kind.

    Captions come from ``captions.jsonl`` or a same-named ``.txt``. With ``labels=True`` the
    class is the image's top-level sub-folder (sorted names -> ids 0..K-1, ``classes``), and an
    image without a caption is captioned with its class name. ``total``: candidate images.
    """

    def __init__(self, path: str | os.PathLike, labels: bool = False) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist")
        self.labels = labels
        self.entries = _folder_entries(self.root)  # [(image path, caption or None, attributes)]
        if labels:
            self.classes = sorted({p.relative_to(self.root).parts[0] for p, _, _ in self.entries
                                   if len(p.relative_to(self.root).parts) > 1})
            if not self.classes:
                raise ValueError(f"{self.root} has no class sub-folders (labels come from folder names)")
        self.total = len(self.entries)
        self._init_log()
        self._next = 0

    def __iter__(self) -> FolderSource:
        return self

    def __next__(self) -> Sample:
        while self._next < self.total:
            file, caption, attributes = self.entries[self._next]
            self._next += 1
            try:
                return self._sample(file, caption, attributes)
            except Skip as err:
                self._skip(os.path.relpath(file, self.root), err)
        raise StopIteration

    def _sample(self, file: Path, caption: Any, attributes: dict | None) -> Sample:
        label = None
        if self.labels:
            parts = file.relative_to(self.root).parts
            label = decode_label(parts[0] if len(parts) > 1 else None, self.classes)
            if caption is None:
                caption = self.classes[label]
        text = decode_caption(caption)
        return Sample(decode_image(file), text, attributes, label)


def folder_source(path: str | os.PathLike, labels: bool = False) -> FolderSource:
    """Images (png/jpg/webp, searched recursively) with captions from `captions.jsonl`
    (`{"file", "caption"[, "attributes"]}` per line) or a same-named `.txt` per image; with
    `labels=True`, class labels from the sub-folder names."""
    return FolderSource(path, labels)


def _folder_entries(root: Path) -> list[tuple[Path, Any, dict | None]]:
    index = root / "captions.jsonl"
    if index.exists():
        return [(root / r["file"], r["caption"], r.get("attributes")) for r in _read_caption_index(index)]
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{root} has no captions.jsonl and no {'/'.join(IMAGE_SUFFIXES)} images")
    return [(p, _read_txt(p.with_suffix(".txt")), None) for p in images]


def _read_caption_index(path: Path) -> list[dict]:
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f'{path}:{number} needs {{"file": str, "caption": str}}, got {json.dumps(row)[:120]}')
        rows.append(row)
    return rows


def _read_txt(path: Path) -> bytes | None:
    """Raw bytes: decoding (and a non-UTF-8 skip) happens per sample, not while listing."""
    return path.read_bytes() if path.is_file() else None


# ----------------------------------------------------------------------------- shapes


class ShapesSource(SkipLog):
    """The procedural shapes world as Samples 0..n-1; `skip(k)` jumps ahead without rendering."""

    def __init__(self, n: int, size: int = 64, split: str = "train", seed: int = 0,
                 scene_weights: tuple[float, ...] | None = None, lang: str = "en",
                 count_layout: str = "any") -> None:
        from .datasets.shapes import ShapesDataset

        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        weights = None if scene_weights is None else tuple(float(w) for w in scene_weights)
        self.dataset = ShapesDataset(size=size, split=split, seed=seed, scene_weights=weights, lang=lang,
                                     count_layout=count_layout)
        self.total, self._next = n, 0
        self._init_log()

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


def shapes_source(n: int, *, size: int = 64, split: str = "train", seed: int = 0,
                  scene_weights: tuple[float, ...] | None = None, lang: str = "en",
                  count_layout: str = "any") -> ShapesSource:
    """`scene_weights`: relative frequencies of the single / relation / count scenes (default equal);
    `lang`: the caption language, "en", "zh" or "en+zh"; `count_layout`: "any", or "distinct" to keep
    fewer than four copies out of the four corners (`ShapesDataset`)."""
    return ShapesSource(n, size, split, seed, scene_weights, lang, count_layout)


# ----------------------------------------------------------------------------- autoencoder training images


class ImageSource:
    """Training images by index (any index >= 0) and a fixed held-out evaluation batch."""

    def __init__(self, train: Callable[[int], Image.Image], length: int | None,
                 heldout: list[Image.Image]) -> None:
        self._train, self.length, self.heldout = train, length, heldout

    def image(self, index: int) -> Image.Image:
        return self._train(index if self.length is None else index % self.length)


def make_source(cfg: AEConfig) -> ImageSource:
    from .datasets import mnist

    if cfg.data == "shapes":
        return _shapes_source(cfg)
    if mnist.is_digit_set(cfg.data):
        return _digit_source(cfg)
    return _folder_source(cfg)


def _digit_source(cfg: AEConfig) -> ImageSource:
    """A digit set's training split, padded to the autoencoder's image size; its held-out split's
    first images for evaluation."""
    from .datasets import mnist

    train = mnist.digit_set(cfg.data, "train", cfg.image_size)
    held = mnist.digit_set(cfg.data, "heldout", cfg.image_size)
    return ImageSource(train.image, train.total, [held.image(i) for i in range(min(cfg.eval_images, held.total))])


def _shapes_source(cfg: AEConfig) -> ImageSource:
    from .datasets.shapes import ShapesDataset

    train = ShapesDataset(size=cfg.image_size, split="train", seed=cfg.seed)
    held = ShapesDataset(size=cfg.image_size, split="heldout", seed=cfg.seed)
    return ImageSource(lambda i: train[i].image, None, [held[i].image for i in range(cfg.eval_images)])


def _folder_source(cfg: AEConfig) -> ImageSource:
    """An image folder (captions are not needed): the last images are held out."""
    files = _folder_images(Path(cfg.data))
    held = min(cfg.eval_images, max(1, len(files) // 10))
    if len(files) < 2:
        raise ValueError(f"image folder {cfg.data!r} needs at least 2 images (train + held out), "
                         f"found {len(files)}")
    cache: dict[int, Image.Image] = {}

    def train(i: int) -> Image.Image:
        if i not in cache:
            cache[i] = _load_square(files[i], cfg.image_size)
        return cache[i]

    return ImageSource(train, len(files) - held, [_load_square(f, cfg.image_size) for f in files[-held:]])


def _folder_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"data must be 'shapes', a digit set ('fashion-mnist', 'mnist') or an image folder; "
                         f"{str(root)!r} is none of them")
    return [entry[0] for entry in folder_source(root).entries]


def _load_square(path: Path, size: int) -> Image.Image:
    """Resize the short side to `size` and centre-crop (no flips: they break left/right)."""
    from PIL import Image

    with Image.open(path) as im:
        return fit_image(im, size)


def train_batch(source: ImageSource, step: int, batch_size: int) -> Tensor:
    """Batch `step`: samples step * batch_size + row, so resuming needs no loader state."""
    start = step * batch_size
    return from_pil([source.image(start + row) for row in range(batch_size)])


# ----------------------------------------------------------------------------- dispatch


def open_source(spec: str | os.PathLike, *, n: int | None = None, size: int = 64, split: str = "train",
                seed: int = 0, labels: bool = False, image_column: str | None = None,
                caption_column: str | None = None, label_column: str | None = None,
                scene_weights: tuple[float, ...] | None = None, lang: str = "en",
                count_layout: str = "any") -> SkipLog:
    """The source a ``--source`` value names: "shapes"; "fashion-mnist" or a folder of MNIST-format
    files, "mnist" or an unpacked npm ``mnist`` package (labelled, padded to `size`); .tar shards
    (paths, brace patterns, URLs); .parquet files; a ``save_to_disk`` dataset folder; a folder of
    tars or parquet files; an image folder (with ``labels``: class sub-folders). `scene_weights`,
    `lang` (the caption language) and `count_layout` apply to "shapes" only."""
    from .datasets import archives, mnist

    text = str(spec)
    if scene_weights is not None and text != "shapes":
        raise ValueError(f"scene weights apply to the shapes source only, not to {text!r}")
    if lang != "en" and text != "shapes":
        raise ValueError(f"a caption language applies to the shapes source only, not to {text!r}")
    if count_layout != "any" and text != "shapes":
        raise ValueError(f"a count layout applies to the shapes source only, not to {text!r}")
    if mnist.is_digit_set(text):
        return mnist.digit_set(text, split, size)
    columns = dict(image_column=image_column, caption_column=caption_column, label_column=label_column)
    if text == "shapes":
        if not n:
            raise ValueError("n is required with the shapes source (the dataset is infinite)")
        return shapes_source(n, size=size, split=split, seed=seed, scene_weights=scene_weights, lang=lang,
                             count_layout=count_layout)
    path = Path(text)
    if ".tar" in text and not path.is_dir():
        return archives.tar_source(text, labels)
    if ".parquet" in text and not path.is_dir():
        return archives.parquet_source(text, labels=labels, **columns)
    if not path.is_dir():
        raise ValueError(f"source {text!r} is not 'shapes', a .tar / .parquet path or an existing folder")
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return archives.hf_source(path, split=split, labels=labels, **columns)
    if any(path.glob("*.tar")):
        return archives.tar_source(path, labels)
    if any(path.glob("*.parquet")):
        return archives.parquet_source(path, labels=labels, **columns)
    return folder_source(path, labels)

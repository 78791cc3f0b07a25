"""Image sources for ``preprocess``: a folder of captioned images, or the procedural shapes data.

A source is any iterable of ``Sample``; a ``skipped`` attribute counts unreadable inputs (corrupt
images are skipped and counted, never fatal) and ``problems`` names the first few.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
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



"""Sources for data packed the way large image-caption sets ship: webdataset tar shards (what
img2dataset writes by default), parquet tables (img2dataset's other layout) and Hugging Face
``datasets`` saved with ``save_to_disk``.

Each yields ``samples.Sample`` and counts bad items by kind, like the folder source. Tar files
are read with the standard library, one member at a time, so a shard never has to fit in memory.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..pixels import IMAGE_SUFFIXES
from ..samples import (
    Sample,
    Skip,
    SkipLog,
    caption_from_json,
    decode_caption,
    decode_image,
    decode_label,
)

_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_SUFFIXES)  # webdataset extensions of an image
_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
_CAPTION_COLUMNS = ("txt", "caption", "text")
_LABEL_COLUMNS = ("cls", "label", "labels")


# ----------------------------------------------------------------------------- paths


def expand_braces(pattern: str) -> list[str]:
    """``data-{000..009}.tar`` -> 10 names (zero padding kept), ``{a,b}`` -> 2; nested and several
    groups expand left to right, as webdataset and bash do."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} counts down")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        parts = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


def expand_paths(spec: str | os.PathLike | list, suffix: str = ".tar") -> list[str]:
    """Brace patterns, globs, folders (every `suffix` file inside) and URLs -> files to read."""
    specs = [str(s) for s in spec] if isinstance(spec, list) else expand_braces(str(spec))
    out: list[str] = []
    for s in specs:
        if "://" in s:
            out.append(s)
        elif Path(s).is_dir():
            out += sorted(str(p) for p in Path(s).glob(f"*{suffix}"))
        elif any(c in s for c in "*?["):
            out += sorted(glob.glob(s))
        elif Path(s).is_file():
            out.append(s)
        else:
            raise ValueError(f"{s!r} does not exist")
    if not out:
        raise ValueError(f"{spec!r} names no {suffix} files")
    return out


def _open_stream(path: str):
    if "://" in path:  # fsspec (a dependency of `datasets`) reads s3://, https://, file:// ...
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{path}: reading URLs needs fsspec (pip install fsspec)") from None
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


# ----------------------------------------------------------------------------- webdataset


class TarSource(SkipLog):
    """webdataset shards: members sharing a key (the name up to the first dot of its basename)
    form one sample, e.g. ``000042.jpg``, ``000042.txt``/``.json``, ``000042.cls``.

    A truncated or corrupt tar keeps the samples read before the damage and counts the rest as
    one "bad-archive" skip; the next shard is read as usual.
    """

    def __init__(self, spec: str | os.PathLike | list, labels: bool = False,
                 classes: list[str] | None = None) -> None:
        self.paths = expand_paths(spec)
        self.labels, self.classes = labels, classes
        self.total = None
        self._init_log()
        self._it = self._samples()

    def __iter__(self) -> TarSource:
        return self

    def __next__(self) -> Sample:
        return next(self._it)

    def _samples(self) -> Iterator[Sample]:
        for path in self.paths:
            for key, files in self._groups(path):
                try:
                    yield self._sample(files)
                except Skip as err:
                    self._skip(f"{os.path.basename(path)}:{key}", err)

    def _groups(self, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) in archive order; damage ends the shard with a skip."""
        key, files = None, {}
        try:
            with _open_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if base.startswith("."):
                        continue
                    k, _, ext = base.partition(".")
                    k = os.path.join(os.path.dirname(member.name), k)
                    if k != key and files:
                        yield key, files
                        files = {}
                    key = k
                    files[ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:  # the sample being read is lost with it
            self._skip(os.path.basename(path), Skip("bad-archive", f"{type(err).__name__}: {err}"))
            return
        if files:
            yield key, files

    def _sample(self, files: dict[str, bytes]) -> Sample:
        image = next((files[e] for e in _IMAGE_KEYS if e in files), None)
        if image is None:
            raise Skip("no-image", f"no {'/'.join(_IMAGE_KEYS)} member among {sorted(files)}")
        caption = files.get("txt")
        if caption is None and "json" in files:
            caption = caption_from_json(files["json"])
        label = decode_label(files.get("cls"), self.classes) if self.labels else None
        if caption is None and label is not None:
            caption = self.classes[label] if self.classes else str(label)
        return Sample(decode_image(image), decode_caption(caption), None, label)


def tar_source(spec: str | os.PathLike | list, labels: bool = False,
               classes: list[str] | None = None) -> TarSource:
    """webdataset / img2dataset tar shards (paths, brace patterns, globs, folders, fsspec URLs)."""
    return TarSource(spec, labels, classes)


# ----------------------------------------------------------------------------- tables


class TableSource(SkipLog):
    """Rows of a parquet file or a saved Hugging Face dataset: an image column (bytes, a path,
    ``{"bytes", "path"}`` as ``datasets.Image`` stores it, or a PIL image), a caption column and,
    with ``labels``, a label column (a ``ClassLabel`` names the classes)."""

    def __init__(self, rows: Any, columns: list[str], *, image_column: str | None, caption_column: str | None,
                 label_column: str | None, labels: bool, classes: list[str] | None, total: int | None,
                 name: str) -> None:
        self.image_column = _pick(image_column, _IMAGE_COLUMNS, columns, "image", name)
        self.caption_column = _pick(caption_column, _CAPTION_COLUMNS, columns, "caption", name,
                                    required=not labels)
        self.label_column = _pick(label_column, _LABEL_COLUMNS, columns, "label", name) if labels else None
        self.labels, self.classes, self.total, self.name = labels, classes, total, name
        self._rows = rows
        self._init_log()
        self._it = self._samples()

    def __iter__(self) -> TableSource:
        return self

    def __next__(self) -> Sample:
        return next(self._it)

    def _samples(self) -> Iterator[Sample]:
        for i, row in enumerate(self._rows):
            try:
                yield self._sample(row)
            except Skip as err:
                self._skip(f"{self.name} row {i}", err)

    def _sample(self, row: dict) -> Sample:
        label = decode_label(row.get(self.label_column), self.classes) if self.labels else None
        caption = row.get(self.caption_column) if self.caption_column else None
        if caption is None and label is not None:
            caption = self.classes[label] if self.classes else str(label)
        return Sample(_table_image(row.get(self.image_column)), decode_caption(caption), None, label)


def _table_image(value: Any):
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        from ..samples import to_rgb

        return to_rgb(value)
    if value is None:
        raise Skip("no-image")
    return decode_image(value)


def _pick(given: str | None, candidates: tuple[str, ...], columns: list[str], what: str, name: str,
          required: bool = True) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{name} has no column {given!r} (--{what}-column); its columns are {columns}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise ValueError(f"{name}: no {what} column among {columns}; name it with --{what}-column")
    return found


def parquet_source(paths: str | os.PathLike | list, *, image_column: str | None = None,
                   caption_column: str | None = None, label_column: str | None = None,
                   labels: bool = False, classes: list[str] | None = None) -> TableSource:
    """Parquet files (img2dataset's parquet layout: ``jpg`` bytes + ``txt``), read batch by batch."""
    import pyarrow.parquet as pq

    files = expand_paths(paths, ".parquet")
    try:
        metas = [pq.ParquetFile(f) for f in files]
    except Exception as err:
        raise ValueError(f"cannot read parquet {paths}: {err}") from None
    columns = metas[0].schema_arrow.names
    rows = (row for m in metas for batch in m.iter_batches(batch_size=256) for row in batch.to_pylist())
    return TableSource(rows, columns, image_column=image_column, caption_column=caption_column,
                       label_column=label_column, labels=labels, classes=classes,
                       total=sum(m.metadata.num_rows for m in metas), name=os.path.basename(str(files[0])))


def hf_source(path: str | os.PathLike, *, split: str = "train", image_column: str | None = None,
              caption_column: str | None = None, label_column: str | None = None,
              labels: bool = False) -> TableSource:
    """A dataset saved with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``, then `split`)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("reading a Hugging Face dataset needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    columns = list(ds.column_names)
    image_col = _pick(image_column, _IMAGE_COLUMNS, columns, "image", str(path))
    if isinstance(ds.features.get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # bytes: we decode (and count) ourselves
    label_col = _pick(label_column, _LABEL_COLUMNS, columns, "label", str(path)) if labels else None
    feature = ds.features.get(label_col) if label_col else None
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return TableSource(iter(ds), columns, image_column=image_col, caption_column=caption_column,
                       label_column=label_col, labels=labels, classes=classes, total=len(ds),
                       name=os.path.basename(str(path).rstrip("/")))

"""What an image source yields (``Sample``) and how a raw item becomes one: image, caption and
label decoding, with every unusable input raised as a ``Skip`` of a named kind and counted by a
``SkipLog``. Odd but valid images (CMYK, palette + alpha, 16-bit, EXIF rotation) are converted,
not skipped. The sources themselves live in ``sources.py`` and ``datasets/``."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

MIN_SIDE = 8  # images smaller than this on either side carry no usable content
MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused before decoding (decompression bombs)
_MAX_PROBLEMS = 100  # names kept for the report; the counts are always exact


@dataclass
class Sample:
    image: Image.Image
    caption: str
    attributes: dict | None = None
    label: int | None = None


SKIP_KINDS = {
    "unreadable": "unreadable image", "too-large": "image too large (decompression bomb?)",
    "too-small": "image too small", "no-caption": "no caption", "bad-caption": "unusable caption",
    "empty-caption": "empty caption", "no-label": "no class label", "bad-label": "bad class label",
    "no-image": "no image", "bad-archive": "unreadable archive",
}


class Skip(Exception):
    """An input that cannot be used; ``kind`` (a key of SKIP_KINDS) is the counter it goes to."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(SKIP_KINDS[kind] + (f" ({detail})" if detail else ""))
        self.kind = kind


class SkipLog:
    """Skip accounting shared by the sources: ``skipped`` in total, ``skips`` by kind."""

    classes: list[str] | None = None  # class names, index = label, when the source has labels

    def _init_log(self) -> None:
        self.skips: Counter[str] = Counter()
        self.problems: list[str] = []

    @property
    def skipped(self) -> int:
        return sum(self.skips.values())

    def _skip(self, where: str, err: Skip) -> None:
        self.skips[err.kind] += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{where}: {err}")


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes | str | os.PathLike, *, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decoded RGB image; raises ``Skip`` ("unreadable", "too-large", "too-small").

    The size is read from the header and checked before decoding, so a bomb costs nothing.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Skip("too-large", f"{w}x{h} pixels (limit {max_pixels})")
            if min(w, h) < min_side:
                raise Skip("too-small", f"{w}x{h} (sides under {min_side} px)")
            im.load()
            return to_rgb(im)
    except Skip:
        raise
    except Image.DecompressionBombError:  # PIL's own, stricter check on some formats
        raise Skip("too-large", f"over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
        raise Skip("unreadable", f"{type(err).__name__}: {err}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF rotation applied, alpha composited on white, 16-bit and float scaled, CMYK converted."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float32)
        top = 65535.0 if a.max() > 255 else 255.0  # "I" holds 16-bit PNGs; 8-bit data stays as is
        return Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_caption(raw: bytes | str | None) -> str:
    """A stripped caption; raises ``Skip`` ("no-caption", "bad-caption", "empty-caption")."""
    if raw is None:
        raise Skip("no-caption")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Skip("bad-caption", f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, str):
        raise Skip("bad-caption", f"a {type(raw).__name__}, not text")
    text = raw.strip()
    if not text or "\x00" in text:
        raise Skip("empty-caption" if not text else "bad-caption", "" if not text else "contains NUL")
    return text


def caption_from_json(raw: bytes | str) -> str | None:
    """img2dataset's / webdataset's ``.json``: the "caption" (or "text") field, if any."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Skip("bad-caption", "the .json is not valid UTF-8 JSON") from None
    if isinstance(data, dict):
        for key in ("caption", "text", "txt"):
            if data.get(key) is not None:
                return data[key]
    return None


def decode_label(raw: Any, classes: list[str] | None = None) -> int:
    """A class id from an int, an int as text/bytes, or a class name; raises ``Skip`` ("no-label",
    "bad-label")."""
    if raw is None:
        raise Skip("no-label")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("bad-label", "not UTF-8") from None
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            raise Skip("no-label")
        if classes is not None and raw in classes:
            return classes.index(raw)
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise Skip("bad-label", f"{str(raw)[:40]!r} is not a class id") from None
    if label < 0 or (classes is not None and label >= len(classes)):
        raise Skip("bad-label", f"class id {label} out of range")
    return label

"""Images in and out of HTTP: uploads checked before they are decoded, PNG/base64 and GIF out."""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Sequence

from PIL import Image


class BadUpload(ValueError):
    """An upload that cannot be used; ``field`` names the form field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def read_upload(data: bytes, field: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode an uploaded image, refusing empty, corrupt and over-large ones (the size is read
    from the header before any pixel is decoded, so a decompression bomb costs nothing)."""
    if not data:
        raise BadUpload(field, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadUpload(field, f"{w}x{h} is more than {max_pixels} pixels")
            img.load()
    except BadUpload:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as e:
        raise BadUpload(field, f"not a readable image ({type(e).__name__}: {e})") from None
    return img.convert(mode)


def check_sides(img: Image.Image, field: str, step: int, max_side: int) -> None:
    w, h = img.size
    if w % step or h % step or not (step <= w <= max_side and step <= h <= max_side):
        raise BadUpload(field, f"the image is {w}x{h}; this model needs sides that are multiples of {step} "
                               f"between {step} and {max_side}: resize or crop it")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_base64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def gif_bytes(frames: Sequence[Image.Image], fps: float) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]),
                   duration=round(1000 / fps), loop=0)
    return buf.getvalue()

"""What the serving tests share: a tiny pipeline, PNG helpers and a real uvicorn server in a thread."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import numpy as np
from PIL import Image
from tiny import tiny_pipeline

from latentdit.pipeline import Text2Image


def tiny_pipe(tiny_clip, tiny_vae, **preset) -> Text2Image:
    """Tiny random components: 16x16 images, sides in steps of 4, 4 sampler steps."""
    return tiny_pipeline(tiny_clip, tiny_vae, **preset)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def noise_image(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0):
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)

"""Starting the server: load the model once, warm it up, bind (loopback unless told otherwise)."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

from ..pipeline import Text2Image

TOKEN_ENV = "LATENTDIT_TOKEN"
log = logging.getLogger("latentdit.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warm_up(pipe: Text2Image) -> None:
    """One short generation, so the first client does not pay for lazy initialisation."""
    prompt = 0 if pipe.model.config.num_classes else "warm up"
    pipe(prompt, steps=1, progress=False)


def serve(model: str = "shapes", host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          token: str | None = None, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 64,
          timeout: float = 120.0, pipe: Text2Image | None = None) -> None:
    """Serve ``model`` with uvicorn until interrupted. ``token`` (or ``$LATENTDIT_TOKEN``) turns on
    bearer authentication."""
    import uvicorn

    from .app import create_app

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        print(f"WARNING: serving on {host} without a token: anyone who can reach this port can use the "
              f"model. Pass --token or set {TOKEN_ENV}.", file=sys.stderr)
    if pipe is None:
        pipe = Text2Image.from_pretrained(model, device=device)
    warm_up(pipe)
    app = create_app(pipe, name=str(model), token=token, max_batch=max_batch, max_wait=max_wait_ms / 1000,
                     max_queue=max_queue, timeout=timeout)
    print(f"latentdit serve: http://{host}:{port}/ui (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                h11_max_incomplete_event_size=64 * 1024)

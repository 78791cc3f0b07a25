"""A tiny client for a running ``latentdit serve`` (standard library only)::

    from latentdit.serve.client import Client
    images, seeds = Client("http://127.0.0.1:8000").generate("a red circle", num_images=2)
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any

from PIL import Image


class ServerError(ValueError):
    """The server answered with an error status; the message is its explanation."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 300.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{self.url}{path}: {e.code} {_detail(e.read())}") from None
        except urllib.error.URLError as e:
            raise ServerError(f"cannot reach {self.url}: {e.reason}") from None

    def model(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/v1/model"))

    def generate(self, prompt: str | int, **settings: Any) -> tuple[list[Image.Image], list[int]]:
        """``settings``: the fields of POST /v1/generate (num_images, seed, steps, guidance_scale,
        sampler, negative_prompt, height, width, guidance_interval). Returns images and seeds."""
        key = "class_label" if isinstance(prompt, int) else "prompt"
        body = {key: prompt, **{k: v for k, v in settings.items() if v is not None}}
        out = json.loads(self._request("POST", "/v1/generate", body))
        return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in out["images"]], out["seeds"]


def _detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw)["detail"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
    return str(detail)

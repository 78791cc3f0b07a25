"""Serving: a REST API with dynamic batching and a web UI (``latentdit serve``).

FastAPI and uvicorn are needed only here (``pip install -e ".[serve]"``); names resolve lazily,
so the standard-library client imports without them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"create_app": "app", "Client": "client", "serve": "server"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'latentdit.serve' has no attribute {name!r}")

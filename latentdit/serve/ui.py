"""The web UI: one self-contained HTML page (no external scripts, works offline) served at /ui.

It calls the same REST API as any client: text-to-image with a gallery and seeds, img2img,
inpainting with a brush mask painted on a canvas, interpolation GIFs, the sampler settings, a
progress indicator and example prompts (from ``/v1/model``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("ui.html")


@lru_cache(maxsize=1)
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def add_ui(app) -> None:
    """Mount the page at /ui (and redirect / there). The page holds no data, so it needs no token;
    the API calls it makes do."""
    from fastapi.responses import HTMLResponse, RedirectResponse

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    def ui() -> HTMLResponse:
        return HTMLResponse(page(), headers={"Content-Security-Policy": "default-src 'self' 'unsafe-inline' "
                                                                       "data: blob:; frame-ancestors 'none'"})

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")

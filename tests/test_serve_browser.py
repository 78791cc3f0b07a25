"""The web UI in a real browser: Debian's chromium driven by playwright, headless.

Run as a script to redraw the documentation screenshot with the packaged model::

    python tests/test_serve_browser.py docs/serving_ui.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from serve_helpers import running_server, tiny_pipe

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def drive_ui(url: str, screenshot: Path, size: tuple[int, int], prompt: str = "a large red circle in the center",
             inpaint: bool = True) -> dict:
    """Open /ui, generate from a prompt, (optionally) paint a mask and inpaint; return what the
    page showed and save a screenshot."""
    from playwright.sync_api import sync_playwright

    seen: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            # bypass_csp: the page forbids eval, which wait_for_function needs
            page = browser.new_page(viewport={"width": 1180, "height": 760}, bypass_csp=True)
            page.goto(url + "/ui")
            page.wait_for_selector("body[data-ready='1']", timeout=20_000)
            seen["examples"] = page.locator("#examples button").count()
            page.fill("#prompt", prompt)
            page.fill("#numImages", "4")
            page.fill("#seed", "0")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery img.result').length === 4 && "
                                   "[...document.querySelectorAll('#gallery img.result')].every(i => i.complete)",
                                   timeout=60_000)
            imgs = page.locator("#gallery img.result")
            seen["sizes"] = [tuple(imgs.nth(i).evaluate("i => [i.naturalWidth, i.naturalHeight]")) for i in range(4)]
            seen["seeds"] = [imgs.nth(i).get_attribute("data-seed") for i in range(4)]
            seen["captions"] = page.locator("#gallery figcaption").all_inner_texts()
            seen["status"] = page.inner_text("#status")
            page.screenshot(path=str(screenshot), full_page=True)
            if inpaint:
                page.click("button[data-tab='inp']")
                box = page.locator("#paintMask").bounding_box()
                page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.8, steps=8)
                page.mouse.up()
                seen["mask_white"] = page.evaluate(
                    "() => { const c = document.getElementById('paintMask'); const d = c.getContext('2d')"
                    ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 0; i < d.length; i += 4)"
                    " n += d[i] > 128; return n / (c.width * c.height); }")
                page.fill("#numImages", "1")
                page.click("#runInp")
                page.wait_for_function("document.getElementById('status').textContent.startsWith('inpainting done')"
                                       " || document.getElementById('status').className === 'error'", timeout=60_000)
                seen["inpaint_status"] = page.inner_text("#status")
                seen["inpaint_count"] = page.locator("#gallery img.result").count()
        finally:
            browser.close()
    assert all(s == size for s in seen["sizes"]), seen
    return seen


def test_ui_generates_and_inpaints_in_chromium(tiny_clip, tiny_vae, tmp_path):
    pytest.importorskip("playwright")
    pytest.importorskip("uvicorn")
    if not Path(CHROMIUM).exists():
        print("SKIP: chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from latentdit.serve.app import create_app

    with running_server(create_app(tiny_pipe(tiny_clip, tiny_vae))) as url:
        seen = drive_ui(url, tmp_path / "ui.png", (16, 16))
    assert seen["seeds"] == ["0", "1", "2", "3"] and seen["examples"] >= 3
    assert all(c.startswith(f"seed {s}") for c, s in zip(seen["captions"], seen["seeds"]))
    assert seen["status"].startswith("generating done")
    assert 0.02 < seen["mask_white"] < 0.9  # the brush painted part of the mask, not all of it
    assert seen["inpaint_status"].startswith("inpainting done") and seen["inpaint_count"] == 1
    assert (tmp_path / "ui.png").stat().st_size > 5_000


def main(out: str) -> None:
    """The screenshot for the docs, with the packaged model."""
    from latentdit.pipeline import Text2Image
    from latentdit.serve.app import create_app

    pipe = Text2Image.from_pretrained("shapes")
    with running_server(create_app(pipe)) as url:
        seen = drive_ui(url, Path(out), (64, 64), inpaint=False)
    print(out, seen["captions"], seen["status"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/serving_ui.png")

"""The README's promises: two set-up-and-go commands at the top, a short page, and a Python
example that runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_install_and_test_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert "pip install torch==2.13.0" in first[0] and "latentdit generate" in first[0]
    assert first[1].endswith("python -m pytest -q")
    assert len(README.read_text().splitlines()) <= 150


def test_readme_links_point_at_files_that_exist():
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)\)", README.read_text()):
        assert (README.parent / target).exists(), target


@pytest.mark.weights
def test_readme_python_example_runs(tmp_path, monkeypatch):
    (code,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    for name in ("out.png", "edit.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (64, 64)

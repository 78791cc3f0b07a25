"""Reading JSON files (line-oriented ones: prompt lists, caption indexes, shard sidecars; and
single-object ones: configs, manifests, checkpoint state) and the one-line reason of an exception:
one reader each, so every such file fails with the same clear messages (the path and line
number, never a JSON traceback)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path, *, holds: str = "one JSON object per line",
               plain: bool = False) -> list[tuple[int, dict | str]]:
    """``(line number, row)`` for every non-blank line of a UTF-8 file. A row is the parsed JSON
    object; with ``plain=True`` a line that does not start with ``{`` is kept as its stripped
    text instead (prompt files mix the two). ``holds`` names what the file should hold, for the
    message when it is not UTF-8. Raises ValueError naming the path and line on bad input."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); it must hold {holds}") from None
    rows: list[tuple[int, dict | str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if plain and not line.startswith("{"):
            rows.append((n, line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not an object")
        rows.append((n, row))
    return rows


def read_json(path: str | Path) -> dict:
    """A JSON file that must hold one object (a config, a manifest, a checkpoint's state). Raises
    ValueError naming the file: unreadable, not valid JSON (with the line), or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ValueError(f"{path} is unreadable ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty:
    what a one-line error quotes from a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__

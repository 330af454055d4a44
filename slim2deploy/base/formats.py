"""Formats: numbers for people (one formatter for counts, one for memory sizes), and the one reader of
JSON files a user may hand the tool (latency tables, caches, build records, engine manifests)."""

from __future__ import annotations

import json
import os
from typing import Any

from slim2deploy.base.errors import SlimError
from slim2deploy.base.files import check_input_file


def si(n: float | None, unit: str = "", digits: int = 2) -> str:
    """``1234567`` -> ``1.23M``; None -> ``-``. Decimal prefixes, for counts."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{suffix}{unit}"
    return f"{n:g}{unit}"


def binary_size(n: int | None) -> str:
    """``3 << 20`` -> ``3.0 MiB``; None -> ``-``. Binary prefixes, for memory and files."""
    if n is None:
        return "-"
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


# what a JSON file the tool reads may be: its own tables and records are far smaller and flatter
JSON_MAX_BYTES = 256 << 20
JSON_MAX_DEPTH = 64


def parse_json(text: str | bytes, what: str, *, advice: str = "re-create it", max_depth: int = JSON_MAX_DEPTH) -> Any:
    """``text`` parsed as JSON, or one SlimError saying what is wrong with ``what`` and ending in ``advice``:
    bytes that are not UTF-8, text that is not JSON, and nesting deeper than ``max_depth`` (which would
    otherwise be a RecursionError in the parser or in whatever walks the data next) are refused alike."""
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as exc:
        raise SlimError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason}); {advice}") from None
    except json.JSONDecodeError as exc:
        raise SlimError(f"{what} is not valid JSON ({exc}); {advice}") from None
    except RecursionError:  # deeper than the parser goes: deeper than max_depth too
        deep = True
    else:
        deep = _depth(data) > max_depth
    if deep:
        raise SlimError(f"{what} is nested deeper than {max_depth} levels, which no file of this tool is; {advice}")
    return data


def read_json(
    path: str | os.PathLike[str], what: str, *, advice: str = "re-create it", max_bytes: int = JSON_MAX_BYTES
) -> Any:
    """The JSON file at ``path`` (``what`` names it in messages, e.g. "latency table"), size and depth
    bounded before the data is used; a missing, special (a FIFO), oversized or malformed file is one
    SlimError ending in ``advice``. Callers reading a mere cache catch it and go on without the cache."""
    path = check_input_file(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise SlimError(f"the {what} {path} cannot be read ({exc.strerror or exc}); {advice}") from None
    if len(raw) > max_bytes:
        raise SlimError(f"the {what} {path} is over {binary_size(max_bytes)}, far more than this tool writes; {advice}")
    return parse_json(raw, f"the {what} {path}", advice=advice)


def _depth(data: Any) -> int:
    """How deeply lists and dicts nest in ``data`` (0 for a scalar), without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in children)
    return deepest

"""The Python standard library as text: the demo model's training and held-out data.

Every machine with Python has it, so the demo needs no download. Files are split into a
training part and a held-out 10% by a stable hash of their path relative to `Lib/`, so the
split is the same on every machine and every Python version (a file new in a later version
lands on the same side wherever it exists).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

__all__ = ["HELD_OUT_PERCENT", "is_held_out", "line_chunks", "stdlib_root", "stdlib_texts"]

#: The share of files kept out of training, in percent.
HELD_OUT_PERCENT = 10

# Third-party packages installed into the interpreter live below Lib/ too: not stdlib.
_NOT_STDLIB = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    """The running interpreter's `Lib/` folder (the base interpreter's, inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str) -> bool:
    """Whether a file (its POSIX path relative to `Lib/`) belongs to the held-out part."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def stdlib_texts(split: Literal["train", "held-out"], root: Path | None = None) -> dict[str, str]:
    """The `.py` files of one part of the standard library: relative path -> source text.

    Sorted by path. Files that are not UTF-8 (a few test files are, on purpose) and empty
    files are left out.
    """
    if split not in ("train", "held-out"):
        raise ValueError(f"split must be 'train' or 'held-out', not {split!r}")
    root = root or stdlib_root()
    texts: dict[str, str] = {}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root).as_posix()
        if relative.split("/", 1)[0] in _NOT_STDLIB or not path.is_file():
            continue
        if is_held_out(relative) != (split == "held-out"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts[relative] = text
    return texts


def line_chunks(text: str, max_chars: int) -> Iterator[tuple[int, int, str]]:
    """Splits ``text`` into runs of whole lines of at most ``max_chars`` characters.

    Yields ``(first_line, last_line, chunk)`` with 1-based line numbers. A line longer than
    ``max_chars`` is a chunk of its own. Blank-only chunks are skipped.
    """
    lines = text.splitlines(keepends=True)
    start, size = 0, 0
    for i, line in enumerate(lines):
        if size and size + len(line) > max_chars:
            yield from _chunk(lines, start, i)
            start, size = i, 0
        size += len(line)
    yield from _chunk(lines, start, len(lines))


def _chunk(lines: list[str], start: int, stop: int) -> Iterator[tuple[int, int, str]]:
    chunk = "".join(lines[start:stop])
    if chunk.strip():
        yield start + 1, stop, chunk

"""Writing results so that an interruption never leaves something that looks complete.

Torch-free: used by the corpus, atlas and export modules alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to a temporary file and renames it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for the paths and torch dtypes found in metadata."""
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "torch":  # a torch.dtype; no torch import needed here
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def replace_path(tmp: Path, out: Path) -> None:
    """Renames the finished ``tmp`` (file or folder) to ``out``, replacing what is there.

    A rename cannot replace a non-empty folder, so the old one is moved aside first and
    removed only once the new one is in place.
    """
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.gatescope-old")
        remove_path(old)
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


def remove_path(path: Path) -> None:
    """Removes a file, a link or a folder tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

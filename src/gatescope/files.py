"""The output policy: what gatescope may write over, and how it writes so that an
interruption never leaves something that looks complete.

Every command that writes (corpus, scan, merge, export, import, page, demo) goes through
here:

* :func:`claim_output` decides what may happen to an existing output: nothing new is
  refused; something of the same kind is refused unless ``--overwrite`` (or ``--resume``,
  which continues it); anything else that is not empty is never touched. Each refusal has
  one wording, here.
* :func:`staged` writes a whole file or folder under a temporary name beside the target and
  renames it into place at the end (on failure the target is untouched); :func:`write_atomic`
  does the same for one file. Inside a folder, the file that marks it complete
  (``atlas.json``, ``gatescope_corpus.json``) is written last, and removed first when the
  folder is rewritten in place (an atlas being replaced, a scan's first checkpoint).

Torch-free.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatescope.constants import ATLAS_JSON, CHECKPOINT_DIR, CORPUS_JSON, STATS_FILE
from gatescope.errors import GatescopeError

__all__ = [
    "ATLAS",
    "CORPUS",
    "DATASET",
    "DEMO",
    "SITE",
    "Found",
    "OutputKind",
    "claim_output",
    "remove_path",
    "staged",
    "write_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@dataclass(frozen=True)
class OutputKind:
    """A kind of output, and how to recognize one that gatescope wrote.

    Attributes:
        noun: "an atlas", for messages.
        markers: Files whose presence in a folder makes it one of this kind (finished).
        unfinished: Entries whose presence marks an unfinished one (a scan's checkpoint, an
            atlas's tensors without its description).
        may_be_file: The output may also be a single file (a parquet export).
    """

    noun: str
    markers: tuple[str, ...]
    unfinished: tuple[str, ...] = ()
    may_be_file: bool = False


ATLAS = OutputKind("an atlas", (ATLAS_JSON,), unfinished=(CHECKPOINT_DIR, STATS_FILE))
CORPUS = OutputKind("a corpus", (CORPUS_JSON,))
# A `datasets` save_to_disk folder, or a parquet file.
DATASET = OutputKind("a dataset export", ("dataset_info.json", "state.json"), may_be_file=True)
SITE = OutputKind("a site of neuron pages", ("site.json",))
DEMO = OutputKind("an earlier demo", ("demo.json",))


class Found(enum.Enum):
    """What :func:`claim_output` found at the output path, and may be written over."""

    NOTHING = "nothing"  # nothing, an empty folder, or what --overwrite replaces
    FINISHED = "finished"  # a finished output of the kind, to continue (resume)
    UNFINISHED = "unfinished"  # an unfinished one, to continue (resume)


def claim_output(
    out: Path, kind: OutputKind, *, overwrite: bool = False, resume: bool = False
) -> Found:
    """Checks what ``out`` holds before anything is computed for it.

    Args:
        out: The output path.
        kind: What will be written there.
        overwrite: Replace an output of the same kind (never anything else).
        resume: Continue an output of the same kind: a scan's checkpoint or finished atlas,
            a site's pages. Wins over ``overwrite``.

    Returns:
        What was found; the caller continues it (FINISHED, UNFINISHED) or writes anew.

    Raises:
        GatescopeError: ``out`` holds something that must not be written over.
    """
    if not (out.exists() or out.is_symlink()):
        return Found.NOTHING
    if not out.is_dir():
        if not kind.may_be_file:
            raise GatescopeError(f"{out} exists and is not a folder: choose another output path.")
        if overwrite:
            return Found.NOTHING
        raise GatescopeError(f"{out} already exists: pass --overwrite to replace it.")
    found, refusal = _recognize(out, kind)
    if found is not Found.NOTHING:
        if resume:
            return found
        if overwrite:
            return Found.NOTHING
        raise GatescopeError(f"{out} {refusal}.")
    if any(out.iterdir()):
        raise GatescopeError(
            f"{out} is not empty and holds no {kind.noun.split(' ', 1)[1]}: choose another "
            "output path (gatescope never writes over what it did not write)."
        )
    return Found.NOTHING


def _recognize(out: Path, kind: OutputKind) -> tuple[Found, str]:
    """What the folder ``out`` holds of ``kind``, and how a refusal to write over it ends."""
    if any((out / marker).exists() for marker in kind.markers):
        return Found.FINISHED, f"already holds {kind.noun}: pass --overwrite to replace it"
    if any((out / entry).exists() for entry in kind.unfinished):
        return Found.UNFINISHED, (
            "holds an unfinished scan: pass --resume to continue it or --overwrite to start over"
        )
    return Found.NOTHING, ""


# ----------------------------------------------------------------------------- writing


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` to write a file or folder into; on success it
    replaces ``out`` at once, on failure it is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out)
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        remove_path(tmp)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Writes one file through ``write(temporary path)`` and renames it into place."""
    with staged(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Renames the finished ``tmp`` (file or folder) to ``out``, replacing what is there.

    A rename cannot replace a non-empty folder, nor put a folder where a file is, so what
    is there is moved aside first (and back if the rename fails), and removed once the new
    one is in place.
    """
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = temporary_name(out)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    remove_path(old)


def remove_path(path: Path) -> None:
    """Removes a file, a link or a folder tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

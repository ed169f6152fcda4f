"""gatescope: a neuron atlas for gated-MLP (SwiGLU, GEGLU) language models.

Importing the package is cheap; torch, transformers and datasets load on first use.

    import gatescope
    corpus = gatescope.build_corpus("texts/", tokenizer="allenai/OLMo-7B-0424-hf")
    options = gatescope.ScanOptions(batch_size=16, refactor_glu=True)
    atlas = gatescope.scan("allenai/OLMo-7B-0424-hf", corpus, options)
    atlas.neuron(31, 9634).freq
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("gatescope")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "Atlas",
    "GatescopeError",
    "ScanOptions",
    "__version__",
    "build_corpus",
    "load_corpus",
    "save_corpus",
    "scan",
]

_LAZY = {
    "Atlas": "gatescope.atlas",
    "GatescopeError": "gatescope.errors",
    "ScanOptions": "gatescope.options",
    "save_corpus": "gatescope.corpus",
    "build_corpus": "gatescope.corpus",
    "load_corpus": "gatescope.corpus",
    "scan": "gatescope.scanner",
}

if TYPE_CHECKING:
    from gatescope.atlas import Atlas
    from gatescope.corpus import build_corpus, load_corpus, save_corpus
    from gatescope.errors import GatescopeError
    from gatescope.options import ScanOptions
    from gatescope.scanner import scan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gatescope' has no attribute {name!r}")

"""gatescope's demo: a small trained SwiGLU model shipped in the package, so that the whole
method runs on any machine, offline.

The model (`gatescope-demo-model/`, with its model card) was trained by
`scripts/train_demo_model.py` on the Python standard library minus a held-out tenth of its
files (:mod:`gatescope.demo.stdlib`); :func:`run_demo` scans those held-out files and writes
pages of neurons worth a look.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from gatescope.demo.run import run_demo

__all__ = ["MODEL_FOLDER", "model_path", "run_demo"]

#: The demo model's folder inside this package (its name is the model's name on pages).
MODEL_FOLDER = "gatescope-demo-model"


def model_path() -> Path:
    """The folder of the shipped demo model: load it with ``from_pretrained(model_path())``."""
    folder = Path(str(resources.files("gatescope.demo").joinpath(MODEL_FOLDER)))
    if not (folder / "model.safetensors").is_file():
        raise GatescopeError(
            f"the demo model is missing from {folder}: reinstall gatescope, or train it with "
            "scripts/train_demo_model.py."
        )
    return folder


def __getattr__(name: str) -> object:
    # run_demo pulls in torch and transformers: imported on first use only.
    if name == "run_demo":
        from gatescope.demo.run import run_demo

        return run_demo
    raise AttributeError(name)

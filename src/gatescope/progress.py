"""Progress bars: gatescope's own, and the libraries' turned off.

A command shows one bar per step of its own (corpus, scan, pages). The bars of the libraries
underneath ("Loading weights", "Saving the dataset", downloads) are off while a command runs,
unless the user asks for more output with ``-v``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["library_bars_off", "progress_bar"]


def progress_bar(
    *, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0
) -> tqdm[NoReturn]:
    """One of gatescope's bars (a disabled one does nothing)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit == "tok",
        disable=not enabled,
        dynamic_ncols=True,
    )


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """The progress bars of datasets, transformers and huggingface_hub are off inside the
    block and as they were after it."""
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    datasets_on = not datasets.are_progress_bars_disabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_on = not hub.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if hub_on:
            hub.enable_progress_bars()

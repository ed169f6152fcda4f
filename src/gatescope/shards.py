"""Splitting a corpus into parts scanned apart: `--shard i/N`, and the ranks of torchrun.

A shard is a contiguous run of text indices holding about 1/N of the corpus's tokens, so
parts take about the same time. Text indices stay global: an atlas of a part names texts of
the whole corpus, and parts merge into exactly the atlas of one scan (:mod:`gatescope.merge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gatescope.errors import GatescopeError

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise GatescopeError(
                f"shard {self.index}/{self.count} does not exist: write i/N with 0 <= i < N."
            )

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """``"2/8"`` -> the third of eight parts."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match:
            raise GatescopeError(f"'{spec}' is not a shard: write i/N, e.g. --shard 0/4.")
        return cls(int(match[1]), int(match[2]))

    def texts(self, lengths: np.ndarray) -> np.ndarray:
        """The indices of this part's texts, given every text's length ``[n_texts]``.

        Text t belongs to the part in which its first token falls when the corpus's tokens
        are cut into ``count`` equal runs.
        """
        total = int(lengths.sum())
        starts = np.cumsum(lengths) - lengths  # [n_texts] tokens before each text
        part = (starts * self.count) // max(total, 1)
        return np.flatnonzero(part == self.index)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

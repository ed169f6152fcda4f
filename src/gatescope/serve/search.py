"""Search by token: which neurons fire on ``again``?

The index answers it from the atlas alone, without the model: for every neuron and case,
the tokens at which the case's top hook_post examples peak (each example is a text and the
position of its strongest token), counted. A neuron is found for a token when some of its
top examples of a case peak on it; the more of them do, the higher it ranks.

Built once per atlas (one pass over the ranked lists and the corpus's token ids) and kept
on disk with the server's other caches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gatescope.constants import CASES, QUANTITIES, TOP_LISTS
from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gatescope.atlas import Atlas
    from gatescope.corpus import TokenizedCorpus

__all__ = ["SearchHit", "SearchResult", "TokenIndex", "Vocabulary"]

#: The most neurons one search lists.
MAX_HITS = 500

_TOKEN_ID = re.compile(r"#(\d{1,9})")


@dataclass(frozen=True)
class SearchHit:
    """A neuron whose top examples of ``case`` peak on ``token`` ``hits`` times (of
    ``examples``)."""

    layer: int
    neuron: int
    case: str
    token: int
    hits: int
    examples: int


@dataclass(frozen=True)
class SearchResult:
    """A search: the query, the tokens it named as (id, text), and the neurons found."""

    query: str
    case: str | None
    tokens: tuple[tuple[int, str], ...]
    hits: tuple[SearchHit, ...]


@dataclass(frozen=True)
class TokenIndex:
    """(token, case, neuron) -> hits, as parallel arrays sorted by token.

    ``neuron`` is the neuron's index in the model (``layer * d_mlp + n``); ``examples`` is
    how many top examples the neuron has in that case (at most k).
    """

    token: np.ndarray  # [entries] int64, ascending
    case: np.ndarray  # [entries] int8, index into CASES
    neuron: np.ndarray  # [entries] int64
    hits: np.ndarray  # [entries] int32
    examples: np.ndarray  # [entries] int32
    d_mlp: int

    def __post_init__(self) -> None:
        lengths = {len(getattr(self, f.name)) for f in fields(self) if f.name != "d_mlp"}
        if len(lengths) != 1:
            raise GatescopeError("a token index of arrays of different lengths.")

    @classmethod
    def build(cls, atlas: Atlas, corpus: TokenizedCorpus) -> TokenIndex:
        """The index of an atlas's top hook_post examples, one layer at a time."""
        post = QUANTITIES.index("hook_post")
        lists = [TOP_LISTS.index((c, post)) for c in range(len(CASES))]
        parts: list[tuple[np.ndarray, ...]] = []
        for layer in range(atlas.num_layers):
            stats = atlas.layer(layer)
            for c, list_index in enumerate(lists):
                texts = stats.top_text[:, list_index].numpy()  # [d, k], -1 in empty slots
                positions = stats.top_position[:, list_index].numpy()
                filled = texts >= 0
                if not filled.any():
                    continue
                neuron = np.broadcast_to(np.arange(atlas.d_mlp)[:, None], texts.shape)[filled]
                tokens = corpus.tokens_at(texts[filled], positions[filled])
                # Count each (neuron, token) pair: one key per pair, then np.unique.
                base = int(tokens.max()) + 1
                keys, hits = np.unique(neuron * base + tokens, return_counts=True)
                pair_neuron, pair_token = np.divmod(keys, base)
                examples = filled.sum(axis=1)[pair_neuron]
                parts.append((pair_token, np.full(len(keys), c, np.int8),
                              pair_neuron + layer * atlas.d_mlp, hits, examples))  # fmt: skip
        columns = (
            [np.concatenate(c) for c in zip(*parts, strict=True)]
            if parts
            else [np.zeros(0, dtype) for dtype in (np.int64, np.int8, np.int64, np.int32, np.int32)]
        )
        order = np.argsort(columns[0], kind="stable")
        token, case, neuron, hits, examples = (c[order] for c in columns)
        return cls(token.astype(np.int64), case.astype(np.int8), neuron.astype(np.int64),
                   hits.astype(np.int32), examples.astype(np.int32), atlas.d_mlp)  # fmt: skip

    def find(self, tokens: list[int], case: str | None = None) -> list[SearchHit]:
        """The neurons whose top examples peak on any of ``tokens`` (of ``case``, or of
        any case): most hits first, then the larger share of the neuron's examples, then
        model order; at most :data:`MAX_HITS`."""
        if case is not None and case not in CASES:
            raise GatescopeError(f"no case '{case}': cases are {', '.join(CASES)}.")
        rows = np.concatenate(
            [np.arange(*np.searchsorted(self.token, [t, t + 1])) for t in tokens]
            or [np.zeros(0, np.int64)]
        ).astype(np.int64)
        if case is not None:
            rows = rows[self.case[rows] == CASES.index(case)]
        share = self.hits[rows] / np.maximum(self.examples[rows], 1)
        order = np.lexsort((self.neuron[rows], -share, -self.hits[rows]))[:MAX_HITS]
        found = zip(self.neuron[rows][order], self.case[rows][order], self.token[rows][order],
                    self.hits[rows][order], self.examples[rows][order], strict=True)  # fmt: skip
        return [
            SearchHit(int(n) // self.d_mlp, int(n) % self.d_mlp, CASES[c], int(t), int(h), int(e))
            for n, c, t, h, e in found
        ]

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        from gatescope.files import write_atomic

        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "d_mlp"}
        arrays["d_mlp"] = np.array([self.d_mlp], np.int64)
        write_atomic(path, lambda tmp: save_file(arrays, str(tmp)))

    @classmethod
    def load(cls, path: Path) -> TokenIndex | None:
        """An index saved by :meth:`save`, or None if absent or unreadable."""
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
            d_mlp = int(arrays.pop("d_mlp")[0])
            return cls(**arrays, d_mlp=d_mlp)
        except (OSError, KeyError, ValueError, TypeError, GatescopeError):
            return None


class Vocabulary:
    """A tokenizer's tokens as they read, for finding the ids a query names."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from gatescope.pages import token_strings

        size = len(tokenizer)
        self.texts = token_strings(tokenizer, range(size))
        self._by_text: dict[str, list[int]] = {}
        for token, text in enumerate(self.texts):
            self._by_text.setdefault(_normal(text), []).append(token)

    def ids(self, query: str) -> list[int]:
        """The ids of the tokens that read as ``query`` (ignoring case and surrounding
        whitespace: ``again`` finds `` again``, ``Again``, ...), or ``#123`` for id 123."""
        by_id = _TOKEN_ID.fullmatch(query.strip())
        if by_id is not None:
            token = int(by_id[1])
            if token >= len(self.texts):
                raise GatescopeError(f"there is no token #{token}: the vocabulary has "
                                     f"{len(self.texts)} tokens.")  # fmt: skip
            return [token]
        if not query.strip():
            raise GatescopeError("name a token to search for, e.g. 'again' or '#1234'.")
        return self._by_text.get(_normal(query), [])


def _normal(text: str) -> str:
    return text.strip().casefold()

"""The accumulator's merges on a CPU: candidates inserted one by one into sorted lists.

The accumulator keeps, per neuron, the ranked lists (strongest first) and the typical
examples (smallest draw key first), and merges each batch's per-text candidates into them.
In torch that is a concatenation, a ``topk`` and gathers over every slot: on a CPU about
30 ns per candidate, a fifth of the statistics pass. Here each candidate is compared with
the last entry kept and, only if it beats it, inserted by shifting the weaker entries
down: once the lists are full, most candidates cost a single comparison.

The order rules are the accumulator's (:mod:`~gatescope.stats.accumulator`), so the lists
are identical to those of its torch merges, which the tests check.
"""

from __future__ import annotations

import numba
import numpy as np
from torch import Tensor

__all__ = ["merge_smallest", "merge_strongest"]


def merge_strongest(
    value: Tensor, text: Tensor, position: Tensor,
    new_value: Tensor, new_text: Tensor, new_position: Tensor,
) -> None:  # fmt: skip
    """Merges candidates into ranked lists in place.

    Args:
        value, text, position: [list, neuron, k] the ranked lists: |value| descending, ties
            by text ascending; empty slots (text -1) last.
        new_value, new_text, new_position: [list, n, neuron] the candidates (text -1: none).
    """
    _merge_strongest(
        value.numpy(), text.numpy(), position.numpy(),
        new_value.numpy(), new_text.numpy(), new_position.numpy(),
    )  # fmt: skip


def merge_smallest(
    key: Tensor, text: Tensor, position: Tensor, value: Tensor,
    new_key: Tensor, new_text: Tensor, new_position: Tensor, new_value: Tensor,
) -> None:  # fmt: skip
    """Merges candidates into lists of the smallest keys in place (the typical examples).

    Args:
        key, text, position: [case, neuron, k] the kept entries, keys ascending (unique;
            ``NO_KEY``, the largest int64, for empty slots).
        value: [case, quantity, neuron, k] their values.
        new_key, new_text, new_position: [case, n, neuron] the candidates (``NO_KEY``:
            none); new_value: [case, quantity, n, neuron].
    """
    _merge_smallest(
        key.numpy(), text.numpy(), position.numpy(), value.numpy(),
        new_key.numpy(), new_text.numpy(), new_position.numpy(), new_value.numpy(),
    )  # fmt: skip


# The candidates come neuron last, as the passes give them. A thread takes a block of
# neurons and, for each candidate, goes along the block: the candidates are read in
# whole cache lines, and the block's kept lists stay in the L1 cache. Indices are made
# unsigned: numba then skips its wraparound of negative indices.
NEURONS_PER_BLOCK = 16


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _merge_strongest(
    value, text, position, new_value, new_text, new_position
):  # pragma: no cover - compiled
    lists, neurons, k = value.shape
    last = np.uint64(k - 1)
    for block in numba.prange((neurons + NEURONS_PER_BLOCK - 1) // NEURONS_PER_BLOCK):
        first = block * NEURONS_PER_BLOCK
        for list_ in range(lists):
            lst = np.uint64(list_)
            for i in range(new_value.shape[1]):
                at = np.uint64(i)
                for n in range(first, min(first + NEURONS_PER_BLOCK, neurons)):
                    neuron = np.uint64(n)
                    candidate = new_text[lst, at, neuron]
                    strength = np.abs(new_value[lst, at, neuron])
                    if candidate < 0 or not _outranks(strength, candidate,
                                                      value[lst, neuron, last],
                                                      text[lst, neuron, last]):  # fmt: skip
                        continue
                    # The entries that stay above the candidate: a prefix of the list.
                    slot = 0
                    for j in range(k - 1):
                        kept = np.uint64(j)
                        above = _outranks(strength, candidate, value[lst, neuron, kept],
                                          text[lst, neuron, kept])  # fmt: skip
                        slot += 0 if above else 1
                    for j in range(k - 1, slot, -1):
                        to, source = np.uint64(j), np.uint64(j - 1)
                        value[lst, neuron, to] = value[lst, neuron, source]
                        text[lst, neuron, to] = text[lst, neuron, source]
                        position[lst, neuron, to] = position[lst, neuron, source]
                    free = np.uint64(slot)
                    value[lst, neuron, free] = new_value[lst, at, neuron]
                    text[lst, neuron, free] = candidate
                    position[lst, neuron, free] = new_position[lst, at, neuron]


@numba.njit(inline="always")
def _outranks(strength, text, kept_value, kept_text):  # pragma: no cover - compiled
    """Whether a candidate (|value| ``strength`` of ``text``) ranks above a kept entry."""
    kept = np.abs(kept_value)
    return (kept_text < 0) | (strength > kept) | ((strength == kept) & (text < kept_text))


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _merge_smallest(
    key, text, position, value, new_key, new_text, new_position, new_value
):  # pragma: no cover - compiled
    cases, neurons, k = key.shape
    last = np.uint64(k - 1)
    for block in numba.prange((neurons + NEURONS_PER_BLOCK - 1) // NEURONS_PER_BLOCK):
        first = block * NEURONS_PER_BLOCK
        for case_ in range(cases):
            case = np.uint64(case_)
            for i in range(new_key.shape[1]):
                at = np.uint64(i)
                for n in range(first, min(first + NEURONS_PER_BLOCK, neurons)):
                    neuron = np.uint64(n)
                    candidate = new_key[case, at, neuron]
                    if not candidate < key[case, neuron, last]:
                        continue
                    slot = 0
                    for j in range(k - 1):
                        slot += 1 if key[case, neuron, np.uint64(j)] < candidate else 0
                    for j in range(k - 1, slot, -1):
                        to, source = np.uint64(j), np.uint64(j - 1)
                        key[case, neuron, to] = key[case, neuron, source]
                        text[case, neuron, to] = text[case, neuron, source]
                        position[case, neuron, to] = position[case, neuron, source]
                        for quantity in range(value.shape[1]):
                            q = np.uint64(quantity)
                            value[case, q, neuron, to] = value[case, q, neuron, source]
                    free = np.uint64(slot)
                    key[case, neuron, free] = candidate
                    text[case, neuron, free] = new_text[case, at, neuron]
                    position[case, neuron, free] = new_position[case, at, neuron]
                    for quantity in range(value.shape[1]):
                        q = np.uint64(quantity)
                        value[case, q, neuron, free] = new_value[case, q, at, neuron]

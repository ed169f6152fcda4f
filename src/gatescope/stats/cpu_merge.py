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
        value, text, position: [list, neuron, k] the ranked lists (contiguous, as every
            tensor here): |value| descending, ties
            by text ascending; empty slots (text -1) last.
        new_value, new_text, new_position: [list, n, neuron] the candidates (text -1: none).
    """
    _merge_strongest(
        value.numpy(), text.numpy(), position.numpy(),
        *(x.contiguous().numpy() for x in (new_value, new_text, new_position)),
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
        *(x.contiguous().numpy() for x in (new_key, new_text, new_position, new_value)),
    )  # fmt: skip


# The candidates come neuron last, as the passes give them. A thread takes a block of
# neurons and, for each candidate, goes along the block: the candidates are read in
# whole cache lines, and the block's kept lists stay in the L1 cache. The arrays are
# indexed flat (all are contiguous) at unsigned offsets: numba then skips its wraparound
# of negative indices, which costs more than the comparisons here.
NEURONS_PER_BLOCK = 16


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _merge_strongest(
    value, text, position, new_value, new_text, new_position
):  # pragma: no cover - compiled
    lists, neurons, k = value.shape
    n = new_value.shape[1]
    # Flat views, indexed by unsigned offsets.
    value, text, position = value.reshape(-1), text.reshape(-1), position.reshape(-1)
    new_value, new_text = new_value.reshape(-1), new_text.reshape(-1)
    new_position = new_position.reshape(-1)
    for block in numba.prange((neurons + NEURONS_PER_BLOCK - 1) // NEURONS_PER_BLOCK):
        first = block * NEURONS_PER_BLOCK
        for lst in range(lists):
            for i in range(n):
                for neuron in range(first, min(first + NEURONS_PER_BLOCK, neurons)):
                    at = np.uint64((lst * n + i) * neurons + neuron)
                    candidate = new_text[at]
                    strength = np.abs(new_value[at])
                    top = np.uint64((lst * neurons + neuron) * k)  # the list's first entry
                    free = top + np.uint64(k - 1)
                    if candidate < 0 or not _outranks(strength, candidate, value[free],
                                                      text[free]):  # fmt: skip
                        continue
                    # Insertion: the entries it outranks move down one place (the last
                    # one, outranked above, drops out).
                    while free > top:
                        above = free - np.uint64(1)
                        if not _outranks(strength, candidate, value[above], text[above]):
                            break
                        value[free], text[free] = value[above], text[above]
                        position[free] = position[above]
                        free = above
                    value[free], text[free] = new_value[at], candidate
                    position[free] = new_position[at]


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
    quantities, n = value.shape[1], new_key.shape[1]
    key, text, position = key.reshape(-1), text.reshape(-1), position.reshape(-1)
    new_key, new_text = new_key.reshape(-1), new_text.reshape(-1)
    new_position = new_position.reshape(-1)
    for block in numba.prange((neurons + NEURONS_PER_BLOCK - 1) // NEURONS_PER_BLOCK):
        first = block * NEURONS_PER_BLOCK
        for case in range(cases):
            for i in range(n):
                for neuron in range(first, min(first + NEURONS_PER_BLOCK, neurons)):
                    at = np.uint64((case * n + i) * neurons + neuron)
                    candidate = new_key[at]
                    top = np.uint64((case * neurons + neuron) * k)
                    free = top + np.uint64(k - 1)
                    if not candidate < key[free]:
                        continue
                    while free > top and candidate < key[free - np.uint64(1)]:
                        above = free - np.uint64(1)
                        key[free], text[free] = key[above], text[above]
                        position[free] = position[above]
                        free = above
                    key[free], text[free] = candidate, new_text[at]
                    position[free] = new_position[at]
                    # The values, [case, quantity, neuron, slot]: the same moves.
                    slot = free - top
                    for quantity in range(quantities):
                        kept = value[case, quantity, neuron]
                        for j in range(k - 1, int(slot), -1):
                            kept[np.uint64(j)] = kept[np.uint64(j - 1)]
                        kept[slot] = new_value[case, quantity, i, neuron]

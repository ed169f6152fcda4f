"""Statistics of a mixture-of-experts layer: each expert's neurons over the tokens routed to it.

A layer's neurons are laid out as every routed expert's ``d_ff`` neurons in turn, then the
shared experts' (:class:`~gatescope.records.ExpertsRecord`). An expert computes its neurons
only on the tokens the router sends it; for the other tokens its g and u are taken as 0,
which puts them in no sign case (the rule that already leaves out padding and uncounted
tokens), so every pass, merge, checkpoint and shard path computes the statistics of routed
tokens alone, unchanged. Per expert, the layer also counts the counted tokens routed to it
and sums their router weights (``NeuronStats.add_routing``).

The dense rows are built a few texts at a time (``CHUNK_ELEMENTS``): an expert's rows are
only ``k / experts`` of a layer's width, but the passes take whole [text, pos, neuron] blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gatescope.arch import RoutedForward
    from gatescope.stats.accumulator import NeuronStats

__all__ = ["CHUNK_ELEMENTS", "add_routed"]

#: Elements of one dense [texts, pos, neurons] block of g (and of u).
CHUNK_ELEMENTS = 2**24


def add_routed(
    stats: NeuronStats, forward: RoutedForward, d_ff: int, text_index: Tensor, counted: Tensor
) -> None:
    """Adds one forward of a mixture-of-experts layer to its statistics.

    Args:
        stats: The layer's statistics, ``experts * d_ff + shared`` neurons wide (or wider).
        forward: What the experts computed, over rows ``text * positions + position``.
        d_ff: Neurons per routed expert.
        text_index: [texts] the batch's corpus indices.
        counted: [texts, positions] bool, the counted tokens.
    """
    texts, length = counted.shape
    _add_routing(stats, forward, counted.reshape(-1))
    per_chunk = max(1, CHUNK_ELEMENTS // (length * stats.d_mlp))
    for first in range(0, texts, per_chunk):
        last = min(first + per_chunk, texts)
        gate, up = _dense(forward, stats, d_ff, first * length, last * length)
        shape = (last - first, length, stats.d_mlp)
        stats.update(gate.view(shape), up.view(shape), text_index[first:last],
                     counted[first:last])  # fmt: skip


def _add_routing(stats: NeuronStats, forward: RoutedForward, counted: Tensor) -> None:
    """Per expert: the counted tokens routed to it, and the sum of their router weights."""
    routed = torch.zeros(stats.experts, dtype=torch.int64, device=counted.device)
    weight = torch.zeros(stats.experts, dtype=torch.float64, device=counted.device)
    for expert, token, _gate, _up, router_weight in forward.experts:
        kept = counted[token]
        routed[expert] += kept.sum()
        weight[expert] += (router_weight.to(torch.float64) * kept).sum()
    stats.add_routing(routed, weight)


def _dense(
    forward: RoutedForward, stats: NeuronStats, d_ff: int, start: int, stop: int
) -> tuple[Tensor, Tensor]:
    """[rows, neurons] g and u of rows ``start:stop``: each expert's values on its routed
    tokens in its columns, the shared experts' in theirs, 0 elsewhere."""
    rows = stop - start
    gate = torch.zeros(rows, stats.d_mlp, dtype=stats.dtype, device=stats.device)
    up = torch.zeros_like(gate)
    for expert, token, expert_gate, expert_up, _weight in forward.experts:
        inside = (token >= start) & (token < stop)
        row = token[inside] - start
        columns = slice(expert * d_ff, (expert + 1) * d_ff)
        gate[row, columns] = expert_gate[inside].to(gate.dtype)
        up[row, columns] = expert_up[inside].to(up.dtype)
    if forward.shared is not None:
        shared_gate, shared_up = forward.shared  # [rows of the batch, shared]
        routed = stats.experts * d_ff  # the shared experts' neurons follow the routed ones'
        columns = slice(routed, routed + shared_gate.shape[-1])
        gate[:, columns] = shared_gate[start:stop].to(gate.dtype)
        up[:, columns] = shared_up[start:stop].to(up.dtype)
    return gate, up

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
:func:`layer_values` builds them, and also the few neurons a page recomputes, with each
token's router weight (:mod:`gatescope.recompute`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gatescope.records import moe_address

if TYPE_CHECKING:
    from gatescope.arch import RoutedForward
    from gatescope.stats.accumulator import NeuronStats

__all__ = ["CHUNK_ELEMENTS", "add_routed", "layer_values"]

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
        gate, up, _ = layer_values(forward, stats.experts, d_ff, (first * length, last * length),
                                   stats.d_mlp, dtype=stats.dtype, device=stats.device)  # fmt: skip
        shape = (last - first, length, stats.d_mlp)
        stats.update(gate.view(shape), up.view(shape), text_index[first:last],
                     counted[first:last])  # fmt: skip


def _add_routing(stats: NeuronStats, forward: RoutedForward, counted: Tensor) -> None:
    """Per expert: the counted tokens routed to it, and the sum of their router weights."""
    routed = torch.zeros(stats.experts, dtype=torch.int64, device=counted.device)
    weight = torch.zeros(stats.experts, dtype=torch.float64, device=counted.device)
    if forward.experts:  # every expert's (token, weight) pairs at once: two index_add_s
        expert = torch.cat([torch.full_like(e[1], e[0]) for e in forward.experts])
        kept = counted[torch.cat([e[1] for e in forward.experts])]
        router_weight = torch.cat([e[4] for e in forward.experts]).to(torch.float64)
        routed.index_add_(0, expert, kept.to(torch.int64))
        weight.index_add_(0, expert, router_weight * kept)
    stats.add_routing(routed, weight)


def layer_values(
    forward: RoutedForward, n_experts: int, d_ff: int, rows: tuple[int, int],
    columns: int | Sequence[int], *,
    dtype: torch.dtype, device: torch.device, weights: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """g, u (and the router's weight) of some neurons of a mixture-of-experts layer on rows
    ``start:stop`` of its batch: each routed expert's values on its routed tokens, the
    shared experts' on all, 0 elsewhere.

    Args:
        forward: What the layer computed.
        n_experts: Routed experts of the layer.
        d_ff: Neurons per routed expert (expert ``e``'s neuron ``n`` is the layer's
            ``e * d_ff + n``, the shared experts' follow every routed one's).
        rows: ``(start, stop)``, rows of the flattened batch.
        columns: The layer's neurons: a width (all neurons up to it, padding beyond the
            layer's own as 0) or their indices, in the order wanted.
        dtype: The values' dtype.
        device: Where to build them.
        weights: Also give the router's weight of each (token, neuron): NaN where the
            neuron's expert did not get the token, and for shared neurons.

    Returns:
        ``gate``, ``up`` [rows, columns] and the weights [rows, columns] or None.
    """
    start, stop = rows
    width = columns if isinstance(columns, int) else len(columns)
    gate = torch.zeros(stop - start, width, dtype=dtype, device=device)
    up = torch.zeros_like(gate)
    weight = torch.full_like(gate, math.nan) if weights else None
    shared = forward.shared[0].shape[-1] if forward.shared is not None else 0
    plan = _plan(columns, n_experts, d_ff, shared, device)
    wanted = [e for e in forward.experts if e[0] in plan]
    for (expert, token, expert_gate, expert_up, router_weight), (first, last) in zip(
        wanted, _spans([e[1] for e in wanted], start, stop), strict=True
    ):
        into, taken = plan[expert]
        row = token[first:last] - start
        rows_of = row if isinstance(into, slice) else row[:, None]
        gate[rows_of, into] = expert_gate[first:last][:, taken].to(dtype)
        up[rows_of, into] = expert_up[first:last][:, taken].to(dtype)
        if weight is not None:
            weight[rows_of, into] = router_weight[first:last][:, None].to(dtype)
    if forward.shared is not None and "shared" in plan:
        shared_gate, shared_up = forward.shared  # [rows of the batch, shared]
        into, taken = plan["shared"]
        gate[:, into] = shared_gate[start:stop][:, taken].to(dtype)
        up[:, into] = shared_up[start:stop][:, taken].to(dtype)
    return gate, up, weight


def _spans(tokens: Sequence[Tensor], start: int, stop: int) -> list[tuple[int, int]]:
    """Per expert, the slice of its (ascending) routed tokens that lies in rows
    ``start:stop``: found on the device for all experts at once, so that a GPU makes the
    host wait once per call rather than once per expert (as a boolean mask would)."""
    if not tokens:
        return []
    bounds = torch.tensor([start, stop], device=tokens[0].device)
    found = torch.stack([torch.searchsorted(token, bounds) for token in tokens]).tolist()
    return [(int(first), int(last)) for first, last in found]


# Where each expert's values go: expert (or "shared") -> (the output's columns, the expert's
# own neurons), slices for whole experts, index tensors for chosen neurons.
_Plan = dict[int | str, tuple[slice | Tensor, slice | Tensor]]


def _plan(
    columns: int | Sequence[int], n_experts: int, d_ff: int, shared: int, device: torch.device
) -> _Plan:
    """For each expert (and "shared", ``shared`` neurons wide), which of ``columns`` it
    fills from which of its neurons (:func:`~gatescope.records.moe_address`: the shared
    experts' neurons follow every routed one's; padding columns stay 0)."""
    routed = n_experts * d_ff
    if isinstance(columns, int):  # whole experts, in place: slices, no gathers
        plan: _Plan = {e: (slice(e * d_ff, (e + 1) * d_ff), slice(None)) for e in range(n_experts)}
        plan["shared"] = (slice(routed, routed + shared), slice(None))
        return plan
    grouped: dict[int | str, tuple[list[int], list[int]]] = {}
    for place, neuron in enumerate(columns):
        address = moe_address(int(neuron), n_experts, d_ff, shared)
        if address is None:  # padding: stays 0
            continue
        expert, own = address
        into, taken = grouped.setdefault(expert, ([], []))
        into.append(place)
        taken.append(own)
    return {
        e: (torch.tensor(into, device=device), torch.tensor(taken, device=device))
        for e, (into, taken) in grouped.items()
    }

"""Statistics of a mixture-of-experts layer: each expert's neurons over the tokens routed to it.

A layer's neurons are laid out as every routed expert's ``d_ff`` neurons in turn, then the
shared experts' (:class:`~gatescope.records.ExpertsRecord`), then padding up to the atlas's
width. :class:`RoutedStats` keeps one :class:`~gatescope.stats.accumulator.NeuronStats` per
routed expert, fed only the tokens routed to it, so an expert costs what it computes:
``k / experts`` of the tokens, not a zero-filled row for every token (which made the
statistics cost ``experts / k`` times the routed activations). An expert's tokens are
packed per text, in order, each with its position in its text (:class:`PackedTokens`); the
passes hash those positions for the typical draw and report them, so the statistics are
exactly those of zero-filled rows, where 0 puts a token in no sign case (float64 sums to
rounding: they add in another order). The shared experts see every token. Per expert the
layer also counts the counted tokens routed to it and sums their router weights.

From outside a :class:`RoutedStats` is one layer's statistics: its state is the experts'
states side by side along the neuron axes (:data:`~gatescope.stats.accumulator.NEURON_AXIS`),
which checkpoints, shards, ranks and the atlas take as they take a dense layer's.
:func:`layer_values` builds zero-filled rows of a few neurons for the pages'
recomputation, with each token's router weight (:mod:`gatescope.recompute`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gatescope.records import moe_address
from gatescope.stats.accumulator import NEURON_AXIS, NeuronStats

if TYPE_CHECKING:
    from gatescope.arch import RoutedForward

__all__ = ["PackedTokens", "RoutedStats", "layer_values", "pack_tokens"]


class RoutedStats:
    """Accumulates the statistics of one mixture-of-experts layer, ``width`` neurons.

    Args:
        width: The layer's neurons in the atlas: ``n_experts * d_ff + shared``, or more
            (padding, never updated).
        accumulator: Makes the statistics of a slice of the layer's neurons:
            ``accumulator(d_mlp, first_neuron=...)``, a ``NeuronStats`` with the layer's
            activation, ``k``, device, kernel, seed, layer...
        n_experts: Routed experts.
        d_ff: Neurons per routed expert.
        shared: Neurons of the shared experts (0: none).
    """

    def __init__(
        self, width: int, accumulator: Callable[..., NeuronStats], *, n_experts: int,
        d_ff: int, shared: int = 0,
    ) -> None:  # fmt: skip
        own = n_experts * d_ff + shared
        if width < own:
            raise ValueError(f"{n_experts} experts of {d_ff} and {shared} shared neurons "
                             f"do not fit in {width}")  # fmt: skip
        widths = [d_ff] * n_experts + [n for n in (shared, width - own) if n]
        firsts = itertools.accumulate(widths[:-1], initial=0)
        # Every routed expert's neurons, the shared experts', then the padding's (if any).
        # (Each keeps its own token count too, unused: the layer's is `tokens`.)
        self.pieces = [accumulator(n, first_neuron=first)
                       for n, first in zip(widths, firsts, strict=True)]  # fmt: skip
        self.shared = self.pieces[n_experts] if shared else None
        self.d_mlp = width
        first = self.pieces[0]
        self.device, self.dtype, self.kernel = first.device, first.dtype, first.kernel
        self.seed, self.layer = first.seed, first.layer
        self.tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self.routed = torch.zeros(n_experts, dtype=torch.int64, device=self.device)
        self.router_weight = torch.zeros(n_experts, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, forward: RoutedForward, text_index: Tensor, counted: Tensor) -> None:
        """Adds one forward of the layer.

        Args:
            forward: What the experts computed, over rows ``text * positions + position``.
            text_index: [texts] the batch's corpus indices.
            counted: [texts, positions] bool, the counted tokens.
        """
        texts, length = counted.shape
        flat = counted.reshape(-1)
        self.tokens += flat.sum()
        self._add_routing(forward, flat)
        packs = pack_tokens([e.token for e in forward.experts], texts, length)
        for e, packed in zip(forward.experts, packs, strict=True):
            if not len(e.token):  # (the capture sends none such; a pass needs a text)
                continue
            piece = self.pieces[e.expert]
            gate, up = packed.spread(e.gate), packed.spread(e.up)
            # the model's act(g), where the statistics take it (their dtype)
            act = packed.spread(e.act) if e.act.dtype == piece.dtype else None
            piece.update(gate, up, text_index[packed.text], packed.spread(flat[e.token]), act,
                         positions=packed.position)  # fmt: skip
            if piece.kernel != self.kernel:  # its Triton kernel failed: the whole layer's did
                for other in self.pieces:
                    other.fall_back_to_torch()
                self.kernel = piece.kernel
        if forward.shared is not None and self.shared is not None:
            gate, up, act = (x.view(texts, length, -1) if x is not None else None
                             for x in forward.shared)  # fmt: skip
            assert gate is not None and up is not None
            self.shared.update(gate, up, text_index, counted, act)

    def _add_routing(self, forward: RoutedForward, counted: Tensor) -> None:
        """Per expert: the counted tokens routed to it, and the sum of their router weights
        (every expert's (token, weight) pairs at once: two index_add_s)."""
        if not forward.experts:
            return
        expert = torch.cat([torch.full_like(e.token, e.expert) for e in forward.experts])
        kept = counted[torch.cat([e.token for e in forward.experts])]
        router_weight = torch.cat([e.weight for e in forward.experts]).to(torch.float64)
        self.routed.index_add_(0, expert, kept.to(torch.int64))
        self.router_weight.index_add_(0, expert, router_weight * kept)

    def state_dict(self) -> dict[str, Tensor]:
        """The layer's state, as :meth:`NeuronStats.state_dict` of a layer this wide with
        experts gives it (fresh tensors)."""
        states = [piece.state_dict() for piece in self.pieces]
        beside = {name: torch.cat([state[name] for state in states], dim=NEURON_AXIS[name])
                  for name in states[0] if name in NEURON_AXIS}  # fmt: skip
        return {"tokens": self.tokens.clone(), **beside, "routed": self.routed.clone(),
                "router_weight": self.router_weight.clone()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores a :meth:`state_dict`: each expert's statistics take their slice of the
        neuron axes (and check its shape)."""
        names = {*self.pieces[0].state_dict(), "routed", "router_weight"}
        if set(state) != names:
            raise ValueError(f"the state has {sorted(state)}, expected {sorted(names)}")
        widths = [piece.d_mlp for piece in self.pieces]
        parts: list[dict[str, Tensor]] = [{"tokens": state["tokens"]} for _ in self.pieces]
        for name in names & NEURON_AXIS.keys():
            tensor, axis = state[name], NEURON_AXIS[name]
            if tensor.dim() <= axis or tensor.shape[axis] != self.d_mlp:
                raise ValueError(f"state '{name}' has shape {tuple(tensor.shape)}, not "
                                 f"{self.d_mlp} neurons on axis {axis}")  # fmt: skip
            for part, own_part in zip(parts, tensor.split(widths, axis), strict=True):
                part[name] = own_part
        for piece, part in zip(self.pieces, parts, strict=True):
            piece.load_state_dict(part)
        self.tokens = state["tokens"].to(self.device, torch.int64).clone()
        self.routed = state["routed"].to(self.device, torch.int64).clone()
        self.router_weight = state["router_weight"].to(self.device, torch.float64).clone()


@dataclass(frozen=True)
class PackedTokens:
    """One expert's routed tokens packed per text, in order: ``[texts, slots]``, a row for
    each text with tokens routed to the expert, as long as the longest such text's share."""

    text: Tensor  # [texts] the batch's text of each row
    slot: tuple[Tensor, Tensor]  # [routed] each routed token's row and place in it
    position: Tensor  # [texts, slots] int64 the slot's token's position in its text (0: empty)

    def spread(self, values: Tensor) -> Tensor:
        """[routed, ...] per-token values into [texts, slots, ...] (0 in empty slots: in no
        sign case, and not counted)."""
        out = values.new_zeros(*self.position.shape, *values.shape[1:])
        out[self.slot] = values
        return out


def pack_tokens(tokens: Sequence[Tensor], texts: int, length: int) -> list[PackedTokens]:
    """Packs each expert's routed tokens per text.

    Args:
        tokens: Per expert, its routed rows of the batch, ascending (row = text * length +
            position).
        texts, length: The batch's shape.

    Returns:
        Per expert, its tokens packed (:class:`PackedTokens`). The host waits for the device
        twice for all experts at once (the groups' number and sizes), not once per expert.
    """
    if not tokens:
        return []
    device = tokens[0].device
    sizes = [len(token) for token in tokens]
    token = torch.cat(list(tokens))  # [routed pairs]: expert by expert, rows ascending
    # [routed pairs] the index of each one's expert in `tokens` (no host-to-device copy)
    owner = torch.cat([torch.full_like(rows, i) for i, rows in enumerate(tokens)])
    # A group: one expert's tokens of one text, contiguous. [groups], [routed pairs]
    groups, group, count = torch.unique_consecutive(
        owner * texts + torch.div(token, length, rounding_mode="floor"),
        return_inverse=True, return_counts=True,
    )  # fmt: skip
    place = torch.arange(len(token), device=device) - (torch.cumsum(count, 0) - count)[group]
    owner_of_group = torch.div(groups, texts, rounding_mode="floor")
    # (index_add_, not bincount: a CUDA bincount asks the host for its range)
    n_groups = torch.zeros(len(tokens), dtype=torch.int64, device=device)
    n_groups.index_add_(0, owner_of_group, torch.ones_like(owner_of_group))
    longest = torch.zeros_like(n_groups).scatter_reduce_(0, owner_of_group, count, "amax")
    packed, first_group, first_token = [], 0, 0
    for size, rows, slots in zip(sizes, *torch.stack([n_groups, longest]).tolist(), strict=True):
        own = slice(first_token, first_token + size)
        slot = (group[own] - first_group, place[own])
        position = torch.zeros(rows, slots, dtype=torch.int64, device=device)
        position[slot] = token[own] % length
        text = groups[first_group : first_group + rows] % texts
        packed.append(PackedTokens(text, slot, position))
        first_group, first_token = first_group + rows, first_token + size
    return packed


def layer_values(
    forward: RoutedForward, n_experts: int, d_ff: int, rows: int,
    columns: int | Sequence[int], *,
    dtype: torch.dtype, device: torch.device, weights: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """g, u (and the router's weight) of some neurons of a mixture-of-experts layer on every
    row of its batch: each routed expert's values on its routed tokens, the shared experts'
    on all, 0 elsewhere.

    Args:
        forward: What the layer computed.
        n_experts: Routed experts of the layer.
        d_ff: Neurons per routed expert (expert ``e``'s neuron ``n`` is the layer's
            ``e * d_ff + n``, the shared experts' follow every routed one's).
        rows: Rows of the flattened batch.
        columns: The layer's neurons: a width (all neurons up to it, padding beyond the
            layer's own as 0) or their indices, in the order wanted.
        dtype: The values' dtype.
        device: Where to build them.
        weights: Also give the router's weight of each (token, neuron): NaN where the
            neuron's expert did not get the token, and for shared neurons.

    Returns:
        ``gate``, ``up`` [rows, columns] and the weights [rows, columns] or None.
    """
    width = columns if isinstance(columns, int) else len(columns)
    gate = torch.zeros(rows, width, dtype=dtype, device=device)
    up = torch.zeros_like(gate)
    weight = torch.full_like(gate, math.nan) if weights else None
    shared = forward.shared[0].shape[-1] if forward.shared is not None else 0
    plan = _plan(columns, n_experts, d_ff, shared, device)
    for e in forward.experts:
        if e.expert not in plan:
            continue
        into, taken = plan[e.expert]
        rows_of = e.token if isinstance(into, slice) else e.token[:, None]
        gate[rows_of, into] = e.gate[:, taken].to(dtype)
        up[rows_of, into] = e.up[:, taken].to(dtype)
        if weight is not None:
            weight[rows_of, into] = e.weight[:, None].to(dtype)
    if forward.shared is not None and "shared" in plan:
        shared_gate, shared_up, _ = forward.shared  # [rows, shared]
        into, taken = plan["shared"]
        gate[:, into] = shared_gate[:, taken].to(dtype)
        up[:, into] = shared_up[:, taken].to(dtype)
    return gate, up, weight


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

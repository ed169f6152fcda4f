"""Streaming GLUScope statistics of one layer's gated-MLP neurons: the math of DESIGN.md.

This is the only module that computes statistics; everything else feeds it or reads its
state. It is pure torch and device-agnostic: it runs where the tensors it is given live.

For each neuron and sign case ``c`` (``gate+_in+``, ``gate+_in-``, ``gate-_in+``,
``gate-_in-``) it accumulates over the counted tokens of a corpus:

* ``count[c]``: tokens in the case (``freq = count / tokens``);
* ``sum[c, q]``: float64 sums of the four quantities ``q`` (``mean = sum / count``);
* for each of the 14 ranked lists ``(c, q)`` (:data:`~gatescope.constants.TOP_LISTS`): the
  ``k`` texts whose strongest token of case ``c`` has the largest ``|q|``, with the signed
  value, the text index and the token position. Ties go to the lower text index.

How it stays cheap: a batch is processed in chunks of whole texts small enough to stay in
cache, with reused workspace buffers (fresh multi-megabyte allocations cost more than the
arithmetic on a CPU). Within a case every quantity has a fixed sign (constants.SIGNS), so a
text's strongest token is a plain ``amax``/``amin`` over positions of the quantity masked by
the case. Argmax kernels are several times slower than ``amax`` ones, so positions come from
block maxima (see ``_strongest``). Each batch's candidates are merged into the ranked lists
with one sort of packed (|value|, text index) keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES, SIGNS, TOP_LISTS

N_CASES = len(CASES)
N_QUANTITIES = len(QUANTITIES)
N_LISTS = len(TOP_LISTS)

#: Elements of one [texts, positions, d_mlp] workspace buffer per chunk. About 20 such
#: buffers live at once; 2**18 float32 elements (1 MiB) keeps a chunk in a CPU's cache (on
#: the benchmark model one text per chunk was fastest), while on a GPU larger chunks only
#: save kernel launches.
CPU_CHUNK_ELEMENTS = 2**18
GPU_CHUNK_ELEMENTS = 2**24

#: Positions per block of the two-level search for a text's strongest token: block maxima
#: come from a fast ``amax``, then only the first block holding the maximum is searched.
BLOCK = 16

#: Text indices are packed into 31 bits of the ranking key.
MAX_TEXTS = 2**31 - 1

#: Candidates (texts) kept per list and neuron before they are merged into the ranked
#: lists, on a CPU: a merge sorts every list, so it runs once per few batches. On a GPU the
#: merge is cheap and memory is not, so candidates are merged after every batch.
CPU_PENDING_TEXTS = 32


class NeuronStats:
    """Accumulates the statistics of the ``d_mlp`` neurons of one gated MLP layer.

    Args:
        d_mlp: Number of neurons.
        act: The model's activation function (SiLU, GELU, ...), applied to ``gate``.
        k: Length of each ranked list.
        device: Where the state lives; ``update`` expects its tensors there.
        dtype: Floating type of the computation and of the stored top-k values: float32 for
            float32/bfloat16/float16 models, float64 for float64 models. Sums are float64.
        chunk_elements: Size of one workspace buffer; ``None`` picks a default per device.
        workspace: Scratch buffers to share with the other layers on the same device.
    """

    def __init__(
        self,
        d_mlp: int,
        act: Callable[[Tensor], Tensor],
        *,
        k: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_elements: int | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        self.d_mlp = d_mlp
        self.act = act
        self.k = k
        self.device = torch.device(device)
        self.dtype = dtype
        if chunk_elements is None:
            chunk_elements = CPU_CHUNK_ELEMENTS if self.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        self.chunk_elements = chunk_elements

        self.tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = torch.zeros(N_CASES, d_mlp, dtype=torch.int64, device=self.device)
        self.sum = torch.zeros(
            N_CASES, N_QUANTITIES, d_mlp, dtype=torch.float64, device=self.device
        )
        # The ranked lists and the candidates waiting to enter them, [list, neuron, slot]:
        # slots [0, k) hold the lists in rank order, slots [k, used) the pending candidates.
        # Empty slots hold text -1, position -1, value 0.
        self._pending_texts = CPU_PENDING_TEXTS if self.device.type == "cpu" else 0
        self._value, self._text, self._position = self._empty_slots(k + self._pending_texts)
        self._used = k

        self.workspace = workspace if workspace is not None else Workspace()
        self._block_offsets = torch.arange(BLOCK, device=self.device).view(1, 1, BLOCK, 1)
        self._signs = torch.tensor(SIGNS, dtype=dtype, device=self.device).view(
            N_CASES, N_QUANTITIES, 1, 1, 1
        )
        self._ranked_quantities = [
            torch.tensor([q for c, q in TOP_LISTS if c == case], device=self.device)
            for case in range(N_CASES)
        ]

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, gate: Tensor, up: Tensor, text_index: Tensor, valid: Tensor) -> None:
        """Adds one batch of texts.

        Args:
            gate: [batch, pos, d_mlp] ``g``, the gate projection's output.
            up: [batch, pos, d_mlp] ``u``, the up (in) projection's output.
            text_index: [batch] int64, the corpus index of each text (global, unique,
                below 2**31).
            valid: [batch, pos] bool, the counted tokens (not padding, BOS per option).
        """
        batch, length, d_mlp = gate.shape
        if d_mlp != self.d_mlp:
            raise ValueError(
                f"expected {self.d_mlp} neurons, got gate of shape {tuple(gate.shape)}"
            )
        valid = valid.to(self.device)
        text_index = text_index.to(self.device, torch.int64)
        self.tokens += valid.sum()

        # Per text: the strongest value of each list, its ranking key and position.
        values = torch.empty(N_LISTS, batch, d_mlp, dtype=self.dtype, device=self.device)
        keys = torch.empty_like(values)
        found = torch.full(values.shape, -1, dtype=torch.int64, device=self.device)

        chunk = max(1, self.chunk_elements // (length * d_mlp))
        for start in range(0, batch, chunk):
            texts = slice(start, min(start + chunk, batch))
            self._update_chunk(
                gate[texts], up[texts], valid[texts],
                values[:, texts], keys[:, texts], found[:, texts],
            )  # fmt: skip
        # Candidates of texts in which the case never occurs (key -inf) are empty slots.
        text = torch.where(keys == float("-inf"), -1, text_index.view(1, batch, 1))
        self._add_candidates(values.transpose(1, 2), text.transpose(1, 2), found.transpose(1, 2))

    def _update_chunk(
        self,
        gate: Tensor,
        up: Tensor,
        valid: Tensor,
        values: Tensor,
        keys: Tensor,
        found: Tensor,
    ) -> None:
        """Accumulates counts and sums of a chunk of texts and fills in their candidates.

        ``values``, ``keys`` and ``found`` ([list, chunk, neuron]) are views into the
        batch's candidate tensors and are written in place.
        """
        texts, length, _ = gate.shape
        q, cases, masked = self._buffers(texts, length)

        # q: [quantity, text, pos, neuron] = g, u, act(g), act(g) * u over positions padded
        # to whole blocks. Padding, uncounted tokens and the block tail get g = 0, which
        # puts them in no case (and act(0) = 0 for every GLU activation).
        torch.mul(gate, valid.unsqueeze(-1), out=q[0, :, :length])
        q[1, :, :length].copy_(up)
        q[:2, :, length:].zero_()
        q[2].copy_(self.act(q[0]))
        torch.mul(q[2], q[1], out=q[3])

        # signs: [pos/neg, g/u, text, pos, neuron] as 0/1 floats. A zero g or u is neither
        # positive nor negative, so it is in no case, as DESIGN.md requires. They live in
        # the buffer of `masked` (needed only later): a smaller workspace stays in cache.
        signs = masked.view(2, 2, *masked.shape[1:])
        torch.gt(q[:2], 0, out=signs[0])
        torch.lt(q[:2], 0, out=signs[1])
        # cases: [case, text, pos, neuron] one-hot, case = 2 * (g < 0) + (u < 0).
        g_sign, u_sign = signs[:, 0], signs[:, 1]
        torch.mul(g_sign.unsqueeze(1), u_sign.unsqueeze(0), out=cases.view(2, 2, *cases.shape[1:]))
        # Counts per text are sums of 0/1 floats: exact below 2**24 positions.
        count_per_text = cases.sum(dim=2)  # [case, text, neuron]
        self.count += count_per_text.sum(dim=1).to(torch.int64)

        for c in range(N_CASES):
            # masked: [quantity, text, pos, neuron], the quantities on case c's tokens, else 0.
            torch.mul(q, cases[c], out=masked)
            self.sum[c] += masked.sum(dim=2).sum(dim=1, dtype=torch.float64)
            lists = _LISTS_OF_CASE[c]
            present = count_per_text[c] > 0  # [text, neuron]
            value, position = self._strongest(masked, cases[c], present, c)
            values[lists] = value
            found[lists] = position
            # Ranking key |value|; -inf marks a text in which the case never occurs.
            keys[lists] = torch.where(present, value.abs(), float("-inf"))

    def _strongest(
        self, masked: Tensor, case_mask: Tensor, present: Tensor, case: int
    ) -> tuple[Tensor, Tensor]:
        """Each text's strongest token of one case, for each ranked quantity of the case.

        Two levels, because argmax kernels are several times slower than amax ones: the
        extremes of each block of BLOCK positions (all quantities at once, one pass for max
        and one for min), the first block holding a text's strongest value, then the first
        position inside that block.

        Args:
            masked: [quantity, text, pos, neuron] the quantities on the case's tokens, else 0;
                pos is a multiple of BLOCK.
            case_mask: [text, pos, neuron] 0/1 membership of the case.
            present: [text, neuron] bool, whether the case occurs in the text.
            case: The case index.

        Returns:
            value: [list, text, neuron] signed strongest value of each of the case's lists.
            position: [list, text, neuron] int64, its first position (meaningless where the
                case never occurs in the text).
        """
        quantities, texts, length, neurons = masked.shape
        blocks = masked.view(quantities, texts, length // BLOCK, BLOCK, neurons)
        sign = self._signs[case]  # [quantity, 1, 1, 1]: each quantity's sign in this case
        strength = torch.where(sign > 0, blocks.amax(dim=3), blocks.amin(dim=3).neg_())
        block = _first_max(strength, dim=2)  # [quantity, text, neuron]
        value = strength.amax(dim=2) * sign.view(-1, 1, 1)

        window = block.unsqueeze(2) * BLOCK + self._block_offsets  # [quantity, text, BLOCK, neuron]
        position = block * BLOCK + _first_max(masked.gather(2, window) * sign, dim=2)
        ranked = self._ranked_quantities[case]
        value, position = value[ranked], position[ranked]  # [list, text, neuron]

        # A strongest value of exactly 0 (act underflow, as GELU-tanh does far out) is also
        # the fill value of other cases' tokens: search those columns among the case's tokens.
        zero = (value == 0) & present
        if zero.any():
            lst, text, neuron = zero.nonzero(as_tuple=True)
            in_case = case_mask[text, :, neuron] > 0  # [candidate, pos]
            hit = (masked[ranked[lst], text, :, neuron] == 0) & in_case
            position[lst, text, neuron] = hit.to(torch.uint8).argmax(dim=1)  # first hit
        return value, position

    # ------------------------------------------------------------------ top-k

    @property
    def top_value(self) -> Tensor:
        """[list, neuron, rank] signed values of the ranked lists, strongest first."""
        self._merge_pending()
        return self._value[..., : self.k]

    @property
    def top_text(self) -> Tensor:
        """[list, neuron, rank] int32 text indices of the ranked lists (-1: empty)."""
        self._merge_pending()
        return self._text[..., : self.k]

    @property
    def top_position(self) -> Tensor:
        """[list, neuron, rank] int32 token positions of the ranked lists (-1: empty)."""
        self._merge_pending()
        return self._position[..., : self.k]

    def _empty_slots(self, slots: int) -> tuple[Tensor, Tensor, Tensor]:
        """Value, text and position tensors [list, neuron, slots], all empty."""
        shape = (N_LISTS, self.d_mlp, slots)
        text = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        return torch.zeros(shape, dtype=self.dtype, device=self.device), text, text.clone()

    def _grow_slots(self, slots: int) -> None:
        """Room for more pending candidates, keeping the ranked lists."""
        self._merge_pending()
        grown = self._empty_slots(slots)
        for new, old in zip(grown, (self._value, self._text, self._position), strict=True):
            new[..., : self.k] = old[..., : self.k]
        self._value, self._text, self._position = grown

    def _add_candidates(self, value: Tensor, text: Tensor, position: Tensor) -> None:
        """Queues candidates [list, neuron, n] (text -1: none) for the ranked lists."""
        n = value.shape[-1]
        if self.k + n > self._value.shape[-1]:
            self._grow_slots(self.k + max(n, self._pending_texts))
        if self._used + n > self._value.shape[-1]:
            self._merge_pending()
        slots = slice(self._used, self._used + n)
        self._value[..., slots] = value
        self._text[..., slots] = text
        self._position[..., slots] = position
        self._used += n
        if not self._pending_texts:
            self._merge_pending()

    def _merge_pending(self) -> None:
        """Merges the pending candidates into the ranked lists.

        Order: |value| descending, then text index ascending. Slots left without a
        candidate are emptied.
        """
        if self._used == self.k:
            return
        value = self._value[..., : self._used]
        text = self._text[..., : self._used]
        key = torch.where(text >= 0, value.abs(), float("-inf"))

        if self.dtype == torch.float32:
            # One sort of unique int64 keys: the bits of a non-negative float32 order like
            # the float, and the text index (descending) breaks ties towards lower indices.
            packed = (key.view(torch.int32).to(torch.int64) << 31) | (MAX_TEXTS - text)
            packed = packed.masked_fill_(text < 0, -1)
            best = packed.sort(dim=-1, descending=True).indices[..., : self.k]
        else:  # float64 keys do not fit beside an index: two stable sorts
            by_text = torch.sort(text, dim=-1, stable=True).indices
            by_key = torch.sort(key.gather(-1, by_text), dim=-1, descending=True, stable=True)
            best = by_text.gather(-1, by_key.indices[..., : self.k])

        empty = text.gather(-1, best) < 0
        ranked = (
            value.gather(-1, best).masked_fill_(empty, 0),
            text.gather(-1, best).masked_fill_(empty, -1),
            self._position[..., : self._used].gather(-1, best).masked_fill_(empty, -1),
        )
        for slots, new in zip((self._value, self._text, self._position), ranked, strict=True):
            slots[..., : self.k] = new
        self._used = self.k

    # ------------------------------------------------------------------ merge, state

    def merge(self, other: NeuronStats) -> None:
        """Adds the statistics of ``other`` (disjoint texts of the same layer) to these."""
        if (other.d_mlp, other.k) != (self.d_mlp, self.k):
            raise ValueError("cannot merge statistics of different shapes or k")
        self.tokens += other.tokens.to(self.device)
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)
        self._add_candidates(
            other.top_value.to(self.device, self.dtype),
            other.top_text.to(self.device),
            other.top_position.to(self.device),
        )
        self._merge_pending()

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated state; ``load_state_dict`` restores it exactly."""
        return {
            "tokens": self.tokens,
            "count": self.count,
            "sum": self.sum,
            "top_value": self.top_value,
            "top_text": self.top_text,
            "top_position": self.top_position,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        for name, tensor in expected.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"state '{name}' has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(tensor.shape)}"
                )
        self.tokens = state["tokens"].to(self.device, torch.int64).clone()
        self.count = state["count"].to(self.device, torch.int64).clone()
        self.sum = state["sum"].to(self.device, torch.float64).clone()
        self._merge_pending()
        self._value[..., : self.k] = state["top_value"]
        self._text[..., : self.k] = state["top_text"]
        self._position[..., : self.k] = state["top_position"]

    # ------------------------------------------------------------------ helpers

    def _buffers(self, texts: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
        """Workspace buffers q, cases, masked for ``texts`` texts of ``length``."""
        padded = -(-length // BLOCK) * BLOCK
        ws = self.workspace.get(texts, padded, self.d_mlp, self.dtype, self.device)
        return ws["q"][:, :texts], ws["cases"][:, :texts], ws["masked"][:, :texts]


class Workspace:
    """Scratch buffers for :meth:`NeuronStats.update`, shared by the layers of a model.

    A fresh multi-megabyte allocation costs more than the arithmetic done in it on a CPU,
    and one set of buffers for all layers stays in cache while the layers take turns (hooks
    run one layer at a time). Not for concurrent updates from several threads.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._key: tuple = ()

    def get(
        self, texts: int, padded: int, d_mlp: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """Buffers [..., at least ``texts``, ``padded``, ``d_mlp``]; a smaller chunk uses views."""
        capacity = self._key[0] if self._key else 0
        if self._key[1:] != (padded, d_mlp, dtype, device) or capacity < texts:
            shape = (max(texts, capacity), padded, d_mlp)
            new = lambda *lead: torch.empty(*lead, *shape, dtype=dtype, device=device)  # noqa: E731
            self._key = (shape[0], padded, d_mlp, dtype, device)
            self._buffers = {
                "q": new(N_QUANTITIES),
                "cases": new(N_CASES),
                "masked": new(N_QUANTITIES),
            }
        return self._buffers


def _first_max(x: Tensor, dim: int) -> Tensor:
    """Index of the first maximum of ``x`` along ``dim`` (int64).

    ``max(dim).indices`` does not promise the first of equal maxima on every device, and its
    CPU kernel is several times slower than ``amax``: compare with the maximum and keep the
    first hit (weights n, n-1, ..., 1 make the first hit the largest). Hits are floats
    because comparisons into bool tensors are slow on a CPU.
    """
    size = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = size
    weights = torch.arange(size, 0, -1, device=x.device, dtype=x.dtype).view(shape)
    hits = torch.empty_like(x)
    torch.eq(x, x.amax(dim=dim, keepdim=True), out=hits)
    return size - hits.mul_(weights).amax(dim=dim).to(torch.int64)


def _lists_of_case(case: int) -> slice:
    """The ranked lists of one case: TOP_LISTS is ordered by case, so they form a slice."""
    indices = [i for i, (c, _) in enumerate(TOP_LISTS) if c == case]
    assert indices == list(range(indices[0], indices[-1] + 1)), "TOP_LISTS must be case-major"
    return slice(indices[0], indices[-1] + 1)


_LISTS_OF_CASE: tuple[slice, ...] = tuple(_lists_of_case(c) for c in range(N_CASES))

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
cache, with preallocated workspace buffers (fresh multi-megabyte allocations cost more than
the arithmetic on CPU). Within a case every quantity has a fixed sign (constants.SIGNS), so
a text's strongest token is a plain ``amax``/``amin`` over positions of the quantity masked
by the case. Argmax-with-indices is ten times slower than ``amax``, so positions are found
only for candidates that can still enter a top-k list: densely while the lists fill up,
by gathering single columns once they are full (then few texts qualify).
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
#: buffers live at once; 2**20 float32 elements (4 MiB) keeps a chunk near a CPU's cache,
#: while on a GPU larger chunks only save kernel launches.
CPU_CHUNK_ELEMENTS = 2**20
GPU_CHUNK_ELEMENTS = 2**24

#: Above this fraction of candidates needing a position, the two-level argmax over every
#: list is cheaper than gathering single columns.
DENSE_POSITIONS_FRACTION = 1 / 8

#: Positions per block of the two-level argmax: the block maxima come from a fast ``amax``,
#: the argmax runs over BLOCK times fewer values, then one block per text is searched.
BLOCK = 16

#: Text indices are packed into 31 bits of the ranking key.
MAX_TEXTS = 2**31 - 1


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
        # Ranked lists [list, neuron, rank]; empty slots hold text -1, position -1, value 0.
        self.top_value = torch.zeros(N_LISTS, d_mlp, k, dtype=dtype, device=self.device)
        self.top_text = torch.full((N_LISTS, d_mlp, k), -1, dtype=torch.int64, device=self.device)
        self.top_position = torch.full_like(self.top_text, -1)

        self._workspace: dict[str, Tensor] = {}
        self._workspace_shape: tuple[int, ...] = ()
        self._block_offsets = torch.arange(BLOCK, device=self.device).view(1, BLOCK, 1)
        self._reverse_rank = torch.arange(BLOCK, 0, -1, device=self.device, dtype=torch.int16)
        self._reverse_rank = self._reverse_rank.view(1, BLOCK, 1)

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
        threshold = self._keys(self.top_value[..., -1], self.top_text[..., -1])  # [list, neuron]

        chunk = max(1, self.chunk_elements // (length * d_mlp))
        for start in range(0, batch, chunk):
            texts = slice(start, min(start + chunk, batch))
            self._update_chunk(
                gate[texts], up[texts], valid[texts],
                values[:, texts], keys[:, texts], found[:, texts], threshold,
            )  # fmt: skip
        text = text_index.view(1, 1, batch).expand(N_LISTS, d_mlp, batch)
        self._merge_top(values.transpose(1, 2), keys.transpose(1, 2), text, found.transpose(1, 2))

    def _update_chunk(
        self,
        gate: Tensor,
        up: Tensor,
        valid: Tensor,
        values: Tensor,
        keys: Tensor,
        found: Tensor,
        threshold: Tensor,
    ) -> None:
        """Accumulates counts and sums of a chunk of texts and fills in their candidates.

        ``values``, ``keys`` and ``found`` ([list, chunk, neuron]) are views into the
        batch's candidate tensors and are written in place.
        """
        texts, length, _ = gate.shape
        q, signs, cases, masked = self._buffers(texts, length)

        # q: [quantity, text, pos, neuron] = g, u, act(g), act(g) * u over positions padded
        # to whole blocks. Padding, uncounted tokens and the block tail get g = 0, which
        # puts them in no case (and act(0) = 0 for every GLU activation).
        torch.mul(gate, valid.unsqueeze(-1), out=q[0, :, :length])
        q[1, :, :length].copy_(up)
        q[:2, :, length:].zero_()
        q[2].copy_(self.act(q[0]))
        torch.mul(q[2], q[1], out=q[3])

        # signs: [pos/neg, g/u, text, pos, neuron] as 0/1 floats. sign() is 0 at 0, so a zero
        # g or u is in no case, as DESIGN.md requires.
        torch.sign(q[:2], out=signs[1])
        torch.clamp(signs[1], min=0, out=signs[0])
        torch.sub(signs[0], signs[1], out=signs[1])
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
            for lst in range(lists.start, lists.stop):
                qi = TOP_LISTS[lst][1]
                reduce = torch.amax if SIGNS[c][qi] > 0 else torch.amin
                reduce(masked[qi], dim=1, out=values[lst])
            present = count_per_text[c] > 0  # [text, neuron]
            # Ranking key |value|; -inf marks a text in which the case never occurs.
            keys[lists] = torch.where(present, values[lists].abs(), float("-inf"))
            need = present & (keys[lists] >= threshold[lists].unsqueeze(1))
            found[lists] = self._positions(masked, cases[c], values[lists], need, lists)

    def _positions(
        self, masked: Tensor, case_mask: Tensor, values: Tensor, need: Tensor, lists: slice
    ) -> Tensor:
        """Token positions of the candidates that may enter a ranked list.

        Args:
            masked: [quantity, text, pos, neuron] quantities of one case (0 elsewhere).
            case_mask: [text, pos, neuron] 0/1 membership of that case.
            values: [list, text, neuron] each text's strongest value of the case's lists.
            need: [list, text, neuron] bool, which candidates need their position.
            lists: The lists (a slice of TOP_LISTS, all of one case) of ``values`` and ``need``.

        Returns:
            [list, text, neuron] int64: the first position of the strongest token where
            ``need``, -1 elsewhere.
        """
        found = torch.full(values.shape, -1, dtype=torch.int64, device=values.device)
        case = TOP_LISTS[lists.start][0]
        quantities = [qi for _, qi in TOP_LISTS[lists]]
        if need.sum() > DENSE_POSITIONS_FRACTION * need.numel():
            for i, qi in enumerate(quantities):
                first = self._first_extreme(masked[qi], SIGNS[case][qi])
                found[i] = torch.where(need[i], first, -1)
            # A value of exactly 0 (act underflow) is also the fill value of the other cases'
            # tokens, so the dense search may have picked one of those: look those up below.
            need = need & (values == 0)
        if need.any():
            lst, text, neuron = need.nonzero(as_tuple=True)
            quantity = torch.tensor(quantities, device=values.device)[lst]
            column = masked[quantity, text, :, neuron]  # [candidate, pos]
            in_case = case_mask[text, :, neuron] > 0
            hit = (column == values[lst, text, neuron].unsqueeze(1)) & in_case
            found[lst, text, neuron] = hit.to(torch.uint8).argmax(dim=1)  # first hit
        return found

    def _first_extreme(self, x: Tensor, sign: int) -> Tensor:
        """[text, neuron]: the first position of the maximum (sign > 0) or minimum of ``x``.

        Two levels, because argmax kernels are several times slower than amax ones: the
        extreme of each block of positions, the first block holding the overall extreme,
        then the first position inside that block.

        Args:
            x: [text, pos, neuron] with pos a multiple of BLOCK.
        """
        texts, length, neurons = x.shape
        blocks = x.view(texts, length // BLOCK, BLOCK, neurons)
        if sign > 0:
            best, block = blocks.amax(dim=2).max(dim=1)
        else:
            best, block = blocks.amin(dim=2).min(dim=1)
        window = block.unsqueeze(1) * BLOCK + self._block_offsets  # [text, BLOCK, neuron]
        hit = x.gather(1, window) == best.unsqueeze(1)
        first = BLOCK - (hit * self._reverse_rank).amax(dim=1)
        return block * BLOCK + first

    # ------------------------------------------------------------------ top-k

    @staticmethod
    def _keys(value: Tensor, text: Tensor) -> Tensor:
        """Ranking keys |value|, -inf for empty slots."""
        return torch.where(text >= 0, value.abs(), float("-inf"))

    def _merge_top(self, value: Tensor, key: Tensor, text: Tensor, position: Tensor) -> None:
        """Merges candidates [list, neuron, n] into the ranked lists.

        Order: key descending, then text index ascending. Candidates with key -inf never
        enter; slots left without one are emptied.
        """
        key = torch.cat([self._keys(self.top_value, self.top_text), key], dim=-1)
        value = torch.cat([self.top_value, value], dim=-1)
        text = torch.cat([self.top_text, text], dim=-1)
        position = torch.cat([self.top_position, position], dim=-1)

        if self.dtype == torch.float32:
            # One sort of unique int64 keys: the bits of a non-negative float32 order like
            # the float, and the text index (descending) breaks ties towards lower indices.
            packed = (key.view(torch.int32).to(torch.int64) << 31) | (MAX_TEXTS - text)
            packed = packed.masked_fill_(key == float("-inf"), -1)
            best = packed.sort(dim=-1, descending=True).indices[..., : self.k]
        else:  # float64 keys do not fit beside an index: two stable sorts
            by_text = torch.sort(text, dim=-1, stable=True).indices
            by_key = torch.sort(key.gather(-1, by_text), dim=-1, descending=True, stable=True)
            best = by_text.gather(-1, by_key.indices[..., : self.k])

        empty = key.gather(-1, best) == float("-inf")
        self.top_value = value.gather(-1, best).masked_fill_(empty, 0)
        self.top_text = text.gather(-1, best).masked_fill_(empty, -1)
        self.top_position = position.gather(-1, best).masked_fill_(empty, -1)

    # ------------------------------------------------------------------ merge, state

    def merge(self, other: NeuronStats) -> None:
        """Adds the statistics of ``other`` (disjoint texts of the same layer) to these."""
        if (other.d_mlp, other.k) != (self.d_mlp, self.k):
            raise ValueError("cannot merge statistics of different shapes or k")
        self.tokens += other.tokens.to(self.device)
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)
        value = other.top_value.to(self.device, self.dtype)
        text = other.top_text.to(self.device)
        self._merge_top(value, self._keys(value, text), text, other.top_position.to(self.device))

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
        self.top_value = state["top_value"].to(self.device, self.dtype).clone()
        self.top_text = state["top_text"].to(self.device, torch.int64).clone()
        self.top_position = state["top_position"].to(self.device, torch.int64).clone()

    # ------------------------------------------------------------------ helpers

    def _buffers(self, texts: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Workspace buffers q, signs, cases, masked for ``texts`` texts of ``length``.

        Positions are padded to whole blocks. Buffers are kept for the next call (a fresh
        allocation costs more than the arithmetic on a CPU); a smaller last chunk uses views.
        """
        padded = -(-length // BLOCK) * BLOCK
        if (
            len(self._workspace_shape) != 2
            or self._workspace_shape[0] < texts
            or (self._workspace_shape[1] != padded)
        ):
            shape = (
                max(texts, self._workspace_shape[0] if self._workspace_shape else 0),
                padded,
                self.d_mlp,
            )
            new = lambda *lead: torch.empty(*lead, *shape, dtype=self.dtype, device=self.device)  # noqa: E731
            self._workspace_shape = shape[:2]
            self._workspace = {
                "q": new(N_QUANTITIES),
                "signs": new(2, 2),
                "cases": new(N_CASES),
                "masked": new(N_QUANTITIES),
            }
        ws = self._workspace
        return (
            ws["q"][:, :texts],
            ws["signs"][:, :, :texts],
            ws["cases"][:, :texts],
            ws["masked"][:, :texts],
        )


def _lists_of_case(case: int) -> slice:
    """The ranked lists of one case: TOP_LISTS is ordered by case, so they form a slice."""
    indices = [i for i, (c, _) in enumerate(TOP_LISTS) if c == case]
    assert indices == list(range(indices[0], indices[-1] + 1)), "TOP_LISTS must be case-major"
    return slice(indices[0], indices[-1] + 1)


_LISTS_OF_CASE: tuple[slice, ...] = tuple(_lists_of_case(c) for c in range(N_CASES))

"""The statistics pass in torch operations: any device (the GPU path).

Within a case every quantity has a fixed sign (constants.SIGNS), so a text's strongest
token is a plain ``amax``/``amin`` over positions of the quantity masked by the case.
A batch is processed in chunks of whole texts, in reused workspace buffers: fresh
multi-megabyte allocations cost more than the arithmetic done in them. Argmax kernels are
several times slower than ``amax`` ones, so positions come from block maxima (see
``TorchPass._strongest``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES, SIGNS
from gatescope.stats import distributions
from gatescope.stats.batch import PerText, Totals, Workspace
from gatescope.stats.quantities import fill_quantities

N_CASES = len(CASES)
N_QUANTITIES = len(QUANTITIES)

#: Elements of one [texts, positions, d_mlp] workspace buffer per chunk. About 12 such
#: buffers live at once; 2**18 float32 elements (1 MiB) keeps a chunk in a CPU's cache,
#: while on a GPU larger chunks only save kernel launches.
CPU_CHUNK_ELEMENTS = 2**18
GPU_CHUNK_ELEMENTS = 2**24

#: Positions per block of the two-level search for a text's strongest token: block maxima
#: come from a fast ``amax``, then only the first block holding the maximum is searched.
BLOCK = 16


class TorchPass:
    """Adds batches to a layer's counts and sums and finds each text's strongest tokens.

    Args:
        act: The model's activation function, applied to ``g``.
        device: Where the tensors live.
        dtype: Floating type of the computation (float32 or float64).
        chunk_elements: Size of one workspace buffer; ``None`` picks a default per device.
        workspace: Scratch buffers shared with the other layers on the same device.
    """

    def __init__(
        self,
        act: Callable[[Tensor], Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        chunk_elements: int | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        self.act = act
        self.device = device
        self.dtype = dtype
        if chunk_elements is None:
            chunk_elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
        self.chunk_elements = chunk_elements
        self.workspace: Workspace = workspace if workspace is not None else Workspace()
        self._block_offsets = torch.arange(BLOCK, device=device).view(1, 1, BLOCK, 1)
        self._signs = torch.tensor(SIGNS, dtype=dtype, device=device).view(
            N_CASES, N_QUANTITIES, 1, 1, 1
        )

    def __call__(
        self,
        gate: Tensor,
        up: Tensor,
        valid: Tensor,
        totals: Totals,
        salt: Tensor | None,
        swish: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> PerText:
        """The :class:`~gatescope.stats.batch.StatisticsPass` contract."""
        batch, length, neurons = gate.shape
        pairs = N_CASES * N_QUANTITIES
        strength = torch.empty(pairs, batch, neurons, dtype=self.dtype, device=self.device)
        position = torch.empty(pairs, batch, neurons, dtype=torch.int64, device=self.device)
        typical = None
        if salt is not None:
            typical = (
                torch.empty(N_CASES, batch, neurons, dtype=torch.int64, device=self.device),
                torch.empty(N_CASES, N_QUANTITIES, batch, neurons, dtype=self.dtype,
                            device=self.device),
            )  # fmt: skip
        chunk = max(1, self.chunk_elements // (length * neurons))
        for start in range(0, batch, chunk):
            texts = slice(start, min(start + chunk, batch))
            q, cases = self._chunk(
                gate[texts], up[texts], None if swish is None else swish[texts], valid[texts],
                totals, strength[:, texts], position[:, texts],
            )  # fmt: skip
            if totals.histogram is None and typical is None:
                continue
            case, in_case = _case_index(cases)  # [text, pos, neuron]
            if totals.histogram is not None and totals.joint is not None:
                _add_histograms(q, case, in_case, totals.histogram, totals.joint)
            if salt is not None and typical is not None:
                hashed = None if positions is None else positions[texts]
                _draw_typical(q, case, in_case, salt[:, texts], hashed, typical[0][:, texts],
                              typical[1][:, :, texts])  # fmt: skip
        return PerText(strength, position, *(typical or (None, None)))

    def _chunk(
        self,
        gate: Tensor,
        up: Tensor,
        swish: Tensor | None,
        valid: Tensor,
        totals: Totals,
        strength: Tensor,
        position: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One chunk of texts; ``strength`` and ``position`` ([pair, chunk, neuron]) are
        views into the batch's results and are written in place. Returns the chunk's
        quantities ``q`` and one-hot ``cases`` (workspace views, valid until the next
        chunk)."""
        texts, length, _ = gate.shape
        q, cases, masked = self._buffers(texts, length, gate.shape[2])

        # q: [quantity, text, pos, neuron] = g, u, act(g), act(g) * u over positions padded
        # to whole blocks. Padding, uncounted tokens and the block tail get g = 0, which
        # puts them in no case (and act(0) = 0 for every GLU activation).
        torch.mul(gate, valid.unsqueeze(-1), out=q[0, :, :length])
        q[1, :, :length].copy_(up)
        q[:2, :, length:].zero_()
        if swish is None:
            fill_quantities(q, self.act)
        else:  # the model's act(g), zero where g is
            torch.mul(swish, valid.unsqueeze(-1), out=q[2, :, :length])
            q[2, :, length:].zero_()
            torch.mul(q[2], q[1], out=q[3])

        # signs: [pos/neg, g/u, text, pos, neuron] as 0/1 floats. A zero g or u is neither
        # positive nor negative, so it is in no case (docs/architecture.md). They live in
        # the buffer of `masked` (needed only later): a smaller workspace stays in cache.
        signs = masked.view(2, 2, *masked.shape[1:])
        torch.gt(q[:2], 0, out=signs[0])
        torch.lt(q[:2], 0, out=signs[1])
        # cases: [case, text, pos, neuron] one-hot, case = 2 * (g < 0) + (u < 0).
        g_sign, u_sign = signs[:, 0], signs[:, 1]
        torch.mul(g_sign.unsqueeze(1), u_sign.unsqueeze(0), out=cases.view(2, 2, *cases.shape[1:]))
        # Counts per text are sums of 0/1 floats: exact below 2**24 positions.
        count_per_text = cases.sum(dim=2)  # [case, text, neuron]
        totals.count.add_(count_per_text.sum(dim=1).to(torch.int64))

        for c in range(N_CASES):
            # masked: [quantity, text, pos, neuron], the quantities on case c's tokens, else 0.
            torch.mul(q, cases[c], out=masked)
            totals.sums[c] += masked.sum(dim=(1, 2), dtype=torch.float64)
            # Weakest |value|: the case's tokens only (a bool mask: the masked zeros are not).
            in_case = (cases[c] > 0).unsqueeze(0)  # [1, text, pos, neuron]
            magnitude = torch.where(in_case, masked.abs(), float("inf"))
            weakest = totals.weakest[c]
            torch.minimum(weakest, magnitude.amin(dim=(1, 2)), out=weakest)
            pairs = slice(c * N_QUANTITIES, (c + 1) * N_QUANTITIES)
            present = count_per_text[c] > 0  # [text, neuron]
            case_strength, case_position = self._strongest(masked, cases[c], c)
            strength[pairs] = torch.where(present, case_strength, float("-inf"))
            position[pairs] = case_position
        return q, cases

    def _strongest(self, masked: Tensor, case_mask: Tensor, case: int) -> tuple[Tensor, Tensor]:
        """Each text's strongest token of one case, for each quantity.

        Two levels, because argmax kernels are several times slower than amax ones: the
        extremes of each block of BLOCK positions (all quantities at once, one pass for max
        and one for min), the first block holding a text's strongest value, then the first
        position inside that block.

        Args:
            masked: [quantity, text, pos, neuron] the quantities on the case's tokens, else 0;
                pos is a multiple of BLOCK.
            case_mask: [text, pos, neuron] 0/1 membership of the case.
            case: The case index.

        Returns:
            strength: [quantity, text, neuron] |strongest value|.
            position: [quantity, text, neuron] int64, its first position (meaningless where
                the case never occurs in the text).
        """
        quantities, texts, length, neurons = masked.shape
        blocks = masked.view(quantities, texts, length // BLOCK, BLOCK, neurons)
        sign = self._signs[case]  # [quantity, 1, 1, 1]: each quantity's sign in this case
        block_strength = torch.where(sign > 0, blocks.amax(dim=3), blocks.amin(dim=3).neg_())
        block = _first_max(block_strength, dim=2)  # [quantity, text, neuron]
        strength = block_strength.amax(dim=2)

        window = block.unsqueeze(2) * BLOCK + self._block_offsets  # [quantity, text, BLOCK, neuron]
        position = block * BLOCK + _first_max(masked.gather(2, window) * sign, dim=2)
        # A strongest value of exactly 0 (act underflow, as GELU-tanh does far out) is also
        # the fill value of other cases' tokens; then every token of the case is 0 and the
        # first of them is the strongest. (No test of whether any is 0: it would make the
        # host wait for the GPU.)
        first = _first_max(case_mask, dim=1)  # [text, neuron]
        return strength, torch.where(strength == 0, first, position)

    def _buffers(self, texts: int, length: int, neurons: int) -> tuple[Tensor, Tensor, Tensor]:
        """Workspace buffers q, cases, masked for ``texts`` texts of ``length``."""
        padded = -(-length // BLOCK) * BLOCK
        ws = self.workspace.get(texts, padded, neurons, self.dtype, self.device)
        return ws["q"], ws["cases"], ws["masked"]


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


def _case_index(cases: Tensor) -> tuple[Tensor, Tensor]:
    """From one-hot ``cases`` [case, text, pos, neuron]: each token's case (int64; 0 where
    it is in none) and whether it is in one (bool)."""
    weights = torch.arange(N_CASES, device=cases.device, dtype=cases.dtype).view(-1, 1, 1, 1)
    index = (cases * weights).sum(dim=0).to(torch.int64)
    return index, cases.sum(dim=0) > 0


def _add_histograms(
    q: Tensor, case: Tensor, in_case: Tensor, histogram: Tensor, joint: Tensor
) -> None:
    """Adds a chunk's tokens to the magnitude and joint histograms (int32, in place).

    Args:
        q: [quantity, text, pos, neuron] the quantities (padding in no case).
        case, in_case: [text, pos, neuron] each token's case and whether it is in one
            (``_case_index``).
        histogram: [case, quantity, bin, neuron].
        joint: [case, |g| bin, |u| bin, neuron].
    """
    neurons = q.shape[-1]
    ones = in_case.to(torch.int32).flatten()  # tokens in no case add 0 (at a valid index)
    neuron = torch.arange(neurons, device=q.device)
    for quantity in range(N_QUANTITIES):  # one at a time: a few chunk-sized temporaries
        bins = distributions.magnitude_bins(q[quantity])  # [text, pos, neuron]
        row = (case * N_QUANTITIES + quantity) * distributions.N_BINS + bins
        histogram.view(-1).scatter_add_(0, (row * neurons + neuron).flatten(), ones)
    g_bin, u_bin = distributions.joint_bins(q[0]), distributions.joint_bins(q[1])
    size = distributions.N_JOINT_BINS
    flat = ((case * size + g_bin) * size + u_bin) * neurons + neuron
    joint.view(-1).scatter_add_(0, flat.flatten(), ones)


def _draw_typical(
    q: Tensor, case: Tensor, in_case: Tensor, salt: Tensor, hashed: Tensor | None,
    position: Tensor, value: Tensor,
) -> None:  # fmt: skip
    """Each text's token for the typical examples: the smallest token priority among the
    case's tokens, the first position on a tie.

    Args:
        q: [quantity, text, pos, neuron] the quantities.
        case, in_case: [text, pos, neuron] each token's case and whether it is in one
            (``_case_index``).
        salt: [case, text, neuron] int64 token-draw salts (-1: not drawn).
        hashed: [text, pos] int64 the tokens' positions in their texts, which the draw
            hashes (None: the index along pos; ties go to the lower index either way).
        position: [case, text, neuron] int64, written: the drawn position or -1.
        value: [case, quantity, text, neuron], written: its quantities (0: none).
    """
    length = q.shape[2]
    at = torch.arange(length, device=q.device).view(1, -1, 1)  # [1, pos, 1]
    # A token is in one case at most, so one hash per token serves all four: with the salt
    # of its own case. [text, pos, neuron]
    token_salt = salt.unsqueeze(2).expand(-1, -1, length, -1).gather(0, case.unsqueeze(0))[0]
    in_text = at
    if hashed is not None:  # [text, pos, 1]; the block padding is in no case: any 0 does
        in_text = torch.nn.functional.pad(hashed, (0, length - hashed.shape[1])).unsqueeze(-1)
    priority = distributions.token_priority(token_salt, in_text)
    key = distributions.ranking_key(priority, at, in_case & (token_salt >= 0))
    for c in range(N_CASES):
        # [text, neuron] the smallest key (priority, then position) among the case's tokens
        best = key.where(case == c, distributions.NO_KEY).amin(dim=1)
        found = best != distributions.NO_KEY
        chosen = best & (2**distributions.KEY_LOW_BITS - 1)
        position[c] = torch.where(found, chosen, -1)
        index = chosen.where(found, 0).unsqueeze(0).unsqueeze(2).expand(N_QUANTITIES, -1, 1, -1)
        picked = q.gather(2, index).squeeze(2)  # [quantity, text, neuron]
        value[c] = picked.where(found.unsqueeze(0), 0)

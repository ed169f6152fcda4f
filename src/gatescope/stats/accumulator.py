"""The per-layer accumulator: counts, float64 sums, the ranked top-k lists, and the
distributions (histograms and typical examples).

A pass (:mod:`~gatescope.stats.cpu_pass` on a CPU, :mod:`~gatescope.stats.torch_pass`
elsewhere) adds a batch to the counts, sums and histograms and finds each text's strongest
token per list and its drawn typical token; this module keeps the state and merges those
per-text candidates: into the ranked lists by (|value| descending, text index), into the
typical examples by their smallest (priority, text index) keys. On a CPU the merges insert
candidates one by one (:mod:`~gatescope.stats.cpu_merge`); elsewhere ``topk`` selects them.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES, SIGNS, TOP_LISTS
from gatescope.errors import GatescopeError
from gatescope.stats import distributions
from gatescope.stats.batch import PerText, StatisticsPass, Totals, Workspace
from gatescope.stats.torch_pass import TorchPass

N_CASES = len(CASES)
N_QUANTITIES = len(QUANTITIES)
N_LISTS = len(TOP_LISTS)

#: Text indices are packed into 31 bits of the ranking key.
MAX_TEXTS = 2**31 - 1

KERNELS = ("auto", "cpu", "torch", "triton")

#: The histograms count in int32.
MAX_HISTOGRAM_TOKENS = 2**31 - 1

#: The neuron axis of each tensor of a state (:meth:`NeuronStats.state_dict`) that has one:
#: how the states of a layer's slices of neurons go side by side.
NEURON_AXIS = {
    "count": 1, "sum": 2, "max": 2, "min": 2,  # [case, (quantity,) neuron]
    "top_value": 1, "top_text": 1, "top_position": 1,  # [list, neuron, rank]
    "histogram": 3, "joint": 3,  # [case, quantity or |g| bin, bin, neuron]
    # [case, (quantity,) neuron, slot]
    "typical_text": 1, "typical_position": 1, "typical_value": 2,
}  # fmt: skip


class NeuronStats:
    """Accumulates the statistics of the ``d_mlp`` neurons of one gated MLP layer.

    Args:
        d_mlp: Number of neurons.
        act: The model's activation function (SiLU, GELU, ...), applied to ``gate``; None
            for statistics that are only merged, never updated (:meth:`from_states`).
        k: Length of each ranked list.
        device: Where the state lives; ``update`` expects its tensors there.
        dtype: Floating type of the computation and of the stored top-k values: float32 for
            float32/bfloat16/float16 models, float64 for float64 models. Sums are float64.
        kernel: ``"cpu"`` (the fused CPU pass and numba's merges), ``"torch"`` (torch
            operations, any device), ``"triton"`` (the fused Triton kernel: CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``) or ``"auto"``: the CPU kernel on a CPU,
            Triton on CUDA where it is installed and computes the activation, torch
            elsewhere. The attribute ``kernel`` holds the one chosen.
        chunk_elements: Workspace size of the torch pass; ``None`` picks one per device.
        workspace: The pass's scratch buffers, to share with the other layers.
        distributions: Whether to collect the histograms and typical examples
            (:mod:`~gatescope.stats.distributions`).
        seed: The typical examples' draw.
        layer: The layer's index (part of the draw: each layer draws its own texts).
        first_neuron: The layer's index of the first of these neurons, where they are a
            slice of a wider layer (an expert's, :mod:`~gatescope.stats.routed`): each
            neuron draws its typical examples as the layer's would.
        experts: Routed experts of a mixture-of-experts layer (0: a dense layer): per expert
            the counted tokens routed to it and the sum of their router weights
            (:meth:`add_routing`).
    """

    def __init__(
        self,
        d_mlp: int,
        act: Callable[[Tensor], Tensor] | None,
        *,
        k: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
        chunk_elements: int | None = None,
        workspace: Workspace | None = None,
        distributions: bool = True,
        seed: int = 0,
        layer: int = 0,
        first_neuron: int = 0,
        experts: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        self.d_mlp = d_mlp
        self.act = act
        self.k = k
        self.device: torch.device = torch.device(device)
        self.dtype = dtype
        self.kernel = self._resolve_kernel(kernel)
        # Triton chosen by "auto" falls back to the torch pass if its first batch fails.
        self._auto_triton = kernel == "auto" and self.kernel == "triton"
        self._chunk_elements, self._workspace = chunk_elements, workspace
        self._pass = self._choose_pass(chunk_elements, workspace)

        self.tokens: Tensor = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count: Tensor = torch.zeros(N_CASES, d_mlp, dtype=torch.int64, device=self.device)
        self.sum: Tensor = torch.zeros(
            N_CASES, N_QUANTITIES, d_mlp, dtype=torch.float64, device=self.device
        )
        # [case, quantity, neuron] the largest and smallest |value| over the case's tokens
        # (-inf / +inf while the case has not occurred); `maximum`/`minimum` sign them.
        self._strongest = torch.full(
            (N_CASES, N_QUANTITIES, d_mlp), float("-inf"), dtype=dtype, device=self.device
        )
        self._weakest = torch.full_like(self._strongest, float("inf"))
        # The ranked lists [list, neuron, rank], in rank order; empty slots hold text -1,
        # position -1, value 0.
        self._value, self._text, self._position = self._empty_lists()
        # A value is its strength (|value|) times its (case, quantity)'s sign.
        self._signs = torch.tensor(SIGNS, dtype=dtype, device=self.device).unsqueeze(-1)
        self._list_pairs = torch.tensor(
            [c * N_QUANTITIES + q for c, q in TOP_LISTS], device=self.device
        )
        self._list_signs = self._signs.flatten()[self._list_pairs].view(N_LISTS, 1, 1)
        self.distributions = distributions
        self.seed, self.layer = seed, layer
        self._neuron_salt: Tensor | None = None
        self._cases = torch.arange(N_CASES, device=self.device)
        self.first_neuron = first_neuron
        self._neurons = torch.arange(first_neuron, first_neuron + d_mlp, device=self.device)
        self.histogram: Tensor | None = None
        self.joint: Tensor | None = None
        if distributions:
            self._empty_distributions()
        self.experts = experts
        self.routed = torch.zeros(experts, dtype=torch.int64, device=self.device)
        self.router_weight = torch.zeros(experts, dtype=torch.float64, device=self.device)

    def fall_back_to_torch(self) -> None:
        """Takes the torch pass from now on: what ``update`` does when the Triton kernel that
        "auto" chose fails on its first batch (and what the other experts of a layer do
        then, :class:`~gatescope.stats.routed.RoutedStats`)."""
        self.kernel, self._auto_triton = "torch", False
        self._pass = self._choose_pass(self._chunk_elements, self._workspace)

    def add_routing(self, routed: Tensor, router_weight: Tensor) -> None:
        """Adds a batch's routing: [experts] counted tokens sent to each expert (int64) and
        the sum of their router weights."""
        self.routed += routed.to(self.device, torch.int64)
        self.router_weight += router_weight.to(self.device, torch.float64)

    def _empty_distributions(self) -> None:
        """Histograms at zero and no typical examples (slots: text -1, position -1, value 0)."""
        n_bins, joint_bins = distributions.N_BINS, distributions.N_JOINT_BINS
        zeros = functools.partial(torch.zeros, dtype=torch.int32, device=self.device)
        # [case, quantity, bin, neuron] and [case, |g| bin, |u| bin, neuron]
        self.histogram = zeros(N_CASES, N_QUANTITIES, n_bins, self.d_mlp)
        self.joint = zeros(N_CASES, joint_bins, joint_bins, self.d_mlp)
        # The typical examples, [case, neuron, slot] by ascending key (priority << 31 | text).
        shape = (N_CASES, self.d_mlp, self.k)
        self._typical_key = torch.full(shape, distributions.NO_KEY, device=self.device)
        self._typical_text = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        self._typical_position = self._typical_text.clone()
        self._typical_value = torch.zeros(
            N_CASES, N_QUANTITIES, self.d_mlp, self.k, dtype=self.dtype, device=self.device
        )

    def _resolve_kernel(self, kernel: str) -> str:
        """``"cpu"`` (numba's pass and merges), ``"triton"`` or ``"torch"``, for the one
        asked."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        if kernel == "auto":
            if self.device.type == "cpu":
                return "cpu" if _numba_works() else "torch"
            if self.device.type == "cuda" and _triton_computes(self.act, self.dtype, self.device):
                return "triton"
            return "torch"
        problem = kernel_problem(kernel, self.device, self.dtype, self.act)
        if problem is not None:
            raise ValueError(problem)
        return kernel

    def _choose_pass(
        self, chunk_elements: int | None, workspace: Workspace | None
    ) -> StatisticsPass:
        act = self.act if self.act is not None else _no_activation
        if self.kernel == "cpu":
            from gatescope.stats.cpu_pass import cpu_pass

            scratch = workspace if workspace is not None else Workspace()
            return functools.partial(cpu_pass, act=act, workspace=scratch)
        if self.kernel == "triton":
            from gatescope.stats.triton_pass import TritonPass

            return TritonPass(act, device=self.device, dtype=self.dtype)
        return TorchPass(
            act,
            device=self.device,
            dtype=self.dtype,
            chunk_elements=chunk_elements,
            workspace=workspace,
        )

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(
        self,
        gate: Tensor,
        up: Tensor,
        text_index: Tensor,
        valid: Tensor,
        swish: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> None:
        """Adds one batch of texts.

        Args:
            gate: [batch, pos, d_mlp] ``g``, the gate projection's output.
            up: [batch, pos, d_mlp] ``u``, the up (in) projection's output.
            text_index: [batch] int64, the corpus index of each text (global, unique,
                below 2**31).
            valid: [batch, pos] bool, the counted tokens (not padding, BOS per option).
            swish: [batch, pos, d_mlp] the model's own ``act(g)``, or None. It saves
                applying the activation again when it is in the statistics' dtype (as
                ``g`` is then, it is the very value); otherwise ``act`` is applied to ``g``
                in that dtype.
            positions: [batch, pos] int64, each token's position in its text where the
                texts' tokens are packed (a mixture of experts' routed tokens, in order:
                :mod:`~gatescope.stats.routed`), or None: a token's position is its index
                along pos. The ranked lists and typical examples keep these positions.
        """
        batch, _, d_mlp = gate.shape
        if d_mlp != self.d_mlp:
            raise ValueError(
                f"expected {self.d_mlp} neurons, got gate of shape {tuple(gate.shape)}"
            )
        valid = valid.to(self.device)
        text_index = text_index.to(self.device, torch.int64)
        self.tokens += valid.sum()
        if swish is not None and swish.shape != gate.shape:
            raise ValueError(
                f"swish has shape {tuple(swish.shape)}, gate {tuple(gate.shape)}: they must match"
            )
        if swish is not None and swish.dtype != self.dtype:
            swish = None
        if self.kernel != "triton":  # the Triton kernel reads the model's dtype itself
            gate, up = gate.to(self.dtype), up.to(self.dtype)
        totals = Totals(self.count, self.sum, self._weakest, self.histogram, self.joint)
        priority = self._text_priority(text_index) if self.distributions else None
        try:
            per_text = self._pass(gate, up, valid, totals, self._salts(priority), swish, positions)
        except Exception as error:  # e.g. Triton cannot compile for this GPU: before any update
            if not self._auto_triton:
                raise
            warnings.warn(f"the Triton kernel failed ({error}); using the torch pass", stacklevel=2)
            self.fall_back_to_torch()
            gate, up = gate.to(self.dtype), up.to(self.dtype)
            per_text = self._pass(gate, up, valid, totals, self._salts(priority), swish, positions)
        if positions is not None:
            per_text = _in_texts(per_text, positions.to(self.device))
        if priority is not None:
            self._add_typical_candidates(per_text, priority, text_index)
        # [case * 4 + quantity, text, neuron]: each text's strongest token (-inf: the case
        # does not occur in the text).
        strength, position = per_text.strength, per_text.position
        strongest = strength.amax(dim=1).view(N_CASES, N_QUANTITIES, d_mlp)
        torch.maximum(self._strongest, strongest, out=self._strongest)

        lists = self._list_pairs
        strength, position = strength[lists], position[lists]  # [list, text, neuron]
        present = strength != float("-inf")
        value = torch.where(present, strength * self._list_signs, 0)
        text = torch.where(present, text_index.view(1, batch, 1), -1)
        self._add_candidates(value, text, position)

    # ------------------------------------------------------------------ typical examples

    def _text_priority(self, text_index: Tensor) -> Tensor:
        """[case, text, neuron] the texts' draw priorities for every neuron."""
        if self._neuron_salt is None:  # [case, 1, neuron], hashed once
            neurons = self._neurons.view(1, 1, -1)
            case = self._cases.view(-1, 1, 1)
            self._neuron_salt = distributions.neuron_salt(self.seed, self.layer, case, neurons)
        return distributions.mix32(self._neuron_salt ^ text_index.view(1, -1, 1))

    def _priority(self, text: Tensor, neuron: Tensor) -> Tensor:
        """Draw priorities of ``text`` for ``neuron`` in each case (case first; the
        arguments broadcast with [case, 1, 1])."""
        case = self._cases.view(-1, 1, 1)
        return distributions.text_priority(self.seed, self.layer, case, neuron, text)

    def _salts(self, priority: Tensor | None) -> Tensor | None:
        """[case, text, neuron] the token-draw salts of the texts that may enter the typical
        examples (-1 for the others: their priority is above the k-th kept one)."""
        if priority is None:
            return None
        kth = (self._typical_key[..., -1] >> distributions.KEY_LOW_BITS).unsqueeze(1)
        return torch.where(priority <= kth, distributions.token_salt(priority), -1)

    def _add_typical_candidates(
        self, per_text: PerText, priority: Tensor, text_index: Tensor
    ) -> None:
        """Merges each text's drawn token ([case, text, neuron]) into the typical examples."""
        assert per_text.typical_position is not None and per_text.typical_value is not None
        drawn = per_text.typical_position >= 0
        texts = text_index.view(1, -1, 1)
        key = distributions.ranking_key(priority, texts, drawn)
        text = torch.where(drawn, texts.to(torch.int32), -1)
        self._merge_typical(key, text, per_text.typical_position, per_text.typical_value)

    def _merge_typical(self, key: Tensor, text: Tensor, position: Tensor, value: Tensor) -> None:
        """Keeps the k smallest keys among the kept examples and the candidates.

        Args:
            key, text, position: [case, n, neuron] candidates (key NO_KEY: none).
            value: [case, quantity, n, neuron] their four values.
        """
        if self.kernel == "cpu":
            from gatescope.stats.cpu_merge import merge_smallest

            merge_smallest(self._typical_key, self._typical_text, self._typical_position,
                           self._typical_value, key, text, position, value)  # fmt: skip
            return
        # [case, neuron, n] and [case, quantity, neuron, n], as the kept examples' slots
        key, text, position = (x.transpose(1, 2) for x in (key, text, position))
        keys = torch.cat([self._typical_key, key], dim=-1)
        text = torch.cat([self._typical_text, text.to(torch.int32)], dim=-1)
        position = torch.cat([self._typical_position, position.to(torch.int32)], dim=-1)
        values = torch.cat([self._typical_value, value.transpose(2, 3).to(self.dtype)], dim=-1)
        best = keys.topk(self.k, dim=-1, largest=False, sorted=True).indices  # [case, neuron, k]
        self._typical_key = keys.gather(-1, best)
        self._typical_text = text.gather(-1, best)
        self._typical_position = position.gather(-1, best)
        self._typical_value = values.gather(-1, best.unsqueeze(1).expand(-1, N_QUANTITIES, -1, -1))

    def _typical_keys_of(self, text: Tensor) -> Tensor:
        """[case, neuron, slot] the keys of kept examples of texts ``text`` (NO_KEY where
        the slot is empty, text -1)."""
        index = text.to(torch.int64).clamp(min=0)
        priority = self._priority(index, self._neurons.view(1, -1, 1))
        return distributions.ranking_key(priority, index, text >= 0)

    # ------------------------------------------------------------------ top-k

    @property
    def top_value(self) -> Tensor:
        """[list, neuron, rank] signed values of the ranked lists, strongest first."""
        return self._value

    @property
    def top_text(self) -> Tensor:
        """[list, neuron, rank] int32 text indices of the ranked lists (-1: empty)."""
        return self._text

    @property
    def top_position(self) -> Tensor:
        """[list, neuron, rank] int32 token positions of the ranked lists (-1: empty)."""
        return self._position

    @property
    def maximum(self) -> Tensor:
        """[case, quantity, neuron] the largest value over the case's tokens (NaN: none)."""
        return self._signed(self._strongest, -self._weakest)

    @property
    def minimum(self) -> Tensor:
        """[case, quantity, neuron] the smallest value over the case's tokens (NaN: none)."""
        return self._signed(self._weakest, -self._strongest)

    def _signed(self, if_positive: Tensor, if_negative: Tensor) -> Tensor:
        """Per (case, quantity) sign, one of two |value| extremes made signed."""
        value = torch.where(self._signs > 0, if_positive, if_negative)
        return value.masked_fill_(self._strongest == float("-inf"), float("nan"))

    def _set_extremes(self, maximum: Tensor, minimum: Tensor) -> None:
        """The inverse of ``maximum`` and ``minimum``."""
        positive = self._signs > 0
        never = maximum.isnan()
        strongest = torch.where(positive, maximum, -minimum)
        weakest = torch.where(positive, minimum, -maximum)
        self._strongest = strongest.masked_fill_(never, float("-inf")).to(self.dtype)
        self._weakest = weakest.masked_fill_(never, float("inf")).to(self.dtype)

    def _empty_lists(self) -> tuple[Tensor, Tensor, Tensor]:
        """Value, text and position tensors [list, neuron, rank], all empty."""
        shape = (N_LISTS, self.d_mlp, self.k)
        text = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        return torch.zeros(shape, dtype=self.dtype, device=self.device), text, text.clone()

    def _add_candidates(self, value: Tensor, text: Tensor, position: Tensor) -> None:
        """Merges candidates [list, n, neuron] (text -1: none) into the ranked lists.

        Order: |value| descending, then text index ascending; slots left without a
        candidate stay empty.
        """
        if self.kernel == "cpu":
            from gatescope.stats.cpu_merge import merge_strongest

            merge_strongest(self._value, self._text, self._position, value, text, position)
            return
        # [list, neuron, n], as the kept lists' slots
        value, text, position = (x.transpose(1, 2) for x in (value, text, position))
        value = torch.cat([self._value, value.to(self.dtype)], dim=-1)
        text = torch.cat([self._text, text.to(torch.int32)], dim=-1)
        position = torch.cat([self._position, position.to(torch.int32)], dim=-1)
        key = torch.where(text >= 0, value.abs(), float("-inf"))

        if self.dtype == torch.float32:
            # The k largest of unique int64 keys: the bits of a non-negative float32 order
            # like the float, and the text index (descending) breaks ties towards lower
            # indices. (Empty slots all have key -1; they are emptied below, whichever.)
            packed = (key.view(torch.int32).to(torch.int64) << 31) | (MAX_TEXTS - text)
            packed = packed.masked_fill_(text < 0, -1)
            best = packed.topk(self.k, dim=-1, sorted=True).indices
        else:  # float64 keys do not fit beside an index: two stable sorts
            by_text = torch.sort(text, dim=-1, stable=True).indices
            by_key = torch.sort(key.gather(-1, by_text), dim=-1, descending=True, stable=True)
            best = by_text.gather(-1, by_key.indices[..., : self.k])

        empty = text.gather(-1, best) < 0
        self._value = value.gather(-1, best).masked_fill_(empty, 0)
        self._text = text.gather(-1, best).masked_fill_(empty, -1)
        self._position = position.gather(-1, best).masked_fill_(empty, -1)

    # ------------------------------------------------------------------ merge, state

    def merge(self, other: NeuronStats) -> None:
        """Adds the statistics of ``other`` (disjoint texts of the same layer) to these."""
        mine = (self.d_mlp, self.k, self.distributions, self.seed, self.layer,
                self.first_neuron, self.experts)  # fmt: skip
        theirs = (other.d_mlp, other.k, other.distributions, other.seed, other.layer,
                  other.first_neuron, other.experts)  # fmt: skip
        if theirs != mine:
            raise ValueError("cannot merge statistics of different shapes, k, distributions, "
                             "seed, layer, neurons or experts")  # fmt: skip
        self.tokens += other.tokens.to(self.device)
        self.add_routing(other.routed, other.router_weight)
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)
        torch.maximum(self._strongest, other._strongest.to(self._strongest), out=self._strongest)
        torch.minimum(self._weakest, other._weakest.to(self._weakest), out=self._weakest)
        self._add_candidates(  # [list, rank, neuron]: the ranks as candidates
            other.top_value.to(self.device, self.dtype).transpose(1, 2),
            other.top_text.to(self.device).transpose(1, 2),
            other.top_position.to(self.device).transpose(1, 2),
        )
        if self.distributions:
            self._check_histogram_capacity()
            assert self.histogram is not None and self.joint is not None
            assert other.histogram is not None and other.joint is not None
            self.histogram += other.histogram.to(self.device)
            self.joint += other.joint.to(self.device)
            self._merge_typical(  # [case, slot, neuron]: the slots as candidates
                other._typical_key.to(self.device).transpose(1, 2),
                other._typical_text.to(self.device).transpose(1, 2),
                other._typical_position.to(self.device).transpose(1, 2),
                other._typical_value.to(self.device, self.dtype).transpose(2, 3),
            )

    def _check_histogram_capacity(self) -> None:
        """Refuses more tokens than int32 histograms count (scans check their corpus first:
        this catches merges of parts that together exceed it)."""
        if int(self.tokens) > MAX_HISTOGRAM_TOKENS:
            raise GatescopeError(
                f"the distributions count at most {MAX_HISTOGRAM_TOKENS:,} tokens, and these "
                f"statistics have {int(self.tokens):,}: scan with --no-distributions."
            )

    @classmethod
    def from_states(
        cls,
        states: Sequence[dict[str, Tensor]],
        *,
        device: torch.device | str = "cpu",
        seed: int,
        layer: int,
    ) -> NeuronStats:
        """The statistics of disjoint sets of texts, merged in the order given: how scans
        run apart (shards, ranks) are combined. Ranked lists, extremes, histograms and
        typical examples do not depend on the order or grouping; float64 sums do only to
        rounding. ``seed`` and ``layer`` are those the typical examples were drawn with."""
        if not states:
            raise ValueError("nothing to merge")
        d_mlp, k = states[0]["count"].shape[-1], states[0]["top_value"].shape[-1]
        dtype = states[0]["top_value"].dtype
        with_distributions = "histogram" in states[0]
        experts = len(states[0]["routed"]) if "routed" in states[0] else 0

        def load(state: dict[str, Tensor]) -> NeuronStats:
            # Never updated, only merged: no activation function, the plain torch pass.
            stats = cls(d_mlp, act=None, k=k, device=device, dtype=dtype, kernel="torch",
                        distributions=with_distributions, seed=seed, layer=layer,
                        experts=experts)  # fmt: skip
            stats.load_state_dict(state)
            return stats

        merged = load(states[0])
        for state in states[1:]:
            merged.merge(load(state))
        return merged

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated state, as views of the live tensors (copy them to keep them past
        the next ``update``); ``load_state_dict`` restores it exactly. With the
        distributions: ``histogram`` [case, quantity, bin, neuron] and ``joint`` [case,
        |g| bin, |u| bin, neuron] int32, and the typical examples ``typical_text``,
        ``typical_position`` [case, neuron, slot] int32 and ``typical_value`` [case,
        quantity, neuron, slot], in draw order (text -1: empty). With experts: ``routed``
        [expert] int64 and ``router_weight`` [expert] float64."""
        state = {
            "tokens": self.tokens,
            "count": self.count,
            "sum": self.sum,
            "max": self.maximum,
            "min": self.minimum,
            "top_value": self.top_value,
            "top_text": self.top_text,
            "top_position": self.top_position,
        }
        if self.distributions:
            assert self.histogram is not None and self.joint is not None
            state |= {
                "histogram": self.histogram,
                "joint": self.joint,
                "typical_text": self._typical_text,
                "typical_position": self._typical_position,
                "typical_value": self._typical_value,
            }
        if self.experts:
            state |= {"routed": self.routed, "router_weight": self.router_weight}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            raise ValueError(f"the state has {sorted(state)}, expected {sorted(expected)}")
        for name, tensor in expected.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"state '{name}' has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(tensor.shape)}"
                )
        self.tokens = state["tokens"].to(self.device, torch.int64).clone()
        self.count = state["count"].to(self.device, torch.int64).clone()
        self.sum = state["sum"].to(self.device, torch.float64).clone()
        self._set_extremes(state["max"].to(self.device), state["min"].to(self.device))
        # Fresh contiguous copies: the CPU merges write into them, flat.
        own = functools.partial(torch.Tensor.clone, memory_format=torch.contiguous_format)
        self._value = own(state["top_value"].to(self.device, self.dtype))
        self._text = own(state["top_text"].to(self.device, torch.int32))
        self._position = own(state["top_position"].to(self.device, torch.int32))
        if self.distributions:
            int32 = functools.partial(torch.Tensor.to, device=self.device, dtype=torch.int32)
            self.histogram = own(int32(state["histogram"]))
            self.joint = own(int32(state["joint"]))
            self._typical_text = own(int32(state["typical_text"]))
            self._typical_position = own(int32(state["typical_position"]))
            self._typical_value = own(state["typical_value"].to(self.device, self.dtype))
            self._typical_key = self._typical_keys_of(self._typical_text)
        if self.experts:
            self.routed = state["routed"].to(self.device, torch.int64).clone()
            self.router_weight = state["router_weight"].to(self.device, torch.float64).clone()


def _in_texts(per_text: PerText, positions: Tensor) -> PerText:
    """A pass's candidates over packed tokens, with the positions of their tokens in their
    texts (``positions`` [text, pos]) for the indices along pos. Packing keeps a text's
    tokens in order, so the first strongest token is the same either way."""

    def in_text(index: Tensor) -> Tensor:  # [n, text, neuron], -1: none
        # Where a case does not occur the index means nothing (and may lie in the block
        # padding of the torch pass): clamped, then ignored.
        n, length = index.shape[0], positions.shape[1]
        looked_up = positions.expand(n, -1, -1).gather(2, index.clamp(0, length - 1))
        return torch.where(index >= 0, looked_up, -1)

    drawn = per_text.typical_position
    typical_position = None if drawn is None else in_text(drawn)
    return PerText(per_text.strength, in_text(per_text.position), typical_position,
                   per_text.typical_value)  # fmt: skip


def _numba_works() -> bool:
    """Whether the fused CPU pass can be used (numba imports); warns once if not."""
    try:
        import gatescope.stats.cpu_pass  # noqa: F401
    except ImportError as error:  # numba missing or broken: slower, same results
        warnings.warn(f"numba is unavailable ({error}); using the slower torch pass", stacklevel=4)
        return False
    return True


def kernel_problem(
    kernel: str, device: torch.device, dtype: torch.dtype,
    act: Callable[[Tensor], Tensor] | None = None,
) -> str | None:  # fmt: skip
    """Why ``kernel`` (cpu, torch or triton) cannot compute statistics in ``dtype`` on
    ``device`` (with the activation ``act``, when known), or None if it can."""
    if kernel == "cpu" and device.type != "cpu":
        return f"the numba kernel runs on the CPU, not on {device}"
    if kernel != "triton":
        return None
    try:
        from gatescope.stats.triton_pass import activation_kind
    except ImportError:
        return "the Triton kernel needs Triton (pip install gatescope[gpu])"
    if device.type != "cuda" and not _interpreting():
        return f"the Triton kernel runs on CUDA GPUs, not on {device}"
    if dtype != torch.float32:
        return f"the Triton kernel computes in float32, not for a {dtype} model"
    if act is not None and activation_kind(act) is None:
        return UNKNOWN_ACTIVATION
    return None


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set true)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


#: kernel_problem's answer for an activation other than SiLU, GELU and GELU-tanh.
UNKNOWN_ACTIVATION = "the Triton kernel computes SiLU, GELU and GELU-tanh only"


def _triton_computes(
    act: Callable[[Tensor], Tensor] | None, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether "auto" takes the Triton kernel: it can compute this layer (no Triton is no
    error; an activation it does not compute warns, once)."""
    if act is None:  # statistics that are only merged
        return False
    problem = kernel_problem("triton", device, dtype, act)
    if problem == UNKNOWN_ACTIVATION:
        warnings.warn(f"{problem}: using the torch pass", stacklevel=4)
    return problem is None


def _no_activation(gate: Tensor) -> Tensor:
    """The activation of statistics built only to be merged (``act=None``): never called."""
    raise TypeError("these statistics have no activation function (act=None): merge them only")

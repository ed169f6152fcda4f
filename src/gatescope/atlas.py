"""The atlas: a scan's result on disk (``atlas.json`` + ``stats.safetensors``).

Layout of ``stats.safetensors`` (``L`` layers, ``d`` neurons per layer, the 14 ranked
lists of :data:`~gatescope.constants.TOP_LISTS`, ``k`` entries each):

==============  ====================  =======  =============================================
name            shape                 dtype    meaning
==============  ====================  =======  =============================================
count           [L, case, d]          int64    counted tokens of each sign case (*)
sum             [L, case, quantity, d] float64 sums of each quantity over the case's tokens
max, min        [L, case, quantity, d] float32 extremes over the case's tokens (NaN: none)
top_value       [L, d, list, k]       float32  signed values, strongest first (0 if empty)
top_text        [L, d, list, k]       int32    corpus text index (-1 if empty)
top_position    [L, d, list, k]       int32    token position in the text (-1 if empty)
==============  ====================  =======  =============================================

With the distributions (``meta.options.distributions``, format 3; bins of
:mod:`gatescope.stats.distributions`, ``B`` magnitude bins, ``J`` joint bins per axis):

================  ==========================  =====  =====================================
histogram         [L, d, case, quantity, B]   int32  tokens of the case per |value| bin
joint             [L, d, case, J, J]          int32  tokens of the case per (|g|, |u|) bin
typical_text      [L, d, case, k]             int32  typical examples' texts, draw order (-1)
typical_position  [L, d, case, k]             int32  their drawn token (-1 if empty)
typical_value     [L, d, case, quantity, k]   float  the token's four values (0 if empty)
================  ==========================  =====  =====================================

A mixture-of-experts atlas (``meta.experts``, :class:`~gatescope.records.ExpertsRecord`:
``d`` is every routed expert's neurons in turn, then the shared experts'; an expert's
statistics are over its routed tokens) adds, for ``E`` routed experts:

================  ==========================  =======  ===================================
routed            [L, E]                      int64    counted tokens routed to the expert
router_weight     [L, E]                      float64  the sum of their router weights
================  ==========================  =======  ===================================

(*) An atlas whose token count is unknown (``meta.tokens`` None: a dataset imported without
its corpus) holds ``round(freq * FREQ_SCALE)`` there instead: its frequencies to float64
precision, and sums that divide by the same numbers into the means.

The ranked lists are neuron-major so that one neuron's lists are one contiguous block of
the memory-mapped file. ``atlas.json`` (:class:`~gatescope.records.AtlasMeta`) is written
last: a folder without it is never taken for a complete atlas.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gatescope.constants import (
    ATLAS_JSON,
    CASES,
    CHECKPOINT_DIR,
    QUANTILES,
    QUANTITIES,
    SIGNS,
    STATS_FILE,
    TOP_LISTS,
)
from gatescope.errors import GatescopeError
from gatescope.files import ATLAS, claim_output, write_atomic, write_json_atomic
from gatescope.records import DENSE, SHARED, AtlasMeta, expert_label
from gatescope.stats.distributions import N_BINS, N_JOINT_BINS, Bracket, quantile_brackets

if TYPE_CHECKING:
    import datasets
    import numpy as np

    from gatescope.stats import NeuronStats
    from gatescope.stats.routed import RoutedStats

__all__ = [
    "Atlas",
    "Example",
    "LayerRouting",
    "LayerStats",
    "NeuronDistributions",
    "NeuronRouting",
    "NeuronSummary",
    "TypicalExample",
]

TENSORS = ("count", "sum", "max", "min", "top_value", "top_text", "top_position")
DISTRIBUTIONS = ("histogram", "joint", "typical_text", "typical_position", "typical_value")
#: A mixture-of-experts atlas's routing: [layer, expert] counted tokens routed to each expert
#: (int64) and the sum of their router weights (float64).
ROUTING = ("routed", "router_weight")
#: What ``count`` is a multiple of when the token count is unknown (see the module docstring).
FREQ_SCALE = 2**53
# The names of the ranked-list tensors; the others are the per-case totals and extremes.
RANKED = ("top_value", "top_text", "top_position")


@dataclass(frozen=True)
class Example:
    """One entry of a ranked list: the strongest token of a text."""

    value: float  # signed value of the quantity
    text: int  # index of the text in the corpus
    position: int  # token position in the text


@dataclass(frozen=True)
class TypicalExample:
    """A token drawn at random among a case's tokens (in a text drawn at random)."""

    text: int  # index of the text in the corpus
    position: int  # token position in the text
    values: dict[str, float]  # quantity -> value


@dataclass(frozen=True)
class NeuronDistributions:
    """A neuron's distributions (bins of :mod:`gatescope.stats.distributions`)."""

    histogram: dict[str, dict[str, list[int]]]  # case -> quantity -> tokens per |value| bin
    joint: dict[str, list[list[int]]]  # case -> [|g| bin][|u| bin] tokens
    # case -> quantity -> quantile name ("p50", ...) -> where it lies (None: never occurs)
    quantiles: dict[str, dict[str, dict[str, Bracket | None]]]
    typical: dict[str, list[TypicalExample]]  # case -> examples in draw order


@dataclass(frozen=True)
class LayerRouting:
    """Where each neuron of a mixture-of-experts layer sits, and the tokens it computes."""

    code: np.ndarray  # [d] the routed expert's number, or records.SHARED, DENSE, PADDING
    neuron: np.ndarray  # [d] the neuron within its expert (or shared or dense MLP)
    # [d] int64 the counted tokens the neuron computes: its expert's routed tokens; every
    # counted token for shared and dense neurons (the atlas's denominator); 0 for padding.
    seen: np.ndarray
    router_weight_mean: np.ndarray  # [d] float64, NaN outside the routed experts

    def freq(self, count: np.ndarray) -> np.ndarray:
        """[case, d] each case's frequency among the tokens the neuron computes (NaN where
        it computes none), from ``count`` [case, d]."""
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.seen > 0, count / self.seen, np.nan)


@dataclass(frozen=True)
class NeuronRouting:
    """A mixture-of-experts neuron's place and the tokens it computes."""

    expert: int | str  # the routed expert's number, "shared" or "dense"
    neuron: int  # within the expert
    seen: int  # counted tokens it computes (all counted tokens for shared and dense ones)
    share: float  # ``seen`` / counted tokens: the expert's routing frequency (1: always on)
    router_weight_mean: float  # over the expert's tokens (NaN: shared, dense, never routed)
    freq: dict[str, float]  # case -> its tokens / ``seen`` (NaN: the neuron computed none)

    @property
    def routed(self) -> bool:
        """Whether the neuron belongs to a routed expert (not a shared or dense one)."""
        return isinstance(self.expert, int)


@dataclass
class NeuronSummary:
    """Everything the atlas knows about one neuron. Cases and quantities use GLUScope names."""

    layer: int
    index: int
    tokens: int | None  # counted tokens of the corpus (None: unknown)
    count: dict[str, int] | None  # case -> tokens in the case (None: unknown)
    freq: dict[str, float]  # case -> count / tokens
    mean: dict[str, dict[str, float]]  # case -> quantity -> mean (NaN if the case never occurs)
    max: dict[str, dict[str, float]]  # case -> quantity -> largest value (NaN: never, unknown)
    min: dict[str, dict[str, float]]  # case -> quantity -> smallest value (NaN: never, unknown)
    # case -> quantity -> examples, strongest first; the case's ranked quantities only,
    # empty slots left out.
    top: dict[str, dict[str, list[Example]]] = field(default_factory=dict)
    distributions: NeuronDistributions | None = None  # None: the atlas has none
    routing: NeuronRouting | None = None  # None: not a mixture of experts


@dataclass(frozen=True)
class LayerStats:
    """The statistics of every neuron of one layer (``d`` neurons, the 14 ranked lists of
    :data:`~gatescope.constants.TOP_LISTS`, ``k`` entries each)."""

    layer: int
    count: Tensor  # [case, d] int64
    sum: Tensor  # [case, quantity, d] float64
    max: Tensor  # [case, quantity, d] float32, NaN where the case never occurs
    min: Tensor  # [case, quantity, d] float32
    top_value: Tensor  # [d, list, k] float32
    top_text: Tensor  # [d, list, k] int32, -1 in empty slots
    top_position: Tensor  # [d, list, k] int32, -1 in empty slots
    # The distributions (None: the atlas has none); see the module docstring.
    histogram: Tensor | None = None  # [d, case, quantity, bin] int32
    joint: Tensor | None = None  # [d, case, |g| bin, |u| bin] int32
    typical_text: Tensor | None = None  # [d, case, k] int32
    typical_position: Tensor | None = None  # [d, case, k] int32
    typical_value: Tensor | None = None  # [d, case, quantity, k] float32
    # A mixture of experts' routing (None: a dense model's atlas): per expert the counted
    # tokens routed to it (int64) and the sum of their router weights (float64).
    routed: Tensor | None = None  # [expert]
    router_weight: Tensor | None = None  # [expert]

    def strongest(self, quantity: str) -> Tensor:
        """[d] the largest |value| of ``quantity`` over all cases (-inf: never occurs)."""
        q = QUANTITIES.index(quantity)
        extremes = torch.stack([self.max[:, q], -self.min[:, q]])  # [2, case, d]
        return extremes.nan_to_num(-math.inf).amax(dim=(0, 1))

    def quantiles(self) -> Tensor | None:
        """[d, case, quantity, level, 2] brackets (low, high) of the quantiles
        :data:`~gatescope.constants.QUANTILES` of |value| (NaN where the case never
        occurs); None without distributions."""
        if self.histogram is None:
            return None
        return _quantiles(self.histogram, self.max.permute(2, 0, 1), self.min.permute(2, 0, 1))


class Atlas:
    """Statistics of every neuron of a model over a corpus, with their provenance.

    Build one with :func:`gatescope.scan`, :meth:`load` one from disk, or import the
    published GLUScope dataset with :func:`gatescope.export.from_hf_dataset`.

    Attributes:
        meta: The atlas's description (:class:`~gatescope.records.AtlasMeta`).
    """

    def __init__(self, meta: AtlasMeta, tensors: Mapping[str, Tensor] | _SafetensorsFile) -> None:
        self.meta = meta
        self._tensors = tensors
        _check_shapes(meta, {name: self._shape(name) for name in self._names})

    # --------------------------------------------------------------- building

    @classmethod
    def from_stats(cls, layers: Sequence[NeuronStats | RoutedStats], meta: AtlasMeta) -> Atlas:
        """Stacks the per-layer accumulators of a finished scan into an atlas described by
        ``meta`` (whose shape and token count must be those of ``layers``)."""
        states = [layer.state_dict() for layer in layers]

        def stack(name: str) -> Tensor:
            return torch.stack([state[name].cpu() for state in states])

        # Accumulators keep lists as [list, neuron, rank]; the atlas is neuron-major.
        def ranked(name: str, dtype: torch.dtype) -> Tensor:
            return stack(name).permute(0, 2, 1, 3).to(dtype).contiguous()

        routing = {name: stack(name) for name in ROUTING} if meta.experts is not None else {}
        tensors = {
            **_stacked_distributions(states),
            **routing,
            "count": stack("count"),
            "sum": stack("sum"),
            "max": stack("max").to(torch.float32),
            "min": stack("min").to(torch.float32),
            "top_value": ranked("top_value", torch.float32),
            "top_text": ranked("top_text", torch.int32),
            "top_position": ranked("top_position", torch.int32),
        }
        tokens = {int(state["tokens"]) for state in states}
        if meta.tokens is None or tokens != {meta.tokens}:
            raise ValueError(f"the layers counted {sorted(tokens)} tokens, not {meta.tokens}")
        return cls(meta, tensors)

    @property
    def has_distributions(self) -> bool:
        """Whether the atlas holds histograms and typical examples (format 3 scans)."""
        return self.meta.options.distributions

    @property
    def _names(self) -> tuple[str, ...]:
        return _stored_names(self.meta)

    def layer(self, layer: int) -> LayerStats:
        """Every neuron's statistics of one layer; reads only that layer."""
        self.check_neuron(layer)
        return LayerStats(layer, **{name: self._read(name, layer) for name in self._names})

    def layer_state(self, layer: int) -> dict[str, Tensor]:
        """One layer as a ``NeuronStats`` state, the inverse of :meth:`from_stats` (lists
        back to [list, neuron, rank]): how atlases of parts of a corpus are merged."""
        stats = self.layer(layer)
        state = {name: getattr(stats, name) for name in self._names}
        for name in RANKED:
            state[name] = state[name].permute(1, 0, 2).contiguous()
        if self.has_distributions:
            for name in DISTRIBUTIONS:
                state[name] = _accumulator_layout(name, state[name])
        if self.tokens is None:
            raise GatescopeError("an atlas without a token count cannot be merged.")
        return {"tokens": torch.tensor(self.tokens, dtype=torch.int64), **state}

    # --------------------------------------------------------------- disk

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Writes the atlas into the folder ``path`` (created if needed).

        Both files are renamed into place, ``atlas.json`` last and removed first, so an
        interrupted save never leaves a folder that looks like a complete atlas.
        """
        from safetensors.torch import save_file

        path = Path(path)
        claim_output(path, ATLAS, overwrite=overwrite)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: self.tensor(name).contiguous() for name in self._names}
        (path / ATLAS_JSON).unlink(missing_ok=True)
        write_atomic(path / STATS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        write_json_atomic(path / ATLAS_JSON, self.meta.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Atlas:
        """Opens an atlas folder; tensors stay memory-mapped until used."""
        path = Path(path)
        if not path.is_dir():
            raise GatescopeError(f"{path} does not exist or is not a folder.")
        if not (path / ATLAS_JSON).exists():
            if (path / CHECKPOINT_DIR).exists():
                raise GatescopeError(
                    f"{path} holds an unfinished scan: continue it with `gatescope scan ... "
                    f"--out {path} --resume`."
                )
            raise GatescopeError(f"{path} is not an atlas folder (it has no {ATLAS_JSON}).")
        try:
            data = json.loads((path / ATLAS_JSON).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise GatescopeError(f"{path / ATLAS_JSON} is unreadable: {error}.") from error
        try:
            meta = AtlasMeta.from_dict(data)
        except GatescopeError as error:
            raise GatescopeError(f"{path / ATLAS_JSON} cannot be read: {error}") from error
        return cls(meta, _SafetensorsFile(path / STATS_FILE, _stored_names(meta)))

    # --------------------------------------------------------------- access

    @property
    def num_layers(self) -> int:
        return self.meta.layers

    @property
    def d_mlp(self) -> int:
        return self.meta.d_mlp

    @property
    def k(self) -> int:
        return self.meta.k

    @property
    def tokens(self) -> int | None:
        """Counted tokens (None: unknown)."""
        return self.meta.tokens

    @property
    def denominator(self) -> int:
        """What ``count`` divides by into frequencies."""
        if self.tokens is not None:
            return self.tokens
        return self.meta.count_scale or FREQ_SCALE

    def tensor(self, name: str) -> Tensor:
        """A whole stored tensor (see the module docstring for names and shapes)."""
        return self._read(name)

    def _read(self, name: str, *index: int) -> Tensor:
        """``tensor(name)[index]``, reading only that part of a memory-mapped file."""
        if isinstance(self._tensors, _SafetensorsFile):
            return self._tensors.get_slice(name, *index) if index else self._tensors.get(name)
        return self._tensors[name][index]

    def _shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self._tensors, _SafetensorsFile):
            return self._tensors.shape(name)
        return tuple(self._tensors[name].shape)

    def check_neuron(self, layer: int, index: int | None = None) -> None:
        """Refuses a layer (and neuron) the atlas does not have, in one sentence."""
        if not 0 <= layer < self.num_layers:
            raise GatescopeError(
                f"layer {layer} is out of range: the atlas has layers 0-{self.num_layers - 1}."
            )
        if index is not None and not 0 <= index < self.d_mlp:
            raise GatescopeError(
                f"neuron {index} is out of range: layers have neurons 0-{self.d_mlp - 1}."
            )
        experts = self.meta.experts
        if index is not None and experts is not None and experts.address(layer, index) is None:
            raise GatescopeError(
                f"layer {layer} has neurons 0-{experts.neurons(layer) - 1}; {index} is only "
                f"padding to the atlas's width of {self.d_mlp}."
            )

    def neuron_name(self, layer: int, index: int) -> str:
        """How the neuron is addressed: ``layer.neuron``, or ``layer.expert.neuron`` in a
        mixture of experts (``expert`` a number, ``shared`` or ``dense``)."""
        experts = self.meta.experts
        address = experts.address(layer, index) if experts is not None else None
        if address is None:
            return f"{layer}.{index}"
        return f"{layer}.{address[0]}.{address[1]}"

    def find_neuron(self, name: str) -> tuple[int, int]:
        """(layer, index) of a neuron addressed as ``layer.neuron`` (the index within the
        layer) or, in a mixture of experts, ``layer.expert.neuron``: ``"31.9634"``,
        ``"3.5.17"``, ``"3.shared.4"``.

        Raises:
            GatescopeError: For anything else, or a neuron the atlas does not have.
        """
        experts = self.meta.experts
        number = "[0-9]{1,9}"  # ASCII digits, few enough for an int of any platform
        match = re.fullmatch(rf"\s*({number})\.(?:({number}|shared|dense)\.)?({number})\s*", name)
        if not match or (match[2] is not None and experts is None):
            form = ("LAYER.EXPERT.NEURON, e.g. 3.5.17 or 3.shared.4 (or LAYER.NEURON, its "
                    "index in the layer)" if experts else "LAYER.NEURON, e.g. 31.9634")  # fmt: skip
            raise GatescopeError(f"'{name}' is not a neuron of the atlas: write {form}.")
        layer, neuron = int(match[1]), int(match[3])
        self.check_neuron(layer)
        if match[2] is not None:
            assert experts is not None
            expert = int(match[2]) if match[2].isdigit() else match[2]
            neuron = experts.index(layer, expert, neuron)
        self.check_neuron(layer, neuron)
        return layer, neuron

    def routing(self, layer: int) -> LayerRouting | None:
        """Where each neuron of ``layer`` sits and the tokens it computes; None for a dense
        model's atlas."""
        import numpy as np

        experts = self.meta.experts
        if experts is None:
            return None
        self.check_neuron(layer)
        code, neuron = experts.layout(layer)
        routed = self._read("routed", layer).numpy()  # [expert]
        weight = self._read("router_weight", layer).numpy()
        expert = np.maximum(code, 0)
        inside = code >= 0
        always_on = np.isin(code, (SHARED, DENSE))  # every counted token; padding none
        seen = np.where(inside, routed[expert], np.where(always_on, self.denominator, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(inside, weight[expert] / routed[expert], np.nan)
        return LayerRouting(code, neuron, seen.astype(np.int64), mean)

    def neuron(self, layer: int, index: int) -> NeuronSummary:
        """The summary of neuron ``index`` of layer ``layer``: its ranked lists alone, and its
        column of the layer's small per-case tensors."""
        self.check_neuron(layer, index)
        layer_count = self._read("count", layer)  # [case, d]
        count = layer_count[:, index].tolist()  # [case]
        sums = self._read("sum", layer)[:, :, index].tolist()  # [case][quantity]
        extremes = {
            name: self._read(name, layer)[:, :, index].tolist()  # [case][quantity]
            for name in ("max", "min")
        }
        value = self._read("top_value", layer, index).tolist()  # [list][rank]
        text = self._read("top_text", layer, index).tolist()
        position = self._read("top_position", layer, index).tolist()

        denominator = self.denominator
        summary = NeuronSummary(
            layer=layer,
            index=index,
            tokens=self.tokens,
            count=dict(zip(CASES, count, strict=True)) if self.tokens is not None else None,
            freq={
                case: (n / denominator if denominator else math.nan)
                for case, n in zip(CASES, count, strict=True)
            },
            mean={
                case: {
                    quantity: (total / count[c] if count[c] else math.nan)
                    for quantity, total in zip(QUANTITIES, sums[c], strict=True)
                }
                for c, case in enumerate(CASES)
            },
            max=_by_case(extremes["max"]),
            min=_by_case(extremes["min"]),
        )
        for lst, (c, q) in enumerate(TOP_LISTS):
            examples = [
                Example(v, t, p)
                for v, t, p in zip(value[lst], text[lst], position[lst], strict=True)
                if t >= 0
            ]
            summary.top.setdefault(CASES[c], {})[QUANTITIES[q]] = examples
        if self.has_distributions:
            summary.distributions = self._distributions(layer, index, extremes)
        summary.routing = self._neuron_routing(layer, index, layer_count.numpy())
        return summary

    def _neuron_routing(self, layer: int, index: int, count: np.ndarray) -> NeuronRouting | None:
        """Neuron ``index``'s part of :meth:`routing`, with ``count`` [case, d] its layer's."""
        routing = self.routing(layer)
        if routing is None:
            return None
        code = int(routing.code[index])
        seen = int(routing.seen[index])
        freq = routing.freq(count)[:, index]
        return NeuronRouting(
            expert=expert_label(code),
            neuron=int(routing.neuron[index]),
            seen=seen,
            share=seen / self.denominator,
            router_weight_mean=float(routing.router_weight_mean[index]),
            freq=dict(zip(CASES, freq.tolist(), strict=True)),
        )

    def _distributions(
        self, layer: int, index: int, extremes: dict[str, list[list[float]]]
    ) -> NeuronDistributions:
        histogram = self._read("histogram", layer, index)  # [case, quantity, bin]
        brackets = _quantiles(
            histogram, torch.tensor(extremes["max"]), torch.tensor(extremes["min"])
        ).tolist()  # [case][quantity][level][low, high]
        text = self._read("typical_text", layer, index).tolist()  # [case][slot]
        position = self._read("typical_position", layer, index).tolist()
        value = self._read("typical_value", layer, index).tolist()  # [case][quantity][slot]
        return NeuronDistributions(
            histogram=_by_case(histogram.tolist()),
            joint=dict(zip(CASES, self._read("joint", layer, index).tolist(), strict=True)),
            quantiles={
                case: {
                    quantity: {
                        name: None if math.isnan(low) else Bracket(low, high)
                        for (name, _), (low, high) in zip(QUANTILES, levels, strict=True)
                    }
                    for quantity, levels in zip(QUANTITIES, brackets[c], strict=True)
                }
                for c, case in enumerate(CASES)
            },
            typical={
                case: [
                    TypicalExample(t, p, {q: value[c][i][slot] for i, q in enumerate(QUANTITIES)})
                    for slot, (t, p) in enumerate(zip(text[c], position[c], strict=True))
                    if t >= 0
                ]
                for c, case in enumerate(CASES)
            },
        )

    def quantiles(self, layer: int) -> Tensor | None:
        """Like :meth:`LayerStats.quantiles`, reading only the histograms and extremes."""
        self.check_neuron(layer)
        if not self.has_distributions:
            return None
        maximum, minimum = self._read("max", layer), self._read("min", layer)
        return _quantiles(
            self._read("histogram", layer), maximum.permute(2, 0, 1), minimum.permute(2, 0, 1)
        )

    def to_hf_dataset(self) -> datasets.Dataset:
        """The atlas in the GLUScope activation-dataset schema (one row per neuron)."""
        from gatescope.export import to_hf_dataset

        return to_hf_dataset(self)

    def __repr__(self) -> str:
        return (
            f"Atlas(model={self.meta.model.name!r}, layers={self.num_layers}, "
            f"d_mlp={self.d_mlp}, tokens={self.tokens}, k={self.k})"
        )


# How each distribution tensor of a layer goes from the accumulator's layout (neuron axis
# last but for the typical examples' slots) to the atlas's neuron-major one: histogram
# [case, quantity, bin, d], joint [case, g, u, d], typical text/position [case, d, k],
# typical value [case, quantity, d, k].
_NEURON_MAJOR = {
    "histogram": (3, 0, 1, 2),
    "joint": (3, 0, 1, 2),
    "typical_text": (1, 0, 2),
    "typical_position": (1, 0, 2),
    "typical_value": (2, 0, 1, 3),
}
_STORED_DTYPE = {"typical_value": torch.float32}


def _stacked_distributions(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The distributions of the layers' accumulator states, neuron-major (none if the
    states have none)."""
    if "histogram" not in states[0]:
        return {}
    return {
        name: torch.stack([state[name].cpu().permute(*order) for state in states])
        .to(_STORED_DTYPE.get(name, torch.int32))
        .contiguous()
        for name, order in _NEURON_MAJOR.items()
    }


def _accumulator_layout(name: str, tensor: Tensor) -> Tensor:
    """One layer's stored distribution tensor in the accumulator's layout."""
    inverse = [_NEURON_MAJOR[name].index(axis) for axis in range(tensor.dim())]
    return tensor.permute(*inverse).contiguous()


def _quantiles(histogram: Tensor, maximum: Tensor, minimum: Tensor) -> Tensor:
    """[..., case, quantity, level, 2] brackets of the QUANTILES of |value| from
    ``histogram`` [..., case, quantity, bin] and the signed extremes [..., case, quantity]."""
    positive = torch.tensor(SIGNS) > 0  # [case, quantity]
    strongest = torch.where(positive, maximum, -minimum)
    weakest = torch.where(positive, minimum, -maximum)
    levels = tuple(level for _, level in QUANTILES)
    return quantile_brackets(histogram, weakest, strongest, levels)


def _by_case(values: list[list]) -> dict[str, dict[str, Any]]:
    """[case][quantity] nested lists as case -> quantity -> value."""
    return {
        case: dict(zip(QUANTITIES, row, strict=True))
        for case, row in zip(CASES, values, strict=True)
    }


def _stored_names(meta: AtlasMeta) -> tuple[str, ...]:
    """The tensors an atlas of ``meta`` stores."""
    names = TENSORS + DISTRIBUTIONS if meta.options.distributions else TENSORS
    return names + ROUTING if meta.experts is not None else names


def _check_shapes(meta: AtlasMeta, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuses tensors whose shapes are not those ``meta`` describes."""
    L, d, k = meta.layers, meta.d_mlp, meta.k
    expected = {
        "count": (L, len(CASES), d),
        **{name: (L, len(CASES), len(QUANTITIES), d) for name in ("sum", "max", "min")},
        **{name: (L, d, len(TOP_LISTS), k) for name in RANKED},
    }
    if meta.options.distributions:
        cases, quantities = len(CASES), len(QUANTITIES)
        expected |= {
            "histogram": (L, d, cases, quantities, N_BINS),
            "joint": (L, d, cases, N_JOINT_BINS, N_JOINT_BINS),
            "typical_text": (L, d, cases, k),
            "typical_position": (L, d, cases, k),
            "typical_value": (L, d, cases, quantities, k),
        }
    if meta.experts is not None:
        expected |= dict.fromkeys(ROUTING, (L, meta.experts.n_experts))
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise GatescopeError(
                f"the atlas's {name} has shape {list(shapes[name])}, but its description "
                f"says {list(shape)}: the atlas is damaged."
            )


class _SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of a ``stats.safetensors`` file."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        from safetensors import safe_open

        if not path.exists():
            raise GatescopeError(f"{path} is missing: the atlas folder is incomplete.")
        self._file = safe_open(str(path), framework="pt")
        missing = set(names) - set(self._file.keys())
        if missing:
            raise GatescopeError(f"{path} lacks the tensors {', '.join(sorted(missing))}.")

    def get(self, name: str) -> Tensor:
        return self._file.get_tensor(name)

    def get_slice(self, name: str, *index: int) -> Tensor:
        return self._file.get_slice(name)[index]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

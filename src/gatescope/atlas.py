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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gatescope.constants import ATLAS_JSON, CASES, CHECKPOINT_DIR, QUANTITIES, STATS_FILE, TOP_LISTS
from gatescope.errors import GatescopeError
from gatescope.files import ATLAS, claim_output, write_atomic, write_json_atomic
from gatescope.records import AtlasMeta

if TYPE_CHECKING:
    import datasets

    from gatescope.stats import NeuronStats

__all__ = ["Atlas", "Example", "LayerStats", "NeuronSummary"]

TENSORS = ("count", "sum", "max", "min", "top_value", "top_text", "top_position")
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

    def strongest(self, quantity: str) -> Tensor:
        """[d] the largest |value| of ``quantity`` over all cases (-inf: never occurs)."""
        q = QUANTITIES.index(quantity)
        extremes = torch.stack([self.max[:, q], -self.min[:, q]])  # [2, case, d]
        return extremes.nan_to_num(-math.inf).amax(dim=(0, 1))


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
        _check_shapes(meta, {name: self._shape(name) for name in TENSORS})

    # --------------------------------------------------------------- building

    @classmethod
    def from_stats(cls, layers: Sequence[NeuronStats], meta: AtlasMeta) -> Atlas:
        """Stacks the per-layer accumulators of a finished scan into an atlas described by
        ``meta`` (whose shape and token count must be those of ``layers``)."""
        states = [layer.state_dict() for layer in layers]

        def stack(name: str) -> Tensor:
            return torch.stack([state[name].cpu() for state in states])

        # Accumulators keep lists as [list, neuron, rank]; the atlas is neuron-major.
        def ranked(name: str, dtype: torch.dtype) -> Tensor:
            return stack(name).permute(0, 2, 1, 3).to(dtype).contiguous()

        tensors = {
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

    def layer(self, layer: int) -> LayerStats:
        """Every neuron's statistics of one layer; reads only that layer."""
        self.check_neuron(layer)
        return LayerStats(layer, **{name: self._read(name, layer) for name in TENSORS})

    def layer_state(self, layer: int) -> dict[str, Tensor]:
        """One layer as a ``NeuronStats`` state, the inverse of :meth:`from_stats` (lists
        back to [list, neuron, rank]): how atlases of parts of a corpus are merged."""
        stats = self.layer(layer)
        state = {name: getattr(stats, name) for name in TENSORS}
        for name in RANKED:
            state[name] = state[name].permute(1, 0, 2).contiguous()
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
        tensors = {name: self.tensor(name).contiguous() for name in TENSORS}
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
        return cls(meta, _SafetensorsFile(path / STATS_FILE))

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

    def neuron(self, layer: int, index: int) -> NeuronSummary:
        """The summary of neuron ``index`` of layer ``layer``: its ranked lists alone, and its
        column of the layer's small per-case tensors."""
        self.check_neuron(layer, index)
        count = self._read("count", layer)[:, index].tolist()  # [case]
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
        return summary

    def to_hf_dataset(self) -> datasets.Dataset:
        """The atlas in the GLUScope activation-dataset schema (one row per neuron)."""
        from gatescope.export import to_hf_dataset

        return to_hf_dataset(self)

    def __repr__(self) -> str:
        return (
            f"Atlas(model={self.meta.model.name!r}, layers={self.num_layers}, "
            f"d_mlp={self.d_mlp}, tokens={self.tokens}, k={self.k})"
        )


def _by_case(values: list[list[float]]) -> dict[str, dict[str, float]]:
    """[case][quantity] nested lists as case -> quantity -> value."""
    return {
        case: dict(zip(QUANTITIES, row, strict=True))
        for case, row in zip(CASES, values, strict=True)
    }


def _check_shapes(meta: AtlasMeta, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuses tensors whose shapes are not those ``meta`` describes."""
    L, d, k = meta.layers, meta.d_mlp, meta.k
    expected = {
        "count": (L, len(CASES), d),
        **{name: (L, len(CASES), len(QUANTITIES), d) for name in ("sum", "max", "min")},
        **{name: (L, d, len(TOP_LISTS), k) for name in RANKED},
    }
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise GatescopeError(
                f"the atlas's {name} has shape {list(shapes[name])}, but its description "
                f"says {list(shape)}: the atlas is damaged."
            )


class _SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of a ``stats.safetensors`` file."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.exists():
            raise GatescopeError(f"{path} is missing: the atlas folder is incomplete.")
        self._file = safe_open(str(path), framework="pt")
        missing = set(TENSORS) - set(self._file.keys())
        if missing:
            raise GatescopeError(f"{path} lacks the tensors {', '.join(sorted(missing))}.")

    def get(self, name: str) -> Tensor:
        return self._file.get_tensor(name)

    def get_slice(self, name: str, *index: int) -> Tensor:
        return self._file.get_slice(name)[index]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

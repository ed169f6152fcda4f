"""The neuron table: one row per neuron of an atlas, filtered, sorted and paginated.

The columns are computed once per atlas, layer by layer (an atlas may hold hundreds of
thousands of neurons), as flat numpy arrays; a request is then a few vectorized masks, one
stable argsort and a slice, however large the model.

Filters are clauses joined by ``and``: ``COLUMN OP NUMBER`` (OP one of ``< <= > >= = !=``)
or ``COLUMN A-B`` (inclusive). A column is named by its words in any order, e.g.
``gate-_in- frequency > 0.2 and layer 20-31`` or ``p99 gate+_in+ >= 1``. Some values have
names: a mixture of experts' ``expert = shared`` (and ``dense``).

A mixture-of-experts atlas's table has a row per expert neuron (the padding of its narrower
layers left out) and, beside the columns of every atlas, the neuron's ``expert`` (its
number; ``shared``, ``dense``), its ``expert share`` of the counted tokens (1 for shared and
dense neurons), the expert's mean ``router weight`` and each case's ``routed frequency``
(among the expert's tokens; ``frequency`` stays among all counted tokens).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gatescope.constants import CASES, QUANTILES, QUANTITIES
from gatescope.errors import GatescopeError
from gatescope.records import DENSE, PADDING, SHARED
from gatescope.stats.distributions import bracket_estimates

if TYPE_CHECKING:
    from gatescope.atlas import Atlas
    from gatescope.weights import WeightFigures

__all__ = ["Column", "NeuronTable", "TablePage", "parse_filter"]

#: The most rows one page may hold.
MAX_PAGE_SIZE = 500

_OPERATORS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "<=": operator.le, ">=": operator.ge, "!=": operator.ne,
    "<": operator.lt, ">": operator.gt, "=": operator.eq,
}  # fmt: skip
_ALIASES = {"freq": "frequency", "==": "="}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COLUMN = r"(?P<column>[^<>=!]+?)"  # no operator inside a column's name
_COMPARISON = re.compile(
    rf"^{_COLUMN}\s*(?P<op><=|>=|!=|==|<|>|=)\s*(?P<value>{_NUMBER}|[A-Za-z_]+)$"
)
_RANGE = re.compile(rf"^{_COLUMN}\s+(?P<low>{_NUMBER})\s*-\s*(?P<high>{_NUMBER})$")


@dataclass(frozen=True)
class Column:
    """A column of the table: ``key`` in URLs and JSON, ``label`` in headers."""

    key: str
    label: str
    named: tuple[tuple[str, float], ...] = ()  # values a filter may give by name

    @property
    def words(self) -> frozenset[str]:
        """The words that name it in a filter (any order)."""
        return _words(self.label)

    def name_of(self, value: float | None) -> str | None:
        """The name of a value (``shared`` for an expert column's -1), or None."""
        return next((name for name, named in self.named if named == value), None)


@dataclass(frozen=True)
class Condition:
    """One clause of a filter: ``low <= column <= high`` or ``column OP value``."""

    column: str  # a Column key
    op: str  # one of _OPERATORS, or "range"
    value: float
    high: float = float("nan")  # the upper bound of a range

    def mask(self, values: np.ndarray) -> np.ndarray:
        if self.op == "range":
            return (values >= self.value) & (values <= self.high)
        return _OPERATORS[self.op](values, self.value)


@dataclass(frozen=True)
class TablePage:
    """One page of rows (``rows[i][j]`` is column ``columns[j]``; None where there is no
    value, e.g. the max of a case that never occurs)."""

    columns: tuple[Column, ...]
    rows: list[list[float | int | None]]
    names: list[str]  # each row's neuron as addressed (Atlas.neuron_name)
    total: int  # rows that pass the filter
    page: int  # 1-based
    size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))


class NeuronTable:
    """Every neuron of an atlas as a row: layer, neuron, the four case frequencies, the
    largest |hook_post| per case, the three weight cosines when ``figures`` are given and,
    when the atlas has distributions, the quantiles of |hook_post| per case."""

    def __init__(self, atlas: Atlas, figures: WeightFigures | None = None) -> None:
        self.columns, data = _columns(atlas, figures)
        self._data = data  # key -> [neuron of the model] array
        self._name = atlas.neuron_name
        self._order: dict[tuple[str, bool], np.ndarray] = {}  # sorted row indices, cached

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.columns)

    def __len__(self) -> int:
        return len(self._data["layer"])

    def values(self, key: str) -> np.ndarray:
        """Column ``key`` over every neuron of the model, in model order (read-only)."""
        column = self._data[key].view()
        column.flags.writeable = False
        return column

    def page(
        self,
        filter_: str = "",
        *,
        sort: str = "layer",
        descending: bool = False,
        page: int = 1,
        size: int = 50,
    ) -> TablePage:
        """The rows of page ``page`` (1-based, ``size`` rows) of those that pass ``filter_``,
        sorted by column ``sort`` (rows without a value last; ties in model order)."""
        if sort not in self._data:
            raise GatescopeError(f"cannot sort by '{sort}': columns are {', '.join(self.keys)}.")
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise GatescopeError(f"a page holds 1 to {MAX_PAGE_SIZE} rows, not {size}.")
        if page < 1:
            raise GatescopeError(f"pages count from 1, not {page}.")
        keep = np.ones(len(self), dtype=bool)
        for condition in parse_filter(filter_, self.columns):
            keep &= condition.mask(self._data[condition.column])
        order = self._sorted(sort, descending)
        chosen = order[keep[order]]
        rows = chosen[(page - 1) * size : page * size]
        layer, neuron = self._data["layer"][rows].tolist(), self._data["neuron"][rows].tolist()
        names = [self._name(lyr, n) for lyr, n in zip(layer, neuron, strict=True)]
        return TablePage(self.columns, self._rows(rows), names, len(chosen), page, size)

    def _sorted(self, key: str, descending: bool) -> np.ndarray:
        """Row indices by ``key`` (NaN last, stable), cached per (key, direction)."""
        cached = self._order.get((key, descending))
        if cached is None:
            values = self._data[key].astype(np.float64)
            ranked = -values if descending else values
            cached = self._order[key, descending] = np.argsort(ranked, kind="stable")
        return cached

    def _rows(self, indices: np.ndarray) -> list[list[float | int | None]]:
        columns = [self._data[c.key][indices] for c in self.columns]
        return [[_cell(column[i]) for column in columns] for i in range(len(indices))]


def parse_filter(text: str, columns: Sequence[Column]) -> list[Condition]:
    """The conditions of a filter (see the module docstring); a clause that names no column
    or does not parse is refused with a sentence."""
    conditions = []
    for clause in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        if not clause:
            continue
        match = _COMPARISON.match(clause) or _RANGE.match(clause)
        if match is None:
            raise GatescopeError(
                f"cannot read '{clause}': write COLUMN OP NUMBER or COLUMN A-B, "
                "e.g. 'gate-_in- frequency > 0.2 and layer 20-31'."
            )
        key = _column_named(match["column"], columns)
        if key is None:
            names = ", ".join(c.label for c in columns)
            raise GatescopeError(f"no column '{match['column']}': columns are {names}.")
        if "op" in match.groupdict():
            op = _ALIASES.get(match["op"], match["op"])
            column = next(c for c in columns if c.key == key)
            conditions.append(Condition(key, op, _value(match["value"], column)))
        else:
            conditions.append(Condition(key, "range", float(match["low"]), float(match["high"])))
    return conditions


#: The weight cosines of the table: column key, label, WeightFigures field.
WEIGHT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cos:gate_in", "cos gate-in", "cos_gate_in"),
    ("cos:gate_out", "cos gate-out", "cos_gate_out"),
    ("cos:in_out", "cos in-out", "cos_in_out"),
)


def _value(text: str, column: Column) -> float:
    """A filter's value: a number, or one of the column's named values."""
    named = dict(column.named)
    if text.lower() in named:
        return named[text.lower()]
    try:
        return float(text)
    except ValueError:
        names = " or ".join(named) or "none"
        raise GatescopeError(f"'{text}' is not a value of {column.label}: write a number "
                             f"(named values: {names}).") from None  # fmt: skip


def _words(name: str) -> frozenset[str]:
    """A column name's words: lower case, bars dropped (``|hook_post|`` is ``hook_post``),
    aliases resolved (``freq`` is ``frequency``)."""
    return frozenset(_ALIASES.get(w, w) for w in name.replace("|", " ").lower().split())


def _column_named(name: str, columns: Sequence[Column]) -> str | None:
    """The key of the column ``name`` names: all its words in any order, or some of them
    when they name no other column (``p99 gate+_in+`` for ``gate+_in+ p99 |hook_post|``)."""
    words = _words(name)
    exact = [c.key for c in columns if c.words == words]
    if exact:
        return exact[0]
    partial = [c.key for c in columns if words and words <= c.words]
    return partial[0] if len(partial) == 1 else None


def _columns(
    atlas: Atlas, figures: WeightFigures | None
) -> tuple[tuple[Column, ...], dict[str, np.ndarray]]:
    """The table's columns and their values over every neuron, read one layer at a time."""
    post = QUANTITIES.index("hook_post")
    columns = [Column("layer", "layer"), Column("neuron", "neuron")]
    experts = atlas.meta.experts is not None
    if experts:
        columns += [Column("expert", "expert", (("shared", SHARED), ("dense", DENSE))),
                    Column("routing:share", "expert share"),
                    Column("routing:weight", "router weight")]  # fmt: skip
    columns += [Column(f"freq:{case}", f"{case} frequency") for case in CASES]
    if experts:
        columns += [Column(f"routed:{case}", f"{case} routed frequency") for case in CASES]
    columns += [Column(f"max:{case}", f"{case} max |hook_post|") for case in CASES]
    if figures is not None:
        if figures.shape != (atlas.num_layers, atlas.d_mlp):
            raise GatescopeError(
                f"the model's weights have {figures.shape[0]} layers of {figures.shape[1]} "
                f"neurons, the atlas {atlas.num_layers} of {atlas.d_mlp}: a different model."
            )
        columns += [Column(key, label) for key, label, _ in WEIGHT_COLUMNS]
    with_quantiles = atlas.has_distributions
    if with_quantiles:
        columns += [Column(f"{name}:{case}", f"{case} {name} |hook_post|")
                    for name, _ in QUANTILES for case in CASES]  # fmt: skip
    parts: dict[str, list[np.ndarray]] = {c.key: [] for c in columns}
    for layer in range(atlas.num_layers):
        stats = atlas.layer(layer)
        routing = atlas.routing(layer)
        found: dict[str, np.ndarray] = {}  # key -> [d] this layer's values
        add = found.__setitem__
        d = stats.count.shape[1]
        add("layer", np.full(d, layer, dtype=np.int32))
        add("neuron", np.arange(d, dtype=np.int32))
        freq = stats.count.double() / atlas.denominator  # [case, d]
        strongest = _strongest(stats.max[:, post], stats.min[:, post])  # [case, d]
        for c, case in enumerate(CASES):
            add(f"freq:{case}", freq[c].numpy())
            add(f"max:{case}", strongest[c])
        if routing is not None:
            add("expert", routing.code)
            add("routing:share", routing.seen / atlas.denominator)
            add("routing:weight", routing.router_weight_mean)
            routed_freq = routing.freq(stats.count.numpy())  # [case, d]
            for c, case in enumerate(CASES):
                add(f"routed:{case}", routed_freq[c])
        if figures is not None:
            for key, _, name in WEIGHT_COLUMNS:
                add(key, getattr(figures, name)[layer])
        quantiles = stats.quantiles() if with_quantiles else None
        if quantiles is not None:  # [d, case, quantity, level, 2] brackets
            estimate = bracket_estimates(quantiles[:, :, post])  # [d, case, level]
            for level, (name, _) in enumerate(QUANTILES):
                for c, case in enumerate(CASES):
                    add(f"{name}:{case}", estimate[:, c, level])
        kept = slice(None) if routing is None else routing.code != PADDING  # [d]
        for key, values in found.items():
            parts[key].append(values[kept])
    return tuple(columns), {key: np.concatenate(arrays) for key, arrays in parts.items()}


def _strongest(maximum, minimum) -> np.ndarray:
    """[case, d] the largest |value| from a case's signed max and min (NaN: never occurs)."""
    return np.fmax(np.abs(maximum.numpy()), np.abs(minimum.numpy()))


def _cell(value: np.generic) -> float | int | None:
    if isinstance(value, np.integer):
        return int(value)
    number = float(value)
    return None if np.isnan(number) else number

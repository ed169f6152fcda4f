"""The geometry of the static charts: a neuron page's magnitude histograms and joint
(x_gate, x_in) heat map, and the server's model-wide box plots and scatter plots, as plain
data the templates draw as inline SVG.

No plotting library and no script: a page's charts are readable without JavaScript, each
bar and cell carrying its numbers in a tooltip (``<title>``) and in a table beside it.
Counts are drawn on a log scale (``log(1 + count)``): a case's tokens span many orders of
magnitude between bins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gatescope.constants import CASES

__all__ = [
    "AxisTick",
    "Bar",
    "Box",
    "Cell",
    "HeatMap",
    "Point",
    "Tick",
    "axis_ticks",
    "bin_label",
    "box_plot",
    "heat_map",
    "histogram_bars",
    "scatter",
    "ticks",
]

#: Size of a histogram chart and of the heat map, in SVG user units.
HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 380.0, 110.0
HEAT_MAP_SIZE = 360.0
#: Size of a model-wide chart's plotting area (box plots, scatter plots), in SVG user units.
PLOT_WIDTH, PLOT_HEIGHT = 520.0, 240.0


@dataclass(frozen=True)
class Bar:
    """One histogram bin: its rectangle and numbers."""

    x: float
    y: float
    width: float
    height: float
    count: int
    label: str  # the bin's range of |value|


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Cell:
    """One heat-map cell: a (|g| bin, |u| bin) of one case."""

    x: float
    y: float
    size: float
    count: int
    shade: float  # 0 (no tokens) to 1 (the map's largest count), on a log scale
    label: str  # its ranges of g and u


@dataclass(frozen=True)
class Quadrant:
    case: str
    freq: float
    x: float  # where its label goes
    y: float
    anchor: str  # SVG text-anchor of the label


@dataclass(frozen=True)
class HeatMap:
    cells: list[Cell]
    quadrants: list[Quadrant]
    size: float
    half: float  # the axes' position (the map's middle)


@dataclass(frozen=True)
class Box:
    """One layer's box: whiskers at ``low``/``high``, the box from ``q1`` to ``q3``, a line
    at the median (y coordinates), with the numbers for its tooltip."""

    x: float
    width: float
    low: float
    q1: float
    median: float
    q3: float
    high: float
    layer: int
    label: str


@dataclass(frozen=True)
class AxisTick:
    at: float  # the position along its axis
    label: str


@dataclass(frozen=True)
class Point:
    """One neuron of a scatter plot."""

    x: float
    y: float
    layer: int
    neuron: int
    label: str


def box_plot(summaries: np.ndarray, low: float = 0.0, high: float = 1.0) -> list[Box]:
    """One box per row of ``summaries`` ``[layers, 5]`` (low whisker, q1, median, q3, high
    whisker), on a y axis from ``low`` (bottom) to ``high``."""
    width = PLOT_WIDTH / len(summaries)
    boxes = []
    for layer, values in enumerate(summaries):
        y = [_y(float(v), low, high) for v in values]
        low_, q1, median, q3, high_ = (f"{v:.3g}" for v in values)
        label = f"layer {layer}: median {median}, quartiles {q1} – {q3}, 5–95% {low_} – {high_}"
        boxes.append(Box(layer * width + width * 0.15, width * 0.7, *y, layer=layer, label=label))
    return boxes


def scatter(
    xs: np.ndarray, ys: np.ndarray, layer: int, x_range: tuple[float, float],
    y_range: tuple[float, float], x_name: str, y_name: str,
) -> list[Point]:  # fmt: skip
    """One point per neuron of ``layer`` (``xs[n]``, ``ys[n]``); NaN pairs are left out."""
    points = []
    for neuron, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
        if math.isnan(x) or math.isnan(y):
            continue
        px = PLOT_WIDTH * (x - x_range[0]) / (x_range[1] - x_range[0])
        label = f"{layer}.{neuron}: {x_name} {x:.3g}, {y_name} {y:.3g}"
        points.append(Point(px, _y(y, *y_range), layer, neuron, label))
    return points


def axis_ticks(low: float, high: float, step: float, vertical: bool) -> list[AxisTick]:
    """Ticks every ``step`` from ``low`` to ``high`` of a plot's x axis, or its y axis when
    ``vertical``."""
    count = round((high - low) / step)
    values = [low + i * step for i in range(count + 1)]
    if vertical:
        return [AxisTick(_y(v, low, high), f"{v:g}") for v in values]
    return [AxisTick(PLOT_WIDTH * (v - low) / (high - low), f"{v:g}") for v in values]


def _y(value: float, low: float, high: float) -> float:
    """SVG y of ``value`` on an axis from ``low`` (bottom) to ``high`` (top)."""
    return PLOT_HEIGHT * (high - value) / (high - low)


def bin_label(edges: Sequence[float], b: int) -> str:
    """The range of bin ``b``: ``[low, high)``, shortened at both ends."""
    low, high = edges[b], edges[b + 1]
    if low == 0:
        return f"< {_short(high)}"
    if math.isinf(high):
        return f"≥ {_short(low)}"
    return f"{_short(low)} – {_short(high)}"


def histogram_bars(counts: Sequence[int], edges: Sequence[float], top: int) -> list[Bar]:
    """Equal-width bars (bins are equal in log |value|) of heights ``log(1 + count)``
    relative to ``log(1 + top)``: charts that share ``top`` share their scale."""
    width = HISTOGRAM_WIDTH / len(counts)
    scale = math.log1p(max(top, 1))
    bars = []
    for b, count in enumerate(counts):
        height = HISTOGRAM_HEIGHT * math.log1p(count) / scale
        bars.append(Bar(b * width, HISTOGRAM_HEIGHT - height, width, height, int(count),
                        bin_label(edges, b)))  # fmt: skip
    return bars


def ticks(edges: Sequence[float], every: int, first: int = 1) -> list[Tick]:
    """Labels at every ``every``-th inner edge of a histogram's |value| axis from edge
    ``first`` (the first inner edge is 1)."""
    width = HISTOGRAM_WIDTH / (len(edges) - 1)
    return [Tick(b * width, _short(edges[b])) for b in range(first, len(edges) - 1, every)]


def heat_map(
    joint: Mapping[str, Sequence[Sequence[int]]], edges: Sequence[float], freq: Mapping[str, float]
) -> HeatMap:
    """The (x_gate, x_in) plane: g grows to the right, u upwards, each quadrant one case's
    (|g| bin, |u| bin) counts with the smallest magnitudes at the axes.

    Args:
        joint: case -> [|g| bin][|u| bin] counts.
        edges: The joint bins' edges along each axis.
        freq: case -> frequency, for the quadrant labels.
    """
    bins = len(edges) - 1
    size = HEAT_MAP_SIZE / (2 * bins)
    half = HEAT_MAP_SIZE / 2
    top = max((max(max(row) for row in counts) for counts in joint.values()), default=0)
    scale = math.log1p(max(top, 1))
    cells = []
    for case, counts in joint.items():
        g_sign = -1 if case.startswith("gate-") else 1
        u_sign = -1 if case.endswith("in-") else 1
        for gb, row in enumerate(counts):
            for ub, count in enumerate(row):
                x = half + (gb if g_sign > 0 else -gb - 1) * size
                y = half - (ub + 1 if u_sign > 0 else -ub) * size
                label = (f"g {'+' if g_sign > 0 else '−'}({bin_label(edges, gb)}), "
                         f"u {'+' if u_sign > 0 else '−'}({bin_label(edges, ub)})")  # fmt: skip
                cells.append(Cell(x, y, size, int(count), math.log1p(count) / scale, label))
    corner = {  # label positions, just inside each quadrant's outer corner
        CASES[0]: (HEAT_MAP_SIZE - 4, 14, "end"),
        CASES[1]: (HEAT_MAP_SIZE - 4, HEAT_MAP_SIZE - 6, "end"),
        CASES[2]: (4, 14, "start"),
        CASES[3]: (4, HEAT_MAP_SIZE - 6, "start"),
    }
    quadrants = [Quadrant(case, freq[case], *corner[case]) for case in CASES]
    return HeatMap(cells, quadrants, HEAT_MAP_SIZE, half)


def _short(x: float) -> str:
    """A bin edge: a power of two as ``2^n``, others to three digits."""
    if x == 0:
        return "0"
    exponent = math.log2(x)
    if exponent == int(exponent):
        return f"2^{int(exponent)}"
    return f"{np.float32(x):.3g}"

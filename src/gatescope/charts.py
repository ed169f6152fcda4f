"""The geometry of a neuron page's static charts: magnitude histograms and the joint
(x_gate, x_in) heat map, as plain data the templates draw as inline SVG.

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

__all__ = ["Bar", "Cell", "HeatMap", "Tick", "bin_label", "heat_map", "histogram_bars", "ticks"]

#: Size of a histogram chart and of the heat map, in SVG user units.
HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 380.0, 110.0
HEAT_MAP_SIZE = 360.0


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

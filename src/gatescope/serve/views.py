"""The model-wide views of a served atlas: how the four case frequencies are distributed
over each layer's neurons, and, for one layer, how cos(w_in, w_out) goes with the frequency
of x_gate > 0 (GLUScope's section 5.1 reports a strong negative correlation).

Both read the neuron table's columns (computed once per atlas), so a view costs a few
vectorized passes over them. A frequency is among the tokens a neuron computes: in a
mixture of experts, an expert neuron's among its expert's tokens (the table's routed
frequencies), so that expert, shared and dense neurons compare.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gatescope.constants import CASES
from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from gatescope.serve.table import NeuronTable

__all__ = ["FREQUENCY_LEVELS", "Correlation", "gate_correlation", "layer_frequencies"]

#: The levels of a layer's frequency summary: whiskers, quartiles and median.
FREQUENCY_LEVELS: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)

#: The cases in which x_gate > 0.
_GATE_POSITIVE = tuple(case for case in CASES if case.startswith("gate+"))


@dataclass(frozen=True)
class Correlation:
    """cos(w_in, w_out) against P(x_gate > 0) over one layer's neurons."""

    layer: int
    cos_in_out: np.ndarray  # [d_mlp]
    gate_positive: np.ndarray  # [d_mlp] frequency of x_gate > 0
    neurons: int  # with both values (a neuron of an atlas without token count may lack one)
    r: float  # Pearson's correlation (NaN when undefined: constant values, < 3 neurons)
    p: float  # its two-sided p-value


def layer_frequencies(table: NeuronTable) -> dict[str, np.ndarray]:
    """case -> ``[layers, len(FREQUENCY_LEVELS)]``: the quantiles of each layer's neuron
    frequencies of the case."""
    layers = table.values("layer")
    count = int(layers.max()) + 1
    summaries = {}
    for case in CASES:
        freq = _frequency(table, case)
        with warnings.catch_warnings():  # a layer of experts the router never chose: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            summaries[case] = np.stack([np.nanquantile(freq[layers == layer], FREQUENCY_LEVELS)
                                        for layer in range(count)])  # fmt: skip
    return summaries


def _frequency(table: NeuronTable, case: str) -> np.ndarray:
    """[neuron] the case's frequency among the tokens each neuron computes (NaN: an expert
    no token was routed to)."""
    routed = f"routed:{case}"
    return table.values(routed if routed in table.keys else f"freq:{case}")


def gate_correlation(table: NeuronTable, layer: int) -> Correlation:
    """The correlation over layer ``layer``'s neurons; the table must have the weight
    cosines."""
    if "cos:in_out" not in table.keys:
        raise GatescopeError("the weight cosines are not available for this atlas.")
    in_layer = table.values("layer") == layer
    if not in_layer.any():
        raise GatescopeError(f"there is no layer {layer}.")
    cos = table.values("cos:in_out")[in_layer].astype(np.float64)
    gate_positive = np.sum([_frequency(table, c)[in_layer] for c in _GATE_POSITIVE], axis=0)
    both = ~(np.isnan(cos) | np.isnan(gate_positive))
    r, p = _pearson(cos[both], gate_positive[both])
    return Correlation(layer, cos, gate_positive, int(both.sum()), r, p)


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value (scipy), NaN where they are undefined."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    from scipy.stats import pearsonr

    result = pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)  # pyright: ignore[reportAttributeAccessIssue]

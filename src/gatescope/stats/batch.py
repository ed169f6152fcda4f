"""What a statistics pass is given and gives back: the contract every pass implements.

A pass (:mod:`~gatescope.stats.cpu_pass`, :mod:`~gatescope.stats.torch_pass`) adds one
batch of a layer's ``g`` and ``u`` ([text, pos, neuron]) to the layer's :class:`Totals` in
place, and returns each text's candidates for the accumulator's ranked lists and typical
examples (:class:`PerText`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class Totals:
    """A layer's running totals, added to in place by every pass."""

    count: Tensor  # [case, neuron] int64
    sums: Tensor  # [case, quantity, neuron] float64
    weakest: Tensor  # [case, quantity, neuron] smallest |value| so far (+inf: none)
    # The distributions (None: not collected), int32: magnitude histograms
    # [case, quantity, N_BINS, neuron] and joint histograms [case, |g| bin, |u| bin, neuron].
    histogram: Tensor | None = None
    joint: Tensor | None = None


@dataclass(frozen=True)
class PerText:
    """Each text's candidates, for the ranked lists and the typical examples."""

    # [case * 4 + quantity, text, neuron]: the largest |value| of the quantity over the
    # text's tokens of the case (-inf: the case does not occur), and its first position.
    strength: Tensor
    position: Tensor  # int64
    # [case, text, neuron] the token drawn for the typical examples (-1: none, or the text
    # was not asked for), and [case, quantity, text, neuron] its four values (0: none).
    typical_position: Tensor | None = None
    typical_value: Tensor | None = None


class StatisticsPass(Protocol):
    def __call__(
        self, gate: Tensor, up: Tensor, valid: Tensor, totals: Totals, salt: Tensor | None
    ) -> PerText:
        """Adds a batch to ``totals``.

        Args:
            gate, up: [text, pos, neuron] ``g`` and ``u`` in the statistics' dtype.
            valid: [text, pos] bool, the counted tokens.
            totals: The layer's totals, updated in place.
            salt: [case, text, neuron] int64, each text's token-draw salt
                (:func:`~gatescope.stats.distributions.token_salt`), or -1 where the text
                cannot enter the typical examples; None: no typical examples.
        """
        ...

"""What a statistics pass is given and gives back: the contract every pass implements.

A pass (:mod:`~gatescope.stats.cpu_pass`, :mod:`~gatescope.stats.torch_pass`) adds one
batch of a layer's ``g`` and ``u`` ([text, pos, neuron]) to the layer's :class:`Totals` in
place, and returns each text's candidates for the accumulator's ranked lists and typical
examples (:class:`PerText`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gatescope.constants import CASES, QUANTITIES


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
        self,
        gate: Tensor,
        up: Tensor,
        valid: Tensor,
        totals: Totals,
        salt: Tensor | None,
        swish: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> PerText:
        """Adds a batch to ``totals``.

        Args:
            gate, up: [text, pos, neuron] ``g`` and ``u`` in the statistics' dtype.
            valid: [text, pos] bool, the counted tokens.
            totals: The layer's totals, updated in place.
            salt: [case, text, neuron] int64, each text's token-draw salt
                (:func:`~gatescope.stats.distributions.token_salt`), or -1 where the text
                cannot enter the typical examples; None: no typical examples.
            swish: [text, pos, neuron] ``act(g)`` as the model computed it, in the same
                dtype; None: the pass applies the activation to ``gate``.
            positions: [text, pos] int64, each token's position in its text, where a text's
                tokens are packed (a mixture of experts' routed tokens, in order): what the
                token draw hashes. None: the index along pos. The positions a pass returns
                are indices along pos either way.
        """
        ...


class Workspace:
    """Scratch buffers of the statistics passes, shared by the layers of a model.

    A fresh multi-megabyte allocation costs more than the arithmetic done in it on a CPU
    (the kernel zeroes every new page on first touch), and one set of buffers for all
    layers stays in cache while the layers take turns (hooks run one layer at a time).
    Not for concurrent updates from several threads.
    """

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def flat(
        self, name: str, elements: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> Tensor:
        """A flat buffer ``name`` of ``elements`` (on the CPU unless ``device``), contents
        undefined: the same memory from call to call, grown when a call needs more."""
        device = device if device is not None else torch.device("cpu")
        buffer = self._flat.get(name)
        if (buffer is None or buffer.dtype != dtype or buffer.device != device
                or buffer.numel() < elements):  # fmt: skip
            buffer = self._flat[name] = torch.empty(elements, dtype=dtype, device=device)
        return buffer[:elements]

    def get(
        self, texts: int, padded: int, d_mlp: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, Tensor]:
        """The torch pass's buffers q, cases, masked: [quantity or case, ``texts``,
        ``padded``, ``d_mlp``], views of flat buffers, so that layers and experts of other
        shapes (an expert's packed tokens, a shared MLP) reuse the same memory."""
        shape = (texts, padded, d_mlp)
        elements = texts * padded * d_mlp
        lead = {"q": len(QUANTITIES), "cases": len(CASES), "masked": len(QUANTITIES)}
        return {name: self.flat(f"torch {name}", n * elements, dtype, device).view(n, *shape)
                for name, n in lead.items()}  # fmt: skip

"""The distributions of a neuron's activations: fixed log-spaced bins, seeded typical examples.

**Bins.** Within a sign case every quantity has a fixed sign (constants.SIGNS), so a
histogram per (case, quantity) needs magnitude bins only, and the joint (x_gate, x_in)
histogram of a case is one quadrant of the plane over (|g| bin, |u| bin). The bins are
fixed and data-independent, so histograms of disjoint texts add up exactly:

* ``N_BINS`` magnitude bins: ``[0, 2**LOWEST)`` (underflow, zero included), then
  ``BINS_PER_OCTAVE`` log-spaced bins per octave up to ``2**HIGHEST``, then
  ``[2**HIGHEST, inf]`` (overflow; a NaN ``act(g)`` or product counts there too: a NaN
  ``g`` or ``u`` puts the token in no case). The edge inside an octave is
  ``2**e * float32(sqrt(2))``: every edge is a float32 number, so a float32 value and the
  same value in float64 fall in the same bin.
* ``N_JOINT_BINS`` bins per axis of the joint histogram: ``[0, 2**JOINT_LOWEST)``, bins of
  ``JOINT_OCTAVES`` octaves up to ``2**HIGHEST``, overflow. Its edges are a subset of the
  magnitude edges.

A bin is read off the float's exponent and mantissa bits: exact, branch-free, and the same
on every device and in every pass (the numba kernel does it on the same bits).

How the counts were chosen: OLMo-7B has 352,256 neurons, and its histograms must stay
within about 1.5 GB. ``16 * 38 + 4 * 10 * 10 = 1,008`` int32 counts per neuron are 1.42 GB
(the typical examples add 0.54 GB at k = 16, the rest of the atlas is 1.05 GB). Half
octaves over 2**-11..2**7 cover the |values| of trained models (the fixture's 0.1%
quantile of |hook_post| is near 2**-15, its largest |g| below 2**3; 7B models reach the
hundreds in rare outliers, whose exact extremes ``max``/``min`` keep), and bracket a
quantile in a regular bin within a factor sqrt(2) (in the underflow or overflow bin, within
that bin and the case's extremes). The heat map needs a coarser grid: 10 x 10 per
quadrant is 20 x 20 over the plane.

**Typical examples.** Per neuron and case, ``k`` texts drawn uniformly among those where
the case occurs, and in each a token drawn uniformly among the case's tokens. A draw is a
priority from a hash of (seed, layer, neuron, case, text): the ``k`` smallest win. For the
token, a hash of the text's salt and the position; the smallest wins. The priorities depend
on nothing but those numbers, so shards and torchrun ranks draw exactly what one scan draws.
Hashes are 32-bit (held in int64 tensors, masked after each multiply, so no arithmetic
overflows on any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gatescope.constants import CASES

__all__ = [
    "BINS_PER_OCTAVE",
    "N_BINS",
    "N_JOINT_BINS",
    "Bracket",
    "bin_edges",
    "bracket_estimates",
    "joint_bins",
    "joint_edges",
    "magnitude_bins",
    "mix32",
    "neuron_salt",
    "quantile_brackets",
    "ranking_key",
    "text_priority",
    "token_priority",
    "token_salt",
]

BINS_PER_OCTAVE = 2
LOWEST = -11  # the first regular magnitude bin starts at 2**LOWEST
HIGHEST = 7  # the overflow bins start at 2**HIGHEST
N_BINS = 2 + BINS_PER_OCTAVE * (HIGHEST - LOWEST)
JOINT_OCTAVES = 2
JOINT_LOWEST = -9
N_JOINT_BINS = 2 + (HIGHEST - JOINT_LOWEST) // JOINT_OCTAVES

#: The 23 mantissa bits of float32(sqrt(2)): a magnitude whose mantissa is at least this is
#: in the upper half of its octave.
HALF_OCTAVE = int(np.array(np.sqrt(2.0), dtype=np.float32).view(np.int32)) & 0x7FFFFF
_MANTISSA_MASK = 0x7FFFFF
_FLOAT64_BIAS, _FLOAT64_MANTISSA = 1023, 52

#: Ranking keys of the draw are ``priority << KEY_LOW_BITS | index``, unique and smallest
#: first: the index is the text's (texts) or the position's (tokens), below 2**31.
KEY_LOW_BITS = 31
NO_KEY = torch.iinfo(torch.int64).max  # no candidate

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIER = 0x45D9F3B  # below 2**27: a product of it and a 32-bit value fits in int63
TOKEN_SALT = 0x2545F491


# ------------------------------------------------------------------------------ bins


def _exponent_and_mantissa(x: Tensor) -> tuple[Tensor, Tensor]:
    """The unbiased exponent and the top 23 mantissa bits of ``|x|``: from the float32 bits
    (int32 work, no copy wider than ``x``), else from the float64 bits."""
    if x.dtype == torch.float32:
        bits = x.view(torch.int32) & 0x7FFFFFFF
        return (bits >> 23) - 127, bits & _MANTISSA_MASK
    bits = x.to(torch.float64).view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    exponent = (bits >> _FLOAT64_MANTISSA) - _FLOAT64_BIAS
    return exponent, (bits >> (_FLOAT64_MANTISSA - 23)) & _MANTISSA_MASK


def magnitude_bins(x: Tensor) -> Tensor:
    """The magnitude bin of each ``|x|`` (0 to ``N_BINS - 1``; int32 for float32 ``x``,
    int64 otherwise)."""
    exponent, mantissa = _exponent_and_mantissa(x)
    regular = 1 + BINS_PER_OCTAVE * (exponent - LOWEST) + (mantissa >= HALF_OCTAVE)
    return regular.clamp_(0, N_BINS - 1)


def joint_bins(x: Tensor) -> Tensor:
    """The joint histogram's bin of each ``|x|`` along its axis (0 to ``N_JOINT_BINS - 1``,
    the integer type of :func:`magnitude_bins`)."""
    exponent, _ = _exponent_and_mantissa(x)
    regular = 1 + ((exponent - JOINT_LOWEST) >> 1)  # floor division by JOINT_OCTAVES (2)
    return regular.clamp_(0, N_JOINT_BINS - 1)


def bin_edges() -> np.ndarray:
    """[N_BINS + 1] float64: bin ``b`` holds magnitudes in ``[edges[b], edges[b + 1])``
    (the last one includes inf)."""
    half = np.float64(np.float32(np.sqrt(2.0)))
    inner = [
        np.ldexp(mult, e) for e in range(LOWEST, HIGHEST) for mult in (1.0, half)
    ]  # BINS_PER_OCTAVE == 2
    return np.array([0.0, *inner, 2.0**HIGHEST, np.inf])


def joint_edges() -> np.ndarray:
    """[N_JOINT_BINS + 1] float64, the joint histogram's edges along each axis."""
    inner = [2.0**e for e in range(JOINT_LOWEST, HIGHEST + 1, JOINT_OCTAVES)]
    return np.array([0.0, *inner, np.inf])


# ------------------------------------------------------------------------------ quantiles


@dataclass(frozen=True)
class Bracket:
    """Where a quantile of |value| lies: in ``[low, high]``, its histogram bin clipped to
    the observed extremes; ``estimate`` is the geometric middle (``high`` where ``low`` is
    0)."""

    low: float
    high: float

    @property
    def estimate(self) -> float:
        return float(bracket_estimates(torch.tensor([self.low, self.high], dtype=torch.float64)))


def bracket_estimates(brackets: Tensor) -> np.ndarray:
    """[...] float64 estimates from [..., 2] brackets (low, high): their geometric middle,
    ``high`` where ``low`` is 0 (NaN stays NaN)."""
    low, high = brackets[..., 0].numpy(), brackets[..., 1].numpy()
    with np.errstate(invalid="ignore"):
        return np.where(low > 0, np.sqrt(low * high), high)


def quantile_brackets(
    histogram: Tensor, weakest: Tensor, strongest: Tensor, levels: tuple[float, ...]
) -> Tensor:
    """Brackets of quantiles of |value| from magnitude histograms.

    The ``q``-quantile is the ``ceil(q * n)``-th smallest of ``n`` values; it lies in the bin
    where the cumulative count reaches that rank, and within the observed extremes.

    Args:
        histogram: [..., N_BINS] counts.
        weakest, strongest: [...] the smallest and largest |value| (any value where the
            count is 0).
        levels: Quantile levels in (0, 1].

    Returns:
        [..., level, 2] float64 (low, high); NaN where the count is 0.
    """
    edges = torch.from_numpy(bin_edges())
    counts = histogram.to(torch.int64)
    total = counts.sum(dim=-1, keepdim=True)  # [..., 1]
    cumulative = counts.cumsum(dim=-1)  # [..., bins]
    result = []
    for level in levels:
        rank = torch.ceil(total.to(torch.float64) * level).clamp_(min=1).to(torch.int64)
        bin_ = torch.searchsorted(cumulative.contiguous(), rank).squeeze(-1).clamp_(max=N_BINS - 1)
        low = torch.maximum(edges[bin_], weakest.to(torch.float64))
        high = torch.minimum(edges[bin_ + 1], strongest.to(torch.float64))
        result.append(torch.stack([low, high], dim=-1))
    brackets = torch.stack(result, dim=-2)
    return brackets.masked_fill_((total == 0).unsqueeze(-1), float("nan"))


# ------------------------------------------------------------------------------ typical draw


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (int64 tensors holding values below 2**32)."""
    x = (((x >> 16) ^ x) * MIX_MULTIPLIER) & MASK32
    x = (((x >> 16) ^ x) * MIX_MULTIPLIER) & MASK32
    return (x >> 16) ^ x


def text_priority(seed: int, layer: int, case: Tensor, neuron: Tensor, text: Tensor) -> Tensor:
    """Priorities below 2**32 (int64) of texts (corpus indices) for the typical examples of
    (case, neuron) of a layer; ``case``, ``neuron`` and ``text`` (int64) broadcast."""
    return mix32(neuron_salt(seed, layer, case, neuron) ^ text)


def neuron_salt(seed: int, layer: int, case: Tensor, neuron: Tensor) -> Tensor:
    """The part of :func:`text_priority` that depends on no text: ``text_priority`` is
    ``mix32(neuron_salt(...) ^ text)``, so a scan hashes it once per layer."""
    base = mix32(mix32(torch.tensor(seed & MASK32, device=neuron.device)) ^ (layer & MASK32))
    return mix32(base ^ (neuron * len(CASES) + case))


def token_salt(priority: Tensor) -> Tensor:
    """The salt of a text's token draw: a second hash of its priority, so that the token
    drawn does not depend on how the text ranks."""
    return mix32(priority ^ TOKEN_SALT)


def ranking_key(priority: Tensor, index: Tensor, present: Tensor) -> Tensor:
    """The draw's ranking keys ``priority << KEY_LOW_BITS | index`` (unique, smallest
    first), ``NO_KEY`` where ``present`` is false; the arguments broadcast."""
    return torch.where(present, (priority << KEY_LOW_BITS) | index, NO_KEY)


def token_priority(salt: Tensor, position: Tensor) -> Tensor:
    """Priorities below 2**32 of token positions in a text of salt ``salt`` (broadcast)."""
    return mix32(salt ^ position)

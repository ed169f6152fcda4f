"""The statistics pass on a CPU: one fused, vectorized loop over g, u and act(g).

A pass of torch operations reads and writes the batch's [texts, positions, d_mlp]
activations about a hundred times (masks, masked quantities, block maxima...). On a GPU that
is cheap; on a CPU it takes a third of the layer's own forward time and evicts the model's
weights from the cache. This kernel (numba, compiled on first use and cached on disk) reads
each activation once and keeps every accumulator of a block of neurons in the L1 cache.

Layout: neurons are split into blocks of ``BLOCK`` (the threads take blocks). Within a
block, the inner loop runs over the block's neurons, which are contiguous in memory, so
LLVM vectorizes it; every branch is written as a select for the same reason. All
accumulators of a block live in one flat float64 array at constant offsets (rows of
``BLOCK``), which lets the compiler prove that they do not overlap one another.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import torch
from numba.core import config as numba_config
from torch import Tensor

from gatescope.constants import SIGNS

#: Neurons per block; 64 was fastest on the benchmark model (AVX-512 and AVX2 alike).
BLOCK = 64

# A block's accumulators are rows of BLOCK neurons in two flat arrays; `pair` is
# 4 * case + quantity. `totals` (float64, the whole batch): the counts per case (exact in
# float64), the sums per pair, the weakest |value| per pair (+inf before any token of the
# case). `best` (the input dtype, reset for every text): the strongest |value| per pair
# (-inf before any token of the case), then its position (exact below 2**24).
COUNT = 0  # totals[COUNT + case]
SUM = COUNT + 4  # totals[SUM + pair]
WEAKEST = SUM + 16  # totals[WEAKEST + pair]
TOTAL_ROWS = WEAKEST + 16
STRENGTH = 0  # best[STRENGTH + pair]
POSITION = STRENGTH + 16  # best[POSITION + pair]
BEST_ROWS = POSITION + 16

# The kernel spells out each case's quantity signs; this is the table it implements.
_KERNEL_SIGNS = ((1, 1, 1, 1), (1, -1, 1, -1), (-1, 1, -1, -1), (-1, -1, -1, 1))
assert tuple(SIGNS) == _KERNEL_SIGNS, "kernel out of date"


def cpu_pass(
    gate: Tensor,
    up: Tensor,
    valid: Tensor,
    count: Tensor,
    sums: Tensor,
    weakest: Tensor,
    *,
    act: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Adds a batch to the totals and finds each text's strongest tokens.

    Args:
        gate, up: [text, pos, neuron] ``g`` and ``u`` in the statistics' dtype (float32 or
            float64), on the CPU.
        valid: [text, pos] bool, the counted tokens.
        count: [case, neuron] int64, added to in place.
        sums: [case, quantity, neuron] float64, added to in place.
        weakest: [case, quantity, neuron] the smallest |value| so far (+inf: none), in the
            input dtype, lowered in place.
        act: The activation; ``act(g)`` is computed by torch, exactly as the model does.

    Returns:
        strength: [case * 4 + quantity, text, neuron] the largest |value| of the quantity
            over the text's tokens of the case; -inf where the case does not occur.
        position: [case * 4 + quantity, text, neuron] int64, the first position holding it.
    """
    gate, up = gate.contiguous(), up.contiguous()
    swish = act(gate).contiguous()
    texts, _, neurons = gate.shape
    strength = torch.empty(16, texts, neurons, dtype=gate.dtype)
    position = torch.empty(16, texts, neurons, dtype=torch.int64)
    # numba keeps its own thread pool: use as many threads as torch is allowed to.
    # (numba sets its config attributes from the environment at import: unseen by pyright.)
    n_threads = numba_config.NUMBA_NUM_THREADS  # pyright: ignore[reportAttributeAccessIssue]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), n_threads)))
    _batch(
        gate.numpy(), up.numpy(), swish.numpy(), valid.contiguous().numpy(),
        count.numpy(), sums.numpy(), weakest.numpy(), strength.numpy(), position.numpy(),
    )  # fmt: skip
    return strength, position


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _batch(g, u, a, valid, count, sums, weakest, strength, position):  # pragma: no cover
    texts, _, neurons = g.shape
    for block in numba.prange((neurons + BLOCK - 1) // BLOCK):
        first = block * BLOCK
        width = min(BLOCK, neurons - first)
        totals = np.zeros(TOTAL_ROWS * BLOCK)
        totals[WEAKEST * BLOCK :] = np.inf
        best = np.empty(BEST_ROWS * BLOCK, dtype=g.dtype)
        for text in range(texts):
            best[: POSITION * BLOCK] = -np.inf
            best[POSITION * BLOCK :] = -1
            _text(g, u, a, valid, text, first, width, totals, best)
            _weakest(g, u, a, valid, text, first, width, totals)
            _store_text(best, text, first, width, strength, position)
        _store_block(totals, first, width, count, sums, weakest)


# The loops below are not inlined into `_batch`: inside its parallel loop they made numba's
# compilation take a minute instead of seconds.


@numba.njit(boundscheck=False)
def _store_text(best, text, first, width, strength, position):  # pragma: no cover - compiled
    """Writes a text's strongest values and positions of a block's neurons."""
    for pair in range(16):
        for j in range(width):
            strength[pair, text, first + j] = best[(STRENGTH + pair) * BLOCK + j]
            position[pair, text, first + j] = int(best[(POSITION + pair) * BLOCK + j])


@numba.njit(boundscheck=False)
def _store_block(totals, first, width, count, sums, weakest):  # pragma: no cover - compiled
    """Adds a block's totals to the layer's."""
    for case in range(4):
        for j in range(width):
            n = first + j
            count[case, n] += int(totals[(COUNT + case) * BLOCK + j])
            for quantity in range(4):
                pair = 4 * case + quantity
                sums[case, quantity, n] += totals[(SUM + pair) * BLOCK + j]
                low = totals[(WEAKEST + pair) * BLOCK + j]
                if low < weakest[case, quantity, n]:
                    weakest[case, quantity, n] = low


@numba.njit(boundscheck=False, error_model="numpy")
def _text(g, u, a, valid, text, first, width, totals, best):  # pragma: no cover - compiled
    """Counts, sums and the strongest tokens of one text, for a block's neurons."""
    for t in range(g.shape[1]):
        if not valid[text, t]:
            continue
        for j in range(width):
            gv, uv, av, pv, pp, pn, np_, nn = _token(g, u, a, text, t, first + j)
            _sums(totals, j, 0, pp, gv, uv, av, pv)
            _sums(totals, j, 1, pn, gv, uv, av, pv)
            _sums(totals, j, 2, np_, gv, uv, av, pv)
            _sums(totals, j, 3, nn, gv, uv, av, pv)
            _strongest(best, j, t, 0, pp, gv, uv, av, pv, 1, 1, 1, 1)
            _strongest(best, j, t, 1, pn, gv, uv, av, pv, 1, -1, 1, -1)
            _strongest(best, j, t, 2, np_, gv, uv, av, pv, -1, 1, -1, -1)
            _strongest(best, j, t, 3, nn, gv, uv, av, pv, -1, -1, -1, 1)


@numba.njit(boundscheck=False, error_model="numpy")
def _weakest(g, u, a, valid, text, first, width, totals):  # pragma: no cover - compiled
    """The weakest tokens of one text, for a block's neurons. A loop of its own: folded
    into ``_text``, the many accumulators stopped LLVM from vectorizing."""
    for t in range(g.shape[1]):
        if not valid[text, t]:
            continue
        for j in range(width):
            gv, uv, av, pv, pp, pn, np_, nn = _token(g, u, a, text, t, first + j)
            _weaker(totals, j, 0, pp, gv, uv, av, pv, 1, 1, 1, 1)
            _weaker(totals, j, 1, pn, gv, uv, av, pv, 1, -1, 1, -1)
            _weaker(totals, j, 2, np_, gv, uv, av, pv, -1, 1, -1, -1)
            _weaker(totals, j, 3, nn, gv, uv, av, pv, -1, -1, -1, 1)


# Per-token updates, one case at a time. They are selects rather than branches or
# min/max, so that the loops over neurons vectorize.


@numba.njit(inline="always")
def _token(g, u, a, text, t, n):  # pragma: no cover - compiled
    """A token's four values for neuron ``n`` and whether it is in each sign case.

    hook_post is rounded in the input dtype, as torch's ``a * u`` is. A zero g or u is in
    no case. The signs of the cases are constants.SIGNS: within a case every quantity has a
    fixed sign, and value * sign is its strength |value|.
    """
    gv, uv, av = g[text, t, n], u[text, t, n], a[text, t, n]
    pv = av * uv
    pp, pn = (gv > 0) & (uv > 0), (gv > 0) & (uv < 0)
    np_, nn = (gv < 0) & (uv > 0), (gv < 0) & (uv < 0)
    return gv, uv, av, pv, pp, pn, np_, nn


@numba.njit(inline="always")
def _sums(totals, j, case, in_case, g, u, a, p):  # pragma: no cover - compiled
    """Counts the token and adds its quantities (in float64), if it is in ``case``."""
    totals[(COUNT + case) * BLOCK + j] += 1.0 if in_case else 0.0
    totals[(SUM + 4 * case) * BLOCK + j] += np.float64(g) if in_case else 0.0
    totals[(SUM + 4 * case + 1) * BLOCK + j] += np.float64(u) if in_case else 0.0
    totals[(SUM + 4 * case + 2) * BLOCK + j] += np.float64(a) if in_case else 0.0
    totals[(SUM + 4 * case + 3) * BLOCK + j] += np.float64(p) if in_case else 0.0


@numba.njit(inline="always")
def _strongest(best, j, t, case, in_case, g, u, a, p, sg, su, sa, sp):  # pragma: no cover
    """Keeps the token where it is the text's strongest so far of a case's quantities."""
    _stronger(best, j, t, 4 * case, in_case, g if sg > 0 else -g)
    _stronger(best, j, t, 4 * case + 1, in_case, u if su > 0 else -u)
    _stronger(best, j, t, 4 * case + 2, in_case, a if sa > 0 else -a)
    _stronger(best, j, t, 4 * case + 3, in_case, p if sp > 0 else -p)


@numba.njit(inline="always")
def _stronger(best, j, t, pair, in_case, strength):  # pragma: no cover - compiled
    """Strictly stronger only: the first strongest token wins."""
    s = strength if in_case else -np.inf
    stronger = s > best[(STRENGTH + pair) * BLOCK + j]
    best[(POSITION + pair) * BLOCK + j] = t if stronger else best[(POSITION + pair) * BLOCK + j]
    best[(STRENGTH + pair) * BLOCK + j] = s if stronger else best[(STRENGTH + pair) * BLOCK + j]


@numba.njit(inline="always")
def _weaker(totals, j, case, in_case, g, u, a, p, sg, su, sa, sp):  # pragma: no cover
    """Lowers the weakest |value| of a case's quantities to the token's, if in ``case``."""
    _lower(totals, (WEAKEST + 4 * case) * BLOCK + j, in_case, g if sg > 0 else -g)
    _lower(totals, (WEAKEST + 4 * case + 1) * BLOCK + j, in_case, u if su > 0 else -u)
    _lower(totals, (WEAKEST + 4 * case + 2) * BLOCK + j, in_case, a if sa > 0 else -a)
    _lower(totals, (WEAKEST + 4 * case + 3) * BLOCK + j, in_case, p if sp > 0 else -p)


@numba.njit(inline="always")
def _lower(totals, at, in_case, strength):  # pragma: no cover - compiled
    s = np.float64(strength)
    totals[at] = s if in_case & (s < totals[at]) else totals[at]

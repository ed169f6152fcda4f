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
from torch import Tensor

from gatescope.constants import SIGNS, TOP_LISTS

#: Neurons per block; 64 was fastest on the benchmark model (AVX-512 and AVX2 alike).
BLOCK = 64

N_LISTS = len(TOP_LISTS)
# A block's accumulators are rows of BLOCK neurons in two flat arrays. `totals` (float64,
# for the whole batch): the counts per case (exact in float64), then the sums per case and
# quantity. `best` (the input dtype, reset for every text): the strongest |value| so far
# per list (-inf before any token of the case), then its position (exact below 2**24).
COUNT = 0  # totals[COUNT + case]
SUM = COUNT + 4  # totals[SUM + 4 * case + quantity]
TOTAL_ROWS = SUM + 16
STRENGTH = 0  # best[STRENGTH + list]
POSITION = STRENGTH + N_LISTS  # best[POSITION + list]
BEST_ROWS = POSITION + N_LISTS

# The kernel below spells out every ranked list; this is the table it implements.
_KERNEL_LISTS = (
    ((0, 0), 1), ((0, 1), 1), ((0, 3), 1),
    ((1, 0), 1), ((1, 1), -1), ((1, 3), -1),
    ((2, 0), -1), ((2, 1), 1), ((2, 2), -1), ((2, 3), -1),
    ((3, 0), -1), ((3, 1), -1), ((3, 2), -1), ((3, 3), 1),
)  # fmt: skip
assert tuple(((c, q), SIGNS[c][q]) for c, q in TOP_LISTS) == _KERNEL_LISTS, "kernel out of date"


def cpu_pass(
    gate: Tensor,
    up: Tensor,
    valid: Tensor,
    count: Tensor,
    sums: Tensor,
    *,
    act: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Adds a batch to ``count`` and ``sums`` and finds each text's strongest tokens.

    Args:
        gate, up: [text, pos, neuron] ``g`` and ``u`` in the statistics' dtype (float32 or
            float64), on the CPU.
        valid: [text, pos] bool, the counted tokens.
        count: [case, neuron] int64, added to in place.
        sums: [case, quantity, neuron] float64, added to in place.
        act: The activation; ``act(g)`` is computed by torch, exactly as the model does.

    Returns:
        strength: [list, text, neuron] the largest |value| of each list's quantity over the
            text's tokens of the list's case; -inf where the case does not occur.
        position: [list, text, neuron] int64, the first position holding it.
    """
    gate, up = gate.contiguous(), up.contiguous()
    swish = act(gate).contiguous()
    texts, _, neurons = gate.shape
    strength = torch.empty(N_LISTS, texts, neurons, dtype=gate.dtype)
    position = torch.empty(N_LISTS, texts, neurons, dtype=torch.int64)
    # numba keeps its own thread pool: use as many threads as torch is allowed to.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _batch(
        gate.numpy(), up.numpy(), swish.numpy(), valid.contiguous().numpy(),
        count.numpy(), sums.numpy(), strength.numpy(), position.numpy(),
    )  # fmt: skip
    return strength, position


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _batch(g, u, a, valid, count, sums, strength, position):  # pragma: no cover - compiled
    texts, _, neurons = g.shape
    for block in numba.prange((neurons + BLOCK - 1) // BLOCK):
        first = block * BLOCK
        width = min(BLOCK, neurons - first)
        totals = np.zeros(TOTAL_ROWS * BLOCK)
        best = np.empty(BEST_ROWS * BLOCK, dtype=g.dtype)
        for text in range(texts):
            best[: POSITION * BLOCK] = -np.inf
            best[POSITION * BLOCK :] = -1
            _text(g, u, a, valid, text, first, width, totals, best)
            _store_text(best, text, first, width, strength, position)
        _store_block(totals, first, width, count, sums)


# The loops below are not inlined into `_batch`: inside its parallel loop they made numba's
# compilation take a minute instead of seconds.


@numba.njit(boundscheck=False)
def _store_text(best, text, first, width, strength, position):  # pragma: no cover - compiled
    """Writes a text's strongest values and positions of a block's neurons."""
    for lst in range(N_LISTS):
        for j in range(width):
            strength[lst, text, first + j] = best[(STRENGTH + lst) * BLOCK + j]
            position[lst, text, first + j] = int(best[(POSITION + lst) * BLOCK + j])


@numba.njit(boundscheck=False)
def _store_block(totals, first, width, count, sums):  # pragma: no cover - compiled
    """Adds a block's counts and sums to the layer's."""
    for case in range(4):
        for j in range(width):
            count[case, first + j] += int(totals[(COUNT + case) * BLOCK + j])
            for quantity in range(4):
                sums[case, quantity, first + j] += totals[(SUM + 4 * case + quantity) * BLOCK + j]


@numba.njit(boundscheck=False, error_model="numpy")
def _text(g, u, a, valid, text, first, width, totals, best):  # pragma: no cover - compiled
    """One text's tokens for the neurons [first, first + width) of a block."""
    for t in range(g.shape[1]):
        if not valid[text, t]:
            continue
        for j in range(width):
            n = first + j
            gv, uv, av = g[text, t, n], u[text, t, n], a[text, t, n]
            pv = av * uv  # rounded in the input dtype, as torch's a * u is
            # A zero g or u is in no case.
            pp = (gv > 0) & (uv > 0)
            pn = (gv > 0) & (uv < 0)
            np_ = (gv < 0) & (uv > 0)
            nn = (gv < 0) & (uv < 0)
            _add(totals, j, 0, pp, gv, uv, av, pv)
            _add(totals, j, 1, pn, gv, uv, av, pv)
            _add(totals, j, 2, np_, gv, uv, av, pv)
            _add(totals, j, 3, nn, gv, uv, av, pv)
            # Within a case every quantity has a fixed sign (constants.SIGNS): the strength
            # is the value times that sign.
            _keep(best, j, 0, pp, gv, t)
            _keep(best, j, 1, pp, uv, t)
            _keep(best, j, 2, pp, pv, t)
            _keep(best, j, 3, pn, gv, t)
            _keep(best, j, 4, pn, -uv, t)
            _keep(best, j, 5, pn, -pv, t)
            _keep(best, j, 6, np_, -gv, t)
            _keep(best, j, 7, np_, uv, t)
            _keep(best, j, 8, np_, -av, t)
            _keep(best, j, 9, np_, -pv, t)
            _keep(best, j, 10, nn, -gv, t)
            _keep(best, j, 11, nn, -uv, t)
            _keep(best, j, 12, nn, -av, t)
            _keep(best, j, 13, nn, pv, t)


@numba.njit(inline="always")
def _add(totals, j, case, in_case, g, u, a, p):  # pragma: no cover - compiled
    """Counts the token and adds its quantities (in float64), if it is in ``case``."""
    totals[(COUNT + case) * BLOCK + j] += 1.0 if in_case else 0.0
    totals[(SUM + 4 * case) * BLOCK + j] += np.float64(g) if in_case else 0.0
    totals[(SUM + 4 * case + 1) * BLOCK + j] += np.float64(u) if in_case else 0.0
    totals[(SUM + 4 * case + 2) * BLOCK + j] += np.float64(a) if in_case else 0.0
    totals[(SUM + 4 * case + 3) * BLOCK + j] += np.float64(p) if in_case else 0.0


@numba.njit(inline="always")
def _keep(best, j, lst, in_case, strength, t):  # pragma: no cover - compiled
    """Keeps the token if it is the list's strongest so far (strictly: the first one wins)."""
    s = strength if in_case else -np.inf
    stronger = s > best[(STRENGTH + lst) * BLOCK + j]
    best[(POSITION + lst) * BLOCK + j] = t if stronger else best[(POSITION + lst) * BLOCK + j]
    best[(STRENGTH + lst) * BLOCK + j] = s if stronger else best[(STRENGTH + lst) * BLOCK + j]

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
# Rows of a block's accumulator array, each BLOCK long. Counts are exact in float64.
COUNT = 0  # [case]
SUM = COUNT + 4  # [case * 4 + quantity]
STRENGTH = SUM + 16  # [list] the text's strongest |value| so far, -inf before any token
POSITION = STRENGTH + N_LISTS  # [list] its position
ROWS = POSITION + N_LISTS

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
        acc = np.zeros(ROWS * BLOCK)
        for text in range(texts):
            acc[STRENGTH * BLOCK : POSITION * BLOCK] = -np.inf
            acc[POSITION * BLOCK : ROWS * BLOCK] = -1.0
            _text(g, u, a, valid, text, first, width, acc)
            _store_text(acc, text, first, width, strength, position)
        _store_block(acc, first, width, count, sums)


# The loops below are not inlined into `_batch`: inside its parallel loop they made numba's
# compilation take minutes instead of seconds.


@numba.njit(boundscheck=False)
def _store_text(acc, text, first, width, strength, position):  # pragma: no cover - compiled
    """Writes a text's strongest values and positions of a block's neurons."""
    for lst in range(N_LISTS):
        for j in range(width):
            strength[lst, text, first + j] = acc[(STRENGTH + lst) * BLOCK + j]
            position[lst, text, first + j] = int(acc[(POSITION + lst) * BLOCK + j])


@numba.njit(boundscheck=False)
def _store_block(acc, first, width, count, sums):  # pragma: no cover - compiled
    """Adds a block's counts and sums to the layer's."""
    for case in range(4):
        for j in range(width):
            count[case, first + j] += int(acc[(COUNT + case) * BLOCK + j])
            for quantity in range(4):
                sums[case, quantity, first + j] += acc[(SUM + 4 * case + quantity) * BLOCK + j]


@numba.njit(boundscheck=False, error_model="numpy")
def _text(g, u, a, valid, text, first, width, acc):  # pragma: no cover - compiled
    """One text's tokens for the neurons [first, first + width) of a block."""
    for t in range(g.shape[1]):
        if not valid[text, t]:
            continue
        for j in range(width):
            n = first + j
            gv, uv, av = np.float64(g[text, t, n]), np.float64(u[text, t, n]), a[text, t, n]
            p = np.float64(av * u[text, t, n])  # rounded in the input dtype, as torch's a * u
            av = np.float64(av)
            # A zero g or u is in no case.
            pp = (gv > 0) & (uv > 0)
            pn = (gv > 0) & (uv < 0)
            np_ = (gv < 0) & (uv > 0)
            nn = (gv < 0) & (uv < 0)
            _add(acc, j, 0, pp, gv, uv, av, p)
            _add(acc, j, 1, pn, gv, uv, av, p)
            _add(acc, j, 2, np_, gv, uv, av, p)
            _add(acc, j, 3, nn, gv, uv, av, p)
            # Within a case every quantity has a fixed sign (constants.SIGNS): the strength
            # is the value times that sign.
            _keep(acc, j, 0, pp, gv, t)
            _keep(acc, j, 1, pp, uv, t)
            _keep(acc, j, 2, pp, p, t)
            _keep(acc, j, 3, pn, gv, t)
            _keep(acc, j, 4, pn, -uv, t)
            _keep(acc, j, 5, pn, -p, t)
            _keep(acc, j, 6, np_, -gv, t)
            _keep(acc, j, 7, np_, uv, t)
            _keep(acc, j, 8, np_, -av, t)
            _keep(acc, j, 9, np_, -p, t)
            _keep(acc, j, 10, nn, -gv, t)
            _keep(acc, j, 11, nn, -uv, t)
            _keep(acc, j, 12, nn, -av, t)
            _keep(acc, j, 13, nn, p, t)


@numba.njit(inline="always")
def _add(acc, j, case, in_case, g, u, a, p):  # pragma: no cover - compiled
    """Counts the token and adds its quantities, if it is in ``case``."""
    acc[(COUNT + case) * BLOCK + j] += 1.0 if in_case else 0.0
    acc[(SUM + 4 * case) * BLOCK + j] += g if in_case else 0.0
    acc[(SUM + 4 * case + 1) * BLOCK + j] += u if in_case else 0.0
    acc[(SUM + 4 * case + 2) * BLOCK + j] += a if in_case else 0.0
    acc[(SUM + 4 * case + 3) * BLOCK + j] += p if in_case else 0.0


@numba.njit(inline="always")
def _keep(acc, j, lst, in_case, strength, t):  # pragma: no cover - compiled
    """Keeps the token if it is the list's strongest so far (strictly: the first one wins)."""
    s = strength if in_case else -np.inf
    stronger = s > acc[(STRENGTH + lst) * BLOCK + j]
    acc[(POSITION + lst) * BLOCK + j] = t if stronger else acc[(POSITION + lst) * BLOCK + j]
    acc[(STRENGTH + lst) * BLOCK + j] = s if stronger else acc[(STRENGTH + lst) * BLOCK + j]

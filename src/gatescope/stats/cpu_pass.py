"""The statistics pass on a CPU: one fused, vectorized loop over g, u and act(g).

A pass of torch operations reads and writes the batch's [texts, positions, d_mlp]
activations about a hundred times (masks, masked quantities, block maxima...). On a GPU that
is cheap; on a CPU it takes a third of the layer's own forward time and evicts the model's
weights from the cache. This kernel (numba, compiled on first use and cached on disk) reads
each activation from memory once and keeps the accumulators of a block of neurons in the
L1 cache.

Layout: neurons are split into blocks of ``BLOCK`` (the threads take blocks). For each
text, a block's values are first copied into a contiguous tile; the loops that follow read
the tile from the cache. Their inner loops run over the block's neurons, contiguous in the
tile, so LLVM vectorizes them; every branch is written as a select for the same reason.
The accumulators of a block live in flat arrays at constant offsets (rows of ``BLOCK``),
which lets the compiler prove that they do not overlap one another.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import torch
from numba.core import config as numba_config
from torch import Tensor

from gatescope.constants import SIGNS
from gatescope.stats import distributions
from gatescope.stats.batch import PerText, Totals, Workspace
from gatescope.stats.cpu_int32 import (
    BLOCK,  # neurons per block; 64 was fastest on the benchmark model (AVX-512 and AVX2)
    COUNT_ROWS,
    HISTOGRAM_ROWS,
    joint_counter,
    magnitude_counter,
    token_priority,
)

# A block's accumulators are rows of BLOCK neurons in flat arrays; `pair` is
# 4 * case + quantity. `totals` (float64, the whole batch): the counts per case (exact in
# float64), then the sums per pair. `weakest` (the input dtype, the whole batch): the
# weakest |value| per pair (+inf before any token of the case). `best` (the input dtype,
# reset for every text): the strongest |value| per pair (-inf before any token of the
# case), then its position (exact below 2**24). Comparisons stay in the input dtype, so
# that they vectorize as wide as it allows.
COUNT = 0  # totals[COUNT + case]
SUM = COUNT + 4  # totals[SUM + pair]
TOTAL_ROWS = SUM + 16
STRENGTH = 0  # best[STRENGTH + pair]
POSITION = STRENGTH + 16  # best[POSITION + pair]
BEST_ROWS = POSITION + 16
# `drawn` (int64, per text): per case the token draw's salt (-1: not drawn), the smallest
# priority key so far (priority << 31 | position) and then the drawn position.
SALT = 0  # drawn[SALT + case]
KEY = SALT + 4  # drawn[KEY + case]
DRAW_ROWS = KEY + 4

# -inf in float32: it leaves float32 comparisons in float32 and widens to float64 ones.
_MINUS_INF = np.float32(-np.inf)

# The kernel spells out each case's quantity signs; this is the table it implements.
_KERNEL_SIGNS = ((1, 1, 1, 1), (1, -1, 1, -1), (-1, 1, -1, -1), (-1, -1, -1, 1))
assert tuple(SIGNS) == _KERNEL_SIGNS, "kernel out of date"


def cpu_pass(
    gate: Tensor,
    up: Tensor,
    valid: Tensor,
    totals: Totals,
    salt: Tensor | None,
    swish: Tensor | None = None,
    positions: Tensor | None = None,
    *,
    act: Callable[[Tensor], Tensor],
    workspace: Workspace,
) -> PerText:
    """The :class:`~gatescope.stats.batch.StatisticsPass` contract, on the CPU.

    ``act(g)``, unless given, is computed by torch, exactly as the model does;
    ``totals.weakest`` is in the input dtype. Each thread's tile and histogram counts live
    in ``workspace``.
    """
    gate, up = gate.contiguous(), up.contiguous()
    swish = (act(gate) if swish is None else swish).contiguous()
    texts, _, neurons = gate.shape
    strength = torch.empty(16, texts, neurons, dtype=gate.dtype)
    position = torch.empty(16, texts, neurons, dtype=torch.int64)
    histograms = totals.histogram is not None and totals.joint is not None
    draw = salt is not None
    # Unused outputs are empty arrays: numba compiles one kernel for both.
    histogram = totals.histogram if totals.histogram is not None else _NO_COUNTS.view(0, 0, 0, 0)
    joint = totals.joint if totals.joint is not None else _NO_COUNTS.view(0, 0, 0, 0)
    typical_shape = (4, texts, neurons) if draw else (0, 0, 0)
    salts = salt.contiguous() if salt is not None else torch.empty(typical_shape, dtype=torch.int64)
    typical_position = torch.empty(typical_shape, dtype=torch.int64)
    typical_value = torch.empty((4, *typical_shape), dtype=gate.dtype)
    packed = positions is not None
    hashed = positions.contiguous() if positions is not None else _NO_POSITIONS.view(0, 0)
    # numba keeps its own thread pool: use as many threads as torch is allowed to.
    # (numba sets its config attributes from the environment at import: unseen by pyright.)
    n_threads = numba_config.NUMBA_NUM_THREADS  # pyright: ignore[reportAttributeAccessIssue]
    threads = max(1, min(torch.get_num_threads(), n_threads))
    numba.set_num_threads(threads)
    rows = gate.shape[1] + gate.shape[1] % 2  # a tile pads texts to an even length
    tiles = workspace.flat("cpu tiles", threads * rows * 3 * BLOCK, gate.dtype)
    counts = workspace.flat("cpu counts", threads * COUNT_ROWS * BLOCK if histograms else 0,
                            torch.int32)  # fmt: skip
    _batch(
        tiles.view(threads, -1).numpy(), counts.view(threads, -1).numpy(),
        gate.numpy(), up.numpy(), swish.numpy(), valid.contiguous().numpy(),
        totals.count.numpy(), totals.sums.numpy(), totals.weakest.numpy(),
        strength.numpy(), position.numpy(),
        histograms, histogram.numpy(), joint.numpy(),
        draw, salts.numpy(), packed, hashed.numpy(), typical_position.numpy(),
        typical_value.numpy(),
    )  # fmt: skip
    if not draw:
        return PerText(strength, position)
    return PerText(strength, position, typical_position, typical_value)


_NO_COUNTS = torch.empty(0, dtype=torch.int32)
_NO_POSITIONS = torch.empty(0, dtype=torch.int64)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _batch(
    tiles, all_counts, g, u, a, valid, count, sums, weakest, strength, position,
    histograms, histogram, joint, draw, salt, packed, hashed, typical_position, typical_value,
):  # pragma: no cover  # fmt: skip
    texts, _, neurons = g.shape
    rows = tiles.shape[1] // (3 * BLOCK)  # length, even
    for block in numba.prange((neurons + BLOCK - 1) // BLOCK):
        first = block * BLOCK
        width = min(BLOCK, neurons - first)
        # This thread's scratch: a text's tile of the block, the block's histogram counts.
        thread = numba.get_thread_id()  # pyright: ignore[reportPrivateImportUsage]
        tile, counts = tiles[thread], all_counts[thread]
        counts[:] = 0
        totals = np.zeros(TOTAL_ROWS * BLOCK)
        weakest_of_block = np.full(16 * BLOCK, np.inf, dtype=g.dtype)
        best = np.empty(BEST_ROWS * BLOCK, dtype=g.dtype)
        drawn = np.empty(DRAW_ROWS * BLOCK, dtype=np.int64)
        at = np.empty(5 * BLOCK, dtype=np.uint32)
        for text in range(texts):
            _load_tile(g, u, a, valid[text], text, first, width, tile, rows)
            best[: POSITION * BLOCK] = -np.inf
            best[POSITION * BLOCK :] = -1
            _sums_of_text(tile, rows, totals)
            _extremes_of_text(tile, rows, best, weakest_of_block)
            _store_text(best, text, first, width, strength, position)
            if histograms:
                _histograms(tile, rows, counts, at)
            if draw:
                _draw(tile, rows, salt, text, first, width, drawn, packed, hashed)
                _store_draw(tile, drawn, text, first, width, typical_position, typical_value)
        _store_block(totals, weakest_of_block, first, width, count, sums, weakest)
        if histograms:
            _store_histograms(counts, first, width, histogram, joint)


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
def _store_block(totals, weakest_of_block, first, width, count, sums, weakest):  # pragma: no cover
    """Adds a block's totals to the layer's."""
    for case in range(4):
        for j in range(width):
            n = first + j
            count[case, n] += int(totals[(COUNT + case) * BLOCK + j])
            for quantity in range(4):
                pair = 4 * case + quantity
                sums[case, quantity, n] += totals[(SUM + pair) * BLOCK + j]
                low = weakest_of_block[pair * BLOCK + j]
                if low < weakest[case, quantity, n]:
                    weakest[case, quantity, n] = low


@numba.njit(boundscheck=False)
def _load_tile(g, u, a, counted, text, first, width, tile, rows):  # pragma: no cover
    """Copies one text's g, u and act(g) of a block's neurons into ``tile`` (flat [row,
    3, BLOCK], see _token). Zeros stand for everything not to count: tokens not counted,
    neurons beyond ``width``, the row that pads the text to an even length. A zero g is
    in no case, so the passes need no other mask.

    The passes below read the tile, not the batch: a block's row of the batch is 256
    bytes every d_mlp values, a stride the hardware prefetcher does not follow across
    pages, and this tight loop keeps many of its cache misses in flight at once.
    """
    length = g.shape[1]
    for t in range(rows):
        row = 3 * t * BLOCK
        if t >= length or not counted[t]:
            tile[row : row + 3 * BLOCK] = 0
            continue
        this_text, this_token = _unsigned(text), _unsigned(t)
        for j in range(width):
            at, neuron = _unsigned(row + j), _unsigned(first + j)
            tile[at] = g[this_text, this_token, neuron]
            tile[at + _U_BLOCK] = u[this_text, this_token, neuron]
            tile[at + _U_2_BLOCK] = a[this_text, this_token, neuron]
        for j in range(width, BLOCK):
            tile[row + j] = 0
            tile[row + BLOCK + j] = 0
            tile[row + 2 * BLOCK + j] = 0


@numba.njit(boundscheck=False, error_model="numpy")
def _sums_of_text(tile, rows, totals):  # pragma: no cover - compiled
    """Adds one text's counts and sums per case, for a block's neurons. Tokens go in
    pairs: a pair's float64 sum, then one addition to the accumulator, halves the
    accumulators' loads and stores (float64 sums in another order, as any pass may)."""
    for t in range(0, rows, 2):
        for j in range(BLOCK):
            g0, u0, a0, p0, pp0, pn0, np0, nn0 = _token(tile, t, j)
            g1, u1, a1, p1, pp1, pn1, np1, nn1 = _token(tile, t + 1, j)
            _sums(totals, j, 0, pp0, g0, u0, a0, p0, pp1, g1, u1, a1, p1)
            _sums(totals, j, 1, pn0, g0, u0, a0, p0, pn1, g1, u1, a1, p1)
            _sums(totals, j, 2, np0, g0, u0, a0, p0, np1, g1, u1, a1, p1)
            _sums(totals, j, 3, nn0, g0, u0, a0, p0, nn1, g1, u1, a1, p1)


@numba.njit(boundscheck=False, error_model="numpy")
def _extremes_of_text(tile, rows, best, weakest):  # pragma: no cover - compiled
    """One text's strongest tokens and the weakest values so far, for a block's neurons
    (comparisons and selects in the input dtype)."""
    for t in range(rows):
        for j in range(BLOCK):
            gv, uv, av, pv, pp, pn, np_, nn = _token(tile, t, j)
            _strongest(best, j, t, 0, pp, gv, uv, av, pv, 1, 1, 1, 1)
            _strongest(best, j, t, 1, pn, gv, uv, av, pv, 1, -1, 1, -1)
            _strongest(best, j, t, 2, np_, gv, uv, av, pv, -1, 1, -1, -1)
            _strongest(best, j, t, 3, nn, gv, uv, av, pv, -1, -1, -1, 1)
            _weaker(weakest, j, 0, pp, gv, uv, av, pv, 1, 1, 1, 1)
            _weaker(weakest, j, 1, pn, gv, uv, av, pv, 1, -1, 1, -1)
            _weaker(weakest, j, 2, np_, gv, uv, av, pv, -1, 1, -1, -1)
            _weaker(weakest, j, 3, nn, gv, uv, av, pv, -1, -1, -1, 1)


# Per-token updates, one case at a time. They are selects rather than branches or
# min/max, so that the loops over neurons vectorize.


# Offsets into flat buffers are made unsigned: numba then skips its wraparound of negative
# indices, whose selects turn contiguous loads into gathers and stop the vectorizer.
_U_BLOCK, _U_2_BLOCK = np.uint64(BLOCK), np.uint64(2 * BLOCK)


@numba.njit(inline="always")
def _unsigned(offset):  # pragma: no cover - compiled
    return np.uint64(offset)


@numba.njit(inline="always")
def _token(tile, t, j):  # pragma: no cover - compiled
    """A token's four values for a block's neuron ``j`` and whether it is in each sign case.

    The tile is flat [pos, 3, BLOCK]: per token, the block's g, then u, then act(g).

    hook_post is rounded in the input dtype, as torch's ``a * u`` is. A zero g or u is in
    no case. The signs of the cases are constants.SIGNS: within a case every quantity has a
    fixed sign, and value * sign is its strength |value|.
    """
    row = _unsigned(3 * t * BLOCK + j)
    gv, uv, av = tile[row], tile[row + _U_BLOCK], tile[row + _U_2_BLOCK]
    pv = av * uv
    pp, pn = (gv > 0) & (uv > 0), (gv > 0) & (uv < 0)
    np_, nn = (gv < 0) & (uv > 0), (gv < 0) & (uv < 0)
    return gv, uv, av, pv, pp, pn, np_, nn


@numba.njit(inline="always")
def _sums(totals, j, case, in0, g0, u0, a0, p0, in1, g1, u1, a1, p1):  # pragma: no cover
    """Counts two tokens and adds their quantities (in float64), those in ``case``."""
    totals[(COUNT + case) * BLOCK + j] += _if(in0, 1.0) + _if(in1, 1.0)
    totals[(SUM + 4 * case) * BLOCK + j] += _if(in0, g0) + _if(in1, g1)
    totals[(SUM + 4 * case + 1) * BLOCK + j] += _if(in0, u0) + _if(in1, u1)
    totals[(SUM + 4 * case + 2) * BLOCK + j] += _if(in0, a0) + _if(in1, a1)
    totals[(SUM + 4 * case + 3) * BLOCK + j] += _if(in0, p0) + _if(in1, p1)


@numba.njit(inline="always")
def _if(condition, x):  # pragma: no cover - compiled
    return np.float64(x) if condition else 0.0


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
    s = strength if in_case else _MINUS_INF
    stronger = s > best[(STRENGTH + pair) * BLOCK + j]
    best[(POSITION + pair) * BLOCK + j] = t if stronger else best[(POSITION + pair) * BLOCK + j]
    best[(STRENGTH + pair) * BLOCK + j] = s if stronger else best[(STRENGTH + pair) * BLOCK + j]


@numba.njit(inline="always")
def _weaker(weakest, j, case, in_case, g, u, a, p, sg, su, sa, sp):  # pragma: no cover
    """Lowers the weakest |value| of a case's quantities to the token's, if in ``case``."""
    _lower(weakest, 4 * case * BLOCK + j, in_case, g if sg > 0 else -g)
    _lower(weakest, (4 * case + 1) * BLOCK + j, in_case, u if su > 0 else -u)
    _lower(weakest, (4 * case + 2) * BLOCK + j, in_case, a if sa > 0 else -a)
    _lower(weakest, (4 * case + 3) * BLOCK + j, in_case, p if sp > 0 else -p)


@numba.njit(inline="always")
def _lower(weakest, at, in_case, strength):  # pragma: no cover - compiled
    weakest[at] = strength if in_case & (strength < weakest[at]) else weakest[at]


# The distributions (gatescope.stats.distributions implements the same in torch; tests
# hold the two equal). The histograms' counters and the draw's hash are
# cpu_int32's.

_N_BINS, _N_JOINT_BINS = distributions.N_BINS, distributions.N_JOINT_BINS
_NO_KEY = distributions.NO_KEY
_KEY_LOW_BITS = distributions.KEY_LOW_BITS
_POSITION_MASK = 2**_KEY_LOW_BITS - 1


@numba.njit(boundscheck=False, error_model="numpy")
def _histograms(tile, rows, counts, at):  # pragma: no cover
    """Adds one text's tokens to a block's histogram counts (rows of BLOCK, see
    cpu_int32.COUNT_ROWS).

    Two loops: the first finds each token's five counters (its four quantities' bins and
    its joint cell) and vectorizes; the second adds to them one by one, since counters at
    data-dependent addresses do not vectorize. ``at`` ([5 * BLOCK] uint32: unsigned
    spares each increment numba's check for a negative index) holds the counters in
    between; a token in no case adds to the spare row.
    """
    for t in range(rows):
        for j in range(BLOCK):
            gv, uv, av, pv, pp, pn, np_, nn = _token(tile, t, j)
            in_case = pp | pn | np_ | nn
            case = 2 * (gv < 0) + (uv < 0)
            at[j] = magnitude_counter(gv, case, 0, j, in_case)
            at[BLOCK + j] = magnitude_counter(uv, case, 1, j, in_case)
            at[2 * BLOCK + j] = magnitude_counter(av, case, 2, j, in_case)
            at[3 * BLOCK + j] = magnitude_counter(pv, case, 3, j, in_case)
            at[4 * BLOCK + j] = joint_counter(gv, uv, case, j, in_case)
        for k in range(5 * BLOCK):
            counts[at[k]] += 1


@numba.njit(boundscheck=False)
def _store_histograms(counts, first, width, histogram, joint):  # pragma: no cover
    """Adds a block's histogram counts to the layer's."""
    for case in range(4):
        for quantity in range(4):
            for b in range(_N_BINS):
                row = ((4 * case + quantity) * _N_BINS + b) * BLOCK
                for j in range(width):
                    histogram[case, quantity, b, first + j] += counts[row + j]
        for gb in range(_N_JOINT_BINS):
            for ub in range(_N_JOINT_BINS):
                cell = (case * _N_JOINT_BINS + gb) * _N_JOINT_BINS + ub
                row = (HISTOGRAM_ROWS + cell) * BLOCK
                for j in range(width):
                    joint[case, gb, ub, first + j] += counts[row + j]


@numba.njit(boundscheck=False, error_model="numpy")
def _draw(tile, rows, salt, text, first, width, drawn, packed, hashed):  # pragma: no cover
    """One text's token draw for the typical examples, for a block's neurons: per case the
    token of smallest priority key. Skipped when no neuron of the block asks for the text.
    The priority hashes the token's position in its text: ``hashed[text, t]`` where the
    tokens are ``packed``, else ``t``; the key's low bits keep ``t``, the tile's row."""
    wanted = False
    for case in range(4):
        for j in range(BLOCK):
            s = salt[case, text, first + j] if j < width else -1
            drawn[(SALT + case) * BLOCK + j] = s
            drawn[(KEY + case) * BLOCK + j] = _NO_KEY
            wanted |= s >= 0
    if not wanted:
        return
    length = hashed.shape[1]
    for t in range(rows):
        # (the row padding a text to an even length is in no case: any position does)
        in_text = hashed[text, t] if packed and t < length else t
        for j in range(BLOCK):
            _, _, _, _, pp, pn, np_, nn = _token(tile, t, j)
            s0, s1 = _salt_of(drawn, 0, j), _salt_of(drawn, 1, j)
            s2, s3 = _salt_of(drawn, 2, j), _salt_of(drawn, 3, j)
            s = s0 if pp else (s1 if pn else (s2 if np_ else s3))
            key = (np.int64(token_priority(s, in_text)) << _KEY_LOW_BITS) | t
            _drawn_if(drawn, j, 0, pp & (s0 >= 0), key)
            _drawn_if(drawn, j, 1, pn & (s1 >= 0), key)
            _drawn_if(drawn, j, 2, np_ & (s2 >= 0), key)
            _drawn_if(drawn, j, 3, nn & (s3 >= 0), key)


@numba.njit(inline="always")
def _salt_of(drawn, case, j):  # pragma: no cover - compiled
    return drawn[_unsigned((SALT + case) * BLOCK + j)]


@numba.njit(inline="always")
def _drawn_if(drawn, j, case, eligible, key):  # pragma: no cover - compiled
    at = _unsigned((KEY + case) * BLOCK + j)
    drawn[at] = key if eligible & (key < drawn[at]) else drawn[at]


@numba.njit(boundscheck=False)
def _store_draw(tile, drawn, text, first, width, position, value):  # pragma: no cover
    """Writes a text's drawn positions and their four values for a block's neurons."""
    for case in range(4):
        for j in range(width):
            n = first + j
            key = drawn[(KEY + case) * BLOCK + j]
            if key == _NO_KEY:
                position[case, text, n] = -1
                for quantity in range(4):
                    value[case, quantity, text, n] = 0
                continue
            t = key & _POSITION_MASK
            position[case, text, n] = t
            gv, uv, av, pv, _, _, _, _ = _token(tile, t, j)
            value[case, 0, text, n] = gv
            value[case, 1, text, n] = uv
            value[case, 2, text, n] = av
            value[case, 3, text, n] = pv

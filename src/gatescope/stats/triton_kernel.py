"""The Triton kernel of :mod:`gatescope.stats.triton_pass` (Triton's language: not typed
Python, so pyright leaves this file alone).

One program per (text, block of ``BLOCK_N`` neurons) walks the text's positions in tiles of
``BLOCK_P``. Its state lives in registers as [pair, neuron] tensors (pair = case * 4 +
quantity, 16 rows) updated row by row with masks, since a program cannot index a list of
tensors: the strongest |value| and its first position, the weakest |value|, float64 sums,
and [case, neuron] counts.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["stats_kernel"]


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in float32: SiLU, GELU (erf) or GELU-tanh (as a sigmoid of twice the argument)."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        z = 1.5957691216057308 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(z)


@triton.jit
def stats_kernel(
    g_ptr, u_ptr, s_ptr, valid_ptr,
    strength_ptr, position_ptr, weakest_ptr, sums_ptr, count_ptr,
    texts, length, neurons,
    ACT: tl.constexpr, HAS_SWISH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One text, one block of neurons. Inputs [text, pos, neuron] contiguous, valid
    [text, pos] uint8; outputs [pair, text, neuron] (pair = case * 4 + quantity) and
    count [case, text, neuron]."""
    text = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < neurons
    pair_rows = tl.arange(0, 16)[:, None]  # [pair, 1]
    case_rows = tl.arange(0, 4)[:, None]  # [case, 1]

    strength = tl.full([16, BLOCK_N], float("-inf"), tl.float32)
    position = tl.zeros([16, BLOCK_N], tl.int32)
    weakest = tl.full([16, BLOCK_N], float("inf"), tl.float32)
    sums = tl.zeros([16, BLOCK_N], tl.float64)
    count = tl.zeros([4, BLOCK_N], tl.int32)

    for start in range(0, length, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        in_p = offs_p < length
        # int64: a batch of g may hold more than 2**31 elements.
        tile = (text.to(tl.int64) * length + offs_p[:, None]) * neurons + offs_n[None, :]
        mask = in_p[:, None] & in_n[None, :]
        counted = tl.load(valid_ptr + text * length + offs_p, mask=in_p, other=0) != 0
        g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if HAS_SWISH:
            a = tl.load(s_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        else:
            a = _act(g, ACT)
        p = a * u
        # A token is in a case when counted and g, u are both nonzero (and not NaN).
        in_any = mask & counted[:, None] & (g != 0) & (u != 0) & (g == g) & (u == u)
        case = (g < 0).to(tl.int32) * 2 + (u < 0).to(tl.int32)
        for c in tl.static_range(4):
            in_case = in_any & (case == c)
            count = tl.where(
                case_rows == c, count + tl.sum(in_case.to(tl.int32), 0)[None, :], count
            )
            for q in tl.static_range(4):
                if q == 0:
                    x = g
                elif q == 1:
                    x = u
                elif q == 2:
                    x = a
                else:
                    x = p
                this = pair_rows == c * 4 + q  # [pair, 1]: the state's row of (c, q)
                magnitude = tl.abs(x)
                tile_best = tl.max(tl.where(in_case, magnitude, float("-inf")), 0)  # [neuron]
                hit = in_case & (magnitude == tile_best[None, :])
                tile_at = tl.min(tl.where(hit, offs_p[:, None], 2147483647), 0)
                best = tl.max(tl.where(this, strength, float("-inf")), 0)
                better = this & (tile_best > best)[None, :]  # strictly: first position wins
                strength = tl.where(better, tile_best[None, :], strength)
                position = tl.where(better, tile_at[None, :], position)
                tile_weak = tl.min(tl.where(in_case, magnitude, float("inf")), 0)
                weakest = tl.where(this, tl.minimum(weakest, tile_weak[None, :]), weakest)
                tile_sum = tl.sum(tl.where(in_case, x, 0.0).to(tl.float64), 0)
                sums = tl.where(this, sums + tile_sum[None, :], sums)

    out = (pair_rows * texts + text) * neurons + offs_n[None, :]
    keep = in_n[None, :] & (pair_rows < 16)
    tl.store(strength_ptr + out, strength, mask=keep)
    tl.store(position_ptr + out, position, mask=keep)
    tl.store(weakest_ptr + out, weakest, mask=keep)
    tl.store(sums_ptr + out, sums, mask=keep)
    out_case = (case_rows * texts + text) * neurons + offs_n[None, :]
    tl.store(count_ptr + out_case, count, mask=in_n[None, :] & (case_rows < 4))

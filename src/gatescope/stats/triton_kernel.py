"""The Triton kernel of :mod:`gatescope.stats.triton_pass` (Triton's language: not typed
Python, so pyright leaves this file alone).

One program per (text, block of ``BLOCK_N`` neurons) walks the text's positions in tiles of
``BLOCK_P``. Its state lives in registers as [pair, neuron] tensors (pair = case * 4 +
quantity, 16 rows) updated row by row with masks, since a program cannot index a list of
tensors: the strongest |value| and its first position, the weakest |value|, float64 sums,
[case, neuron] counts and, for the typical examples, the smallest draw key per case.
Histogram counts go straight to global memory with relaxed atomic adds: a program's share
of a neuron's 1,008 bins is too large for registers.

The bins and the draw's hash are :mod:`gatescope.stats.distributions`' rules on the same
bits (its constants are passed in); tests hold them equal.
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
def _exponent(x):
    """The unbiased exponent of |x| (float32) and its 23 mantissa bits."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return (bits >> 23) - 127, bits & 0x7FFFFF


@triton.jit
def _magnitude_bin(x, LOWEST: tl.constexpr, HALF_OCTAVE: tl.constexpr, N_BINS: tl.constexpr):
    """distributions.magnitude_bins (two bins per octave)."""
    exponent, mantissa = _exponent(x)
    regular = 1 + 2 * (exponent - LOWEST) + (mantissa >= HALF_OCTAVE).to(tl.int32)
    return tl.minimum(tl.maximum(regular, 0), N_BINS - 1)


@triton.jit
def _joint_bin(x, JOINT_LOWEST: tl.constexpr, N_JOINT: tl.constexpr):
    """distributions.joint_bins (two octaves per bin; >> floors negative numbers too)."""
    exponent, _ = _exponent(x)
    regular = 1 + ((exponent - JOINT_LOWEST) >> 1)
    return tl.minimum(tl.maximum(regular, 0), N_JOINT - 1)


@triton.jit
def _mix32(x, MULTIPLIER: tl.constexpr):
    """distributions.mix32 in uint32 arithmetic (its multiplies wrap modulo 2**32, as the
    int64 version masks them)."""
    x = ((x >> 16) ^ x) * MULTIPLIER
    x = ((x >> 16) ^ x) * MULTIPLIER
    return (x >> 16) ^ x


@triton.jit
def stats_kernel(
    g_ptr, u_ptr, s_ptr, valid_ptr,
    strength_ptr, position_ptr, weakest_ptr, sums_ptr, count_ptr,
    histogram_ptr, joint_ptr, salt_ptr, key_ptr,
    texts, length, neurons,
    ACT: tl.constexpr, HAS_SWISH: tl.constexpr, HISTOGRAMS: tl.constexpr,
    TYPICAL: tl.constexpr, LOWEST: tl.constexpr, HALF_OCTAVE: tl.constexpr,
    N_BINS: tl.constexpr, JOINT_LOWEST: tl.constexpr, N_JOINT: tl.constexpr,
    MIX_MULTIPLIER: tl.constexpr, KEY_LOW_BITS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One text, one block of neurons.

    Inputs [text, pos, neuron] contiguous, valid [text, pos] uint8, salt [case, text,
    neuron] int64 (-1: not drawn). Outputs [pair, text, neuron] (pair = case * 4 +
    quantity), count and key [case, text, neuron] (key: the smallest draw key
    ``priority << KEY_LOW_BITS | position``, int64 max where none); histogram [case,
    quantity, bin, neuron] and joint [case, |g| bin, |u| bin, neuron] are added to."""
    text = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < neurons
    pair_rows = tl.arange(0, 16)[:, None]  # [pair, 1]
    case_rows = tl.arange(0, 4)[:, None]  # [case, 1]
    out_case = (case_rows * texts + text) * neurons + offs_n[None, :]  # [case, neuron]
    keep_case = in_n[None, :] & (case_rows < 4)

    strength = tl.full([16, BLOCK_N], float("-inf"), tl.float32)
    position = tl.zeros([16, BLOCK_N], tl.int32)
    weakest = tl.full([16, BLOCK_N], float("inf"), tl.float32)
    sums = tl.zeros([16, BLOCK_N], tl.float64)
    count = tl.zeros([4, BLOCK_N], tl.int32)
    no_key = 9223372036854775807
    best_key = tl.full([4, BLOCK_N], no_key, tl.int64)
    if TYPICAL:  # each case's token-draw salt, [1, neuron]
        salt_row, step = salt_ptr + text * neurons + offs_n, texts * neurons
        salt0 = tl.load(salt_row, mask=in_n, other=-1)[None, :]
        salt1 = tl.load(salt_row + step, mask=in_n, other=-1)[None, :]
        salt2 = tl.load(salt_row + 2 * step, mask=in_n, other=-1)[None, :]
        salt3 = tl.load(salt_row + 3 * step, mask=in_n, other=-1)[None, :]

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

        if HISTOGRAMS:  # each token adds 1 to its case's bin of each quantity, and of the joint
            ones = tl.full([BLOCK_P, BLOCK_N], 1, tl.int32)
            for q in tl.static_range(4):
                if q == 0:
                    x = g
                elif q == 1:
                    x = u
                elif q == 2:
                    x = a
                else:
                    x = p
                row = (case * 4 + q) * N_BINS + _magnitude_bin(x, LOWEST, HALF_OCTAVE, N_BINS)
                tl.atomic_add(histogram_ptr + row * neurons + offs_n[None, :], ones,
                              mask=in_any, sem="relaxed")  # fmt: skip
            g_bin = _joint_bin(g, JOINT_LOWEST, N_JOINT)
            cell = (case * N_JOINT + g_bin) * N_JOINT + _joint_bin(u, JOINT_LOWEST, N_JOINT)
            tl.atomic_add(joint_ptr + cell * neurons + offs_n[None, :], ones, mask=in_any,
                          sem="relaxed")  # fmt: skip

        if TYPICAL:  # the token's draw key, with the salt of its own case
            token_salt = tl.where(case < 2, tl.where(case == 0, salt0, salt1),
                                  tl.where(case == 2, salt2, salt3))  # fmt: skip
            at = offs_p[:, None].to(tl.uint32)
            priority = _mix32(token_salt.to(tl.uint32) ^ at, MIX_MULTIPLIER)
            key = (priority.to(tl.int64) << KEY_LOW_BITS) | offs_p[:, None].to(tl.int64)
            key = tl.where(in_any & (token_salt >= 0), key, no_key)

        for c in tl.static_range(4):
            in_case = in_any & (case == c)
            count = tl.where(
                case_rows == c, count + tl.sum(in_case.to(tl.int32), 0)[None, :], count
            )
            if TYPICAL:
                tile_key = tl.min(tl.where(in_case, key, no_key), 0)  # [neuron]
                best_key = tl.where(case_rows == c, tl.minimum(best_key, tile_key[None, :]),
                                    best_key)  # fmt: skip
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
    tl.store(count_ptr + out_case, count, mask=keep_case)
    if TYPICAL:
        tl.store(key_ptr + out_case, best_key, mask=keep_case)

"""The Triton kernel of :mod:`gatescope.stats.triton_pass` (Triton's language: not typed
Python, so pyright leaves this file alone).

One program per (text, block of ``BLOCK_N`` neurons) walks the text's positions in tiles of
``BLOCK_P``. Its state lives in registers, per quantity as [case, neuron] tensors: the
strongest |value| and its first position, the weakest |value|, float64 sums; and [case,
neuron] counts and, for the typical examples, the smallest draw key per case. A tile is
spread over the four cases as a [case, pos, neuron] mask, so that each reduction over the
tile serves all four cases and the state is updated element-wise (no row of it is picked
out with masks: that cost more instructions than the statistics).
Histogram counts go straight to global memory with relaxed atomic adds: a program's share
of a neuron's 1,008 bins is too large for registers.

The bins and the draw's hash are :mod:`gatescope.stats.distributions`' rules on the same
bits (its constants are passed in); tests hold them equal.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["TILES", "stats_kernel", "tuned_stats_kernel"]

#: The tiles (BLOCK_P positions x BLOCK_N neurons, warps) a GPU tries, keeping the fastest
#: per neuron count. Compiled for sm_90 as a scan launches them (scripts/kernel_resources.py)
#: none spills registers in any variant (a test checks; 4 x 64 and 4 x 128 did, by 8-32
#: bytes): about 650-690 instructions per activation with the distributions, 440-490
#: without, with 170-220 registers per thread.
TILES = ((16, 32, 4), (8, 128, 8), (8, 64, 4), (2, 128, 4), (8, 32, 2))


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
def _add_quantity(x, in_case, offs_p, strength, position, weakest, sums):
    """One quantity's tile [pos, neuron] into its [case, neuron] state, all four cases at
    once (``in_case`` [case, pos, neuron]): the strongest |x| and its first position, the
    weakest |x|, the float64 sum."""
    magnitude = tl.abs(x)[None, :, :]
    candidate = tl.where(in_case, magnitude, float("-inf"))
    tile_best = tl.max(candidate, 1)  # [case, neuron]
    first = tl.where(candidate == tile_best[:, None, :], offs_p[None, :, None], 2147483647)
    better = tile_best > strength  # strictly: an earlier position keeps a tie
    strength = tl.where(better, tile_best, strength)
    position = tl.where(better, tl.min(first, 1), position)
    weakest = tl.minimum(weakest, tl.min(tl.where(in_case, magnitude, float("inf")), 1))
    sums += tl.sum(tl.where(in_case, x.to(tl.float64)[None, :, :], 0.0), 1)
    return strength, position, weakest, sums


@triton.jit
def _store_quantity(
    q: tl.constexpr, strength, position, weakest, sums,
    strength_ptr, position_ptr, weakest_ptr, sums_ptr, texts, text, neurons, offs_n, keep,
):  # fmt: skip
    """One quantity's [case, neuron] state into the outputs' rows pair = case * 4 + q."""
    out = ((tl.arange(0, 4)[:, None] * 4 + q) * texts + text) * neurons + offs_n[None, :]
    tl.store(strength_ptr + out, strength, mask=keep)
    tl.store(position_ptr + out, position, mask=keep)
    tl.store(weakest_ptr + out, weakest, mask=keep)
    tl.store(sums_ptr + out, sums, mask=keep)


@triton.jit
def stats_kernel(
    g_ptr, u_ptr, s_ptr, valid_ptr,
    strength_ptr, position_ptr, weakest_ptr, sums_ptr, count_ptr,
    histogram_ptr, joint_ptr, salt_ptr, key_ptr,
    texts, length, neurons,
    ACT: tl.constexpr, HAS_SWISH: tl.constexpr, HISTOGRAMS: tl.constexpr,
    TYPICAL: tl.constexpr, PACKED: tl.constexpr, LOWEST: tl.constexpr, HALF_OCTAVE: tl.constexpr,
    N_BINS: tl.constexpr, JOINT_LOWEST: tl.constexpr, N_JOINT: tl.constexpr,
    MIX_MULTIPLIER: tl.constexpr, KEY_LOW_BITS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One text, one block of neurons.

    Inputs [text, pos, neuron] contiguous, valid [text, pos] uint8, salt [case, text,
    neuron] int64 (-1: not drawn). Where PACKED, valid is int32 instead: each token's
    position in its text (which the draw hashes, else the index along pos), -1 where not
    counted.

    Outputs [pair, text, neuron] (pair = case * 4 + quantity), count and key [case, text,
    neuron] (key: the smallest draw key ``priority << KEY_LOW_BITS | index along pos``,
    int64 max where none); histogram [case, quantity, bin, neuron] and joint [case, |g|
    bin, |u| bin, neuron] are added to."""
    text = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < neurons
    case_rows = tl.arange(0, 4)[:, None]  # [case, 1]
    cases = tl.arange(0, 4)[:, None, None]  # [case, 1, 1]
    out_case = (case_rows * texts + text) * neurons + offs_n[None, :]  # [case, neuron]
    keep = in_n[None, :] & (case_rows < 4)

    # Per quantity (g, u, act(g), product) its [case, neuron] state.
    lowest = tl.full([4, BLOCK_N], float("-inf"), tl.float32)
    highest = tl.full([4, BLOCK_N], float("inf"), tl.float32)
    first = tl.zeros([4, BLOCK_N], tl.int32)
    zero = tl.zeros([4, BLOCK_N], tl.float64)
    g_strength, g_position, g_weakest, g_sums = lowest, first, highest, zero
    u_strength, u_position, u_weakest, u_sums = lowest, first, highest, zero
    a_strength, a_position, a_weakest, a_sums = lowest, first, highest, zero
    p_strength, p_position, p_weakest, p_sums = lowest, first, highest, zero
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
        if PACKED:
            in_text = tl.load(valid_ptr + text * length + offs_p, mask=in_p, other=-1)
            counted = in_text >= 0
        else:
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
        in_case = in_any[None, :, :] & (case[None, :, :] == cases)  # [case, pos, neuron]
        count += tl.sum(in_case.to(tl.int32), 1)

        g_strength, g_position, g_weakest, g_sums = _add_quantity(
            g, in_case, offs_p, g_strength, g_position, g_weakest, g_sums)  # fmt: skip
        u_strength, u_position, u_weakest, u_sums = _add_quantity(
            u, in_case, offs_p, u_strength, u_position, u_weakest, u_sums)  # fmt: skip
        a_strength, a_position, a_weakest, a_sums = _add_quantity(
            a, in_case, offs_p, a_strength, a_position, a_weakest, a_sums)  # fmt: skip
        p_strength, p_position, p_weakest, p_sums = _add_quantity(
            p, in_case, offs_p, p_strength, p_position, p_weakest, p_sums)  # fmt: skip

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
            if PACKED:  # noqa: SIM108 (a compile-time branch: in_text exists only here)
                at = in_text.to(tl.uint32)[:, None]
            else:
                at = offs_p[:, None].to(tl.uint32)
            priority = _mix32(token_salt.to(tl.uint32) ^ at, MIX_MULTIPLIER)
            key = (priority.to(tl.int64) << KEY_LOW_BITS) | offs_p[:, None].to(tl.int64)
            key = tl.where(token_salt >= 0, key, no_key)
            best_key = tl.minimum(best_key, tl.min(tl.where(in_case, key[None, :, :], no_key), 1))

    outputs = (strength_ptr, position_ptr, weakest_ptr, sums_ptr, texts, text, neurons, offs_n,
               keep)  # fmt: skip
    _store_quantity(0, g_strength, g_position, g_weakest, g_sums, *outputs)
    _store_quantity(1, u_strength, u_position, u_weakest, u_sums, *outputs)
    _store_quantity(2, a_strength, a_position, a_weakest, a_sums, *outputs)
    _store_quantity(3, p_strength, p_position, p_weakest, p_sums, *outputs)
    tl.store(count_ptr + out_case, count, mask=keep)
    if TYPICAL:
        tl.store(key_ptr + out_case, best_key, mask=keep)


#: The kernel on a GPU: each tile of :data:`TILES` timed once per neuron count, the fastest
#: kept. The histograms are added to in place, so each trial restores them.
tuned_stats_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_P": p, "BLOCK_N": n}, num_warps=w) for p, n, w in TILES],
    key=["neurons"],
    restore_value=["histogram_ptr", "joint_ptr"],
    do_bench=lambda kernel, quantiles: triton.testing.do_bench(
        kernel, warmup=5, rep=20, quantiles=quantiles
    ),
)(stats_kernel)

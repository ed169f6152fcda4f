"""The numba kernel's 32-bit integer arithmetic: histogram bins and counters, the draw's hash.

numba widens every integer operation to 64 bits (``int32 + int32`` is ``int64``), and LLVM
does not narrow it back: the kernel's bin arithmetic and hashing then ran in 64-bit vector
lanes, half as many per instruction, with 64-bit multiplies that AVX2 does not have. These
intrinsics emit the same arithmetic as 32-bit LLVM instructions, which vectorize 16 lanes
wide on AVX-512 and 8 on AVX2 (the bins took a third of the histograms' time less). Their
rules are :func:`gatescope.stats.distributions.magnitude_bins`,
:func:`~gatescope.stats.distributions.joint_bins` and
:func:`~gatescope.stats.distributions.token_priority`; tests hold them equal.

Each intrinsic takes the raw value ``x`` (float32 or float64) and first clamps ``|x|`` in
the float domain to the lowest and highest edges of its bins, so that the integer work
needs no clamp:

* magnitude: ``|x|`` into ``[0.75 * 2**LOWEST, 2**HIGHEST]``. Every ``|x|`` below
  ``2**LOWEST`` becomes ``1.5 * 2**(LOWEST - 1)``, in the underflow bin 0; every ``|x|`` from
  ``2**HIGHEST`` up, inf and NaN, becomes ``2**HIGHEST``, the overflow bin. In between the
  bin is ``1 + 2 * (exponent - LOWEST) + (mantissa >= HALF_OCTAVE)``.
* joint: ``|x|`` into ``[0.75 * 2**JOINT_LOWEST, 2**HIGHEST]``; the bin is
  ``(exponent - JOINT_LOWEST + 2) >> 1``, 0 to ``N_JOINT_BINS - 1``.

Both bounds are float32 numbers and the bin is a monotone function of ``|x|``, so the
clamps change no bin. The exponent and the top 23 mantissa bits come from the float's bits
(float64: shifted down to float32's layout, as distributions does).

A *counter* is the offset of a bin's count in the kernel's block of counts (rows of
``BLOCK``, see cpu_pass.COUNT_ROWS), or the spare row's for a token in no case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic as numba_intrinsic

from gatescope.stats import distributions

__all__ = ["joint_bin", "joint_counter", "magnitude_bin", "magnitude_counter", "token_priority"]

assert distributions.BINS_PER_OCTAVE == 2 and distributions.JOINT_OCTAVES == 2, "out of date"

#: Neurons per block of the kernel: a counter's row stride.
BLOCK = 64
_N_BINS, _N_JOINT_BINS = distributions.N_BINS, distributions.N_JOINT_BINS
#: The rows of a block's counts: the magnitude bins of each (case, quantity), the joint
#: cells of each case, and a spare row for tokens in no case.
HISTOGRAM_ROWS = 16 * _N_BINS
SPARE_ROW = HISTOGRAM_ROWS + 4 * _N_JOINT_BINS * _N_JOINT_BINS
COUNT_ROWS = SPARE_ROW + 1

_MAGNITUDE_LOW = 0.75 * 2.0**distributions.LOWEST
_JOINT_LOW = 0.75 * 2.0**distributions.JOINT_LOWEST
_HIGH = 2.0**distributions.HIGHEST

# numba calls an intrinsic without its first argument (the typing context): to a type
# checker the decorated function is of no known signature.
_intrinsic = cast(Callable[[Callable[..., Any]], Any], numba_intrinsic)
# llvmlite is untyped (its builder's methods read as returning None to a type checker).
_Value = Any

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _const(value: int) -> ir.Constant:
    return ir.Constant(_I32, value)


# ------------------------------------------------------------------------------ IR pieces


def _clamped_magnitude(builder: ir.IRBuilder, x: _Value, low: float) -> _Value:
    """``|x|`` clamped to ``[low, 2**HIGHEST]``; NaN becomes ``2**HIGHEST``."""
    fabs = builder.module.declare_intrinsic("llvm.fabs", [x.type])
    magnitude = builder.call(fabs, [x])
    low_, high = ir.Constant(x.type, low), ir.Constant(x.type, _HIGH)
    magnitude = builder.select(builder.fcmp_ordered("<", magnitude, low_), low_, magnitude)
    return builder.select(builder.fcmp_ordered("<", magnitude, high), magnitude, high)


def _exponent_and_mantissa(builder: ir.IRBuilder, magnitude: _Value) -> tuple[_Value, _Value]:
    """The unbiased exponent and the top 23 mantissa bits (i32) of a positive normal float."""
    if magnitude.type == ir.FloatType():
        bits = builder.bitcast(magnitude, _I32)
        exponent = builder.sub(builder.lshr(bits, _const(23)), _const(127))
        return exponent, builder.and_(bits, _const(0x7FFFFF))
    bits = builder.bitcast(magnitude, _I64)
    exponent = builder.trunc(builder.lshr(bits, ir.Constant(_I64, 52)), _I32)
    mantissa = builder.trunc(builder.lshr(bits, ir.Constant(_I64, 29)), _I32)
    return builder.sub(exponent, _const(1023)), builder.and_(mantissa, _const(0x7FFFFF))


def _magnitude_bin(builder: ir.IRBuilder, x: _Value) -> _Value:
    """i32: the magnitude bin of ``|x|``."""
    magnitude = _clamped_magnitude(builder, x, _MAGNITUDE_LOW)
    exponent, mantissa = _exponent_and_mantissa(builder, magnitude)
    upper_half = builder.icmp_unsigned(">=", mantissa, _const(distributions.HALF_OCTAVE))
    twice = builder.shl(builder.sub(exponent, _const(distributions.LOWEST)), _const(1))
    return builder.add(builder.add(twice, _const(1)), builder.zext(upper_half, _I32))


def _joint_bin(builder: ir.IRBuilder, x: _Value) -> _Value:
    """i32: the joint histogram's bin of ``|x|`` along its axis."""
    magnitude = _clamped_magnitude(builder, x, _JOINT_LOW)
    exponent, _ = _exponent_and_mantissa(builder, magnitude)
    return builder.ashr(builder.sub(exponent, _const(distributions.JOINT_LOWEST - 2)), _const(1))


def _as_i32(builder: ir.IRBuilder, value: _Value) -> _Value:
    """An integer argument (numba passes int64) as i32: offsets stay below 2**31."""
    return builder.trunc(value, _I32) if value.type.width > 32 else builder.zext(value, _I32)


def _counter(builder: ir.IRBuilder, row: _Value, neuron: _Value, in_case: _Value) -> _Value:
    """``row * BLOCK + neuron`` if ``in_case``, else the spare row's counter (i32)."""
    counter = builder.add(builder.mul(row, _const(BLOCK)), neuron)
    spare = builder.add(_const(SPARE_ROW * BLOCK), neuron)
    return builder.select(in_case, counter, spare)


def _check_float(x: types.Type) -> None:
    if x not in (types.float32, types.float64):
        raise TypeError(f"expected float32 or float64, got {x}")


# ------------------------------------------------------------------------------ intrinsics


@_intrinsic
def magnitude_bin(typingctx, x):
    """int32: the magnitude bin of ``|x|`` (0 to ``N_BINS - 1``)."""
    _check_float(x)

    def codegen(context, builder, signature, args):
        return _magnitude_bin(builder, args[0])

    return types.int32(x), codegen


@_intrinsic
def joint_bin(typingctx, x):
    """int32: the joint histogram's bin of ``|x|`` along its axis."""
    _check_float(x)

    def codegen(context, builder, signature, args):
        return _joint_bin(builder, args[0])

    return types.int32(x), codegen


@_intrinsic
def magnitude_counter(typingctx, x, case, quantity, neuron, in_case):
    """uint32: the counter of ``x``'s magnitude bin in (case, quantity)'s histogram, for
    the block's ``neuron``; the spare row's unless ``in_case``."""
    _check_float(x)

    def codegen(context, builder, signature, args):
        x_, case_, quantity_, neuron_, in_case_ = args
        pair = builder.add(builder.mul(_as_i32(builder, case_), _const(4)),
                           _as_i32(builder, quantity_))  # fmt: skip
        row = builder.add(builder.mul(pair, _const(_N_BINS)), _magnitude_bin(builder, x_))
        return _counter(builder, row, _as_i32(builder, neuron_), in_case_)

    return types.uint32(x, case, quantity, neuron, in_case), codegen


@_intrinsic
def joint_counter(typingctx, g, u, case, neuron, in_case):
    """uint32: the counter of (``g``, ``u``)'s cell in ``case``'s joint histogram, for the
    block's ``neuron``; the spare row's unless ``in_case``."""
    _check_float(g)
    _check_float(u)

    def codegen(context, builder, signature, args):
        g_, u_, case_, neuron_, in_case_ = args
        g_row = builder.add(builder.mul(_as_i32(builder, case_), _const(_N_JOINT_BINS)),
                            _joint_bin(builder, g_))  # fmt: skip
        cell = builder.add(builder.mul(g_row, _const(_N_JOINT_BINS)), _joint_bin(builder, u_))
        row = builder.add(cell, _const(HISTOGRAM_ROWS))
        return _counter(builder, row, _as_i32(builder, neuron_), in_case_)

    return types.uint32(g, u, case, neuron, in_case), codegen


@_intrinsic
def token_priority(typingctx, salt, position):
    """uint32: distributions.token_priority(salt, position) of a salt below 2**32 and a
    position below 2**31: mix32's multiplies wrap around in 32 bits, as its masks do."""

    def codegen(context, builder, signature, args):
        x = builder.xor(_as_i32(builder, args[0]), _as_i32(builder, args[1]))
        for _ in range(2):
            x = builder.xor(builder.lshr(x, _const(16)), x)
            x = builder.mul(x, _const(distributions.MIX_MULTIPLIER))
        return builder.xor(builder.lshr(x, _const(16)), x)

    return types.uint32(salt, position), codegen


# The clamps' bounds must be float32 numbers (see the module docstring).
assert all(float(np.float32(b)) == b for b in (_MAGNITUDE_LOW, _JOINT_LOW, _HIGH))

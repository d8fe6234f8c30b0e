"""Eight bytes at a time ("SIMD within a register") for the compiled JSON readers.

A byte loop costs a compare and a branch per byte; reading a 64-bit word and testing all eight
bytes with a few integer operations is several times faster on strings and digits. Words are
little-endian: the byte at ``i`` is the word's lowest, so the first matching byte in text order
is the word's lowest flagged byte (``trailing_zeros // 8``). The byte tests below may flag a
wrong byte only above (after) a correctly flagged one, so the lowest flag is always exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numpy.typing import NDArray

_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)
_QUOTES = np.uint64(0x2222222222222222)
_NEWLINES = np.uint64(0x0A0A0A0A0A0A0A0A)
_COMMAS = np.uint64(0x2C2C2C2C2C2C2C2C)
_CLOSING = np.uint64(0x5D5D5D5D5D5D5D5D)  # ']'
_BELOW_SPACE = np.uint64(0x2121212121212121)  # space and every control character are below
_BACKSLASHES = np.uint64(0x5C5C5C5C5C5C5C5C)
_ZEROS = np.uint64(0x3030303030303030)  # eight '0' characters
_ABOVE_NINE = np.uint64(0x7676767676767676)  # 0x76 + 10 = 0x80
_POW10 = np.array([10**k for k in range(9)], np.uint64)


def _load_word(typingctx: Any, array: Any, index: Any) -> Any:
    """The 8 bytes ``array[index:index + 8]`` of a uint8 array as a little-endian uint64
    (the caller checks they are inside the array)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        return builder.load(builder.bitcast(pointer, ir.IntType(64).as_pointer()), align=1)

    return types.uint64(array, types.intp), codegen


def _trailing_zeros(typingctx: Any, word: Any) -> Any:
    """Number of zero bits below the lowest set bit; 64 for 0."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


def _copy_bytes(
    typingctx: Any, target: Any, target_at: Any, source: Any, source_at: Any, count: Any
) -> Any:
    """memcpy of ``count`` bytes from ``source[source_at:]`` to ``target[target_at:]`` (uint8
    arrays, not overlapping; the caller checks the bounds)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        to = context.make_array(signature.args[0])(context, builder, args[0]).data
        frm = context.make_array(signature.args[2])(context, builder, args[2]).data
        memcpy: Any = cgutils.raw_memcpy
        memcpy(builder, builder.gep(to, [args[1]]), builder.gep(frm, [args[3]]), args[4], 1)
        return context.get_dummy_value()

    return types.void(target, types.intp, source, types.intp, types.intp), codegen


def _leading_zeros(typingctx: Any, word: Any) -> Any:
    """Number of zero bits above the highest set bit; 64 for 0."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


def _multiply_high(typingctx: Any, a: Any, b: Any) -> Any:
    """The high 64 bits of the 128-bit product of two uint64 (the low ones: ``a * b``)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))

    return types.uint64(types.uint64, types.uint64), codegen


# Typed as Any: an intrinsic's Python signature (typingctx first) is not how it is called.
load_word: Any = intrinsic(_load_word)
trailing_zeros: Any = intrinsic(_trailing_zeros)
copy_bytes: Any = intrinsic(_copy_bytes)
leading_zeros: Any = intrinsic(_leading_zeros)
multiply_high: Any = intrinsic(_multiply_high)


@njit(cache=True, nogil=True, inline="always")
def _zero_bytes(word: np.uint64) -> np.uint64:
    """High bit set in each zero byte of ``word`` (exact up to the lowest one)."""
    return (word - _ONES) & ~word & _HIGHS


@njit(cache=True, nogil=True, inline="always")
def find_quote_or_backslash(buf: NDArray[np.uint8], i: int, end: int) -> int:
    """Index of the first '"' or '\\' of ``buf[i:end]``, or ``end``."""
    # A fixed stride while nothing is found: the next load never waits for this word's test.
    while i + 8 <= end:
        word = load_word(buf, i)
        flags = _zero_bytes(word ^ _QUOTES) | _zero_bytes(word ^ _BACKSLASHES)
        if flags:
            return i + (int(trailing_zeros(flags)) >> 3)
        i += 8
    while i < end and buf[i] != 34 and buf[i] != 92:
        i += 1
    return i


@njit(cache=True, nogil=True, inline="always")
def find_number_end(buf: NDArray[np.uint8], i: int, end: int) -> int:
    """Index of the first ',', ']' or whitespace of ``buf[i:end]`` (where a JSON number in a
    list ends: none of them can be part of it), or ``end``."""
    while i + 8 <= end:
        word = load_word(buf, i)
        below = (word - _BELOW_SPACE) & ~word & _HIGHS  # bytes below '!' (exact up to the first)
        flags = below | _zero_bytes(word ^ _COMMAS) | _zero_bytes(word ^ _CLOSING)
        if flags:
            return i + (int(trailing_zeros(flags)) >> 3)
        i += 8
    while i < end and buf[i] > 32 and buf[i] != 44 and buf[i] != 93:
        i += 1
    return i


@njit(cache=True, nogil=True, inline="always")
def find_newline(buf: NDArray[np.uint8], i: int, end: int) -> int:
    """Index of the first newline of ``buf[i:end]``, or ``end``."""
    while i + 8 <= end:
        flags = _zero_bytes(load_word(buf, i) ^ _NEWLINES)
        if flags:
            return i + (int(trailing_zeros(flags)) >> 3)
        i += 8
    while i < end and buf[i] != 10:
        i += 1
    return i


@njit(cache=True, nogil=True, inline="always")
def leading_digits(word: np.uint64) -> int:
    """Number (0-8) of decimal digit bytes at the start of ``word``."""
    t = word ^ _ZEROS  # digits become 0..9; every other byte something else
    flags = ((t + _ABOVE_NINE) | t) & _HIGHS  # high bit: the byte is not 0..9
    return int(trailing_zeros(flags)) >> 3


@njit(cache=True, nogil=True, inline="always")
def digits_value(word: np.uint64, count: int) -> np.uint64:
    """The number written by the first ``count`` (1-8) bytes of ``word``, all digits."""
    t = word ^ _ZEROS
    if count < 8:
        t = t << np.uint64(64 - 8 * count)  # the digits on top, zero bytes (0) below
    # fast_float's parse_eight_digits_unrolled, on values 0..9 per byte.
    t = t * np.uint64(10) + (t >> np.uint64(8))
    low = t & np.uint64(0x000000FF000000FF)
    high = (t >> np.uint64(16)) & np.uint64(0x000000FF000000FF)
    total = low * np.uint64(0x000F424000000064) + high * np.uint64(0x0000271000000001)
    return (total >> np.uint64(32)) & np.uint64(0xFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def power_of_ten(count: int) -> np.uint64:
    power: np.uint64 = _POW10[count]
    return power

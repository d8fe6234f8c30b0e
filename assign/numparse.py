"""JSON numbers read into float64 in compiled code, rounded exactly as Python's ``float()``.

``float()`` (and the reference's ``json``) rounds a decimal to the nearest float64, ties to
even. ``parse_number`` does the same with the Eisel-Lemire algorithm (D. Lemire, "Number
Parsing at a Gigabyte per Second", 2021, as in the fast_float library): the decimal's
significant digits ``w`` (at most 19, so they fit in 64 bits) are multiplied by a 128-bit
truncation of ``5**q`` from a table computed here with Python's exact integers, and the
rounding is read off the product. For 19 digits or fewer the 128-bit product decides every
case (Mushtak and Lemire, "Fast Number Parsing Without Fallback", 2023); where the classic
version of the algorithm would have wanted more bits anyway, this one declines all the same.

It declines (``ok`` False), and the caller reads the number some other way, whenever a
number is outside what it handles: more than 19 significant digits, an integer (JSON ``5``
reads as a Python int, not a float), a result that is zero from underflow, subnormal or
infinite. Tests compare it with ``float()`` on millions of numbers, halfway cases included.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from assign.swar import (
    digits_value,
    leading_digits,
    leading_zeros,
    load_word,
    multiply_high,
    power_of_ten,
)

SMALLEST_POWER = -342
LARGEST_POWER = 308
MAX_DIGITS = 19
_MANTISSA_BITS = 52
_MINIMUM_EXPONENT = -1023
_INFINITE_POWER = 0x7FF


def _power_of_five_table() -> NDArray[np.uint64]:
    """fast_float's ``power_of_five_128``: for each q, 128 bits of 5**q, normalised."""
    words: list[int] = []
    for q in range(SMALLEST_POWER, LARGEST_POWER + 1):
        if q < 0:
            power5 = 5**-q
            z = power5.bit_length()  # the smallest z with 2**z >= power5 (5**k is no power of 2)
            if q >= -27:
                c = 2 ** (z + 127) // power5 + 1
            else:
                c = 2 ** (2 * z + 128) // power5 + 1
                while c >= 1 << 128:
                    c //= 2
        else:
            c = 5**q
            while c < 1 << 127:
                c *= 2
            while c >= 1 << 128:
                c //= 2
        words += [c >> 64, c & ((1 << 64) - 1)]
    return np.array(words, dtype=np.uint64)


_POWERS = _power_of_five_table()
# 2**(p - 1075) for every biased exponent p: a 53-bit mantissa times one of these is exact.
_SCALES = np.ldexp(1.0, np.arange(_INFINITE_POWER + 1) - 1075)
_U64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_PRECISION_MASK = np.uint64(0xFFFFFFFFFFFFFFFF >> (_MANTISSA_BITS + 3))


@njit(cache=True, nogil=True, inline="always")
def _multiply(a: np.uint64, b: np.uint64) -> tuple[np.uint64, np.uint64]:
    """The 128-bit product of two 64-bit words: (high, low)."""
    return multiply_high(a, b), a * b


@njit(cache=True, nogil=True, inline="always")
def decimal_to_double(w: np.uint64, q: int) -> tuple[float, bool]:
    """``w * 10**q`` rounded to the nearest float64 (ties to even), for 0 < w < 10**19;
    False when the result would be subnormal, zero or infinite (declined)."""
    if q < SMALLEST_POWER or q > LARGEST_POWER or w == np.uint64(0):
        return 0.0, False
    lz = int(leading_zeros(w))
    w = w << np.uint64(lz)
    index = 2 * (q - SMALLEST_POWER)
    high, low = _multiply(w, _POWERS[index])
    if high & _PRECISION_MASK == _PRECISION_MASK:
        second_high, _ = _multiply(w, _POWERS[index + 1])
        low = low + second_high
        if second_high > low:
            high = high + np.uint64(1)
        if high & _PRECISION_MASK == _PRECISION_MASK and low == _U64:
            return 0.0, False  # where the classic algorithm fell back: decline too
    upperbit = int(high >> np.uint64(63))
    shift = np.uint64(upperbit + 64 - _MANTISSA_BITS - 3)
    mantissa = high >> shift
    power2 = (((152170 + 65536) * q) >> 16) + 63 + upperbit - lz - _MINIMUM_EXPONENT
    if power2 <= 0:
        return 0.0, False  # subnormal
    if (
        low <= np.uint64(1)
        and -4 <= q <= 23
        and mantissa & np.uint64(3) == np.uint64(1)
        and (mantissa << shift) == high
    ):
        mantissa = mantissa & ~np.uint64(1)  # exactly halfway: round to even
    mantissa = mantissa + (mantissa & np.uint64(1))
    mantissa = mantissa >> np.uint64(1)
    if mantissa >= np.uint64(2) << np.uint64(_MANTISSA_BITS):
        mantissa = np.uint64(1) << np.uint64(_MANTISSA_BITS)
        power2 += 1
    if power2 >= _INFINITE_POWER:
        return 0.0, False
    # mantissa holds the implicit bit: exact as a float64, and scaled exactly (a normal result).
    return float(mantissa) * _SCALES[power2], True


@njit(cache=True, nogil=True, inline="always")
def _is_digit(c: int) -> bool:
    return 48 <= c <= 57


@njit(cache=True, nogil=True, inline="always")
def _digits(buf: NDArray[np.uint8], i: int, end: int, w: np.uint64) -> tuple[np.uint64, int]:
    """``w`` followed by the decimal digits at ``buf[i:]`` (wrapping past 19 digits), and the
    index after them. Up to eight digits per step (``assign.swar``), then one at a time."""
    while i + 8 <= end:
        word = load_word(buf, i)
        count = leading_digits(word)
        if count == 0:
            return w, i
        w = w * power_of_ten(count) + digits_value(word, count)
        i += count
        if count < 8:
            return w, i
    while i < end and _is_digit(buf[i]):
        w = w * np.uint64(10) + np.uint64(buf[i] - 48)
        i += 1
    return w, i


@njit(cache=True, nogil=True, inline="always")
def parse_number(buf: NDArray[np.uint8], i: int, end: int) -> tuple[float, int, bool]:
    """The JSON number starting at ``buf[i]`` (before ``end``): (value, index after it, ok).

    ``buf`` must hold valid JSON there (the caller has had it checked); not ok: declined
    (an integer, more than 19 significant digits, or a value ``decimal_to_double`` declines),
    or no number starts at ``i``.
    """
    negative = False
    if i < end and buf[i] == 45:  # '-'
        negative = True
        i += 1
    if i >= end or not _is_digit(buf[i]):
        return 0.0, i, False
    first = i
    if buf[i] == 48:  # JSON's integer part is "0" or has no leading zero: similarities' case
        w, i = np.uint64(0), i + 1
    else:
        w, i = _digits(buf, i, end, np.uint64(0))
    digits = i - first
    exponent = 0
    fraction = False
    if i < end and buf[i] == 46:  # '.'
        fraction = True
        i += 1
        fraction_first = i
        w, i = _digits(buf, i, end, w)
        exponent = fraction_first - i
        digits += i - fraction_first
    # Leading zeros are no significant digits ("0.05": one); ``w`` is exact up to 19 of them.
    k = first
    while digits > MAX_DIGITS and k < i and (buf[k] == 48 or buf[k] == 46):
        if buf[k] == 48:
            digits -= 1
        k += 1
    if i < end and (buf[i] == 101 or buf[i] == 69):  # 'e', 'E'
        fraction = True  # JSON reads any number with an exponent as a float
        i += 1
        sign = 1
        if i < end and (buf[i] == 45 or buf[i] == 43):
            sign = -1 if buf[i] == 45 else 1
            i += 1
        written = 0
        exp_digits = 0
        while i < end and _is_digit(buf[i]):
            if exp_digits or buf[i] != 48:
                exp_digits += 1
                written = written * 10 + int(buf[i] - 48)
            i += 1
        if exp_digits > 5:
            return 0.0, i, False
        exponent += sign * written
    if not fraction or digits > MAX_DIGITS:
        return 0.0, i, False
    if w == np.uint64(0):  # every digit a zero (there are at most 19 significant ones)
        return (-0.0 if negative else 0.0), i, True
    value, ok = decimal_to_double(w, exponent)
    return (-value if negative else value), i, ok

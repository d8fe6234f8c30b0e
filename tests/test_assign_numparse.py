"""assign.numparse reads a JSON number to the very float64 Python's float() gives, or declines.

Declining is always allowed (the line then takes the per-line path); a value that differs from
float() by even one bit, or a sign, never is.
"""

from __future__ import annotations

import random
from decimal import Decimal, getcontext

import numpy as np
import pytest

from assign.numparse import parse_number


def parsed(text: str) -> float | None:
    """parse_number's value for the whole of ``text``, or None if it declines."""
    buf = np.frombuffer(text.encode(), np.uint8)
    value, end, ok = parse_number(buf, 0, len(buf))
    if not ok:
        return None
    assert end == len(buf), text
    return float(value)


def assert_exact_or_declined(texts: list[str]) -> int:
    """Every number read equals float() bit for bit; returns how many were read."""
    read = 0
    for text in texts:
        value = parsed(text)
        if value is not None:
            expected = float(text)
            assert value == expected and np.signbit(value) == np.signbit(expected), text
            read += 1
    return read


def test_clip_similarities_as_mmc4_prints_them_are_all_read_exactly() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.21, 0.05, 40000).astype(np.float32).astype(np.float64)
    texts = [repr(float(v)) for v in values] + [repr(-float(v)) for v in values[:5000]]
    assert assert_exact_or_declined(texts) == len(texts)


def test_random_mantissas_and_exponents_round_like_float() -> None:
    generator = random.Random(2)
    texts = []
    for _ in range(60000):
        digits = generator.randint(1, 19)
        mantissa = generator.randrange(10 ** (digits - 1), 10**digits)
        exponent = generator.randint(-345, 310)
        sign = generator.choice(["", "-"])
        texts.append(f"{sign}{mantissa}e{exponent}")
        point = generator.randint(0, 25)
        text = str(mantissa).rjust(point + 1, "0")
        texts.append(f"{sign}{text[: len(text) - point]}.{text[len(text) - point :] or '0'}")
    assert assert_exact_or_declined(texts) > 0.9 * len(texts)


def test_exact_halfway_cases_round_to_even() -> None:
    generator = random.Random(3)
    getcontext().prec = 60
    texts = []
    for _ in range(20000):
        # Halfway between two neighbouring float64 integers above 2**53: ties to even.
        exponent = generator.randint(53, 63)
        mantissa = generator.randrange(2**52, 2**53)
        text = str((2 * mantissa + 1) * 2 ** (exponent - 53))
        if len(text) <= 19:
            texts.append(text + ".0")
            texts.append(text[:-3] + "." + text[-3:] + "e3")
        # Halfway between two float64 values near the similarities' range, when short enough.
        x = generator.uniform(0.0, 1.0)
        middle = (Decimal(x) + Decimal(float(np.nextafter(x, 2.0)))) / 2
        texts.append(format(middle, "f"))
    assert assert_exact_or_declined(texts) > 10000


@pytest.mark.parametrize(
    "text",
    [
        "0.0",
        "-0.0",
        "0.000",
        "1.0",
        "-1.5",
        "0.1",
        "1e0",
        "1E+2",
        "-2.5e-3",
        "0.30000000000000004",
        "9007199254740993.0",
        "9007199254740992.5",
        "1.7976931348623157e308",
        "2.2250738585072014e-308",
        "1e-5",
        "0.000000000000000000000000000001234",
        "123456789012345678.9",
        "0.1234567890123456789",
        "12e00002",
    ],
)
def test_edge_values_are_read_exactly(text: str) -> None:
    assert parsed(text) == float(text)
    assert np.signbit(parsed(text)) == np.signbit(float(text))


@pytest.mark.parametrize(
    "text",
    [
        "5",  # an integer: JSON reads it as an int, not a float
        "-0",
        "12345678901234567890",
        "0.12345678901234567891",  # 20 significant digits
        "1.7976931348623159e308",  # overflows to infinity
        "5e-324",  # subnormal
        "1e-400",  # underflows to zero
        "1e999999",
        "-",
        "x",
    ],
)
def test_numbers_it_does_not_handle_are_declined(text: str) -> None:
    assert parsed(text) is None


def test_a_number_ends_at_the_first_character_that_is_not_part_of_it() -> None:
    buf = np.frombuffer(b"0.25, -1.5e2]", np.uint8)
    value, end, ok = parse_number(buf, 0, len(buf))
    assert (value, end, ok) == (0.25, 4, True)
    value, end, ok = parse_number(buf, 6, len(buf))
    assert (value, end, ok) == (-150.0, 12, True)

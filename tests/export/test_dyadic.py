"""Dyadic multipliers b / 2^c: approximation bound, edge cases, overflow limits, integer requantization."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.export.dyadic import MAX_SHIFT, PRODUCT_LIMIT, Dyadic, common_shift, dyadic, requantize


def _exact_requant(acc: int, b: int, c: int, zp: int, lo: int, hi: int) -> int:
    """floor((acc*b + 2^(c-1)) / 2^c) + zp, clamped, in Python's unbounded integers."""
    return min(max(((acc * b + (1 << (c - 1))) >> c) + zp, lo), hi)


def test_relative_error_is_at_most_2_pow_minus_31_on_1e5_random_multipliers():
    gen = np.random.default_rng(0)
    m = np.exp(gen.uniform(np.log(1e-6), 0.0, 100_000))
    d = dyadic(m)
    rel = np.abs(d.value() - m) / m
    assert rel.max() <= 2.0**-31
    assert d.mantissa.min() >= 2**30 and d.mantissa.max() < 2**31  # full 31-bit mantissas
    assert np.all((d.shift >= 1) & (d.shift <= MAX_SHIFT))


def test_multipliers_above_one_and_exact_dyadics():
    d = dyadic(np.array([0.75, 3.0, 1.0, 2.0**-40, 5.5]))
    np.testing.assert_array_equal(d.value(), [0.75, 3.0, 1.0, 2.0**-40, 5.5])  # exactly representable


def test_rounding_up_to_2_pow_31_is_renormalized():
    d = dyadic(1.0 - 1e-12)  # m * 2^31 rounds to 2^31
    assert int(d.mantissa) == 2**30 and int(d.shift) == 30
    assert d.value() == 1.0


def test_tiny_and_zero_multipliers():
    d = dyadic(np.array([0.0, 1e-30, 2.0**-70]))
    assert np.all(d.shift <= MAX_SHIFT)
    # Any int32 accumulator times these rounds to zero, which is what the exact product does.
    acc = np.array([2**31 - 1, -(2**31) + 1, 12345], np.int64)
    for i in range(3):
        one = Dyadic(d.mantissa[i:i + 1], d.shift[i:i + 1])
        np.testing.assert_array_equal(requantize(acc, one, 7, 0, 255), [7, 7, 7])
    # A multiplier just above the 62-bit limit keeps a few mantissa bits.
    d = dyadic(2.0**-60 * 1.5)
    assert int(d.shift) == MAX_SHIFT and d.value() == 2.0**-60 * 1.5


@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf])
def test_invalid_multipliers_are_refused(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        dyadic(bad)


def test_huge_multiplier_is_refused():
    with pytest.raises(ValueError, match="too large"):
        dyadic(2.0**40)


def test_accumulator_bound_shortens_the_mantissa_until_the_int64_product_fits():
    # |acc| < 2^31 and b < 2^31 keep acc*b below 2^62; the rounding term 2^(c-1) is what can push a
    # small multiplier (large c) with a full-range accumulator past the graph's 2^62 offset headroom.
    bound, m = 2**31 - 1, 0.999 * 2.0**-31
    d = dyadic(m, acc_bound=bound)
    b, c = int(d.mantissa), int(d.shift)
    assert bound * b + (1 << (c - 1)) <= PRODUCT_LIMIT
    assert abs(d.value() - m) / m <= 2.0**-29  # only a couple of bits were given up
    # Without the bound the full mantissa would overflow int64 in the graph's offset form.
    full = dyadic(m)
    assert bound * int(full.mantissa) + (1 << (int(full.shift) - 1)) > PRODUCT_LIMIT
    # The extreme accumulators requantize without overflow and match unbounded integers.
    for acc in (bound, -bound, 1 << 30, -(1 << 30) - 1):
        got = int(requantize(np.array([acc]), d, 0, -(2**40), 2**40)[0])
        assert got == _exact_requant(acc, b, c, 0, -(2**40), 2**40)


def test_per_channel_bounds_apply_per_element():
    d = dyadic(np.array([0.999, 0.999]) * 2.0**-31, acc_bound=np.array([100, 2**31 - 1]))
    assert int(d.mantissa[0]).bit_length() == 31 and int(d.mantissa[1]).bit_length() < 31


def test_requantize_matches_unbounded_integer_arithmetic():
    gen = np.random.default_rng(1)
    m = np.exp(gen.uniform(np.log(1e-5), np.log(4.0), 64))
    d = dyadic(m, acc_bound=2**24)
    acc = gen.integers(-(2**24), 2**24, (50, 64))
    acc[0] = 2**24 - 1
    acc[1] = -(2**24)
    got = requantize(acc, d, 3, 0, 255, axis=1)
    want = np.array([[_exact_requant(int(a), int(b), int(c), 3, 0, 255)
                      for a, b, c in zip(row, d.mantissa, d.shift, strict=True)] for row in acc])
    np.testing.assert_array_equal(got, want)


def test_requantize_refuses_an_int64_overflow():
    d = dyadic(0.9)  # 31-bit mantissa: an accumulator beyond int32 leaves the int64 headroom
    with pytest.raises(OverflowError):
        requantize(np.array([2**33]), d, 0, 0, 255)


def test_integer_requantization_is_within_one_lsb_of_float_and_equal_when_dyadic():
    gen = np.random.default_rng(2)
    acc = gen.integers(-(2**20), 2**20, 20_000)
    for m in gen.uniform(1e-5, 1e-2, 20):
        d = dyadic(m)
        float_codes = np.clip(np.rint(acc.astype(np.float32) * np.float32(m)), -(2**31), 2**31)
        int_codes = requantize(acc, d, 0, -(2**31), 2**31)
        assert np.abs(int_codes - float_codes).max() <= 1
    # A multiplier with a short mantissa is exact in float64; round half up on both sides.
    m = 12345 / 2**24
    exact = np.floor(acc.astype(np.float64) * m + 0.5)
    np.testing.assert_array_equal(requantize(acc, dyadic(m), 0, -(2**31), 2**31), exact)


def test_common_shift_gives_each_branch_its_mantissa_over_one_shift():
    mantissas, c = common_shift([0.7, 0.0123, 1.9])
    assert int(max(mantissas)).bit_length() == 31  # the largest keeps a full mantissa
    for b, m in zip(mantissas, [0.7, 0.0123, 1.9], strict=True):
        assert abs(int(b) / 2**c - m) <= 2.0 ** -(c + 1)
    mantissas, c2 = common_shift([0.7, 0.0123], acc_bound=2**31)
    assert sum(int(b) for b in mantissas) * 2**31 + (1 << (c2 - 1)) <= PRODUCT_LIMIT

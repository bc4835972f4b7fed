"""Dyadic numbers b / 2^c: requantization with integer arithmetic only (algorithms.md §6.3).

A requantization multiplier M = s_x * s_w / s_y (per output channel) is written as
M = m * 2^e with m in [0.5, 1) (frexp), then b = round_half_up(m * 2^31) and
c = 31 - e, so that M ~ b / 2^c with relative error <= 2^-31. The integer-only
exporter applies it to an int32 accumulator as

    y = clamp(floor((acc * b + 2^(c-1)) / 2^c) + z_y, lo, hi)        (round half up)

in int64. Two limits keep that product exact: |acc * b| + 2^(c-1) must stay below
2^62 (the exported graph adds a 2^62 offset so that ONNX's truncating integer Div
floors), and c <= 62. `dyadic` enforces both, trading mantissa bits when needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MANTISSA_BITS = 31
MAX_SHIFT = 62
# acc * b + 2^(c-1) must not exceed this: the graph adds OFFSET = 2^62 before dividing.
PRODUCT_LIMIT = (1 << 62) - 1
OFFSET_LOG2 = 62


@dataclass(frozen=True)
class Dyadic:
    """Per-element multipliers b / 2^c (b, c as int64 arrays of the multiplier's shape)."""

    mantissa: np.ndarray
    shift: np.ndarray

    def value(self) -> np.ndarray:
        """b / 2^c as float64 (exact: b has at most 31 bits)."""
        return np.ldexp(self.mantissa.astype(np.float64), -self.shift.astype(np.int64))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mantissa.shape


def _round_shift(b: np.ndarray, k: np.ndarray) -> np.ndarray:
    """round_half_up(b / 2^k) for int64 b >= 0 and k >= 0 (k may exceed 62: the result is then 0)."""
    k = np.minimum(k, 63)
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
    return np.where(k >= 63, 0, np.right_shift(b + half, np.minimum(k, 62)))


def dyadic(multiplier: np.ndarray | float, bits: int = MANTISSA_BITS,
           acc_bound: np.ndarray | int | None = None) -> Dyadic:
    """The dyadic approximation b / 2^c of each multiplier (non-negative, finite).

    `acc_bound` (broadcast against the multiplier) is the largest |accumulator| the
    multiplier will see; where |acc| * b + 2^(c-1) could pass 2^62 the mantissa is
    shortened (b and c reduced together) until it fits.
    """
    if not 1 <= bits <= MANTISSA_BITS:
        raise ValueError(f"mantissa bits must be in [1, {MANTISSA_BITS}], got {bits}")
    m_arr = np.asarray(multiplier, dtype=np.float64)
    if not np.all(np.isfinite(m_arr)) or np.any(m_arr < 0):
        raise ValueError("dyadic multipliers must be finite and non-negative")
    frac, exp = np.frexp(m_arr)  # M = frac * 2^exp, frac in [0.5, 1) (0 for M = 0)
    b = np.floor(frac * float(1 << bits) + 0.5).astype(np.int64)  # exact in float64: < 2^52
    c = (bits - exp).astype(np.int64)
    full = b == (1 << bits)  # rounding reached 2^bits: renormalize to 2^(bits-1) / 2^(c-1)
    b = np.where(full, b >> 1, b)
    c = np.where(full, c - 1, c)
    zero = b == 0
    c = np.where(zero, 1, c)
    if np.any(c < 1):
        worst = float(m_arr.reshape(-1)[int(np.argmin(c.reshape(-1)))])
        raise ValueError(f"multiplier {worst:g} is too large for a dyadic requantization (needs 2^c < 1)")
    # Tiny multipliers: shifting by more than 62 bits is not expressible; drop mantissa bits instead.
    over = np.maximum(c - MAX_SHIFT, 0)
    b = np.where(over > 0, _round_shift(b, over), b)
    c = np.minimum(c, MAX_SHIFT)
    if acc_bound is not None:
        b, c = _fit_product(b, c, np.broadcast_to(np.asarray(acc_bound, dtype=np.int64), b.shape))
    return Dyadic(b.astype(np.int64), c.astype(np.int64))


def _fit_product(b: np.ndarray, c: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shorten mantissas until bound * b + 2^(c-1) <= 2^62 - 1 (Python ints: no int64 overflow here)."""
    b, c = b.copy().reshape(-1), c.copy().reshape(-1)
    flat_bound = bound.reshape(-1)
    dropped = 0
    for i in range(b.size):
        bi, ci, ai = int(b[i]), int(c[i]), int(flat_bound[i])
        while bi and ai * bi + (1 << (ci - 1)) > PRODUCT_LIMIT:
            bi, ci = (bi + 1) >> 1, ci - 1
            dropped += 1
            if ci < 1:
                raise ValueError(f"accumulator bound {ai} leaves no room for a dyadic multiplier")
        b[i], c[i] = bi, ci
    if dropped:
        log.debug("dyadic: dropped %d mantissa bits to keep acc * b below 2^62", dropped)
    return b.reshape(bound.shape), c.reshape(bound.shape)


def common_shift(multipliers: list[np.ndarray | float], bits: int = MANTISSA_BITS,
                 acc_bound: int | None = None) -> tuple[list[np.ndarray], int]:
    """Mantissas b_i over one shared shift c, so that sum_i b_i * v_i is rounded once (residual adds).

    The largest multiplier keeps `bits` mantissa bits; smaller ones get fewer, with the same
    absolute error bound 2^-(c+1). `acc_bound` bounds sum_i |v_i| * b_i checks like `dyadic`.
    """
    values = [np.asarray(m, dtype=np.float64) for m in multipliers]
    largest = max(float(np.max(v)) for v in values)
    ref = dyadic(largest, bits)
    c = int(ref.shift)
    while True:
        mantissas = [np.floor(np.ldexp(v, c) + 0.5).astype(np.int64) for v in values]
        if max(int(np.max(b)) for b in mantissas) < (1 << bits) or c <= 1:
            break
        c -= 1  # the largest rounded up to 2^bits
    if acc_bound is not None:
        while c > 1 and sum(int(np.max(b)) for b in mantissas) * int(acc_bound) + (1 << (c - 1)) > PRODUCT_LIMIT:
            c -= 1
            mantissas = [np.floor(np.ldexp(v, c) + 0.5).astype(np.int64) for v in values]
    return mantissas, c


def requantize(acc: np.ndarray, d: Dyadic, zero_point: np.ndarray | int, lo: np.ndarray | int,
               hi: np.ndarray | int, axis: int | None = None) -> np.ndarray:
    """clamp(floor((acc * b + 2^(c-1)) / 2^c) + zp, lo, hi) in int64 (the definition the graphs implement).

    Per-channel multipliers are broadcast along `axis` of `acc`. Raises OverflowError when
    acc * b would leave the int64 range the exported graph relies on.
    """
    acc = np.asarray(acc, dtype=np.int64)
    b, c = d.mantissa, d.shift
    if axis is not None and b.ndim == 1:
        shape = [1] * acc.ndim
        shape[axis % acc.ndim] = -1
        b, c = b.reshape(shape), c.reshape(shape)
    limit = np.max(np.abs(acc)) if acc.size else 0
    if limit and int(limit) * int(np.max(b)) + (1 << (int(np.max(c)) - 1)) > PRODUCT_LIMIT:
        raise OverflowError(f"|acc| = {int(limit)} times mantissa {int(np.max(b))} leaves the int64 range")
    rounded = np.right_shift(acc * b + np.left_shift(np.int64(1), c - 1), c)  # arithmetic shift = floor
    return np.clip(rounded + np.asarray(zero_point, dtype=np.int64), lo, hi)

"""Streaming, bounded-memory, mergeable statistics of one activation tensor.

`TensorHistogram` keeps exact scalar moments and a histogram on a symmetric
range [-T, T] with `2 * bins_per_side` bins, where T is a power of two strictly
greater than every |x| seen so far. Bin j covers [(j - B) w, (j - B + 1) w) with
w = T / B (B = bins_per_side), so a value's bin is `floor(x / w) + B`:

* w is a power of two, hence `x / w` is exact in float64 and the binning has no
  rounding at bin edges (a tiny negative value never lands on the positive side);
* when T doubles, `floor(x / 2w) == floor(floor(x / w) / 2)`, so merging adjacent
  bin pairs gives exactly the counts a direct binning at 2T would give. The final
  histogram therefore depends only on the multiset of values, not on the batch
  order or split (T only depends on the global max|x|);
* T > max|x| strictly (not >=) so that no value ever sits on the outer edge and
  needs clipping, which would break the pair-merge identity.

Exact zeros are counted apart (`zeros`) and kept out of the internal histogram:
they need no rebinning, and range algorithms treat them exactly (0 is always on
the quantization grid, OCTAV excludes them from the rounding-noise term).
`counts` adds them back to the bin [0, w).
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BINS_PER_SIDE = 2048
_CHUNK = 1 << 22  # elements per internal pass: caps update()'s temporaries at ~200 MB


def _pow2_above(value: float) -> float:
    """Smallest power of two strictly greater than `value` (> 0)."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(1.0, exponent)


class TensorHistogram:
    """Running statistics of one tensor; memory is O(bins_per_side), independent of the data seen."""

    def __init__(self, bins_per_side: int = DEFAULT_BINS_PER_SIDE) -> None:
        if bins_per_side < 2 or bins_per_side & (bins_per_side - 1):
            # A power of two keeps w = T/B a power of two (exact binning) and pairs aligned.
            raise ValueError(f"bins_per_side must be a power of two >= 2, got {bins_per_side}")
        self.bins_per_side = bins_per_side
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.sum = 0.0
        self.sumsq = 0.0
        self.abs_sum = 0.0
        self._mean = 0.0  # Chan et al. running mean / M2: a numerically stable `std`
        self._m2 = 0.0
        self._half_range = 0.0  # T; 0 until a non-zero value has been seen
        self._hist = np.zeros(2 * bins_per_side, dtype=np.int64)  # non-zero values only

    # ------------------------------------------------------------------ updates
    def update(self, x: np.ndarray, sample_stride: int = 1) -> TensorHistogram:
        """Add the elements of `x` (any shape). Raises ValueError on NaN/Inf, leaving self unchanged.

        With `sample_stride` > 1 only every stride-th element enters the histogram
        and the moments (large activations during calibration: the distribution
        is estimated from millions of samples either way), while min and max stay
        exact over all elements.
        """
        flat = np.asarray(x).reshape(-1)
        if flat.size == 0:
            return self
        lo, hi = flat.min(), flat.max()  # NaN propagates and Inf shows: no full isfinite pass needed
        if not (np.isfinite(lo) and np.isfinite(hi)):
            n_bad = sum(int(c.size - np.count_nonzero(np.isfinite(c))) for c in self._chunks(flat))
            raise ValueError(
                f"non-finite values (NaN/Inf) seen in calibration data: {n_bad} of "
                f"{flat.size} elements; calibration data must be finite"
            )
        if sample_stride > 1:
            flat = flat[::sample_stride]
        # Chunks bound the float64 temporaries; the result does not depend on the split.
        for chunk in self._chunks(flat):
            self.merge(self._summarise(chunk.astype(np.float64)))
        if sample_stride > 1:
            self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
            full_abs = max(abs(float(lo)), abs(float(hi)))
            if full_abs > 0 and full_abs >= self._half_range:
                target = _pow2_above(full_abs)
                self._hist = self._rebinned(target)
                self._half_range = target
        return self

    @staticmethod
    def _chunks(flat: np.ndarray) -> list[np.ndarray]:
        return [flat[i : i + _CHUNK] for i in range(0, flat.size, _CHUNK)]

    def _summarise(self, v: np.ndarray) -> TensorHistogram:
        """Statistics of one finite 1-D float64 chunk."""
        nonzero = v[v != 0.0]
        batch = TensorHistogram(self.bins_per_side)
        batch.count = int(v.size)
        batch.zeros = int(v.size - nonzero.size)
        batch.min = float(v.min())
        batch.max = float(v.max())
        batch.sum = float(v.sum())
        # Plain reductions, not BLAS dot: OpenBLAS threads stall on a busy 2-core machine.
        batch.sumsq = float(np.sum(np.square(v)))
        batch.abs_sum = float(np.abs(v).sum())
        batch._mean = batch.sum / batch.count
        d = v - batch._mean
        batch._m2 = float(np.sum(np.square(d)))
        if nonzero.size:
            batch._half_range = _pow2_above(max(-float(nonzero.min()), float(nonzero.max())))
            width = batch._half_range / self.bins_per_side  # a power of two: nonzero / width is exact
            idx = np.floor(nonzero / width).astype(np.int64) + self.bins_per_side
            batch._hist = np.bincount(idx, minlength=2 * self.bins_per_side).astype(np.int64)
        return batch

    def merge(self, other: TensorHistogram) -> TensorHistogram:
        """Fold `other` into `self` (in place; returns self). Same result as one pass over both."""
        if other.bins_per_side != self.bins_per_side:
            raise ValueError(
                f"cannot merge histograms with {self.bins_per_side} and {other.bins_per_side} bins per side"
            )
        if other.count == 0:
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other._mean - self._mean
        self._m2 = self._m2 + other._m2 + delta * delta * n_a * n_b / n
        self._mean = self._mean + delta * n_b / n
        self.count = n
        self.zeros += other.zeros
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.abs_sum += other.abs_sum
        half_range = max(self._half_range, other._half_range)
        if half_range > 0:
            self._hist = self._rebinned(half_range) + other._rebinned(half_range)
            self._half_range = half_range
        return self

    def _rebinned(self, half_range: float) -> np.ndarray:
        """Internal counts re-expressed on [-half_range, half_range] (a power-of-two multiple of T)."""
        if self._half_range in (0.0, half_range):
            return self._hist.copy() if self._half_range else np.zeros_like(self._hist)
        # Beyond 62 halvings every old bin lands next to 0 anyway; capping keeps the int64 shift defined.
        shift = min(round(math.log2(half_range / self._half_range)), 62)
        b = self.bins_per_side
        # Old bin i holds floor(x/w) = i - B; at stride w*2^shift the index is floor((i - B) / 2^shift) + B.
        target = ((np.arange(2 * b, dtype=np.int64) - b) >> shift) + b
        return np.bincount(target, weights=self._hist, minlength=2 * b).astype(np.int64)

    # --------------------------------------------------------------- properties
    @property
    def half_range(self) -> float:
        """T: the histogram covers [-T, T); 1.0 before any non-zero value was seen."""
        return self._half_range or 1.0

    @property
    def bin_width(self) -> float:
        return self.half_range / self.bins_per_side

    @property
    def edges(self) -> np.ndarray:
        """2*B + 1 bin edges, exact multiples of the (power-of-two) bin width."""
        b = self.bins_per_side
        return (np.arange(-b, b + 1, dtype=np.float64)) * self.bin_width

    @property
    def centres(self) -> np.ndarray:
        return (np.arange(-self.bins_per_side, self.bins_per_side, dtype=np.float64) + 0.5) * self.bin_width

    @property
    def counts(self) -> np.ndarray:
        """Counts per bin, exact zeros included in the bin [0, w)."""
        out = self._hist.copy()
        out[self.bins_per_side] += self.zeros
        return out

    @property
    def nonzero_counts(self) -> np.ndarray:
        """Counts per bin of the non-zero values only (what the range algorithms use)."""
        return self._hist.copy()

    @property
    def mean(self) -> float:
        return self._mean if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(max(self._m2, 0.0) / self.count) if self.count else math.nan

    @property
    def is_nonnegative(self) -> bool:
        return self.count > 0 and self.min >= 0.0

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def __repr__(self) -> str:
        return (
            f"TensorHistogram(count={self.count}, zeros={self.zeros}, min={self.min:.6g}, max={self.max:.6g}, "
            f"mean={self.mean:.6g}, std={self.std:.6g}, T={self.half_range:.6g}, bins={2 * self.bins_per_side})"
        )

"""Range selection: (rmin, rmax) for `quant.scale_zero_point`, by a named method.

Activations are chosen from a `TensorHistogram` (bounded streaming statistics); weights, exactly
from their raw values, in qonnx/numerics/weight_ranges.py (same methods, same conventions).

Which part of the data a method looks at depends on the scheme and the data:

* symmetric scheme: the |x| distribution, clip s, range (-s, s);
* asymmetric scheme, one-sided data (min >= 0, e.g. post-ReLU; or max <= 0):
  that side only, range (0, c) (or (-c, 0)), grid constant q = qmax - qmin;
* asymmetric scheme, mixed-sign data: both ends are chosen *jointly*, because
  they share one step (a+b)/(qmax-qmin): MSE searches (a, b) on a 2-D grid
  (coarse to fine), OCTAV solves the two-sided stationarity conditions
  (see `qonnx.octav`), percentile cuts (100-p)/200 from each tail (ORT),
  entropy thresholds |x| symmetrically (ORT) and then clamps.

Every result contains 0 and is clamped to the observed range widened to 0, so
`scale_zero_point` gets exactly the range we picked.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from qonnx.numerics.octav import HistSide, octav_symmetric, octav_two_sided
from qonnx.numerics.quant import QuantScheme, scale_zero_point
from qonnx.numerics.stats import TensorHistogram

log = logging.getLogger(__name__)

ACTIVATION_METHODS = ("minmax", "percentile", "entropy", "mse", "octav")


@dataclass(frozen=True)
class RangeOptions:
    """Tuning knobs shared by the range-setting methods."""

    percentile: float = field(
        default=99.999, metadata={"help": "percentile method: mass kept, in % (ORT default 99.999)"}
    )
    entropy_quantized_bins: int | None = field(
        default=None,
        metadata={
            "help": "entropy method: target levels on the thresholded side; default q+1 of the scheme "
            "(128 for int8 symmetric, 256 for uint8 one-sided)"
        },
    )
    mse_grid: int = field(
        default=100,
        metadata={
            "help": "mse method: candidate clips alpha*max, alpha = 1/n..1 (1-D searches; the 2-D "
            "mixed-sign activation search is a fixed 16x16 grid plus three 9x9 zooms)"
        },
    )
    octav_iterations: int = field(
        default=20, metadata={"help": "octav method: maximum fixed-point iterations"}
    )
    octav_rtol: float = field(
        default=1e-6, metadata={"help": "octav method: stop once the clip moves by less than this (relative)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.entropy_quantized_bins is not None and self.entropy_quantized_bins < 2:
            raise ValueError(f"entropy_quantized_bins must be >= 2, got {self.entropy_quantized_bins}")
        if self.mse_grid < 2 or self.octav_iterations < 1 or self.octav_rtol <= 0:
            raise ValueError("mse_grid must be >= 2, octav_iterations >= 1 and octav_rtol > 0")


def _check_method(method: str, valid: tuple[str, ...], what: str) -> None:
    if method not in valid:
        raise ValueError(f"unknown {what} range method {method!r}; valid methods: {', '.join(valid)}")


def _mode(scheme: QuantScheme, lo: float, hi: float) -> str:
    if scheme.symmetric:
        return "symmetric"
    if lo >= 0:
        return "positive"
    if hi <= 0:
        return "negative"
    return "two-sided"


def _finish(rmin: float, rmax: float, lo: float, hi: float) -> tuple[float, float]:
    """Contain 0 and clamp to the observed range (itself widened to 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    return float(np.clip(rmin, lo, 0.0)), float(np.clip(rmax, 0.0, hi))


# ----------------------------------------------------------- histogram views
def _sides(stats: TensorHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero counts as magnitude histograms (positive side, negative side), B bins of width w each."""
    nz, b = stats.nonzero_counts, stats.bins_per_side
    return nz[b:].astype(np.float64), nz[:b][::-1].astype(np.float64)


def _upper_quantile(counts: np.ndarray, width: float, n_above: float) -> float:
    """Magnitude t with `n_above` values above it (values uniform within bins)."""
    suffix = np.append(np.cumsum(counts[::-1])[::-1], 0.0)  # suffix[j] = count with magnitude >= j*w
    if n_above >= suffix[0]:
        return 0.0
    j = int(np.searchsorted(-suffix, -n_above, side="right")) - 1  # last j with suffix[j] > n_above
    j = min(j, counts.size - 1)
    inside = (n_above - suffix[j + 1]) / counts[j] if counts[j] > 0 else 0.0
    return (j + 1 - inside) * width


def expected_sqnr_db(stats: TensorHistogram, scale: float | np.ndarray, zero_point: int | np.ndarray,
                     scheme: QuantScheme) -> float:
    """SQNR (dB) of quantizing the histogrammed tensor with these per-tensor parameters."""
    rmin = np.array([float(scale) * (scheme.qmin - int(zero_point))])
    rmax = np.array([float(scale) * (scheme.qmax - int(zero_point))])
    mse = float(histogram_mse(stats, rmin, rmax, scheme)[0])
    power = stats.sumsq / max(stats.count, 1)
    return float("inf") if mse <= 0 else 10.0 * np.log10(max(power, 1e-300) / mse)


def histogram_mse(
    stats: TensorHistogram, rmin: np.ndarray, rmax: np.ndarray, scheme: QuantScheme
) -> np.ndarray:
    """Expected squared quantization error per element for candidate ranges, on the histogram.

    The grid is the one `scale_zero_point` builds (zero point rounding included).
    Values are taken as uniform within each bin and the squared error is
    integrated exactly over each bin (a refinement of bin centres: continuous in
    the clip, and no aliasing when the grid step is a few bin widths). Exact
    zeros cost nothing (0 is on the grid). O(bins) per candidate.
    """
    if stats.count == 0:
        raise ValueError("no calibration data was seen for this tensor")
    total = _hist_sq_error(stats.nonzero_counts, stats.bin_width, stats.bins_per_side, rmin, rmax, scheme)
    return total / stats.count


def _hist_sq_error(nz: np.ndarray, w: float, zero_bin: int, rmin, rmax, scheme: QuantScheme) -> np.ndarray:
    """Total squared error on a signed histogram whose bin `zero_bin` starts at 0 (bins of width w)."""
    scale, zp = scale_zero_point(np.atleast_1d(rmin), np.atleast_1d(rmax), scheme)
    step = scale.astype(np.float64)[:, None]
    lo = (scheme.qmin - zp)[:, None] * step
    hi = (scheme.qmax - zp)[:, None] * step
    used = np.flatnonzero(nz)
    if used.size == 0:
        return np.zeros(step.shape[0])
    first, last = used[0], used[-1] + 1
    edges = (np.arange(first, last + 1) - zero_bin)[None, :] * w
    phi = _sq_err_antiderivative(edges, lo, hi, step)
    return (np.diff(phi, axis=1) / w) @ nz[first:last].astype(np.float64)


def _sq_err_antiderivative(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Integral from lo to x of (t - Q(t))^2 dt for the clipped grid lo, lo+step, ..., hi.

    Inside the grid, with u = (t - lo)/step, m = round(u), rho = u - m, the integral is
    step^3 (m/12 + rho^3/3): whole cells contribute step^3/12 each. Outside it is the
    cubic of the distance to the clipped end. (Cubes by multiplication: `**` is slow.)
    """
    u = (np.clip(x, lo, hi) - lo) / step
    m = np.floor(u + 0.5)
    rho = u - m
    out = (step * step * step) * (m * (1.0 / 12.0) + rho * rho * rho * (1.0 / 3.0))
    d = np.maximum(x - hi, 0.0) - np.maximum(lo - x, 0.0)  # signed distance outside the grid
    return out + d * d * d * (1.0 / 3.0)


# ------------------------------------------------------------- activations
def activation_range(
    stats: TensorHistogram, scheme: QuantScheme, method: str, options: RangeOptions = RangeOptions()
) -> tuple[float, float]:
    """(rmin, rmax) for one activation tensor (per-tensor) from its calibration statistics."""
    _check_method(method, ACTIVATION_METHODS, "activation")
    if stats.count == 0:
        raise ValueError("no calibration data was seen for this tensor")
    lo, hi = stats.min, stats.max
    if stats.abs_max == 0.0 or method == "minmax":
        return _finish(lo, hi, lo, hi)
    mode = _mode(scheme, lo, hi)
    pos, neg = _sides(stats)
    w = stats.bin_width
    if method == "percentile":
        tail = (1.0 - options.percentile / 100.0) * stats.count
        if mode == "two-sided":
            r = (-_upper_quantile(neg, w, tail / 2), _upper_quantile(pos, w, tail / 2))
        else:
            t = _upper_quantile({"symmetric": pos + neg, "positive": pos, "negative": neg}[mode], w, tail)
            r = (-t, t)
    elif method == "entropy":
        # Exact zeros are left out: 0 is on every grid, and a spike of (often 50 %) zeros in the
        # first bin would dominate KL and drag the threshold down to `levels` bins.
        mag = {"positive": pos, "negative": neg}.get(mode, pos + neg)
        steps = scheme.steps_per_side if mode != "two-sided" else (scheme.qmax - scheme.qmin) // 2
        levels = options.entropy_quantized_bins or int(steps) + 1
        t = _entropy_threshold(mag, levels) * w
        r = (-t, t)
    elif method == "mse":
        r = _mse_activation(stats, scheme, mode, options)
    else:
        r = _octav_activation(stats, scheme, mode, pos, neg, options)
    if mode == "positive":
        r = (0.0, r[1])
    elif mode == "negative":
        r = (r[0], 0.0)
    rmin, rmax = _finish(r[0], r[1], lo, hi)
    log.debug(
        "activation range %s/%s (%s): [%.6g, %.6g] of observed [%.6g, %.6g]",
        method,
        scheme.describe(),
        mode,
        rmin,
        rmax,
        lo,
        hi,
    )
    return rmin, rmax


def _entropy_threshold(hist: np.ndarray, levels: int, chunk: int = 256) -> int:
    """Number of bins i minimising KL(P_i || Q_i) (the TensorRT/ORT algorithm on a magnitude histogram).

    P_i: the first i bins, the outliers added to the last one. Q_i: those i bins merged
    into `levels` groups, each group's mass spread evenly over its non-empty bins. Both
    smoothed as ORT does. Vectorised over chunks of candidates i (one row each).
    """
    used = int(np.flatnonzero(hist)[-1]) + 1
    if used <= levels:
        return used
    h = hist[:used].astype(np.float64)
    above = h.sum() - np.cumsum(h)  # above[i-1] = mass beyond the first i bins
    j = np.arange(used)[None, :]
    best_i, best_kl = used, math.inf
    for start in range(levels, used + 1, chunk):
        i = np.arange(start, min(start + chunk, used + 1))[:, None]
        rows = np.arange(i.shape[0])
        valid = j < i
        sliced = np.where(valid, h, 0.0)
        p = sliced.copy()
        p[rows, i[:, 0] - 1] += above[i[:, 0] - 1]
        # Group of bin j for candidate i: the last g with floor(g*i/levels) <= j.
        group = np.minimum(((j + 1) * levels + i - 1) // i - 1, levels - 1)
        flat = (rows[:, None] * levels + group).ravel()
        nonzero = valid & (h > 0)
        g_sum = np.bincount(flat, weights=sliced.ravel(), minlength=rows.size * levels).reshape(-1, levels)
        g_nz = np.bincount(flat, weights=nonzero.ravel(), minlength=rows.size * levels).reshape(-1, levels)
        q = np.take_along_axis(g_sum / np.maximum(g_nz, 1.0), group, axis=1) * nonzero
        p, q = _smooth(p, valid), _smooth(q, valid)
        kl = np.where(valid, p * np.log(np.where(valid, p / np.where(valid, q, 1.0), 1.0)), 0.0).sum(axis=1)
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_i, best_kl = int(i[k, 0]), float(kl[k])
    return best_i


def _smooth(h: np.ndarray, valid: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """ORT's smoothing per row (over the valid bins): eps into empty bins, taken from the others; normalised."""
    zero = valid & (h == 0)
    n_zero = zero.sum(axis=1, keepdims=True)
    n_nonzero = np.maximum(valid.sum(axis=1, keepdims=True) - n_zero, 1)
    out = h + eps * zero - (eps * n_zero / n_nonzero) * (valid & ~zero)
    out = np.where(valid, np.maximum(out, eps * 1e-3), 0.0)
    return out / out.sum(axis=1, keepdims=True)


def _candidates(extent: float, grid: int) -> np.ndarray:
    return extent * np.arange(1, grid + 1) / grid


def _mse_activation(
    stats: TensorHistogram, scheme: QuantScheme, mode: str, options: RangeOptions
) -> tuple[float, float]:
    if mode != "two-sided":
        extent = {"symmetric": stats.abs_max, "positive": stats.max, "negative": -stats.min}[mode]
        c = _candidates(extent, options.mse_grid)
        rmin = np.zeros_like(c) if mode == "positive" else -c
        rmax = np.zeros_like(c) if mode == "negative" else c
        best = int(np.argmin(histogram_mse(stats, rmin, rmax, scheme)))
        return float(rmin[best]), float(rmax[best])
    # Joint search of (b, a) = (-rmin, rmax): both ends share one step, so they are not independent.
    # A 16 x 16 grid over the whole range on an 8x coarser histogram finds the basin cheaply, then
    # three 9 x 9 zooms (window +-1 step, full histogram) refine it to ~1/1000 of the range.
    nz, w, zero_bin = stats.nonzero_counts, stats.bin_width, stats.bins_per_side
    f = min(8, zero_bin)
    coarse = (nz.reshape(-1, f).sum(axis=1), w * f, zero_bin // f)
    a_ext, b_ext = stats.max, -stats.min
    a_grid, b_grid = _candidates(a_ext, 16), _candidates(b_ext, 16)
    for level in range(4):
        bb, aa = (g.ravel() for g in np.meshgrid(b_grid, a_grid, indexing="ij"))
        hist: tuple[np.ndarray, float, int] = coarse if level == 0 else (nz, w, zero_bin)
        i = int(np.argmin(_hist_sq_error(*hist, -bb, aa, scheme)))
        da, db = a_grid[1] - a_grid[0], b_grid[1] - b_grid[0]
        a_grid = np.linspace(max(aa[i] - da, da / 4), min(aa[i] + da, a_ext), 9)
        b_grid = np.linspace(max(bb[i] - db, db / 4), min(bb[i] + db, b_ext), 9)
    return -float(bb[i]), float(aa[i])


def _octav_activation(
    stats: TensorHistogram,
    scheme: QuantScheme,
    mode: str,
    pos: np.ndarray,
    neg: np.ndarray,
    options: RangeOptions,
) -> tuple[float, float]:
    w = stats.bin_width
    k = 1.0 / (12.0 * scheme.steps_per_side**2)
    s0 = stats.abs_sum / stats.count  # E|X|: starting at max|X| would waste an iteration (s1 = 0)
    nonzero = stats.count - stats.zeros
    if mode == "two-sided":
        p_side, n_side = HistSide(pos, w), HistSide(neg, w)
        a, b = octav_two_sided(
            p_side.tails,
            n_side.tails,
            nonzero,
            s0,
            s0,
            stats.max,
            -stats.min,
            k,
            options.octav_iterations,
            options.octav_rtol,
        )
        return -float(b), float(a)
    mag, extent = {
        "symmetric": (pos + neg, stats.abs_max),
        "positive": (pos, stats.max),
        "negative": (neg, -stats.min),
    }[mode]
    tails = HistSide(mag, w).tails
    s = float(octav_symmetric(tails, nonzero, s0, extent, k, options.octav_iterations, options.octav_rtol))
    return -s, s

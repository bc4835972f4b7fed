"""Weight ranges: (rmin, rmax) per tensor, channel or block, exact on the raw values, vectorised.

The methods and conventions are those of qonnx/numerics/ranges.py (activations): symmetric schemes clip |w|,
asymmetric ones choose both ends jointly; every range contains 0.
"""

from __future__ import annotations

import numpy as np

from qonnx.numerics.octav import octav_symmetric, octav_two_sided, raw_tails
from qonnx.numerics.quant import QuantScheme, scale_zero_point
from qonnx.numerics.ranges import RangeOptions, _check_method

WEIGHT_METHODS = ("minmax", "mse", "octav")


def _rows(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, tuple[int, ...]]:
    """(groups, group_len) view of w, one row per range, and the shape the ranges come back in.

    Per-tensor: shape (); per-axis: (D[axis],); blocked: w.shape with ceil(D[axis]/block)
    on the axis (the ONNX blocked-scale shape). Ragged last blocks are padded with
    zeros, which change no range (ranges contain 0; zeros cost nothing in MSE/OCTAV).
    """
    w = np.asarray(w, dtype=np.float32)
    if scheme.axis is None:
        return w.reshape(1, -1), ()
    axis = scheme.axis % w.ndim
    if scheme.block_size is None:
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), (w.shape[axis],)
    blk = scheme.block_size
    nb = -(-w.shape[axis] // blk)
    moved = np.moveaxis(w, axis, -1)
    pad = nb * blk - moved.shape[-1]
    if pad:
        moved = np.concatenate([moved, np.zeros((*moved.shape[:-1], pad), np.float32)], axis=-1)
    out_shape = list(w.shape)
    out_shape[axis] = nb
    return moved.reshape(-1, blk), tuple(out_shape)


def _unrows(values: np.ndarray, out_shape: tuple[int, ...], scheme: QuantScheme, ndim: int) -> np.ndarray:
    if scheme.block_size is None or scheme.axis is None:
        return values.reshape(out_shape)
    axis = scheme.axis % ndim
    moved = [*out_shape[:axis], *out_shape[axis + 1 :], out_shape[axis]]
    return np.moveaxis(values.reshape(moved), -1, axis)


def _rows_sq_error(v: np.ndarray, rmin: np.ndarray, rmax: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Exact squared fake-quantization error per row (same arithmetic as quant.fake_quantize)."""
    scale, zp = scale_zero_point(rmin, rmax, scheme)
    s, z = scale[:, None], zp[:, None].astype(np.float32)
    t = v / s  # in place from here: this runs once per grid point over the whole weight
    np.rint(t, out=t)
    t += z
    np.clip(t, scheme.qmin, scheme.qmax, out=t)
    t -= z
    t *= s
    t -= v
    return np.einsum("ij,ij->i", t, t, dtype=np.float64)


def weight_range(
    w: np.ndarray, scheme: QuantScheme, method: str, options: RangeOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rmin, rmax) arrays for a weight, exact on its values, one pair per channel / block.

    Shapes: per-tensor (axis None) -> 0-d; per-axis -> (D[axis],); blocked ->
    same rank as w with ceil(D[axis]/block_size) on the axis. Ranges contain 0.
    Symmetric schemes clip |w| (MSE grid or OCTAV on q = qmax); asymmetric ones
    use OCTAV's two-sided fixed point, or for MSE a joint shrink (a*min, a*max)
    grid, which keeps the cost at O(grid * size).
    """
    _check_method(method, WEIGHT_METHODS, "weight")
    options = options or RangeOptions()
    if np.size(w) == 0:
        raise ValueError("cannot choose a range for an empty weight")
    v, out_shape = _rows(w, scheme)
    if not np.isfinite(v).all():
        raise ValueError("weight contains non-finite values (NaN/Inf)")
    lo = np.minimum(v.min(axis=1), 0.0).astype(np.float64)
    hi = np.maximum(v.max(axis=1), 0.0).astype(np.float64)
    if method == "minmax":
        rmin, rmax = lo, hi
    elif method == "mse":
        rmin, rmax = _mse_rows(v, lo, hi, scheme, options)
    else:
        rmin, rmax = _octav_rows(v, lo, hi, scheme, options)
    rmin, rmax = np.clip(rmin, lo, 0.0), np.clip(rmax, 0.0, hi)
    ndim = np.ndim(w)
    return _unrows(rmin, out_shape, scheme, ndim), _unrows(rmax, out_shape, scheme, ndim)


def _mse_rows(v, lo, hi, scheme: QuantScheme, options: RangeOptions) -> tuple[np.ndarray, np.ndarray]:
    if scheme.symmetric:
        lo = -np.maximum(-lo, hi)
        hi = -lo
    best_err = np.full(v.shape[0], np.inf)
    best_a = np.ones(v.shape[0])
    for a in np.arange(1, options.mse_grid + 1) / options.mse_grid:
        err = _rows_sq_error(v, a * lo, a * hi, scheme)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a = np.where(better, a, best_a)
    return best_a * lo, best_a * hi


def _octav_rows(v, lo, hi, scheme: QuantScheme, options: RangeOptions) -> tuple[np.ndarray, np.ndarray]:
    mag = np.abs(v)
    nonzero = np.count_nonzero(v, axis=1).astype(np.float64)
    s0 = mag.mean(axis=1, dtype=np.float64)
    k = 1.0 / (12.0 * scheme.steps_per_side**2)
    if scheme.symmetric:
        s_max = mag.max(axis=1)
        s = octav_symmetric(
            raw_tails(mag), nonzero, s0, s_max, k, options.octav_iterations, options.octav_rtol
        )
        return -s, s
    a, b = octav_two_sided(
        raw_tails(np.maximum(v, 0)),
        raw_tails(np.maximum(-v, 0)),
        nonzero,
        s0,
        s0,
        hi,
        -lo,
        k,
        options.octav_iterations,
        options.octav_rtol,
    )
    return -b, a

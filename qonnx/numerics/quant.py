"""Quantization schemes and the pure quantize/dequantize math (numpy only).

Conventions follow the ONNX spec (QuantizeLinear divides by the scale and rounds
half to even) and ORT's `compute_scale_zp` (the range always contains zero;
symmetric signed grids are restricted to [-(2^(b-1)-1), 2^(b-1)-1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Smallest scale we emit: a dead channel must not produce scale 0 (division by
# zero in Q) nor an int32 bias overflow (bias scale = s_x * s_w).
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized: grid, granularity and symmetry."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None  # None = per-tensor
    block_size: int | None = None
    narrow: bool = True  # symmetric signed grids drop the most negative code

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 7, 8, 16, 32):
            raise ValueError(f"unsupported bit width {self.bits}")
        if self.block_size is not None and self.axis is None:
            raise ValueError("block_size needs an axis")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        lo = -(1 << (self.bits - 1))
        return lo + 1 if (self.symmetric and self.narrow) else lo

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def onnx_dtype_name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def numpy_dtype(self) -> type:
        # Narrower grids are stored widened; the exporter packs 4-bit and narrower ones.
        if self.bits <= 8:
            return np.int8 if self.signed else np.uint8
        return {16: (np.int16, np.uint16), 32: (np.int32, np.uint32)}[self.bits][0 if self.signed else 1]

    @property
    def steps_per_side(self) -> int:
        """q of the OCTAV grid constant 1/(12 q^2): steps between 0 and the clip value."""
        # Asymmetric grids put the zero point at qmin for one-sided data: all qmax - qmin steps are used
        # (uint8 and asymmetric int8 alike); symmetric signed grids have qmax steps per side.
        if not self.symmetric:
            return self.qmax - self.qmin
        return self.qmax if self.signed else (self.qmax - self.qmin) // 2

    def describe(self) -> str:
        gran = "per-tensor" if self.axis is None else f"per-axis({self.axis})"
        if self.block_size:
            gran = f"blocked({self.axis},{self.block_size})"
        return f"{self.onnx_dtype_name} {'sym' if self.symmetric else 'asym'} {gran}"


UINT8_ACT = QuantScheme(bits=8, signed=False, symmetric=False)
INT8_WEIGHT = QuantScheme(bits=8, signed=True, symmetric=True, axis=0)
INT32_BIAS = QuantScheme(bits=32, signed=True, symmetric=True, axis=0, narrow=False)


def scale_zero_point(
    rmin: np.ndarray | float, rmax: np.ndarray | float, scheme: QuantScheme
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering [rmin, rmax] (widened to contain 0) on the scheme's grid."""
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        if scheme.signed:
            scale = absmax / qmax
            zero_point = np.zeros_like(scale)
        else:  # symmetric unsigned: zero in the middle of the grid
            scale = 2 * absmax / (qmax - qmin)
            zero_point = np.full_like(scale, np.round((qmin + qmax) / 2))
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(qmin - rmin / safe), qmin, qmax)
    # Dead channels and all-zero tensors get the smallest scale: the grid still
    # represents 0 exactly and a bias of s_x*s_w stays finite.
    dead = ~(scale > MIN_SCALE)  # also catches NaN
    scale = np.where(dead, MIN_SCALE, scale)
    zero_point = np.where(dead, np.round((qmin + qmax) / 2) if scheme.symmetric and not scheme.signed else (0 if scheme.signed else qmin), zero_point)
    return scale.astype(np.float32), zero_point.astype(np.int64)


def expand_blocked(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A blocked scale / zero point (ceil(D/block) on `axis`) repeated to the full tensor shape."""
    axis = axis % len(shape)
    return np.repeat(np.asarray(param), block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def _broadcast(param: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0 or (param.ndim == x.ndim and param.ndim > 1):
        # Per-tensor, or already full rank (an expanded blocked parameter): numpy broadcasting does it.
        if param.ndim == x.ndim and any(p not in (1, d) for p, d in zip(param.shape, x.shape, strict=True)):
            raise ValueError(
                f"parameter of shape {param.shape} does not broadcast to {x.shape}; "
                "expand blocked scales first (quant.expand_blocked)"
            )
        return param
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return param.reshape(shape)


def _params(param: np.ndarray, x: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Scale / zero point broadcast against x, blocked ones expanded to x's shape first."""
    param = np.asarray(param)
    if scheme.block_size and scheme.axis is not None and param.ndim == x.ndim:
        if param.shape[scheme.axis % x.ndim] != x.shape[scheme.axis % x.ndim]:  # not expanded yet
            param = expand_blocked(param, x.shape, scheme.axis, scheme.block_size)
    return _broadcast(param, x, scheme.axis)


def scale_in_float_type(scale: Any, float_type: Any = np.float32) -> np.ndarray:
    """A scale as the float type of its tensor: float32 as it is; float16 rounded to nearest, kept positive
    (a scale below float16's smallest subnormal, 6e-8, becomes that; one above its largest finite value, 65504,
    becomes that), so that a float16 QuantizeLinear never divides by zero or infinity."""
    if np.dtype(float_type) != np.float16:
        return np.asarray(scale, dtype=np.float32)
    info = np.finfo(np.float16)
    clipped = np.clip(np.asarray(scale, np.float64), float(info.smallest_subnormal), float(info.max))
    return clipped.astype(np.float16)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zp), returned as int64 codes."""
    x = np.asarray(x, dtype=np.float32)
    s = _params(np.asarray(scale, dtype=np.float32), x, scheme)
    zp = _params(np.asarray(zero_point, dtype=np.int64), x, scheme)
    # Saturate in float before the integer cast: casting an out-of-range float (|x/s| >= 2^63, inf)
    # to int64 is undefined in numpy (gives INT64_MIN), which would wrap huge positives to qmin.
    # ORT saturates; the ONNX reference evaluator has the same wrap-around bug (int32 cast).
    q = np.clip(np.rint(x / s).astype(np.float64) + zp, scheme.qmin, scheme.qmax)
    return q.astype(np.int64)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zp) * scale. Blocked parameters must be expanded (expand_blocked)."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q, axis)
    zp = _broadcast(np.asarray(zero_point, dtype=np.int64), q, axis)
    return ((q.astype(np.int64) - zp).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    scale, zero_point = _params(scale, x, scheme), _params(zero_point, x, scheme)
    return dequantize(quantize(x, scale, zero_point, scheme), scale, zero_point, scheme.axis)


def reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    """Axes to reduce over for statistics kept per `axis` (all axes when per-tensor)."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(i for i in range(ndim) if i != axis % ndim)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)

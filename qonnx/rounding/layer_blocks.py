"""Layers as weight blocks: Conv geometry, im2col rows, block layouts and the integer grid.

Every layer is flattened to y = W x with W [O, I]:
  * Conv: x is an im2col patch, I = C/g * prod(kernel), one row per (image, output position);
  * MatMul/Gemm: x is one row of the input (leading dims flattened); a MatMul weight [K, N] is W = weight.T.
A grouped conv is g independent blocks W_g [O/g, I_g], so weights are block-stacked as [g, O_g, I_g]
(depthwise: [C, multiplier, k*k]); scales and zero points broadcast to those blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def _ints(value: Any, rank: int, default: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (default,) * rank
    out = tuple(int(v) for v in value)
    if len(out) != rank:
        raise ValueError(f"{name} has {len(out)} values, expected {rank} for a {rank}-D conv")
    return out


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of an ONNX Conv (any spatial rank; 1-D and 2-D are the ones in use): all im2col needs."""

    channels: int  # C_in
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: every begin, then every end
    dilations: tuple[int, ...]
    group: int = 1
    auto_pad: str = "NOTSET"

    def __post_init__(self) -> None:
        r = len(self.kernel_shape)
        if r == 0:
            raise ValueError("a conv needs at least one spatial dimension")
        if len(self.strides) != r or len(self.dilations) != r or len(self.pads) != 2 * r:
            raise ValueError(f"conv attributes do not match kernel rank {r}: {self}")
        if min(self.kernel_shape) < 1 or min(self.strides) < 1 or min(self.dilations) < 1:
            raise ValueError(f"kernel, strides and dilations must be >= 1: {self}")
        if min(self.pads) < 0:
            raise ValueError(f"negative pads are not valid ONNX: {self.pads}")
        if self.group < 1 or self.channels % self.group:
            raise ValueError(f"{self.channels} input channels do not split into {self.group} groups")
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise ValueError(f"unknown auto_pad {self.auto_pad!r}")

    @classmethod
    def from_weight(
        cls,
        weight_shape: Sequence[int],
        *,
        strides: Sequence[int] | None = None,
        pads: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        group: int = 1,
        auto_pad: str | bytes = "NOTSET",
        kernel_shape: Sequence[int] | None = None,
    ) -> ConvSpec:
        """Spec of a Conv whose weight is [O, C/group, *kernel]; unset attributes take the ONNX defaults."""
        if len(weight_shape) < 3:
            raise ValueError(f"conv weight must be [O, C/group, *kernel], got shape {tuple(weight_shape)}")
        kernel = tuple(int(k) for k in weight_shape[2:])
        if kernel_shape is not None and tuple(int(k) for k in kernel_shape) != kernel:
            raise ValueError(f"kernel_shape {tuple(kernel_shape)} does not match the weight's {kernel}")
        r = len(kernel)
        group = int(group)
        if int(weight_shape[0]) % group:
            raise ValueError(f"{weight_shape[0]} output channels do not split into {group} groups")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        return cls(
            channels=int(weight_shape[1]) * group,
            kernel_shape=kernel,
            strides=_ints(strides, r, 1, "strides"),
            pads=_ints(pads, 2 * r, 0, "pads"),
            dilations=_ints(dilations, r, 1, "dilations"),
            group=group,
            auto_pad=auto_pad,
        )

    @classmethod
    def from_attrs(cls, weight_shape: Sequence[int], attrs: Mapping[str, Any]) -> ConvSpec:
        """Spec from an ONNX Conv attribute dict (names as in the operator spec)."""
        return cls.from_weight(
            weight_shape,
            strides=attrs.get("strides"),
            pads=attrs.get("pads"),
            dilations=attrs.get("dilations"),
            group=attrs.get("group", 1),
            auto_pad=attrs.get("auto_pad", "NOTSET"),
            kernel_shape=attrs.get("kernel_shape"),
        )

    @property
    def block_in(self) -> int:
        """I_g = C/group * prod(kernel): the length of one group's im2col patch."""
        return self.channels // self.group * math.prod(self.kernel_shape)

    def resolve_pads(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(begins, ends) for an input of this spatial shape (auto_pad depends on it)."""
        r = len(self.kernel_shape)
        if self.auto_pad == "NOTSET":
            return self.pads[:r], self.pads[r:]
        if self.auto_pad == "VALID":
            return (0,) * r, (0,) * r
        begins, ends = [], []
        for size, k, s, d in zip(spatial, self.kernel_shape, self.strides, self.dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            # SAME_UPPER puts the odd extra pad at the end, SAME_LOWER at the beginning.
            begin = small if self.auto_pad == "SAME_UPPER" else total - small
            begins.append(begin)
            ends.append(total - begin)
        return tuple(begins), tuple(ends)

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        begins, ends = self.resolve_pads(spatial)
        out = tuple(
            (size + b + e - (k - 1) * d - 1) // s + 1
            for size, b, e, k, s, d in zip(spatial, begins, ends, self.kernel_shape, self.strides, self.dilations)
        )
        if min(out) < 1:
            raise ValueError(f"input spatial shape {tuple(spatial)} is smaller than the dilated kernel")
        return out


def im2col(x: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """Patches of a [N, C, *spatial] input as [group, N * prod(out), C/group * prod(kernel)].

    Column order is (channel within the group, kernel offsets row-major), i.e. the order of a conv weight
    [O, C/g, *kernel] reshaped to [g, O/g, I_g]; rows are (image, output position) row-major.
    """
    x = np.asarray(x)
    r = len(spec.kernel_shape)
    if x.ndim != r + 2:
        raise ValueError(f"a {r}-D conv input must be [N, C, *{r} spatial dims], got shape {x.shape}")
    n, c = x.shape[:2]
    if c != spec.channels:
        raise ValueError(f"conv input has {c} channels, the weight expects {spec.channels}")
    spatial = x.shape[2:]
    out = spec.output_shape(spatial)
    begins, ends = spec.resolve_pads(spatial)
    g = spec.group
    if all(k == 1 for k in spec.kernel_shape) and all(st == 1 for st in spec.strides) \
            and not any(begins) and not any(ends):
        # Pointwise conv: the patches are the pixels, one transposing copy.
        return x.reshape(n, g, c // g, math.prod(out)).transpose(1, 0, 3, 2).reshape(g, n * math.prod(out), c // g)
    xp = np.pad(x, [(0, 0), (0, 0), *zip(begins, ends)])
    taps = math.prod(spec.kernel_shape)
    cols = np.empty((n, c, taps, *out), dtype=x.dtype)
    # One strided slice per kernel offset: prod(kernel) copies, each vectorised over N, C and positions.
    for j, offset in enumerate(itertools.product(*(range(k) for k in spec.kernel_shape))):
        window = tuple(
            slice(o * d, o * d + s * (m - 1) + 1, s)
            for o, d, s, m in zip(offset, spec.dilations, spec.strides, out)
        )
        cols[:, :, j] = xp[(slice(None), slice(None), *window)]
    cols = cols.reshape(n, g, c // g, taps, math.prod(out))
    return cols.transpose(1, 0, 4, 2, 3).reshape(g, n * math.prod(out), (c // g) * taps)


# ------------------------------------------------------------------------------------------ weight layouts
def conv_weight_blocks(weight: np.ndarray, group: int = 1) -> np.ndarray:
    """Conv weight [O, C/g, *kernel] -> blocks [g, O/g, C/g * prod(kernel)] (a view where possible)."""
    weight = np.asarray(weight)
    if weight.ndim < 3 or weight.shape[0] % group:
        raise ValueError(f"conv weight of shape {weight.shape} does not split into {group} groups")
    return weight.reshape(group, weight.shape[0] // group, -1)


def blocks_to_conv_weight(blocks: np.ndarray, weight_shape: Sequence[int]) -> np.ndarray:
    """Inverse of conv_weight_blocks: output channel o of group j is row o of block j, so a plain reshape."""
    return np.asarray(blocks).reshape(tuple(weight_shape))


def matmul_weight_blocks(weight_kn: np.ndarray) -> np.ndarray:
    """MatMul weight [K, N] (y = x @ weight) -> one block [1, N, K] (W = weight.T).

    Also Gemm with transB = 0; with transB = 1 the Gemm weight already is [O, I] (use weight[None]).
    """
    weight_kn = np.asarray(weight_kn)
    if weight_kn.ndim != 2:
        raise ValueError(f"MatMul weight must be 2-D [K, N], got shape {weight_kn.shape}")
    return weight_kn.T[None]


def blocks_to_matmul_weight(blocks: np.ndarray) -> np.ndarray:
    """Inverse of matmul_weight_blocks: [1, N, K] -> [K, N]."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 3 or blocks.shape[0] != 1:
        raise ValueError(f"a MatMul weight is a single block [1, N, K], got shape {blocks.shape}")
    return np.ascontiguousarray(blocks[0].T)


def _as_blocks(w: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """[O, I] or [g, O_g, I_g] -> blocks, plus whether the input was 2-D (to hand results back alike)."""
    w = np.asarray(w)
    if w.ndim == 2:
        return w[None], True
    if w.ndim == 3:
        return w, False
    raise ValueError(f"{name} must be [O, I] or blocks [g, O_g, I_g], got shape {w.shape}")


def _broadcast_qparam(p: Any, blocks_shape: tuple[int, int, int], name: str) -> np.ndarray:
    """Scale / zero point -> float64 array broadcastable to blocks [g, O_g, I_g].

    A 1-D array of length O = g * O_g is per output channel (never broadcast along I, even when I == O);
    anything else must already broadcast to the blocks shape (a scalar is per tensor).
    """
    g, og, _ = blocks_shape
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim == 1 and arr.size == g * og:
        return arr.reshape(g, og, 1)
    if arr.ndim == 1 and arr.size != 1:
        raise ValueError(f"{name} has {arr.size} values, expected 1 or one per output channel ({g * og})")
    if arr.ndim > 3:
        raise ValueError(f"{name} of shape {arr.shape} has more dims than weight blocks {blocks_shape}")
    try:
        fits = np.broadcast_shapes(arr.shape, blocks_shape) == tuple(blocks_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {arr.shape} does not broadcast to weight blocks {blocks_shape}")
    return arr


def _check_grid(qmin: int, qmax: int) -> tuple[int, int]:
    if int(qmin) != qmin or int(qmax) != qmax or qmin >= qmax:
        raise ValueError(f"integer range must be qmin < qmax (integers), got [{qmin}, {qmax}]")
    return int(qmin), int(qmax)


def _qparams(
    w: np.ndarray, scale: Any, zero_point: Any, qmin: int, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    shape = w.shape
    s = _broadcast_qparam(scale, shape, "scale")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("scale must be finite and > 0")
    z = _broadcast_qparam(0.0 if zero_point is None else zero_point, shape, "zero_point")
    if np.any(z != np.round(z)) or np.any(z < qmin) or np.any(z > qmax):
        raise ValueError(f"zero point must be an integer inside [{qmin}, {qmax}]")
    return s, z


def nearest_codes(
    weight: np.ndarray, scale: Any, qmin: int, qmax: int, zero_point: Any = None
) -> np.ndarray:
    """Round-to-nearest (half to even, as QuantizeLinear) codes clip(rint(W/s) + z, qmin, qmax), int32."""
    qmin, qmax = _check_grid(qmin, qmax)
    wb, flat = _as_blocks(weight, "weight")
    s, z = _qparams(wb, scale, zero_point, qmin, qmax)
    codes = np.clip(np.rint(wb.astype(np.float64) / s) + z, qmin, qmax).astype(np.int32)
    return codes[0] if flat else codes

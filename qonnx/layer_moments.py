"""Layer reconstruction in closed moment form (AdaRound's loss): im2col, weight blocks, moments.

Every layer is flattened to y = W x with W [O, I]:
  * Conv: x is an im2col patch, I = C/g * prod(kernel), one row per (image, output position);
  * MatMul/Gemm: x is one row of the input (leading dims flattened); a MatMul weight [K, N] is W = weight.T.
A grouped conv is g independent blocks W_g [O/g, I_g] with their own moments, so all arrays here are
block-stacked as [g, O_g, I_g] (depthwise: [C, multiplier, k*k]) and each step is one batched matmul.

Moments, accumulated in float64 over streamed batches (M rows in all; x^ is the layer input in the
quantized model, x the one in the float model, d = x^ - x):
    G = (1/M) sum x^ x^T,   E = (1/M) sum d x^T,   c = (1/M) sum ||W d||^2 = tr(W H W^T),  H = (1/M) sum d d^T
With dW = W~ - W, the reconstruction loss of a candidate W~ (the bias cancels) and its gradient are
    L_rec(W~) = (1/M) sum ||W~ x^ - W x||^2 = tr(dW G dW^T) + 2 <dW, W E>_F + c
    dL_rec/dW~ = 2 (dW G + W E)
which is AIMET's "mean over rows of the squared output-error norm" exactly (so lambda = 0.01 keeps its
meaning), at O(O * I^2) per step whatever M is. Symmetric reconstruction (x^ = x) has E = 0 and c = 0.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Bound on the im2col buffers built per chunk by LayerMoments.add (the raw batch is split by images).
DEFAULT_CHUNK_BYTES = 256 << 20


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


# ------------------------------------------------------------------------------------------ moments
class LayerMoments:
    """Streamed float64 second moments of one layer's inputs, per group block.

    `add(x_hat, x)` takes raw layer inputs ([N, C, *spatial] for a conv, [..., I] for MatMul/Gemm) from the
    quantized model (x_hat) and the float model (x); pass x=None or the same object for symmetric
    reconstruction, which then costs one Gram product per batch and keeps no E.
    The constant c = tr(W H W^T) is accumulated as sum ||W d||^2 when the layer weight is known (the
    `for_conv` / `for_linear` constructors; O(M O I) per batch and no I x I buffer), else H itself is kept.
    """

    def __init__(
        self,
        groups: int,
        block_in: int,
        *,
        conv: ConvSpec | None = None,
        weight: np.ndarray | None = None,
        compute_dtype: type | np.dtype = np.float64,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if groups < 1 or block_in < 1:
            raise ValueError(f"groups and block_in must be >= 1, got {groups}, {block_in}")
        if conv is not None and (conv.group != groups or conv.block_in != block_in):
            raise ValueError(f"conv spec {conv} does not give {groups} blocks of {block_in} inputs")
        self.groups = int(groups)
        self.block_in = int(block_in)
        self.conv = conv
        self.compute_dtype = np.dtype(compute_dtype)
        self.chunk_bytes = int(chunk_bytes)
        self.count = 0
        shape = (self.groups, self.block_in, self.block_in)
        self._gram = np.zeros(shape, np.float64)
        self._cross: np.ndarray | None = None  # sum d x_hat^T, allocated on the first asymmetric batch
        self._dd: np.ndarray | None = None  # sum d d^T, only without a weight
        self._wd_sq = 0.0  # sum ||W d||^2, only with a weight
        self._weight: np.ndarray | None = None
        if weight is not None:
            wb, _ = _as_blocks(weight, "weight")
            if wb.shape[0] != self.groups or wb.shape[2] != self.block_in:
                raise ValueError(f"weight blocks {wb.shape} do not match {self.groups} blocks of {self.block_in}")
            self._weight = wb.astype(np.float64)

    # -- constructors
    @classmethod
    def for_conv(cls, weight: np.ndarray, spec: ConvSpec | None = None, **conv_attrs: Any) -> LayerMoments:
        """Moments of a Conv with weight [O, C/g, *kernel]; geometry as a spec or ConvSpec.from_weight kwargs.

        Keyword arguments compute_dtype and chunk_bytes go to the constructor.
        """
        kw = {k: conv_attrs.pop(k) for k in ("compute_dtype", "chunk_bytes") if k in conv_attrs}
        weight = np.asarray(weight)
        if spec is None:
            spec = ConvSpec.from_weight(weight.shape, **conv_attrs)
        elif conv_attrs:
            raise ValueError("give either a ConvSpec or conv attributes, not both")
        if spec.channels // spec.group != weight.shape[1] or spec.kernel_shape != weight.shape[2:]:
            raise ValueError(f"conv weight of shape {weight.shape} does not match {spec}")
        blocks = conv_weight_blocks(weight, spec.group)
        return cls(spec.group, spec.block_in, conv=spec, weight=blocks, **kw)

    @classmethod
    def for_linear(cls, weight_oi: np.ndarray, **kw: Any) -> LayerMoments:
        """Moments of y = x W^T (MatMul with W = weight.T, Gemm) from the weight in [O, I] layout."""
        w = np.asarray(weight_oi)
        if w.ndim != 2:
            raise ValueError(f"linear weight must be [O, I], got shape {w.shape}")
        return cls(1, w.shape[1], weight=w, **kw)

    @classmethod
    def from_arrays(
        cls, gram: np.ndarray, cross: np.ndarray | None = None, dd: np.ndarray | None = None, count: int = 1
    ) -> LayerMoments:
        """Moments given directly as means G, E (= mean d x_hat^T) and H ([I, I] or [g, I_g, I_g])."""
        gram = np.asarray(gram, np.float64)
        gram = gram[None] if gram.ndim == 2 else gram
        if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
            raise ValueError(f"gram must be [I, I] or [g, I_g, I_g], got shape {gram.shape}")
        m = cls(gram.shape[0], gram.shape[1])
        m.count = int(count)
        m._gram = gram * count
        for name, arr in (("cross", cross), ("dd", dd)):
            if arr is None:
                continue
            arr = np.asarray(arr, np.float64)
            arr = arr[None] if arr.ndim == 2 else arr
            if arr.shape != gram.shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {gram.shape}")
            setattr(m, f"_{name}", arr * count)
        if (m._cross is None) != (m._dd is None):
            raise ValueError("asymmetric moments need both cross (E) and dd (H)")
        return m

    # -- accumulation
    def rows(self, x: np.ndarray) -> np.ndarray:
        """Raw layer input -> its rows per block, [g, M, I_g] (im2col for a conv)."""
        x = np.asarray(x)
        if self.conv is not None:
            return im2col(x, self.conv)
        self._check_linear_input(x.shape)
        return x.reshape(1, -1, self.block_in)

    def _check_linear_input(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 1 or shape[-1] != self.block_in:
            raise ValueError(f"linear input must be [..., {self.block_in}], got shape {shape}")

    def _slices(self, shape: tuple[int, ...]) -> Iterator[slice]:
        """Slices of the leading axis (images of a conv input, rows of a [M, I] input) bounding im2col memory."""
        if self.conv is not None:
            spec = self.conv
            per = spec.channels * math.prod(spec.kernel_shape) * math.prod(spec.output_shape(shape[2:]))
        else:
            per = shape[-1]
        # Two buffers of the compute dtype live at once (the patches and their transposed copy).
        step = max(1, self.chunk_bytes // max(1, 2 * per * self.compute_dtype.itemsize))
        for start in range(0, shape[0], step):
            yield slice(start, min(shape[0], start + step))

    def add(self, x_hat: np.ndarray, x: np.ndarray | None = None) -> None:
        """Accumulate one batch; x_hat from the quantized model, x from the float model (None: same)."""
        symmetric = x is None or x is x_hat
        x_hat = np.asarray(x_hat)
        if not symmetric:
            x = np.asarray(x)
            if x.shape != x_hat.shape:
                raise ValueError(f"x_hat {x_hat.shape} and x {x.shape} must have the same shape")
        if self.conv is not None:
            im2col(x_hat[:0], self.conv)  # validates rank, channels and spatial size up front
        else:
            self._check_linear_input(x_hat.shape)
            x_hat = x_hat.reshape(-1, self.block_in)
            x = None if symmetric else np.asarray(x).reshape(-1, self.block_in)
        for sl in self._slices(x_hat.shape):
            xh = self.rows(x_hat[sl]).astype(self.compute_dtype, copy=False)
            self._add_gram(xh)
            if not symmetric:
                # d from the raw inputs in float64 (im2col is linear and pads with zeros, so patches of d are
                # patches of x_hat minus patches of x), never as the cancellation-prone G - C.
                d_raw = x_hat[sl].astype(np.float64) - x[sl].astype(np.float64)  # type: ignore[index]
                self._add_asym(xh, self.rows(d_raw).astype(self.compute_dtype, copy=False))
            self.count += xh.shape[1]

    def _add_gram(self, xh: np.ndarray) -> None:
        if self.groups == 1:
            # 2-D X^T X lets numpy use syrk (half the flops of a general product).
            self._gram[0] += xh[0].T @ xh[0]
        else:
            self._gram += np.matmul(xh.transpose(0, 2, 1), xh)

    def _add_asym(self, xh: np.ndarray, d: np.ndarray) -> None:
        if self._cross is None:
            self._cross = np.zeros_like(self._gram)
        self._cross += np.matmul(d.transpose(0, 2, 1), xh)
        if self._weight is not None:
            wd = np.matmul(d, self._weight.transpose(0, 2, 1).astype(self.compute_dtype, copy=False))
            self._wd_sq += float(np.sum(np.square(wd, dtype=np.float64)))
        else:
            if self._dd is None:
                self._dd = np.zeros_like(self._gram)
            self._dd += np.matmul(d.transpose(0, 2, 1), d)

    # -- results
    def _need_rows(self) -> None:
        if self.count == 0:
            raise ValueError("no rows were added to these moments")

    @property
    def symmetric(self) -> bool:
        """True when every batch so far had x_hat = x (then E = 0 and c = 0)."""
        return self._cross is None

    @property
    def gram(self) -> np.ndarray:
        """G = mean x_hat x_hat^T, [g, I_g, I_g] float64."""
        self._need_rows()
        return self._gram / self.count

    @property
    def cross(self) -> np.ndarray | None:
        """E = mean (x_hat - x) x_hat^T, [g, I_g, I_g] float64, or None when symmetric (E = 0)."""
        self._need_rows()
        return None if self._cross is None else self._cross / self.count

    def const_term(self, w: np.ndarray) -> float:
        """c = tr(W H W^T) = mean ||W d||^2 for the float weight blocks w (0 when symmetric)."""
        self._need_rows()
        wb, _ = _as_blocks(w, "w")
        self.check_blocks(wb, "w")
        if self._cross is None:
            return 0.0
        if self._weight is not None:
            # Accumulated with the constructor's weight; any other weight would silently get a wrong value.
            if wb.shape != self._weight.shape or not np.array_equal(wb.astype(np.float64), self._weight):
                raise ValueError("const_term was accumulated for a different weight than the one given")
            return self._wd_sq / self.count
        wb = wb.astype(np.float64)
        dd = self._dd / self.count  # type: ignore[operator]
        return float(np.sum(np.matmul(wb, dd) * wb))

    def check_blocks(self, wb: np.ndarray, name: str) -> None:
        if wb.ndim != 3 or wb.shape[0] != self.groups or wb.shape[2] != self.block_in:
            raise ValueError(
                f"{name} blocks {wb.shape} do not match the moments ({self.groups} blocks of {self.block_in} inputs)"
            )


# ------------------------------------------------------------------------------------------ loss
def _loss_blocks(w_tilde: Any, w: Any, moments: LayerMoments) -> tuple[np.ndarray, np.ndarray, bool]:
    wt, flat_t = _as_blocks(w_tilde, "w_tilde")
    wb, flat = _as_blocks(w, "w")
    if wt.shape != wb.shape or flat_t != flat:
        raise ValueError(f"w_tilde {np.shape(w_tilde)} and w {np.shape(w)} must have the same shape")
    moments.check_blocks(wb, "w")
    return wt.astype(np.float64), wb.astype(np.float64), flat


def row_losses(w_tilde: np.ndarray, w: np.ndarray, moments: LayerMoments) -> np.ndarray:
    """Each output row's share of L_rec without the constant: dw_o G dw_o^T + 2 dw_o . (W E)_o, blocks [g, O].
    Rows do not interact, so a per-row choice between codes is exact."""
    wt, wb, _ = _loss_blocks(w_tilde, w, moments)
    dw = wt - wb
    loss = np.sum(np.matmul(dw, moments.gram) * dw, axis=-1)
    cross = moments.cross
    if cross is not None:
        loss += 2.0 * np.sum(dw * np.matmul(wb, cross), axis=-1)
    return loss


def reconstruction_loss(w_tilde: np.ndarray, w: np.ndarray, moments: LayerMoments) -> float:
    """L_rec(W~) = tr(dW G dW^T) + 2 <dW, W E> + tr(W H W^T) = mean over rows of ||W~ x_hat - W x||^2."""
    return float(np.sum(row_losses(w_tilde, w, moments))) + moments.const_term(w)


def reconstruction_grad(w_tilde: np.ndarray, w: np.ndarray, moments: LayerMoments) -> np.ndarray:
    """dL_rec/dW~ = 2 (dW G + W E), in the layout of w_tilde."""
    wt, wb, flat = _loss_blocks(w_tilde, w, moments)
    grad = np.matmul(wt - wb, moments.gram)
    cross = moments.cross
    if cross is not None:
        grad += np.matmul(wb, cross)
    grad *= 2.0
    return grad[0] if flat else grad


# ------------------------------------------------------------------------------------------ optimizer

"""Layer reconstruction in closed moment form (AdaRound's loss), on the weight blocks of qonnx/rounding/layer_blocks.py.

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

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from qonnx.rounding.layer_blocks import ConvSpec, _as_blocks, conv_weight_blocks, im2col

log = logging.getLogger(__name__)

# Bound on the im2col buffers built per chunk by LayerMoments.add (the raw batch is split by images).
DEFAULT_CHUNK_BYTES = 256 << 20


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

"""A small numpy interpreter for integer ONNX graphs: the bit-exact reference for int-only exports.

Every op between the input QuantizeLinear and the output DequantizeLinear is
evaluated with int64 arithmetic and checked against the range of its ONNX
output type: where ORT would silently wrap an int32 (or int64) value, the
reference raises `IntegerOverflowError` naming the node. Float appears only in
QuantizeLinear's input and DequantizeLinear's output, both computed as ORT's
CPU kernels do (x / scale in float32, round half to even, saturate;
(q - zp) converted to float32 times scale).

`integer_check` runs ORT and the reference on the same samples and reports, per
output, the fraction of exactly equal elements and the largest difference in
LSBs of the output's dequantization scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, cast

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qonnx.errors import QonnxError, UnsupportedModelError
from qonnx.runtime.ort import make_session

log = logging.getLogger(__name__)


class IntegerOverflowError(QonnxError, OverflowError):
    """An integer op's exact result does not fit its ONNX output type (ORT would wrap it)."""


_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64)


def _is_int(x: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(x).dtype, np.integer)


def _wide(x: np.ndarray) -> np.ndarray:
    if not _is_int(x):
        raise UnsupportedModelError(f"float operand of dtype {np.asarray(x).dtype} in an integer op")
    return np.asarray(x).astype(np.int64)


def _fit(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast exact int64 results to the output type, refusing values the type cannot hold."""
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise IntegerOverflowError(f"value range [{values.min()}, {values.max()}] does not fit {np.dtype(dtype).name}")
    return values.astype(dtype)


def _magnitude(x: np.ndarray) -> int:
    return int(np.max(np.abs(x.astype(np.int64)))) if x.size else 0


def _check_int64(bound: int) -> None:
    if bound >= 2**63:
        raise IntegerOverflowError(f"intermediate magnitude up to {bound} overflows int64")


# ----------------------------------------------------------------------- element-wise
def _add(a, b, **_):
    _check_int64(_magnitude(a) + _magnitude(b))
    return _fit(_wide(a) + _wide(b), np.result_type(a, b))


def _sub(a, b, **_):
    _check_int64(_magnitude(a) + _magnitude(b))
    return _fit(_wide(a) - _wide(b), np.result_type(a, b))


def _mul(a, b, **_):
    _check_int64(_magnitude(a) * _magnitude(b))
    return _fit(_wide(a) * _wide(b), np.result_type(a, b))


def _div(a, b, **_):
    """Integer division truncating toward zero (C semantics, as ORT's integer Div)."""
    a, b64 = _wide(a), _wide(b)
    if np.any(b64 == 0):
        raise UnsupportedModelError("integer division by zero")
    q = np.abs(a) // np.abs(b64)
    return _fit(np.where((a < 0) != (b64 < 0), -q, q), np.result_type(a, b))


def _clip(x, lo=None, hi=None, **_):
    out = _wide(x)
    if lo is not None:
        out = np.maximum(out, _wide(lo))
    if hi is not None:
        out = np.minimum(out, _wide(hi))
    return _fit(out, x.dtype)


def _cast(x, *, to: int, **_):
    dtype = helper.tensor_dtype_to_np_dtype(to)
    if not (_is_int(x) and np.issubdtype(dtype, np.integer)):
        raise UnsupportedModelError(f"Cast {np.asarray(x).dtype} -> {np.dtype(dtype).name} is not integer-only")
    return _fit(_wide(x), dtype)


# ----------------------------------------------------------------------- (de)quantization
def _axis_shape(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if param.ndim == 0:
        return param
    if param.ndim != 1:
        raise UnsupportedModelError("blocked quantization parameters are not supported by the reference")
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


def _quantize_linear(x, scale, zero_point=None, *, axis: int = 1, **_):
    zp = zero_point if zero_point is not None else np.zeros((), np.uint8)
    s = _axis_shape(np.asarray(scale, np.float32), x.ndim, axis)
    z = _axis_shape(np.asarray(zp), x.ndim, axis).astype(np.float32)
    info = np.iinfo(zp.dtype)
    # MLAS: clamp x / s to [qmin - zp, qmax - zp] in float32, round half to even, add zp.
    q = np.rint(np.clip(np.asarray(x, np.float32) / s, np.float32(info.min) - z, np.float32(info.max) - z))
    return (q.astype(np.int64) + _axis_shape(np.asarray(zp), x.ndim, axis).astype(np.int64)).astype(zp.dtype)


def _dequantize_linear(x, scale, zero_point=None, *, axis: int = 1, **_):
    zp = zero_point if zero_point is not None else np.zeros((), x.dtype)
    s = _axis_shape(np.asarray(scale, np.float32), x.ndim, axis)
    centred = _wide(x) - _axis_shape(np.asarray(zp), x.ndim, axis).astype(np.int64)
    return (centred.astype(np.float32) * s).astype(np.float32)


# ----------------------------------------------------------------------- linear algebra
def _matmul_integer(a, b, a_zero_point=None, b_zero_point=None, **_):
    a64 = _wide(a) - (_wide(a_zero_point) if a_zero_point is not None else 0)
    bz = _wide(b_zero_point) if b_zero_point is not None else np.int64(0)
    b64 = _wide(b) - (bz.reshape(1, -1) if bz.ndim == 1 else bz)
    _check_int64(_magnitude(a64) * _magnitude(b64) * max(a64.shape[-1], 1))
    return _fit(np.matmul(a64, b64), np.int32)


def _conv_pads(attrs: dict, spatial: tuple[int, ...], kernel: list[int], strides: list[int],
               dilations: list[int]) -> list[int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    n = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * n)))
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int],
             fill: int) -> np.ndarray:
    """(N, C, *out_spatial, *kernel) view of 2-D windows of a padded NCHW tensor."""
    if x.ndim != 4:
        raise UnsupportedModelError(f"the reference handles 2-D convolutions and pools only (input rank {x.ndim})")
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def _spatial_attrs(attrs: dict, kernel: list[int], spatial: tuple[int, ...]):
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    return strides, dilations, _conv_pads(attrs, spatial, kernel, strides, dilations)


def _conv_integer(x, w, x_zero_point=None, w_zero_point=None, **attrs):
    group = int(attrs.get("group", 1))
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides, dilations, pads = _spatial_attrs(attrs, kernel, x.shape[2:])
    xz = int(_wide(x_zero_point).reshape(-1)[0]) if x_zero_point is not None else 0
    wz = _wide(w_zero_point) if w_zero_point is not None else np.int64(0)
    if wz.ndim == 1:
        wz = wz.reshape(-1, 1, 1, 1)
    x64, w64 = _wide(x) - xz, _wide(w) - wz
    win = _windows(x64, kernel, strides, dilations, pads, fill=0)  # padding holds x's zero point
    n, c = x.shape[:2]
    m = w.shape[0]
    ho, wo = win.shape[2:4]
    _check_int64(_magnitude(x64) * _magnitude(w64) * int(np.prod(w.shape[1:])))
    win = win.reshape(n, group, c // group, ho, wo, *kernel)
    weights = w64.reshape(group, m // group, c // group, *kernel)
    if c // group == 1 and m // group == 1:  # depthwise: an element-wise product per channel
        out = np.einsum("ngxhwij,gxij->nghw", win, weights[:, 0:1, 0], optimize=False).reshape(n, m, ho, wo)
    else:
        patches = win.transpose(0, 1, 3, 4, 2, 5, 6).reshape(n, group, ho * wo, -1)
        flat = weights.reshape(group, m // group, -1).transpose(0, 2, 1)
        out = np.matmul(patches, flat[None]).transpose(0, 1, 3, 2).reshape(n, m, ho, wo)
    return _fit(out, np.int32)


def _max_pool(x, **attrs):
    kernel = list(attrs["kernel_shape"])
    if int(attrs.get("ceil_mode", 0)):
        raise UnsupportedModelError("MaxPool with ceil_mode=1 is not supported by the reference")
    strides, dilations, pads = _spatial_attrs(attrs, kernel, x.shape[2:])
    info = np.iinfo(x.dtype) if _is_int(x) else None
    if info is None:
        raise UnsupportedModelError("float MaxPool in an integer graph")
    return _windows(x, kernel, strides, dilations, pads, fill=info.min).max(axis=(-2, -1))


def _reduce_sum(x, axes=None, *, keepdims: int = 1, noop_with_empty_axes: int = 0, **attrs):
    axes = attrs.get("axes", axes)
    if axes is None or len(axes) == 0:
        if noop_with_empty_axes:
            return x
        axes = tuple(range(x.ndim))
    total = _wide(x).sum(axis=tuple(int(a) for a in np.asarray(axes).reshape(-1)), keepdims=bool(keepdims))
    return _fit(total, x.dtype)


# ----------------------------------------------------------------------- data movement
def _reshape(x, shape, *, allowzero: int = 0, **_):
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(x, *, axis: int = 1, **_):
    axis = axis % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _axes(axes, attrs) -> list[int] | None:
    values = attrs.get("axes", axes)
    return None if values is None else [int(a) for a in np.asarray(values).reshape(-1)]


def _squeeze(x, axes=None, **attrs):
    ax = _axes(axes, attrs)
    return np.squeeze(x, axis=tuple(ax)) if ax is not None else np.squeeze(x)


def _unsqueeze(x, axes=None, **attrs):
    out = x
    rank = x.ndim + len(_axes(axes, attrs))
    for a in sorted(a % rank for a in _axes(axes, attrs)):
        out = np.expand_dims(out, a)
    return out


def _gather(data, indices, *, axis: int = 0, **_):
    idx = _wide(indices)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take(data, idx, axis=axis)


def _slice(x, starts, ends, axes=None, steps=None, **_):
    index = [slice(None)] * x.ndim
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _shape(x, *, start: int = 0, end: int | None = None, **_):
    return np.asarray(x.shape[start:end], np.int64)


OpFn = Callable[..., Any]
OPS: dict[str, OpFn] = {
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "ConvInteger": _conv_integer, "MatMulInteger": _matmul_integer,
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Clip": _clip, "Cast": _cast,
    "ReduceSum": _reduce_sum, "MaxPool": _max_pool, "Gather": _gather,
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": lambda x, *, perm=None, **_: np.transpose(x, perm),
    "Concat": lambda *xs, axis, **_: np.concatenate(xs, axis=axis),
    "Identity": lambda x, **_: x, "Slice": _slice, "Shape": _shape,
}


class IntegerReference:
    """Evaluates an integer ONNX graph (the ops in `OPS`) exactly, in numpy."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        unsupported = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in self.graph.node
                              if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unsupported:
            raise UnsupportedModelError(f"the integer reference does not implement {', '.join(unsupported)} "
                                        "(it checks integer-only exports: qonnx optimize --format int-only)")
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in self.graph.node]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self.constants)
        env.update(feed)
        for node, attrs in zip(self.graph.node, self.attrs, strict=True):
            args = [env[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            try:
                result = OPS[node.op_type](*args, **attrs)
            except (IntegerOverflowError, UnsupportedModelError) as e:
                raise type(e)(f"{node.op_type} '{node.name}': {e}") from e
            outs = result if isinstance(result, tuple) else (result,)
            env.update(zip(node.output, outs))
        return {o.name: env[o.name] for o in self.graph.output}


# ----------------------------------------------------------------------- ORT versus the reference
@dataclass
class OutputCheck:
    name: str
    elements: int = 0
    exact: int = 0
    max_lsb: float | None = 0.0  # None when the output has no dequantization scale
    max_abs: float = 0.0

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.elements if self.elements else 1.0


@dataclass
class IntegerCheck:
    samples: int = 0
    outputs: dict[str, OutputCheck] = field(default_factory=dict)

    @property
    def exact_fraction(self) -> float:
        elements = sum(o.elements for o in self.outputs.values())
        return sum(o.exact for o in self.outputs.values()) / elements if elements else 1.0

    @property
    def max_lsb(self) -> float | None:
        values = [o.max_lsb for o in self.outputs.values()]
        # max() is reached only when no output lacks a scale, so every value is a float there
        return None if any(v is None for v in values) else max(cast(list[float], values), default=0.0)

    def describe(self) -> str:
        lines = [f"integer check on {self.samples} samples: {100 * self.exact_fraction:.4f}% of output elements "
                 f"equal the integer reference" + (f", max difference {self.max_lsb:g} LSB"
                                                   if self.max_lsb is not None else "")]
        for o in self.outputs.values():
            lsb = f"{o.max_lsb:g} LSB" if o.max_lsb is not None else f"{o.max_abs:g} (no output scale)"
            lines.append(f"  {o.name}: {o.exact}/{o.elements} exact, max difference {lsb}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "exact_fraction": self.exact_fraction, "max_lsb": self.max_lsb,
                "outputs": {k: {"elements": v.elements, "exact": v.exact, "max_lsb": v.max_lsb, "max_abs": v.max_abs}
                            for k, v in self.outputs.items()}}


def output_scales(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    """(scale, axis) of the DequantizeLinear that produces each graph output, where one does."""
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs and node.input[1] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            found[node.output[0]] = (numpy_helper.to_array(inits[node.input[1]]), axis)
    return found


def integer_check(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                  threads: int | None = 1) -> IntegerCheck:
    """Run ORT (all optimizations) and the reference on each feed and compare the outputs."""
    reference = IntegerReference(model)
    session = make_session(model, threads=threads)
    names = [o.name for o in session.get_outputs()]
    scales = output_scales(model)
    report = IntegerCheck(outputs={n: OutputCheck(n, max_lsb=0.0 if n in scales else None) for n in names})
    for feed in feeds:
        got = dict(zip(names, session.run(names, feed), strict=True))
        want = reference.run(feed)
        for name in names:
            a, b = np.asarray(got[name]), np.asarray(want[name])
            if a.shape != b.shape:
                raise QonnxError(f"output '{name}': ORT gives shape {a.shape}, the reference {b.shape}")
            check = report.outputs[name]
            check.elements += a.size
            check.exact += int(np.count_nonzero(a == b))
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            check.max_abs = max(check.max_abs, float(diff.max()) if diff.size else 0.0)
            if name in scales and diff.size:
                scale, axis = scales[name]
                s = _axis_shape(np.asarray(scale, np.float64), a.ndim, axis) if scale.ndim else scale
                assert check.max_lsb is not None  # outputs with a scale start at 0.0 (report above)
                check.max_lsb = max(check.max_lsb, float(np.round(np.max(diff / s), 3)))  # codes: whole LSBs
        report.samples += len(next(iter(feed.values()))) if feed else 0
    return report

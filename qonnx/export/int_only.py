"""Integer-only exporter: every requantization is a dyadic multiply and shift in integer ONNX ops.

Why integer ops rather than QLinear* with chosen scales: ORT's QLinearConv,
QLinearMatMul and QGemm requantize in float32 (MLAS multiplies the int32
accumulator, converted to float, by s_x*s_w/s_y computed in float). A float32
multiplier has a 24-bit mantissa, so a 31-bit dyadic b/2^c cannot even be
written down, and acc*M is rounded to 24 bits before the final rounding; making
that exact would need power-of-two activation scales, short weight-scale
mantissas and accumulators below 2^24 / 2^bits(b). Integer kernels are exact by
construction instead:

    x (uint8) -ConvInteger/MatMulInteger-> int32 acc -Add(int32 bias)-> acc
    -Cast(int64) -Mul(b) -Add(2^(c-1) + 2^62) -Div(2^c) -Add(z_y - 2^(62-c)) -Clip -Cast(uint8)

The 2^62 offset makes the numerator non-negative, so ONNX's truncating integer
Div is a floor: y = floor((acc*b + 2^(c-1)) / 2^c) + z_y, i.e. round half up of
acc*M (`qonnx.dyadic.requantize`). Residual adds requantize each branch with its
own mantissa over one shared shift (one rounding); global average pooling is a
ReduceSum with the 1/N folded into the multiplier; unary activations with
quantized input and output are 256-entry lookup tables (Gather). No float
tensor exists between the input QuantizeLinear and the output
DequantizeLinear: a node without an integer form there is an ExportError.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import onnx

from qonnx.core.ir import Model
from qonnx.core.ops import ABSORBED_ACTIVATIONS, INT_PASS_THROUGH_OPS, LOOKUP_OPS
from qonnx.errors import ExportError
from qonnx.export.dyadic import OFFSET_LOG2, Dyadic, common_shift, dyadic
from qonnx.export.lowering import Lowering, QValue, all_quantized

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
OFFSET = 1 << OFFSET_LOG2
# Unary ops lowered to a 256-entry table: f(real value) for every input code.
LUT_FUNCTIONS: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {
    "Sigmoid": lambda node, v: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": lambda node, v: np.tanh(v),
    "LeakyRelu": lambda node, v: np.where(v >= 0, v, float(node.attrs.get("alpha", 0.01)) * v),
    "HardSigmoid": lambda node, v: np.clip(float(node.attrs.get("alpha", 0.2)) * v
                                           + float(node.attrs.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": lambda node, v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
}


def _channel_shape(channels: int, axis: int, rank: int) -> list[int]:
    """Shape that broadcasts a per-channel constant along `axis` of a rank-`rank` tensor."""
    return [channels] + [1] * (rank - 1 - axis % rank)


class IntLowering(Lowering):
    format_name = "int-only"

    def __init__(self, model: Model):
        super().__init__(model)
        self.from_int: dict[str, str] = {}  # float tensor -> the node that left the integer domain
        self.stats = {"requantizations": 0, "mantissa_bits_min": 31}

    HANDLERS = {
        "Conv": "conv", "Gemm": "gemm", "MatMul": "matmul", "Add": "add", "Mul": "mul",
        "Concat": "concat", "GlobalAveragePool": "global_pool", "AveragePool": "average_pool",
        "Relu": "clip", "Clip": "clip",
        **{op: "pass_through" for op in INT_PASS_THROUGH_OPS},
        **{op: "lut" for op in LOOKUP_OPS},
    }

    # ------------------------------------------------------------- the float-region rule
    def floating(self, tensor) -> None:
        had = self.has_float(tensor)
        super().floating(tensor)
        if not had:
            self.from_int.setdefault(tensor.name, "DequantizeLinear")

    def dequantized(self, tensor) -> None:
        self.from_int.setdefault(tensor.name, "DequantizeLinear")

    def after_float(self, node) -> None:
        culprit = next((self.from_int[t.name] for t in node.inputs if t.name in self.from_int), None)
        if culprit is not None:
            for out in node.outputs:
                self.from_int[out.name] = culprit if culprit != "DequantizeLinear" else f"{node.op} '{node.name}'"

    def before_quantize(self, tensor) -> None:
        if tensor.name in self.from_int:
            raise ExportError(f"integer-only export: '{tensor.name}' would be computed in float from integer "
                              f"values ({self.from_int[tensor.name]} has no integer form here); "
                              "export as qop or qdq, or keep that part of the model float")

    # ------------------------------------------------------------- building blocks
    def node(self, op: str, inputs: list, dtype, hint: str, attrs: dict | None = None, shape=None):
        out = self.m.make_variable(hint, dtype=dtype, shape=shape)
        self.m.add_node(op, inputs, [out], attrs or {}, name=hint)
        return out

    def cast(self, tensor, to: int, np_dtype, hint: str):
        return self.node("Cast", [tensor], np_dtype, hint, {"to": to}, tensor.shape)

    def requant(self, acc, base: str, d: Dyadic, rank: int, axis: int | None, y: QValue, bounds: tuple[int, int],
                fold: np.ndarray | int = 0, premultiplied: bool = False) -> None:
        """acc (int32/int64) -> y.tensor: clamp(floor((acc*b + fold + 2^(c-1)) / 2^c) + z_y, bounds), uint8.

        `fold` is an int64 constant added to acc*b (zero-point corrections); with `premultiplied`
        acc already holds the sum of mantissa products (residual adds).
        """
        b, c = d.mantissa, d.shift
        shape = _channel_shape(b.size, axis, rank) if (axis is not None and b.ndim == 1) else []
        b, c = b.reshape(shape), c.reshape(shape)
        fold_const = np.asarray(fold, np.int64).reshape(shape) if np.ndim(fold) else np.int64(fold)
        zp = int(y.zero_point)
        if acc.dtype != np.int64:
            acc = self.cast(acc, onnx.TensorProto.INT64, np.int64, base + "_int64")
        if not premultiplied:
            acc = self.node("Mul", [acc, self.const(base + "_mantissa", b)], np.int64, base + "_scaled", shape=acc.shape)
        offset = fold_const + np.left_shift(np.int64(1), c - 1) + np.int64(OFFSET)
        acc = self.node("Add", [acc, self.const(base + "_round", offset.astype(np.int64))], np.int64,
                        base + "_rounded", shape=acc.shape)
        acc = self.node("Div", [acc, self.const(base + "_shift", np.left_shift(np.int64(1), c))], np.int64,
                        base + "_shifted", shape=acc.shape)
        restore = np.int64(zp) - np.left_shift(np.int64(1), OFFSET_LOG2 - c)
        acc = self.node("Add", [acc, self.const(base + "_zero_point", restore.astype(np.int64))], np.int64,
                        base + "_offset", shape=acc.shape)
        acc = self.node("Clip", [acc, self.const(base + "_lo", np.int64(bounds[0])),
                                 self.const(base + "_hi", np.int64(bounds[1]))], np.int64, base + "_clipped",
                        shape=acc.shape)
        self.m.add_node("Cast", [acc], [y.tensor], {"to": onnx.TensorProto.UINT8}, name=base + "_requantized")
        self.stats["requantizations"] += 1
        if not premultiplied and b.size:
            self.stats["mantissa_bits_min"] = min(self.stats["mantissa_bits_min"],
                                                  min(int(v).bit_length() for v in b.reshape(-1)))

    def bounds(self, act, y: QValue) -> tuple[int, int]:
        """Output code range: the type range, narrowed by an absorbed Relu/Clip (Q is monotone)."""
        lo, hi = y.qmin, y.qmax
        if act is not None:
            bounds = self.m.clip_bounds(act)
            assert bounds is not None  # callers pass only activations whose bounds are constant (checked first)
            s, zp = float(y.scale), int(y.zero_point)
            if bounds[0] > -np.inf:
                lo = max(lo, int(np.rint(bounds[0] / s)) + zp)
            if bounds[1] < np.inf:
                hi = min(hi, int(np.rint(bounds[1] / s)) + zp)
            if lo > hi:
                raise ExportError(f"'{act.name}': its bounds {bounds} are outside the grid of its output")
        return lo, hi

    def layer_output(self, node, layer_output: str | None):
        """(activation or None, tensor, QValue or None) for a layer output; activation bounds become the clamp."""
        found = self.absorbed(node, layer_output)
        if found is None:
            return None
        act, tensor = found
        if act is not None and self.m.clip_bounds(act) is None:
            return None
        return act, tensor, self.entry_value(tensor)

    def finish(self) -> None:
        if self.table.dynamic:
            raise ExportError(f"integer-only export: MatMul '{sorted(self.table.dynamic)[0]}' is quantized per run "
                              "(dynamic); that needs float scales at run time (protect{fallback=float,"
                              "dynamic_sqnr=0} keeps static ranges, or float below min_sqnr, instead)")

    def accumulate_out(self, node, act, tensor, acc, base: str, m_values: np.ndarray, bound: np.ndarray,
                       rank: int, axis: int, x: QValue, w_scale: np.ndarray) -> bool:
        """Finish a layer: requantize the int32 accumulator, or leave it int32 for an output DequantizeLinear."""
        y = self.entry_value(tensor)
        if np.any(bound > INT32_MAX):
            raise ExportError(f"integer-only export: the int32 accumulator of '{node.name}' can reach "
                              f"{int(np.max(bound))} > 2^31-1 (weights x activations x reduction size + bias)")
        if y is not None:
            d = dyadic(m_values, acc_bound=bound)
            self.requant(acc, base, d, rank, axis if m_values.ndim else None, y, self.bounds(act, y))
        else:  # int32 accumulator at scale s_x * s_w, dequantized only where a float consumer or output reads it
            if act is not None:
                return False
            scale = (np.float32(x.scale) * w_scale).astype(np.float32)
            y = QValue(acc, scale.reshape(-1) if scale.ndim else scale.reshape(()),
                       np.zeros(scale.shape, np.int32).reshape(-1) if scale.ndim else np.int32(0),
                       axis % rank if scale.ndim else None)
        self.remove(node)
        if act is not None:
            self.remove(act)
        self.bind(tensor, y)
        return True

    def multipliers(self, x: QValue, w_scale: np.ndarray | np.floating, y_tensor) -> np.ndarray:
        y = self.entry_value(y_tensor)
        s_y = float(y.scale) if y is not None else 1.0
        return np.float64(x.scale) * np.asarray(w_scale, np.float64) / s_y

    @staticmethod
    def input_span(x: QValue) -> int:
        """Largest |q - z| of an 8-bit input."""
        zp = int(x.zero_point)
        return max(zp - x.qmin, x.qmax - zp)

    # ------------------------------------------------------------- layers
    def weights(self, node, x: QValue):
        weight = self.layer_weight(node)
        if weight is None:
            return None
        codes, entry = weight
        if np.any(np.asarray(entry.zero_point) != 0):
            raise ExportError(f"integer-only export: weight '{node.inputs[1].name}' has a non-zero zero point "
                              "(symmetric weights only)")
        return codes, np.asarray(entry.scale, np.float32), entry

    def conv(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        layer = self.table.layers.get(node.name)
        found = self.layer_output(node, layer.output) if layer is not None else None
        weights = self.weights(node, x) if x is not None else None
        if x is None or found is None or weights is None:
            return False
        act, tensor, _ = found
        codes, w_scale, _ = weights
        channels, rank, base = codes.shape[0], codes.ndim, node.name
        x_scale, x_zp = self.params(x)
        acc = self.node("ConvInteger", [x.tensor, self.const(node.inputs[1].name + "_quantized", codes), x_zp],
                        np.int32, base + "_acc", dict(node.attrs))
        bias = self.layer_bias(node)
        reach = self.input_span(x) * np.abs(codes.astype(np.int64)).reshape(channels, -1).sum(axis=1)
        if bias is not None:
            acc = self.node("Add", [acc, self.const(node.inputs[2].name + "_quantized",
                                                    bias.reshape(_channel_shape(channels, 1, rank)))],
                            np.int32, base + "_acc_bias")
            reach = reach + np.abs(bias.astype(np.int64))
        m_values = np.broadcast_to(self.multipliers(x, w_scale, tensor), (channels,))
        return self.accumulate_out(node, act, tensor, acc, base, m_values, reach, rank, 1, x,
                                   np.broadcast_to(w_scale, (channels,)))

    def gemm(self, node) -> bool:
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1)) != 1 \
                or float(node.attrs.get("beta", 1)) != 1:
            return False
        x = self.quantized(node.inputs[0])
        layer = self.table.layers.get(node.name)
        weights = self.weights(node, x) if x is not None else None
        found = self.layer_output(node, layer.output) if layer is not None else None
        if x is None or weights is None or found is None:
            return False
        codes, w_scale, _ = weights
        if int(node.attrs.get("transB", 0)):
            codes = np.ascontiguousarray(codes.T)  # MatMulInteger wants B as [K, N]
        return self.matmul_layer(node, x, codes, w_scale, found, self.layer_bias(node))

    def matmul(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        layer = self.table.layers.get(node.name)
        if x is None or layer is None:
            return False
        found = self.layer_output(node, layer.output)
        if found is None:
            return False
        if layer.weight is None:  # activation x activation
            b = self.quantized(node.inputs[1])
            k = node.inputs[0].shape[-1] if node.inputs[0].shape else None
            if b is None or not isinstance(k, int):
                return False
            act, tensor, _ = found
            base = node.name
            acc = self.node("MatMulInteger", [x.tensor, b.tensor, self.params(x)[1], self.params(b)[1]], np.int32,
                            base + "_acc")
            reach = np.asarray(k * self.input_span(x) * self.input_span(b), np.int64)
            rank = len(node.outputs[0].shape) if node.outputs[0].shape else 2
            return self.accumulate_out(node, act, tensor, acc, base, self.multipliers(x, np.float32(b.scale), tensor),
                                       reach, rank, -1, x, np.asarray(b.scale, np.float32))
        weights = self.weights(node, x)
        if weights is None or weights[0].ndim != 2:
            return False
        return self.matmul_layer(node, x, weights[0], weights[1], found, None)

    def matmul_layer(self, node, x: QValue, codes: np.ndarray, w_scale: np.ndarray, found, bias) -> bool:
        act, tensor, _ = found
        channels, base = codes.shape[1], node.name
        rank = len(node.outputs[0].shape) if node.outputs[0].shape else 2
        acc = self.node("MatMulInteger", [x.tensor, self.const(node.inputs[1].name + "_quantized", codes),
                                          self.params(x)[1]], np.int32, base + "_acc")
        reach = self.input_span(x) * np.abs(codes.astype(np.int64)).sum(axis=0)
        if bias is not None:
            acc = self.node("Add", [acc, self.const(node.inputs[2].name + "_quantized", bias)], np.int32,
                            base + "_acc_bias")
            reach = reach + np.abs(bias.astype(np.int64))
        w_scale = np.broadcast_to(w_scale, (channels,))
        return self.accumulate_out(node, act, tensor, acc, base, self.multipliers(x, w_scale, tensor), reach,
                                   rank, -1, x, w_scale)

    # ------------------------------------------------------------- element-wise
    def fused_output(self, node):
        """(activation or None, tensor) that a requantizing node writes: through a lone Relu/Clip when quantized."""
        out = node.outputs[0]
        consumers = self.m.consumers(out)
        if len(consumers) == 1 and consumers[0].op in ABSORBED_ACTIVATIONS and not self.m.is_graph_output(out) \
                and self.m.clip_bounds(consumers[0]) is not None and self.entry_value(consumers[0].outputs[0]):
            return consumers[0], consumers[0].outputs[0]
        return None, out

    def done(self, nodes: list, tensor, y: QValue) -> bool:
        for n in nodes:
            if n is not None:
                self.remove(n)
        self.bind(tensor, y)
        return True

    def widen(self, qv: QValue, base: str):
        return self.cast(qv.tensor, onnx.TensorProto.INT64, np.int64, base)

    def add(self, node) -> bool:
        inputs = [t for t in node.inputs if t.name]
        if len(inputs) != 2:
            return False
        xs = [self.quantized(t) for t in inputs]
        act, tensor = self.fused_output(node)
        y = self.entry_value(tensor)
        if y is None or not all_quantized(xs):
            return False
        base = node.name
        mantissas, c = common_shift([float(x.scale) / float(y.scale) for x in xs],
                                    acc_bound=max(self.input_span(x) for x in xs))
        terms = []
        for i, (x, b) in enumerate(zip(xs, mantissas, strict=True)):
            wide = self.widen(x, f"{base}_in{i}_int64")
            terms.append(self.node("Mul", [wide, self.const(f"{base}_in{i}_mantissa", np.int64(b))], np.int64,
                                   f"{base}_in{i}_scaled"))
        total = self.node("Add", terms, np.int64, base + "_sum")
        fold = -sum(int(b) * int(x.zero_point) for x, b in zip(xs, mantissas, strict=True))
        d = Dyadic(np.asarray(1, np.int64), np.asarray(c, np.int64))
        self.requant(total, base, d, 0, None, y, self.bounds(act, y), fold=fold, premultiplied=True)
        return self.done([node, act], tensor, y)

    def mul(self, node) -> bool:
        inputs = [t for t in node.inputs if t.name]
        xs = [self.quantized(t) for t in inputs]
        act, tensor = self.fused_output(node)
        y = self.entry_value(tensor)
        if len(inputs) != 2 or y is None or not all_quantized(xs):
            return False
        base = node.name
        centred = []
        for i, x in enumerate(xs):
            wide = self.cast(x.tensor, onnx.TensorProto.INT32, np.int32, f"{base}_in{i}_int32")
            centred.append(self.node("Sub", [wide, self.const(f"{base}_in{i}_zp", np.int32(x.zero_point))],
                                     np.int32, f"{base}_in{i}_centred"))
        acc = self.node("Mul", centred, np.int32, base + "_product")
        m_value = np.float64(xs[0].scale) * np.float64(xs[1].scale) / np.float64(y.scale)
        bound = self.input_span(xs[0]) * self.input_span(xs[1])
        self.requant(acc, base, dyadic(m_value, acc_bound=bound), 0, None, y, self.bounds(act, y))
        return self.done([node, act], tensor, y)

    def rescale(self, x: QValue, y: QValue, base: str, bounds: tuple[int, int]) -> None:
        """y = clamp(round((q_x - z_x) * s_x / s_y) + z_y): one tensor onto another grid."""
        b = dyadic(np.float64(x.scale) / np.float64(y.scale), acc_bound=self.input_span(x))
        fold = -int(b.mantissa) * int(x.zero_point)
        self.requant(self.widen(x, base + "_int64"), base, b, 0, None, y, bounds, fold=fold)

    def concat(self, node) -> bool:
        xs = [self.quantized(t) for t in node.inputs]
        y = self.entry_value(node.outputs[0])
        if y is None or not all_quantized(xs):
            return False
        parts = []
        for i, x in enumerate(xs):
            if x.same_params(y):
                parts.append(x.tensor)
                continue
            part = self.new_value(f"{node.name}_in{i}_rescaled", np.uint8, None, y.scale, y.zero_point)
            self.rescale(x, part, f"{node.name}_in{i}", (y.qmin, y.qmax))
            parts.append(part.tensor)
        self.m.add_node("Concat", parts, [y.tensor], {"axis": int(node.attrs["axis"])}, name=node.name)
        return self.done([node], node.outputs[0], y)

    def clip(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        y = self.entry_value(node.outputs[0])
        if x is None or self.m.clip_bounds(node) is None:
            return False
        if y is None:
            y = self.new_value(node.outputs[0].name + "_quantized", np.uint8, node.outputs[0].shape, x.scale,
                               x.zero_point)
        self.rescale(x, y, node.name, self.bounds(node, y))
        return self.done([node], node.outputs[0], y)

    def lut(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        y = self.entry_value(node.outputs[0])
        if x is None or y is None:
            return False
        codes = np.arange(x.qmin, x.qmax + 1, dtype=np.int64)
        real = (codes - int(x.zero_point)).astype(np.float64) * float(x.scale)
        value = LUT_FUNCTIONS[node.op](node, real)
        table = np.clip(np.rint(value / float(y.scale)) + int(y.zero_point), y.qmin, y.qmax).astype(y.dtype)
        index = self.cast(x.tensor, onnx.TensorProto.INT32, np.int32, node.name + "_index")
        self.m.add_node("Gather", [self.const(node.name + "_table", table), index], [y.tensor], {"axis": 0},
                        name=node.name)
        return self.done([node], node.outputs[0], y)

    # ------------------------------------------------------------- pooling
    def global_pool(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        y = self.entry_value(node.outputs[0])
        shape = node.inputs[0].shape
        if x is None or y is None or not shape or not all(isinstance(d, int) for d in shape[2:]):
            return False
        count = int(np.prod(shape[2:]))
        base = node.name
        wide = self.cast(x.tensor, onnx.TensorProto.INT32, np.int32, base + "_int32")
        total = self.node("ReduceSum", [wide, self.const(base + "_axes", np.arange(2, len(shape), dtype=np.int64))],
                          np.int32, base + "_sum", {"keepdims": 1})
        d = dyadic(np.float64(x.scale) / (count * np.float64(y.scale)), acc_bound=count * 255)
        self.requant(total, base, d, len(shape), None, y, (y.qmin, y.qmax),
                     fold=-int(d.mantissa) * count * int(x.zero_point))
        return self.done([node], node.outputs[0], y)

    def average_pool(self, node) -> bool:
        """AveragePool as a depthwise ConvInteger with a ones kernel (padding counts as zero, i.e. z_x)."""
        x = self.quantized(node.inputs[0])
        y = self.entry_value(node.outputs[0])
        shape = node.inputs[0].shape
        attrs = node.attrs
        padded = any(int(p) for p in attrs.get("pads", []))
        if x is None or y is None or not shape or not isinstance(shape[1], int) or int(attrs.get("ceil_mode", 0)) \
                or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") \
                or (padded and not int(attrs.get("count_include_pad", 0))):
            return False
        kernel = [int(k) for k in attrs["kernel_shape"]]
        channels, count, base = shape[1], int(np.prod(kernel)), node.name
        ones = np.ones([channels, 1, *kernel], np.uint8)
        conv_attrs = {"group": channels, "kernel_shape": kernel,
                      **{k: attrs[k] for k in ("strides", "pads", "dilations") if k in attrs}}
        acc = self.node("ConvInteger", [x.tensor, self.const(base + "_ones", ones), self.params(x)[1]], np.int32,
                        base + "_sum", conv_attrs)
        d = dyadic(np.float64(x.scale) / (count * np.float64(y.scale)), acc_bound=count * 255)
        self.requant(acc, base, d, len(shape), None, y, (y.qmin, y.qmax))
        return self.done([node], node.outputs[0], y)

    def pass_through_ok(self, node) -> bool:
        if node.op == "MaxPool":
            return len(node.outputs) == 1 and not int(node.attrs.get("ceil_mode", 0)) \
                and all(int(v) == 1 for v in node.attrs.get("dilations", [1]))
        return True


def export_int_only(model: Model) -> onnx.ModelProto:
    """The integer-only ONNX model for a calibrated IR (the IR itself is left as it was)."""
    lowering = IntLowering(model)
    proto = lowering.run()
    log.info("int-only export: %d dyadic requantizations (shortest mantissa %d bits)",
             lowering.stats["requantizations"], lowering.stats["mantissa_bits_min"])
    return proto

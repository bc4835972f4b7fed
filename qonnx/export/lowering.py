"""Lowering machinery shared by the QOperator and integer-only exporters.

A copy of the calibrated IR is walked in topological order. Each tensor can have
a float form (the original tensor, while a float node or a DequantizeLinear
produces it) and an integer form (`QValue`: codes plus scale and zero point).
Integer forms are made on demand (a QuantizeLinear from the float form, with the
table's parameters), and so are float forms of lowered tensors (a
DequantizeLinear writing the original tensor, so names and graph outputs stay).
Subclasses map ops to handlers that emit integer kernels; a node whose handler
declines stays float and reads what the QDQ model would: DQ(Q(x)) for quantized
activations and DQ(codes) for quantized weights and biases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeGuard

import numpy as np
import onnx

from qonnx.core.ir import Model
from qonnx.core.ops import ABSORBED_ACTIVATIONS
from qonnx.core.qtable import Role, TensorQuant
from qonnx.errors import ExportError
from qonnx.quantize.parameters import quantized_weight_codes

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclass
class QValue:
    """The integer form of a tensor: codes and the parameters that give them real values."""

    tensor: Any  # graph variable holding the codes
    # float32; scalar per tensor, 1-D along `axis`. Scalars may be numpy scalars (new_value's default scale,
    # the int-only exporter's int32 accumulators), which every use here reads like 0-d arrays.
    scale: np.ndarray | np.floating
    zero_point: np.ndarray | np.integer  # of the codes' dtype
    axis: int | None = None
    scale_const: Any = None
    zp_const: Any = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    def same_params(self, other: QValue) -> bool:
        return (self.dtype == other.dtype and self.axis == other.axis
                and np.array_equal(self.scale, other.scale) and np.array_equal(self.zero_point, other.zero_point))

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)


def all_quantized(values: list[QValue | None]) -> TypeGuard[list[QValue]]:
    """True when every input has an integer form (lets the type checker see that the list holds no None)."""
    return not any(v is None for v in values)


def activation_params(name: str, entry: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scalar scale, uint8 scalar zero point) of an 8-bit per-tensor activation entry."""
    scheme = entry.scheme
    if scheme.bits != 8:
        raise ExportError(f"activation '{name}' is {scheme.onnx_dtype_name}: the QOperator and integer-only "
                          "formats support 8-bit activations only (export it as qdq)")
    scale = np.asarray(entry.scale, np.float32)
    zp = np.asarray(entry.zero_point, np.int64)
    if scale.size != 1 or zp.size != 1:
        raise ExportError(f"activation '{name}' has per-channel parameters; QLinear operators take "
                          "one scale and zero point per activation tensor")
    zp = zp.reshape(()) + (128 if scheme.signed else 0)  # int8 codes q <-> uint8 codes q + 128
    return scale.reshape(()), zp.astype(np.uint8)


def weight_codes(name: str, entry: TensorQuant, values: np.ndarray) -> np.ndarray:
    scheme = entry.scheme
    if scheme.bits != 8 or scheme.block_size:
        raise ExportError(f"weight '{name}' is {scheme.describe()}: QLinear operators take 8-bit "
                          "per-tensor or per-channel weights (export it as qdq)")
    return quantized_weight_codes(entry, values).astype(scheme.numpy_dtype)


def bias_codes(entry: TensorQuant, values: np.ndarray) -> np.ndarray:
    """int32 bias codes at scale s_x * s_w (zero point 0), as the QDQ exporter writes them."""
    codes = np.rint(values.astype(np.float64) / np.asarray(entry.scale, np.float64))
    return np.clip(codes, -(2**31), 2**31 - 1).astype(np.int32)


class Lowering:
    """Walks a copy of the IR in topological order and lowers what has an integer form."""

    format_name = ""

    def __init__(self, model: Model):
        uncalibrated = [n for n, e in model.quant.tensors.items() if not e.calibrated]
        if uncalibrated:
            raise ExportError(f"{len(uncalibrated)} tensors have no quantization parameters yet "
                              f"(e.g. '{uncalibrated[0]}'): run a calibration pass before exporting")
        self.m = model.copy()
        self.table = self.m.quant
        self.q: dict[str, QValue] = {}
        self.fq: dict[str, Any] = {}  # float tensor -> its DQ(Q(.)) twin read by float islands
        self.removed: set[int] = set()
        missing = sorted(set(self.table.tensors) - set(self.m.tensors()))
        if missing:
            raise ExportError(f"quant table names tensor '{missing[0]}', which is not in the graph")
        ops = {n.name: n.op for n in self.m.nodes}
        for node_name, op in self.table.node_entries():
            if ops.get(node_name) != op:
                raise ExportError(f"quant table names {op} '{node_name}', which is not in the graph")
        tensors = self.m.tensors()
        float16 = [n for n in sorted(self.table.tensors) if self.m.dtype_of(tensors[n]) == np.float16]
        if float16:
            raise ExportError(f"tensor '{float16[0][:60]}' is float16: the {self.format_name} format's QLinear/integer "
                              "operators take float32 scales and values only (export float16 models as qdq)")

    # ------------------------------------------------------------- constants
    def const(self, hint: str, values: np.ndarray | np.number):
        return self.m.make_constant(hint, np.asarray(values))

    def params(self, qv: QValue) -> tuple[Any, Any]:
        if qv.scale_const is None:
            base = qv.tensor.name
            qv.scale_const = self.const(base + "_scale", qv.scale)
            qv.zp_const = self.const(base + "_zero_point", qv.zero_point)
        return qv.scale_const, qv.zp_const

    def new_value(self, hint: str, dtype, shape=None, scale=None, zero_point=None, axis=None) -> QValue:
        tensor = self.m.make_variable(hint, dtype=dtype, shape=shape)
        return QValue(tensor, np.asarray(scale, np.float32) if scale is not None else np.float32(1),
                      np.asarray(zero_point) if zero_point is not None else np.zeros((), dtype), axis)

    def entry_value(self, tensor) -> QValue | None:
        """A fresh integer value for `tensor` with its table parameters (None without an entry)."""
        entry = self.table.get(tensor.name)
        if entry is None or entry.role is not Role.ACTIVATION:
            return None
        scale, zp = activation_params(tensor.name, entry)
        return self.new_value(tensor.name + "_quantized", np.uint8, tensor.shape, scale, zp)

    # ------------------------------------------------------------- value forms
    def has_float(self, tensor) -> bool:
        return self.m.is_constant(tensor) or self.m.producer(tensor) is not None or \
            any(t is tensor for t in self.m.inputs)

    def quantized(self, tensor) -> QValue | None:
        """The integer form of a tensor, quantizing its float form on first use."""
        if tensor.name in self.q:
            return self.q[tensor.name]
        if self.m.is_constant(tensor) or not self.has_float(tensor):
            return None
        qv = self.entry_value(tensor)
        if qv is None:
            return None
        self.before_quantize(tensor)
        scale, zp = self.params(qv)
        self.m.add_node("QuantizeLinear", [tensor, scale, zp], [qv.tensor], name=tensor.name + "_QuantizeLinear")
        self.q[tensor.name] = qv
        return qv

    def before_quantize(self, tensor) -> None:
        """Hook: the integer-only exporter refuses to quantize a tensor computed in float from integers."""

    def floating(self, tensor) -> None:
        """Make sure a float tensor has a producer: a DequantizeLinear of its integer form if it was lowered."""
        if self.has_float(tensor):
            return
        qv = self.q.get(tensor.name)
        if qv is None:
            raise ExportError(f"tensor '{tensor.name}' lost its producer during export (internal error)")
        scale, zp = self.params(qv)
        attrs = {} if qv.axis is None else {"axis": int(qv.axis)}
        self.m.add_node("DequantizeLinear", [qv.tensor, scale, zp], [tensor], attrs,
                        name=tensor.name + "_DequantizeLinear")

    def activation_entry(self, tensor) -> bool:
        entry = self.table.get(tensor.name)
        return entry is not None and entry.role is Role.ACTIVATION

    def fake_quantized(self, tensor):
        """DQ(Q(x)) of a quantized activation computed in float: the value the QDQ model passes on."""
        if tensor.name not in self.fq:
            qv = self.quantized(tensor)
            out = self.m.make_variable(tensor.name + "_dequantized", dtype=np.float32, shape=tensor.shape)
            self.m.add_node("DequantizeLinear", [qv.tensor, *self.params(qv)], [out],
                            name=tensor.name + "_DequantizeLinear")
            self.fq[tensor.name] = out
            self.dequantized(out)
        return self.fq[tensor.name]

    def dequantized(self, tensor) -> None:
        """Hook: `tensor` is a DequantizeLinear output."""

    def quantize_output(self, tensor) -> None:
        """A graph output with an activation entry computed in float leaves through Q -> DQ, as in QDQ."""
        producer = self.m.producer(tensor)
        if not self.activation_entry(tensor) or producer is None or producer.op == "DequantizeLinear":
            return
        twin = self.fake_quantized(tensor)
        name = tensor.name
        tensor.name = self.m.unique_name(name + "_prequant")
        twin.name = name
        self.m.graph.outputs = [twin if t is tensor else t for t in self.m.graph.outputs]

    def float_constant(self, node, index: int) -> None:
        """In a float island, a quantized weight or bias is read through DQ(codes), as in the QDQ model."""
        tensor = node.inputs[index]
        entry = self.table.get(tensor.name)
        values = self.m.constant_value(tensor)
        if entry is None or entry.role is Role.ACTIVATION or values is None:
            return
        codes: np.ndarray
        zp: np.ndarray
        if entry.role is Role.WEIGHT:
            codes = quantized_weight_codes(entry, values).astype(entry.scheme.numpy_dtype)
            zp = np.asarray(entry.zero_point).astype(entry.scheme.numpy_dtype)
        else:
            codes, zp = bias_codes(entry, values), np.asarray(entry.zero_point).astype(np.int32)
        scale = np.asarray(entry.scale, np.float32)
        per_tensor = entry.scheme.axis is None
        scale, zp = (scale.reshape(()), zp.reshape(())) if per_tensor else (scale.reshape(-1), zp.reshape(-1))
        out = self.m.make_variable(tensor.name + "_dequantized", dtype=np.float32, shape=list(values.shape))
        attrs = {} if entry.scheme.axis is None else {"axis": int(entry.scheme.axis) % max(values.ndim, 1)}
        self.m.add_node("DequantizeLinear", [self.const(tensor.name + "_quantized", codes),
                                             self.const(tensor.name + "_scale", scale),
                                             self.const(tensor.name + "_zero_point", zp)], [out], attrs,
                        name=tensor.name + "_DequantizeLinear")
        node.inputs[index] = out

    # ------------------------------------------------------------- the walk
    # op -> the name of the method that lowers it (returns False to leave the node float); set by subclasses
    HANDLERS: ClassVar[dict[str, str]] = {}

    def handlers(self) -> dict[str, Callable[[Any], bool]]:
        return {op: getattr(self, method) for op, method in self.HANDLERS.items()}

    def remove(self, node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.m.graph.nodes.remove(node)
        self.removed.add(id(node))

    def keep_float(self, node) -> None:
        for i, tensor in enumerate(node.inputs):
            if not tensor.name:
                continue
            if self.m.is_constant(tensor):
                self.float_constant(node, i)
            elif node.op == "Shape" and not self.has_float(tensor) and tensor.name in self.q:
                node.inputs[i] = self.q[tensor.name].tensor  # only the shape is read
            elif self.has_float(tensor) and self.activation_entry(tensor):
                node.inputs[i] = self.fake_quantized(tensor)
            else:
                self.floating(tensor)
        self.after_float(node)

    def after_float(self, node) -> None:
        """Hook: the integer-only exporter tracks which float tensors were computed from integers."""

    def run(self) -> onnx.ModelProto:
        handlers = self.handlers()
        for node in list(self.m.toposort()):
            if id(node) in self.removed:
                continue
            handler = handlers.get(node.op)
            if handler is not None and (node.domain or "") in ("", "ai.onnx") and handler(node):
                continue
            self.keep_float(node)
        self.finish()
        for tensor in list(self.m.outputs):
            self.floating(tensor)
            self.quantize_output(tensor)
        self.m.cleanup()
        self.m.metadata["qonnx.export_format"] = self.format_name
        return self.m.to_onnx()

    def finish(self) -> None:
        """Hook run after the walk, before graph outputs are dequantized."""

    # ------------------------------------------------------------- shared helpers
    def absorbed(self, node, layer_output_name: str | None):
        """The Relu/Clip node after `node` whose output the layer's integer output stands for, if any.

        Returns (activation node or None, tensor whose entry gives the output parameters), or None
        when the table's output tensor is not reachable that way.
        """
        out = node.outputs[0]
        if layer_output_name in (None, out.name):
            return None, out
        consumers = self.m.consumers(out)
        if len(consumers) != 1 or consumers[0].op not in ABSORBED_ACTIVATIONS or self.m.is_graph_output(out):
            return None
        act = consumers[0]
        if act.outputs[0].name != layer_output_name:
            return None
        return act, act.outputs[0]

    def grid_within_bounds(self, act, qv: QValue) -> bool:
        """True when the integer grid of qv already enforces the Relu/Clip's bounds (the QDQ exporter's rule)."""
        bounds = self.m.clip_bounds(act)
        if bounds is None:
            return False
        s, zp = float(qv.scale), int(qv.zero_point)
        lo, hi = (qv.qmin - zp) * s, (qv.qmax - zp) * s
        return lo >= bounds[0] - s / 2 and hi <= bounds[1] + s / 2

    def layer_weight(self, node):
        """(codes, TensorQuant) of a layer's constant weight, or None."""
        layer = self.table.layers.get(node.name)
        if layer is None or layer.weight is None:
            return None
        entry = self.table.get(layer.weight)
        values = self.m.constant_value(node.inputs[1])
        if entry is None or values is None or entry.role is not Role.WEIGHT:
            return None
        return weight_codes(layer.weight, entry, values), entry

    def layer_bias(self, node) -> np.ndarray | None:
        layer = self.table.layers.get(node.name)
        if layer is None or layer.bias is None:
            return None
        entry, values = self.table.get(layer.bias), self.m.constant_value(node.inputs[2])
        assert entry is not None and values is not None  # plan takes a bias only as a 1-D constant, with an entry
        return bias_codes(entry, values)

    def weight_params(self, entry: TensorQuant, dtype) -> tuple[np.ndarray, np.ndarray]:
        scale = np.asarray(entry.scale, np.float32)
        zp = np.asarray(entry.zero_point).astype(dtype)
        if entry.scheme.axis is None:
            return scale.reshape(()), zp.reshape(())
        return scale.reshape(-1), zp.reshape(-1)

    def bind(self, tensor, qv: QValue) -> None:
        """Record qv as the integer form of an original tensor."""
        self.q[tensor.name] = qv

    def pass_through(self, node) -> bool:
        """Data movement on integer codes: every output takes the input's parameters."""
        x = self.quantized(node.inputs[0]) if node.inputs else None
        if x is None or not self.pass_through_ok(node):
            return False
        outs = []
        for out in node.outputs:
            want = self.entry_value(out)
            if want is not None and not want.same_params(x):
                return False
            outs.append(self.new_value(out.name + "_quantized", x.dtype, out.shape, x.scale, x.zero_point))
        rest = list(node.inputs[1:])
        for i, tensor in enumerate(rest):
            if tensor.name and not self.m.is_constant(tensor):
                self.floating(tensor)  # shapes, indices, scales: read as they are
            rest[i] = tensor
        originals = list(node.outputs)
        self.m.add_node(node.op, [x.tensor, *rest], [o.tensor for o in outs], dict(node.attrs), name=node.name)
        self.remove(node)
        for tensor, qv in zip(originals, outs, strict=True):
            self.bind(tensor, qv)
        return True

    def pass_through_ok(self, node) -> bool:
        if node.op == "Gather":  # only the data input may be quantized; indices stay integers
            return len(node.inputs) > 1 and not self.m.is_float(node.inputs[1])
        return True

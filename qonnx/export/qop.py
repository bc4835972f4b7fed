"""QOperator exporter: IR + quant table -> QLinear* operators (the graph ORT would fuse QDQ into).

The quant table is the same one the QDQ exporter reads; this module lowers the
float graph node by node:

- every tensor with an activation entry gets an integer form (uint8 codes plus a
  per-tensor scale and zero point; an int8 table entry becomes uint8 with zp+128,
  the same real values on the type ORT's x86 kernels are fast with);
- a node whose inputs have integer forms and whose op has an integer kernel
  becomes that kernel (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...);
- any other node stays float (a "float island"): its inputs get a
  DequantizeLinear, and where a later integer node needs its output, a
  QuantizeLinear. Only graph outputs and float islands see DequantizeLinear.

A Relu/Clip after a layer is absorbed when the output grid already enforces its
bounds (as in the QDQ exporter). `qonnx.lowering` holds the walk shared with
the integer-only exporter (`qonnx.export_int`); the IR given is never modified.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from qonnx.core.ir import Model
from qonnx.core.ops import ABSORBED_ACTIVATIONS, PASS_THROUGH_OPS
from qonnx.export.lowering import MS_DOMAIN, Lowering, QValue, all_quantized
from qonnx.export.qdq import export_dynamic_matmul, export_int8_lookup

log = logging.getLogger(__name__)


class QOpLowering(Lowering):
    format_name = "qop"

    HANDLERS = {
        "Conv": "conv", "Gemm": "gemm", "MatMul": "matmul",
        "Add": "binary", "Mul": "binary", "Concat": "concat",
        "GlobalAveragePool": "unary", "AveragePool": "unary", "Sigmoid": "unary",
        "LeakyRelu": "unary", "Softmax": "unary", "Relu": "clip", "Clip": "clip",
        **{op: "pass_through" for op in PASS_THROUGH_OPS},
        "Gather": "gather",  # an int8 lookup table (embeddings), else a pass-through
    }

    def gather(self, node) -> bool:
        entry = self.table.gathers.get(node.name)
        if entry is None:
            return self.pass_through(node)
        self.floating(node.inputs[1])
        export_int8_lookup(self.m, node.name, entry)  # the same nodes as in QDQ: there is no QLinearGather
        return True

    def constants(self, *qvs: QValue) -> list:
        out = []
        for qv in qvs:
            out.extend([qv.tensor, *self.params(qv)])
        return out

    def output_value(self, node, layer_output: str | None):
        """(absorbed activation or None, tensor bound, QValue) for a layer's quantized output, or None."""
        found = self.absorbed(node, layer_output)
        if found is None:
            return None
        act, tensor = found
        qv = self.entry_value(tensor)
        if qv is not None and act is not None and not self.grid_within_bounds(act, qv):
            return None  # the Relu/Clip does clip values the grid keeps: stay float (QDQ semantics)
        return act, tensor, qv

    def finish_layer(self, node, act, tensor, qv: QValue | None) -> None:
        self.remove(node)
        if act is not None:
            self.remove(act)
        if qv is not None:
            self.bind(tensor, qv)

    # ------------------------------------------------------------- layers
    def conv(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        weight = self.layer_weight(node)
        found = self.output_value(node, self.table.layers[node.name].output) if node.name in self.table.layers else None
        if x is None or weight is None or found is None or found[2] is None:
            return False
        codes, w_entry = weight
        act, tensor, y = found
        w_scale, w_zp = self.weight_params(w_entry, codes.dtype)
        name = node.inputs[1].name
        inputs = [*self.constants(x), self.const(name + "_quantized", codes), self.const(name + "_scale", w_scale),
                  self.const(name + "_zero_point", w_zp), *self.params(y)]
        bias = self.layer_bias(node)
        if bias is not None:
            inputs.append(self.const(node.inputs[2].name + "_quantized", bias))
        self.m.add_node("QLinearConv", inputs, [y.tensor], dict(node.attrs), name=node.name)
        self.finish_layer(node, act, tensor, y)
        return True

    def gemm(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        weight = self.layer_weight(node)
        if x is None or weight is None or node.name not in self.table.layers:
            return False
        found = self.output_value(node, self.table.layers[node.name].output)
        if found is None:
            return False
        act, tensor, y = found
        codes, w_entry = weight
        w_scale, w_zp = self.weight_params(w_entry, codes.dtype)
        name = node.inputs[1].name
        bias = self.layer_bias(node)
        inputs = [*self.constants(x), self.const(name + "_quantized", codes), self.const(name + "_scale", w_scale),
                  self.const(name + "_zero_point", w_zp)]
        if bias is None:  # QGemm reads C as int32 at scale s_a * s_b: a zero bias says "none"
            bias = np.zeros(codes.shape[0 if attrs_trans_b(node) else 1], np.int32)
        inputs.append(self.const((node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name
                                  else node.name + "_bias") + "_quantized", bias))
        attrs = {"transA": int(node.attrs.get("transA", 0)), "transB": int(node.attrs.get("transB", 0)),
                 "alpha": float(node.attrs.get("alpha", 1.0))}
        if y is not None:
            inputs.extend(self.params(y))
            out = y.tensor
        else:  # float output: the Gemm's own output tensor (and the absorbed activation stays float)
            if act is not None:
                return False
            out = node.outputs[0]
            node.outputs.clear()
        self.m.add_node("QGemm", inputs, [out], attrs, name=node.name, domain=MS_DOMAIN)
        self.finish_layer(node, act, tensor, y)
        return True

    def matmul(self, node) -> bool:
        if node.name in self.table.dynamic:  # quantized per run, as the QDQ exporter writes it
            self.floating(node.inputs[0])
            export_dynamic_matmul(self.m, node.name, self.table.dynamic[node.name])
            return True
        a = self.quantized(node.inputs[0])
        layer = self.table.layers.get(node.name)
        if a is None or layer is None:
            return False
        weight = self.layer_weight(node)
        if weight is not None:
            codes, w_entry = weight
            w_scale, w_zp = self.weight_params(w_entry, codes.dtype)
            name = node.inputs[1].name
            b = [self.const(name + "_quantized", codes), self.const(name + "_scale", w_scale),
                 self.const(name + "_zero_point", w_zp)]
        else:
            bq = self.quantized(node.inputs[1])
            if bq is None:
                return False
            b = self.constants(bq)
        found = self.output_value(node, layer.output)
        if found is None:
            return False
        act, tensor, y = found
        if y is not None:
            self.m.add_node("QLinearMatMul", [*self.constants(a), *b, *self.params(y)], [y.tensor], name=node.name)
        else:
            if act is not None:
                return False
            out = node.outputs[0]
            node.outputs.clear()
            a_scale, a_zp = self.params(a)
            self.m.add_node("MatMulIntegerToFloat", [a.tensor, b[0], a_scale, b[1], a_zp, b[2]], [out],
                            name=node.name, domain=MS_DOMAIN)
        self.finish_layer(node, act, tensor, y)
        return True

    # ------------------------------------------------------------- element-wise and pooling
    def fused_activation(self, node):
        """(activation node, tensor) when node's single consumer is a Relu/Clip whose output the grid covers."""
        out = node.outputs[0]
        consumers = self.m.consumers(out)
        if len(consumers) != 1 or consumers[0].op not in ABSORBED_ACTIVATIONS or self.m.is_graph_output(out):
            return None, out
        act = consumers[0]
        qv = self.entry_value(act.outputs[0])
        if qv is None or not self.grid_within_bounds(act, qv):
            return None, out
        return act, act.outputs[0]

    def binary(self, node) -> bool:
        inputs = [t for t in node.inputs if t.name]
        if len(inputs) != 2:
            return False
        a, b = (self.quantized(t) for t in inputs)
        act, tensor = self.fused_activation(node)
        y = self.entry_value(tensor)
        if a is None or b is None or y is None:
            return False
        op = {"Add": "QLinearAdd", "Mul": "QLinearMul"}[node.op]
        self.m.add_node(op, [*self.constants(a, b), *self.params(y)], [y.tensor], name=node.name, domain=MS_DOMAIN)
        self.finish_layer(node, act, tensor, y)
        return True

    def concat(self, node) -> bool:
        xs = [self.quantized(t) for t in node.inputs]
        y = self.entry_value(node.outputs[0])
        if y is None or not all_quantized(xs):
            return False
        self.m.add_node("QLinearConcat", [*self.params(y), *self.constants(*xs)], [y.tensor],
                        {"axis": int(node.attrs["axis"])}, name=node.name, domain=MS_DOMAIN)
        self.finish_layer(node, None, node.outputs[0], y)
        return True

    def unary(self, node) -> bool:
        x = self.quantized(node.inputs[0])
        y = self.entry_value(node.outputs[0])
        if x is None or y is None:
            return False
        attrs: dict[str, Any] = {}
        if node.op == "GlobalAveragePool":
            attrs = {"channels_last": 0}
        elif node.op == "AveragePool":
            attrs = {k: v for k, v in node.attrs.items() if k in
                     ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")}
            attrs["channels_last"] = 0
        elif node.op == "LeakyRelu":
            attrs = {"alpha": float(node.attrs.get("alpha", 0.01))}
        elif node.op == "Softmax":
            attrs = {"axis": int(node.attrs.get("axis", -1)), "opset": int(self.m.opset)}
        self.m.add_node("QLinear" + node.op, [*self.constants(x), *self.params(y)], [y.tensor], attrs,
                        name=node.name, domain=MS_DOMAIN)
        self.finish_layer(node, None, node.outputs[0], y)
        return True

    def clip(self, node) -> bool:
        """A Relu/Clip on integers: a uint8 Clip at the quantized bounds (same parameters in and out)."""
        x = self.quantized(node.inputs[0])
        bounds = self.m.clip_bounds(node)
        if x is None or bounds is None:
            return False
        y = self.entry_value(node.outputs[0])
        if y is not None and not y.same_params(x):
            return False
        s, zp = float(x.scale), int(x.zero_point)
        lo = x.qmin if bounds[0] == -np.inf else max(x.qmin, int(np.rint(np.float32(bounds[0]) / np.float32(s))) + zp)
        hi = x.qmax if bounds[1] == np.inf else min(x.qmax, int(np.rint(np.float32(bounds[1]) / np.float32(s))) + zp)
        out = self.new_value(node.outputs[0].name + "_quantized", x.dtype, node.outputs[0].shape, x.scale,
                             x.zero_point)
        name = node.outputs[0].name
        self.m.add_node("Clip", [x.tensor, self.const(name + "_lo", np.asarray(lo, x.dtype)),
                                 self.const(name + "_hi", np.asarray(hi, x.dtype))], [out.tensor], name=node.name)
        self.finish_layer(node, None, node.outputs[0], out)
        return True

def attrs_trans_b(node) -> bool:
    return bool(int(node.attrs.get("transB", 0)))


def export_qop(model: Model) -> onnx.ModelProto:
    """The QOperator ONNX model for a calibrated IR (the IR itself is left as it was)."""
    return QOpLowering(model).run()

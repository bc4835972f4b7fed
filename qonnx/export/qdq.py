"""QDQ exporter: IR + quant table -> an ONNX graph of the shapes ORT's CPU EP fuses.

- weights: int8 symmetric constants behind one DequantizeLinear (per channel on
  the layer's output axis);
- bias: int32 with scale s_x * s_w (the Conv/Gemm selectors need int32);
- activations: QuantizeLinear -> a single DequantizeLinear (the S8->U8 and
  selector rules want exactly one DQ per Q; ORT duplicates shared DQs itself).
Float16 models: scales are float16 (the type of the tensor they give back), which QuantizeLinear and
DequantizeLinear take from opset 19 (older models are converted). ORT's CPU EP runs them correctly but
fuses no float16 QDQ group into an integer kernel: the layers run in float16 (float, on x86) on
dequantized weights and activations.
The input model is not modified.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from qonnx.core.ir import Model
from qonnx.core.ops import nbits_applies
from qonnx.core.qtable import QuantState, Role, TensorQuant
from qonnx.errors import ExportError
from qonnx.export.lowbit import (
    FLOAT16_QDQ_OPSET,
    INT4_OPSET,
    PACKED_BITS,
    export_matmul_nbits,
    low_bit_weights,
    pack_int4_initializers,
    with_opset,
)
from qonnx.numerics.quant import quantize, scale_in_float_type
from qonnx.quantize.parameters import quantized_weight_codes

log = logging.getLogger(__name__)


def _np_dtype(entry: TensorQuant) -> type:
    return entry.scheme.numpy_dtype


def _float_type(dtype) -> type:
    """The type of a Q/DQ scale (and of the DequantizeLinear output): float16 for float16 tensors, else float32."""
    return np.float16 if dtype is not None and np.dtype(dtype) == np.float16 else np.float32


def _param_constants(m: Model, base: str, entry: TensorQuant, zp_dtype: type, float_type: type = np.float32):
    scale = scale_in_float_type(entry.scale, float_type)
    zero_point: np.ndarray = np.asarray(entry.zero_point).astype(zp_dtype)
    if entry.scheme.axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    elif not entry.scheme.block_size:  # blocked ones keep the weight's rank, ceil(D/block) on the axis
        scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
    return m.make_constant(base + "_scale", scale), m.make_constant(base + "_zero_point", zero_point)


def _dq_attrs(entry: TensorQuant, rank: int) -> dict:
    if entry.scheme.axis is None:
        return {}
    attrs = {"axis": int(entry.scheme.axis) % max(rank, 1)}
    if entry.scheme.block_size:
        attrs["block_size"] = int(entry.scheme.block_size)
    return attrs


def _export_constant(m: Model, tensor, entry: TensorQuant, codes: np.ndarray) -> tuple[str, str]:
    """DQ(codes) in place of the constant; returns the names of the code and zero-point initializers."""
    values = np.asarray(tensor.values)
    dtype = _np_dtype(entry)
    q = m.make_constant(tensor.name + "_quantized", codes.astype(dtype))
    float_type = _float_type(values.dtype)
    scale, zp = _param_constants(m, tensor.name, entry, dtype, float_type)
    out = m.make_variable(tensor.name + "_dequantized", dtype=float_type, shape=list(values.shape))
    m.add_node("DequantizeLinear", [q, scale, zp], [out], _dq_attrs(entry, values.ndim),
               name=tensor.name + "_DequantizeLinear")
    m.replace_uses(tensor, out)
    # Keep new consumers' order stable: DQ nodes go first in the node list.
    m.graph.nodes.insert(0, m.graph.nodes.pop())
    return q.name, zp.name


def _export_activation(m: Model, tensor, entry: TensorQuant) -> None:
    dtype = _np_dtype(entry)
    float_type = _float_type(m.dtype_of(tensor))
    scale, zp = _param_constants(m, tensor.name, entry, dtype, float_type)
    consumers = [c for c in m.consumers(tensor)]
    is_output = m.is_graph_output(tensor)
    quantized = m.make_variable(tensor.name + "_quantized", dtype=dtype, shape=tensor.shape)
    dequantized = m.make_variable(tensor.name + "_dequantized", dtype=float_type, shape=tensor.shape)
    m.add_node("QuantizeLinear", [tensor, scale, zp], [quantized], name=tensor.name + "_QuantizeLinear")
    if entry.scheme.bits < 8:
        # A 3/4-bit grid held in uint8: Q saturates at the type's [0, 255], so a Clip on the codes narrows it
        # to [qmin, qmax]. Clipping the codes after rounding equals the fake-quant arithmetic exactly (clip and
        # round commute on integers), and ORT still fuses the layer before (its Q) and after (a DQ input),
        # which a float Clip before the Q or uint4 Q/DQ (no QLinearConv kernel) would not.
        narrowed = m.make_variable(tensor.name + "_narrowed", dtype=dtype, shape=tensor.shape)
        bounds = [m.make_constant(tensor.name + f"_{k}", np.asarray(v, dtype))
                  for k, v in (("qmin", entry.scheme.qmin), ("qmax", entry.scheme.qmax))]
        m.add_node("Clip", [quantized, *bounds], [narrowed], name=tensor.name + "_narrow_Clip")
        quantized = narrowed
    m.add_node("DequantizeLinear", [quantized, scale, zp], [dequantized], name=tensor.name + "_DequantizeLinear")
    for consumer in consumers:
        consumer.inputs = [dequantized if t is tensor else t for t in consumer.inputs]
    if is_output and not any(t is tensor for t in m.inputs):
        # The graph keeps its interface: the output name now carries the dequantized value. A graph input
        # that is also an output keeps its name and returns the input as it is (renaming it would rename
        # the input); only its consumers read the dequantized value.
        name = tensor.name
        tensor.name = m.unique_name(name + "_prequant")
        dequantized.name = name
        m.graph.outputs = [dequantized if t is tensor else t for t in m.graph.outputs]


def _absorb_activation(m: Model, tensor, entry: TensorQuant):
    """Drop a Relu/Clip whose whole output range the Q already enforces.

    ORT looks through a Relu before a Q but not through every Clip form, so the
    exporter removes the activation itself when it is exactly redundant: the Q's
    representable range [(qmin-zp)s, (qmax-zp)s] lies inside the clip bounds.
    Returns the tensor that carries the quantized tensor's name afterwards.
    """
    node = m.producer(tensor)
    if node is None or node.op not in ("Relu", "Clip") or m.is_graph_output(tensor):
        return tensor
    src = node.inputs[0]
    layer = m.producer(src)
    # Only the activation of an integer layer is absorbed, and never one whose input
    # is itself quantized (then ORT handles the DQ -> Relu -> Q on its own).
    if layer is None or layer.op not in ("Conv", "Gemm", "MatMul") or m.quant.get(src.name) is not None:
        return tensor
    if len(m.consumers(src)) != 1 or m.is_graph_output(src) or m.used_in_subgraph(tensor):
        return tensor
    bounds = m.clip_bounds(node)
    assert entry.scale is not None and entry.zero_point is not None  # export_qdq refuses uncalibrated tables
    if bounds is None or np.ndim(entry.scale) != 0:
        return tensor
    s, zp = float(entry.scale), int(entry.zero_point)
    lo_q, hi_q = (entry.scheme.qmin - zp) * s, (entry.scheme.qmax - zp) * s
    if lo_q < bounds[0] - s / 2 or hi_q > bounds[1] + s / 2:
        return tensor
    m.replace_uses(tensor, src)
    node.inputs.clear()
    node.outputs.clear()
    m.graph.nodes.remove(node)
    src.name, tensor.name = tensor.name, m.unique_name(src.name + "_preact")
    return src  # now carries the quantized tensor's name


def export_qdq(model: Model, nbits_accuracy_level: int = 0, pack_int4: bool = True) -> onnx.ModelProto:
    """The QDQ ONNX model for a calibrated IR (the IR itself is left as it was).

    4-bit weights: weight-only MatMuls with blocked scales become MatMulNBits; other 4-bit weights are int4
    initializers behind DequantizeLinear, which needs opset 21 (the model is converted when older).
    pack_int4=False keeps 4-bit codes in int8 initializers instead (same values, the model's opset, and
    ORT's int8 kernels: what AdaRound runs to read a layer's quantized input).
    """
    uncalibrated = [n for n, e in model.quant.tensors.items() if not e.calibrated]
    if uncalibrated:
        raise ExportError(f"{len(uncalibrated)} tensors have no quantization parameters yet "
                          f"(e.g. '{uncalibrated[0]}'): run a calibration pass before exporting")
    m = model.copy()
    if m.opset < FLOAT16_QDQ_OPSET and _float16_entries(m):
        m = with_opset(m, FLOAT16_QDQ_OPSET, "float16 QuantizeLinear/DequantizeLinear")
    nbits = _nbits_layers(m)
    if any(name not in nbits and (pack_int4 or e.scheme.block_size) for name, e in low_bit_weights(m).items()):
        m = with_opset(m, INT4_OPSET)
        nbits = _nbits_layers(m)  # the same layers, as nodes of the converted graph
    int4_initializers: dict[str, bool] = {}
    with m.naming_session():
        _export_entries(m, nbits, nbits_accuracy_level, pack_int4, int4_initializers)
    m.cleanup()
    proto = m.to_onnx()
    pack_int4_initializers(proto, int4_initializers)
    return proto


def _float16_entries(m: Model) -> list[str]:
    """Quantized tensors of type float16 (their Q/DQ need opset 19)."""
    tensors = m.tensors()
    return [name for name in sorted(m.quant.tensors)
            if name in tensors and _float_type(m.dtype_of(tensors[name])) is np.float16]


def _export_entries(m: Model, nbits: dict, nbits_accuracy_level: int, pack_int4: bool,
                    int4_initializers: dict[str, bool]) -> None:
    tensors = m.tensors()
    for name, entry in sorted(m.quant.tensors.items()):
        tensor = tensors.get(name)
        if tensor is None:
            raise ExportError(f"quant table names tensor '{name}', which is not in the graph")
        if entry.role is Role.ACTIVATION:
            _export_activation(m, _absorb_activation(m, tensor, entry), entry)
            continue
        values = m.constant_value(tensor)
        if values is None:
            raise ExportError(f"{entry.role.value} '{name}' is not a constant")
        if entry.role is Role.WEIGHT:
            codes = quantized_weight_codes(entry, values)
            if name in nbits:
                export_matmul_nbits(m, nbits[name], entry, codes, nbits_accuracy_level)
                entry.state = QuantState.EXPORTED
                continue
        else:  # int32 bias, zero point 0; the scale was checked for overflow at calibration
            codes = np.clip(np.rint(values.astype(np.float64) / np.asarray(entry.scale, np.float64)),
                            -(2**31), 2**31 - 1)
        q_name, zp_name = _export_constant(m, tensor, entry, codes)
        if entry.scheme.bits <= PACKED_BITS and pack_int4:
            int4_initializers.update({q_name: entry.scheme.signed, zp_name: entry.scheme.signed})
        entry.state = QuantState.EXPORTED
    for node_name, entry in sorted(m.quant.dynamic.items()):
        export_dynamic_matmul(m, node_name, entry)
    for node_name, entry in sorted(m.quant.gathers.items()):
        export_int8_lookup(m, node_name, entry)


def _nbits_layers(m: Model) -> dict[str, object]:
    """Weight name -> its MatMul node, for the layers exported as MatMulNBits (the weight feeds only them)."""
    nodes = {n.name: n for n in m.nodes}
    found = {}
    for layer in m.quant.layers.values():
        entry = m.quant.get(layer.weight) if layer.weight else None
        node = nodes.get(layer.node)
        if entry is not None and node is not None and nbits_applies(m, node, entry) \
                and len(m.consumers(node.inputs[1])) == 1:
            assert layer.weight is not None  # the entry was found under it
            found[layer.weight] = node
    return found


def export_dynamic_matmul(m: Model, node_name: str, entry: TensorQuant) -> None:
    """MatMul(x, W) -> DynamicQuantizeLinear(x), MatMulInteger, Cast, Mul(s_x * s_w): ORT's DynamicQuantizeMatMul."""
    node = next(n for n in m.nodes if n.name == node_name)
    x, w_tensor = node.inputs
    out = node.outputs[0]
    w = m.constant_value(w_tensor)
    assert w is not None  # protect makes only MatMuls with a constant 2-D weight dynamic
    assert entry.scale is not None and entry.zero_point is not None  # protect calibrates every dynamic entry
    codes = quantize(w, entry.scale, entry.zero_point, entry.scheme).astype(np.int8)
    base = node_name
    if _float_type(m.dtype_of(x)) is np.float16:  # DynamicQuantizeLinear takes float32 only
        x32 = m.make_variable(base + "_input_float32", dtype=np.float32, shape=x.shape)
        m.add_node("Cast", [x], [x32], {"to": onnx.TensorProto.FLOAT}, name=base + "_input_Cast")
        out16, out = out, m.make_variable(base + "_output_float32", dtype=np.float32, shape=out.shape)
        m.add_node("Cast", [out], [out16], {"to": onnx.TensorProto.FLOAT16}, name=base + "_output_Cast")
        x = x32
    xq = m.make_variable(base + "_input_quantized", dtype=np.uint8)
    xs = m.make_variable(base + "_input_scale", dtype=np.float32, shape=[])
    xzp = m.make_variable(base + "_input_zero_point", dtype=np.uint8, shape=[])
    m.add_node("DynamicQuantizeLinear", [x], [xq, xs, xzp], name=base + "_DynamicQuantizeLinear")
    w_q = m.make_constant(w_tensor.name + "_quantized", codes)
    w_zp = m.make_constant(w_tensor.name + "_zero_point", np.zeros(codes.shape[1], np.int8))
    acc = m.make_variable(base + "_int32", dtype=np.int32)
    m.add_node("MatMulInteger", [xq, w_q, xzp, w_zp], [acc], name=base + "_MatMulInteger")
    acc_f = m.make_variable(base + "_int32_float", dtype=np.float32)
    m.add_node("Cast", [acc], [acc_f], {"to": onnx.TensorProto.FLOAT}, name=base + "_Cast")
    scales = m.make_variable(base + "_scales", dtype=np.float32)
    w_scale = m.make_constant(w_tensor.name + "_scale", np.asarray(entry.scale, np.float32).reshape(-1))
    m.add_node("Mul", [xs, w_scale], [scales], name=base + "_scales_Mul")
    node.inputs.clear()
    node.outputs.clear()
    m.graph.nodes.remove(node)
    m.add_node("Mul", [acc_f, scales], [out], name=base + "_output_Mul")


def export_int8_lookup(m: Model, node_name: str, entry: TensorQuant) -> None:
    """Gather(T, ids) -> Cast(Gather(int8 T, ids)) * Gather(row scales, ids): the rows scaled after the lookup."""
    node = next((n for n in m.nodes if n.name == node_name), None)
    if node is None or node.op != "Gather":
        raise ExportError(f"quant table names Gather '{node_name}', which is not in the graph")
    table, indices = node.inputs
    out = node.outputs[0]
    values = m.constant_value(table)
    assert values is not None  # the embeddings pass takes only constant tables
    assert entry.scale is not None and entry.zero_point is not None  # the embeddings pass calibrates every entry
    codes = quantize(values, entry.scale, entry.zero_point, entry.scheme).astype(np.int8)
    rows_q = m.make_variable(node_name + "_rows_quantized", dtype=np.int8)
    m.add_node("Gather", [m.make_constant(table.name + "_quantized", codes), indices], [rows_q],
               {"axis": 0}, name=node_name + "_quantized")
    rows = m.make_variable(node_name + "_rows_int", dtype=np.float32)
    m.add_node("Cast", [rows_q], [rows], {"to": onnx.TensorProto.FLOAT}, name=node_name + "_Cast")
    row_scale = m.make_variable(node_name + "_row_scale", dtype=np.float32)
    scales = np.asarray(entry.scale, np.float32).reshape(-1, 1)  # [V, 1]: gathers to ids.shape + [1]
    m.add_node("Gather", [m.make_constant(table.name + "_scale", scales), indices], [row_scale],
               {"axis": 0}, name=node_name + "_scale")
    node.inputs.clear()
    node.outputs.clear()
    m.graph.nodes.remove(node)
    m.add_node("Mul", [rows, row_scale], [out], name=node_name + "_Mul")
    entry.state = QuantState.EXPORTED

"""Low-bit weight export: int4 initializers (opset 21), blocked scales and MatMulNBits.

ORT's CPU kernels for 4-bit weights are MatMulNBits (com.microsoft: float activations, weight blocks along K)
and, for everything else, DequantizeLinear(int4) feeding the float op. Both store two codes per byte, which
is where the size gain comes from.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import version_converter

from qonnx.core.ir import Model
from qonnx.core.qtable import Role, TensorQuant
from qonnx.errors import ExportError

log = logging.getLogger(__name__)

INT4_OPSET = 21  # DequantizeLinear/QuantizeLinear on int4/uint4 and blocked scales
FLOAT16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear with float16 scales (and float16 input/output)
MS_DOMAIN = "com.microsoft"


PACKED_BITS = 4  # grids this narrow are stored two codes per byte; 5-7-bit grids stay in int8 containers


def low_bit_weights(model: Model) -> dict[str, TensorQuant]:
    """Weights stored packed (int4/uint4 initializers)."""
    return {n: e for n, e in model.quant.of_role(Role.WEIGHT).items() if e.scheme.bits <= PACKED_BITS}


def with_opset(model: Model, opset: int, needed_by: str = "int4 weights") -> Model:
    """A copy of `model` converted to `opset` with the ONNX version converter (quant state carried over)."""
    if model.opset >= opset:
        return model
    try:
        converted = version_converter.convert_version(model.to_onnx(), opset)
    except Exception as e:  # the converter raises bare RuntimeErrors for ops it cannot adapt
        reason = " ".join(str(e).split())[:200]
        raise ExportError(f"{needed_by} need opset {opset}, and converting the model from opset "
                          f"{model.opset} failed: {reason}") from e
    upgraded = Model.from_onnx(converted, model.source_path)._with_state_of(model)
    upgraded.opset = opset
    missing = sorted(set(upgraded.quant.tensors) - set(upgraded.tensors()))
    if missing:
        raise ExportError(f"converting to opset {opset} renamed tensor '{missing[0]}' of the quant table")
    log.info("opset %d -> %d for %s", model.opset, opset, needed_by)
    return upgraded


def pack_int4_initializers(proto: onnx.ModelProto, names: dict[str, bool]) -> None:
    """Re-type the named int8/uint8 initializers (name -> signed) as INT4/UINT4, two codes per byte."""
    found = set()
    for index, init in enumerate(proto.graph.initializer):
        if init.name not in names:
            continue
        values = onnx.numpy_helper.to_array(init).astype(np.int64)
        signed = names[init.name]
        lo, hi = (-8, 7) if signed else (0, 15)
        if values.size and (values.min() < lo or values.max() > hi):
            raise ExportError(f"initializer '{init.name}' holds codes outside the 4-bit range [{lo}, {hi}]")
        dtype = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
        # raw_data, two's-complement nibbles, element 2i in the low half of byte i (make_tensor without raw
        # would store every packed byte as an int32 varint, no smaller than int8).
        nibbles = (values.reshape(-1) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
        packed = onnx.helper.make_tensor(init.name, dtype, list(values.shape), raw, raw=True)
        proto.graph.initializer[index].CopyFrom(packed)
        found.add(init.name)
    if found != set(names):
        raise ExportError(f"int4 initializer(s) {sorted(set(names) - found)} missing from the exported graph")


def pack_nbits_weight(codes: np.ndarray, block_size: int) -> np.ndarray:
    """Signed 4-bit codes [K, N] -> MatMulNBits' B: uint8 [N, ceil(K/block), block/2], code + 8, low nibble first."""
    k, n = codes.shape
    blocks = -(-k // block_size)
    unsigned = np.full((n, blocks * block_size), 8, np.uint8)  # padding rows hold code 0 (value 0)
    unsigned[:, :k] = (codes.T + 8).astype(np.uint8)
    pairs = unsigned.reshape(n, blocks, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def export_matmul_nbits(m: Model, node, entry: TensorQuant, codes: np.ndarray, accuracy_level: int = 0) -> None:
    """Replace MatMul/Gemm(x, W[, bias]) by MatMulNBits(x, B, scales[, bias]): W = (code - 8) * scale per block."""
    x, w_tensor = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    scales = np.asarray(entry.scale, np.float32)
    if entry.scheme.axis == 1:  # Gemm transB: the weight is [N, K] already; make both [K, N]
        codes, scales = codes.T, scales.T
    k, n = codes.shape
    block = entry.scheme.block_size
    assert block is not None  # export_qdq sends only the layers nbits_applies took: 4-bit blocks along K
    if codes.min() < -8 or codes.max() > 7:
        raise ExportError(f"weight '{w_tensor.name}' codes exceed the signed 4-bit range")
    scales = np.ascontiguousarray(scales.reshape(-(-k // block), n).T)
    packed = m.make_constant(w_tensor.name + "_nbits", pack_nbits_weight(codes, block))
    inputs = [x, packed, m.make_constant(w_tensor.name + "_nbits_scales", scales)]
    if bias is not None:  # inputs 3 and 4 (zero points, g_idx) are left out: zero point 8 is the default
        inputs += [m.omitted_input(), m.omitted_input(), bias]
    out = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    m.graph.nodes.remove(node)
    m.add_node("MatMulNBits", inputs, [out],
               {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": accuracy_level},
               name=node.name, domain=MS_DOMAIN)

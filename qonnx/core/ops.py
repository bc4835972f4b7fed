"""The op-category table: what quantization does with each ONNX op, in one place.

Planning, the exporters, the integer reference and QAT all read their op sets from here, so a new op
type is added once, with its category; `tests/core/test_ops.py` then names every backend that must
handle it (qop, int-only, the integer reference, qat) and fails in the file that lacks a handler.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from qonnx.core.ir import Model
from qonnx.core.qtable import TensorQuant


class Category(str, Enum):
    LAYER = "layer"  # integer kernels with a quantized weight: QLinearConv/QGemm/MatMulInteger...
    REQUANT = "requant"  # int8 only when every input is quantized already (QLinearAdd, QLinearConcat...)
    # Data movement: the output shares its input's parameters, so ORT runs the op on int8 unchanged.
    MOVEMENT = "movement"  # ... and the integer-only format keeps it integer too
    MOVEMENT_QDQ = "movement-qdq"  # ... in QDQ/QOperator only: the integer-only format computes it in float
    NO_OP = "no-op"  # passes its input through (canonicalize removes it; the exporters pass integers through)
    ACTIVATION = "activation"  # Relu/Clip(0, b) after a layer: absorbed into the quantizer's range
    BOUND = "bound"  # Min(x, b >= 0): CLE's per-channel ReLU6 bound; x takes the output's parameters
    LOOKUP = "lookup"  # elementwise functions the integer-only format runs as a 256-entry table


OP_CATEGORIES: dict[str, Category] = {
    "Conv": Category.LAYER, "Gemm": Category.LAYER, "MatMul": Category.LAYER,
    "Add": Category.REQUANT, "Mul": Category.REQUANT, "Concat": Category.REQUANT,
    "GlobalAveragePool": Category.REQUANT, "AveragePool": Category.REQUANT,
    "Reshape": Category.MOVEMENT, "Transpose": Category.MOVEMENT, "Flatten": Category.MOVEMENT,
    "Squeeze": Category.MOVEMENT, "Unsqueeze": Category.MOVEMENT, "MaxPool": Category.MOVEMENT,
    "Resize": Category.MOVEMENT_QDQ, "Slice": Category.MOVEMENT_QDQ, "Split": Category.MOVEMENT_QDQ,
    "Gather": Category.MOVEMENT_QDQ, "Expand": Category.MOVEMENT_QDQ, "Tile": Category.MOVEMENT_QDQ,
    "DepthToSpace": Category.MOVEMENT_QDQ, "SpaceToDepth": Category.MOVEMENT_QDQ,
    "Identity": Category.NO_OP,
    "Relu": Category.ACTIVATION, "Clip": Category.ACTIVATION,
    "Min": Category.BOUND,
    "Sigmoid": Category.LOOKUP, "Tanh": Category.LOOKUP, "LeakyRelu": Category.LOOKUP,
    "HardSigmoid": Category.LOOKUP, "HardSwish": Category.LOOKUP,
}


def ops_in(*categories: Category) -> frozenset[str]:
    return frozenset(op for op, category in OP_CATEGORIES.items() if category in categories)


LAYER_OPS = ops_in(Category.LAYER)
REQUANT_OPS = ops_in(Category.REQUANT)
SAME_PARAMS_OPS = ops_in(Category.MOVEMENT, Category.MOVEMENT_QDQ)  # plan ties their outputs to their inputs
PASS_THROUGH_OPS = ops_in(Category.MOVEMENT, Category.MOVEMENT_QDQ, Category.NO_OP)  # QDQ / QOperator
INT_PASS_THROUGH_OPS = ops_in(Category.MOVEMENT, Category.NO_OP)  # integer-only
ABSORBED_ACTIVATIONS = ops_in(Category.ACTIVATION)
LOOKUP_OPS = ops_in(Category.LOOKUP)


# ---------------------------------------------------------------- ORT's weight-only kernel
def _k_axis(node: Any) -> int | None:
    """The input-feature axis of a MatMul/Gemm weight (None for a Gemm MatMulNBits cannot express)."""
    if node.op == "MatMul":
        return 0
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)) and float(node.attrs.get("alpha", 1.0)) == 1.0 \
            and float(node.attrs.get("beta", 1.0)) == 1.0:
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return None


def nbits_applies(model: Model, node: Any, entry: TensorQuant) -> bool:
    """A MatMul/Gemm with a 2-D weight in 4-bit blocks along K and a float input runs as MatMulNBits."""
    s, k_axis = entry.scheme, _k_axis(node)
    if s.bits != 4 or not s.signed or not s.block_size or k_axis is None or s.axis != k_axis:
        return False
    if s.block_size < 16 or s.block_size & (s.block_size - 1):
        return False
    w = model.constant_value(node.inputs[1])
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = model.constant_value(node.inputs[2])
        if bias is None or w is None or bias.shape != (w.shape[1 - k_axis],):
            return False  # MatMulNBits adds a per-column bias only
    return w is not None and w.ndim == 2 and model.quant.get(node.inputs[0].name) is None

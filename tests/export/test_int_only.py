"""Integer-only export: no float tensor between Quantize and Dequantize, bit-exact with the numpy
reference, close to QDQ, what it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qonnx.errors import ExportError
from qonnx.export.int_only import export_int_only
from qonnx.export.intref import IntegerReference
from tests.export.test_qop import _dynamic_ir, lsb_diff, optimized, output_scale
from tests.helpers import feed_for, op_counts, run_ort

INT_ONLY = ["conv_bn_relu_conv", "depthwise_block", "residual_block", "conv_pool_gemm", "matmul_mlp", "one_conv"]
INTEGER_OPS = {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "Add", "Mul", "Sub", "Div",
               "Cast", "Clip", "ReduceSum", "MaxPool", "Reshape", "Flatten", "Gather", "Concat", "Transpose"}


@pytest.mark.parametrize("name", INT_ONLY)
def test_int_only_has_no_float_tensor_between_quantize_and_dequantize(name):
    model, result = optimized(name)
    proto = export_int_only(result.ir)
    onnx.checker.check_model(proto, full_check=True)
    assert set(op_counts(proto)) <= INTEGER_OPS, op_counts(proto)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    graph_inputs = {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for tensor in node.input:
            if node.op_type == "QuantizeLinear" and tensor == node.input[0]:
                assert tensor in graph_inputs
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear") or tensor in graph_inputs:
                continue  # scales
            else:
                assert types[tensor] != onnx.TensorProto.FLOAT, f"{node.op_type} reads float '{tensor}'"
        if node.op_type == "DequantizeLinear":
            assert node.output[0] in graph_outputs
    assert proto.metadata_props and {p.key: p.value for p in proto.metadata_props}["qonnx.export_format"] \
        == "int-only"


@pytest.mark.parametrize("name", INT_ONLY)
def test_int_only_is_bit_exact_with_the_reference_and_close_to_qdq(name):
    model, result = optimized(name)
    proto = export_int_only(result.ir)
    reference = IntegerReference(proto)
    out = proto.graph.output[0].name
    for seed in range(3):
        feed = feed_for(model, seed=60 + seed, batch=2 if name == "matmul_mlp" else 1)
        got = run_ort(proto, feed, "all")[0]
        np.testing.assert_array_equal(got, reference.run(feed)[out])
        qdq = run_ort(result.model, feed, "all")[0]
        assert lsb_diff(got, qdq, output_scale(proto, out)).max() <= 1


def test_int_only_dyadic_constants_are_31_bit_mantissas():
    _, result = optimized("conv_bn_relu_conv")
    proto = export_int_only(result.ir)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    mantissas = [v for k, v in inits.items() if k.endswith("_mantissa")]
    assert len(mantissas) == 2
    for b in mantissas:
        assert b.dtype == np.int64 and np.all((b >= 2**30) & (b < 2**31))


def test_int_only_refuses_softmax_and_dynamic_matmuls():
    with pytest.raises(ExportError, match="Softmax"):
        export_int_only(optimized("attention_like")[1].ir)
    with pytest.raises(ExportError, match="per run"):
        export_int_only(_dynamic_ir())


def test_int_only_refuses_an_accumulator_that_can_overflow_int32():
    ir = optimized("one_conv")[1].ir.copy()
    bias = ir.tensors()["b"]
    bias.values = (np.asarray(bias.values) * 1e9).astype(np.float32)  # codes clip at 2^31 - 1
    with pytest.raises(ExportError, match="int32 accumulator"):
        export_int_only(ir)

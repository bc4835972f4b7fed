"""QOperator export: structure, what ORT runs, numerics against QDQ, negative cases, and the contract it shares
with the integer-only exporter (whose own tests are in test_int_only.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qonnx
from qonnx.core.qtable import Role, TensorQuant
from qonnx.data.calibration import open_calibration
from qonnx.errors import ExportError, InputError
from qonnx.export.int_only import export_int_only
from qonnx.export.intref import IntegerReference
from qonnx.export.qdq import export_qdq
from qonnx.export.qop import export_qop
from qonnx.infra.context import PassContext
from qonnx.infra.manager import PassManager
from qonnx.numerics.quant import QuantScheme
from qonnx.passes import parse_pipeline
from qonnx.runtime.fusion import fusion_report
from qonnx.runtime.ort import optimized_graph
from tests.helpers import (
    MODEL_BUILDERS,
    build_model,
    conv_pool_gemm,
    depthwise_block,
    feed_for,
    import_proto,
    make_samples,
    one_conv,
    op_counts,
    randn,
    rng,
    run_ort,
)

PIPELINE = "w8a8"
ATTENTION = "canonicalize,fold-bn,plan{activation_matmul=true},calibrate,bias-correction"
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}

_CACHE: dict[str, tuple[onnx.ModelProto, qonnx.OptimizeResult]] = {}


def optimized(name: str):
    """(float model, QDQ optimize result with its calibrated IR), once per session."""
    if name not in _CACHE:
        model = MODEL_BUILDERS[name]()
        pipeline = ATTENTION if name == "attention_like" else PIPELINE
        _CACHE[name] = (model, qonnx.optimize(model, make_samples(model, 24, seed=1), pipeline=pipeline, seed=0))
    return _CACHE[name]


def calibrated(model: onnx.ModelProto, edit=None):
    """A calibrated IR (plan, then calibrate); `edit(ir)` runs in between (to add table entries)."""
    from qonnx.passes import REGISTRY

    ir = import_proto(model)
    ctx = PassContext(calibration=open_calibration(make_samples(model, 16, seed=1), ir), seed=0)
    ir, _ = PassManager(parse_pipeline("canonicalize,fold-bn,plan")).run(ir, ctx)
    if edit is not None:
        edit(ir)
    return REGISTRY["calibrate"]().run(ir, ctx).model


def output_scale(proto: onnx.ModelProto, name: str) -> float:
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if name in n.output)
    assert dq.op_type == "DequantizeLinear"
    return float(np.max(inits[dq.input[1]]))


def lsb_diff(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale)


# --------------------------------------------------------------------------- QOperator structure
QOP_OPS = {
    "conv_bn_relu_conv": {"QLinearConv": 2},
    "depthwise_block": {"QLinearConv": 3},
    "residual_block": {"QLinearConv": 3, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1},
    "conv_pool_gemm": {"QLinearConv": 1, "MaxPool": 1, "Reshape": 1, "QGemm": 1},
    "matmul_mlp": {"QGemm": 1, "MatMulIntegerToFloat": 1},
    "attention_like": {"QLinearMatMul": 3, "MatMulIntegerToFloat": 2, "Softmax": 1},  # Softmax: float island
    "pad_conv": {"QLinearConv": 1},
    "one_conv": {"QLinearConv": 1},
}


@pytest.mark.parametrize("name", sorted(QOP_OPS))
def test_qop_graph_holds_qlinear_operators_and_ort_keeps_them(name):
    model, result = optimized(name)
    proto = export_qop(result.ir)
    onnx.checker.check_model(proto)
    ops = op_counts(proto)
    for op, count in QOP_OPS[name].items():
        assert ops.get(op, 0) == count, ops
    assert not FLOAT_OPS & set(ops), ops
    assert ops.get("Relu", 0) == ops.get("Clip", 0) == 0  # absorbed into the output grids
    # Quantize only at graph inputs (and after the float Softmax), dequantize only at outputs.
    inputs = {i.name for i in proto.graph.input} | {n.output[0] for n in proto.graph.node if n.op_type == "Softmax"}
    assert all(n.input[0] in inputs for n in proto.graph.node if n.op_type == "QuantizeLinear")
    outputs = {o.name for o in proto.graph.output}
    assert all(n.output[0] in outputs for n in proto.graph.node if n.op_type == "DequantizeLinear")
    report = fusion_report(proto)
    assert report.float_layers == [] and report.integer_count >= 1
    opt_ops = op_counts(optimized_graph(proto))
    assert not FLOAT_OPS & set(opt_ops), opt_ops


def test_qop_types_hit_the_fast_kernels():
    _, result = optimized("conv_bn_relu_conv")
    proto = export_qop(result.ir)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "QLinearConv"]
    assert int(inits[convs[0].input[7]]) == 0  # after Relu: the zero point is the type minimum
    for conv in convs:
        x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = (inits.get(i) for i in conv.input[1:])
        assert x_zp.dtype == np.uint8 and y_zp.dtype == np.uint8 and x_zp.shape == ()
        assert w.dtype == np.int8 and w_zp.dtype == np.int8 and np.all(w_zp == 0)
        assert w_scale.shape == (w.shape[0],)
        assert bias.dtype == np.int32


@pytest.mark.parametrize("name", sorted(QOP_OPS))
def test_qop_output_is_within_one_lsb_of_qdq(name):
    model, result = optimized(name)
    proto = export_qop(result.ir)
    out = proto.graph.output[0].name
    for seed in range(3):
        feed = feed_for(model, seed=40 + seed, batch=1)
        qdq = run_ort(result.model, feed, "all")[0]
        qop = run_ort(proto, feed, "all")[0]
        if out in {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}:
            assert lsb_diff(qop, qdq, output_scale(proto, out)).max() <= 1
        else:  # float output of QGemm / MatMulIntegerToFloat: same integer kernel as ORT's fused QDQ
            np.testing.assert_allclose(qop, qdq, rtol=1e-5, atol=1e-5)


def test_int8_table_entries_export_as_uint8_with_shifted_zero_points():
    ir = optimized("conv_pool_gemm")[1].ir
    signed = ir.copy()
    for entry in signed.quant.of_role(Role.ACTIVATION).values():
        entry.scheme = dataclasses.replace(entry.scheme, signed=True)
        entry.zero_point = np.asarray(entry.zero_point) - 128
    a, b = export_qop(ir), export_qop(signed)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_concat_mul_average_pool_and_pass_through_ops():
    g = rng(80)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,4,4] y) {
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        ra = Relu (a)
        b = Conv <kernel_shape = [1, 1]> (x, wb, bb)
        rb = Relu (b)
        cat = Concat <axis = 1> (ra, rb)
        c = Conv <kernel_shape = [1, 1]> (cat, wc, bc)
        m = Mul (c, ra)
        p = MaxPool <kernel_shape = [2, 2], strides = [1, 1], pads = [0, 0, 1, 1]> (m)
        t = Transpose <perm = [0, 1, 3, 2]> (p)
        y = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (t)
    }""", {"wa": randn(g, 4, 3, 1, 1), "ba": randn(g, 4), "wb": randn(g, 4, 3, 1, 1), "bb": randn(g, 4),
           "wc": randn(g, 4, 8, 1, 1), "bc": randn(g, 4)})
    ir = calibrated(model)
    qdq = export_qdq(ir)
    proto = export_qop(ir)
    ops = op_counts(proto)
    assert ops == {"QuantizeLinear": 1, "QLinearConv": 3, "QLinearConcat": 1, "QLinearMul": 1, "MaxPool": 1,
                   "Transpose": 1, "QLinearAveragePool": 1, "DequantizeLinear": 1}, ops
    feed = feed_for(model, seed=3, batch=1)
    scale = output_scale(proto, "y")
    assert lsb_diff(run_ort(proto, feed, "all")[0], run_ort(qdq, feed, "all")[0], scale).max() <= 1
    # The same graph integer-only: every op integer, bit-exact with the reference.
    ints = export_int_only(ir)
    assert {"ConvInteger", "Concat", "MaxPool", "Transpose"} <= set(op_counts(ints))
    np.testing.assert_array_equal(run_ort(ints, feed, "all")[0], IntegerReference(ints).run(feed)["y"])
    assert lsb_diff(run_ort(ints, feed, "all")[0], run_ort(qdq, feed, "all")[0], scale).max() <= 2


def _sigmoid_model(op: str = "Sigmoid") -> onnx.ModelProto:
    g = rng(90)
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        s = {op} (a)
        y = Conv <kernel_shape = [1, 1]> (s, wb, bb)
    }}""", {"wa": randn(g, 4, 3, 1, 1), "ba": randn(g, 4), "wb": randn(g, 4, 4, 1, 1), "bb": randn(g, 4)})


def _quantize_tensor(name: str):
    def edit(ir):
        ir.quant.set(name, TensorQuant(Role.ACTIVATION, QuantScheme(bits=8, signed=False, symmetric=False)))
    return edit


@pytest.mark.parametrize("op", ["Sigmoid", "LeakyRelu"])
def test_unary_activations_with_quantized_output(op):
    model = _sigmoid_model(op)
    ir = calibrated(model, _quantize_tensor("s"))
    proto = export_qop(ir)
    assert op_counts(proto).get(f"QLinear{op}", 0) == 1
    feed = feed_for(model, seed=4, batch=1)
    qdq = run_ort(export_qdq(ir), feed, "all")[0]
    scale = output_scale(proto, "y")
    assert lsb_diff(run_ort(proto, feed, "all")[0], qdq, scale).max() <= 1
    ints = export_int_only(ir)
    assert op_counts(ints).get("Gather", 0) == 1  # a 256-entry lookup table
    np.testing.assert_array_equal(run_ort(ints, feed, "all")[0], IntegerReference(ints).run(feed)["y"])
    assert lsb_diff(run_ort(ints, feed, "all")[0], qdq, scale).max() <= 2


def test_op_without_integer_form_becomes_a_float_island_in_qop_and_an_error_in_int_only():
    model = _sigmoid_model("Softsign")
    ir = calibrated(model)
    proto = export_qop(ir)
    g = {o: n for n in proto.graph.node for o in n.output}
    island = next(n for n in proto.graph.node if n.op_type == "Softsign")
    assert g[island.input[0]].op_type == "DequantizeLinear"
    consumer = next(n for n in proto.graph.node if island.output[0] in n.input)
    assert consumer.op_type == "QuantizeLinear"
    feed = feed_for(model, seed=5, batch=1)
    qdq = run_ort(export_qdq(ir), feed, "all")[0]
    assert lsb_diff(run_ort(proto, feed, "all")[0], qdq, output_scale(proto, "y")).max() <= 1
    with pytest.raises(ExportError, match="Softsign"):
        export_int_only(ir)


def test_relu_the_grid_does_not_cover_keeps_the_layer_float_with_qdq_numerics():
    model = one_conv()

    ir = calibrated(model)
    entry = ir.quant.get("y")
    entry.zero_point = np.asarray(40, np.int64)  # the grid now reaches -40 s, below the Relu's 0
    proto = export_qop(ir)
    ops = op_counts(proto)
    assert ops == {"QuantizeLinear": 2, "DequantizeLinear": 4, "Conv": 1, "Relu": 1}, ops  # DQ: x, w, b, y
    feed = feed_for(model, seed=6, batch=1)
    qdq = run_ort(export_qdq(ir), feed, "all")[0]
    np.testing.assert_array_equal(run_ort(proto, feed, "all")[0], qdq)


# --------------------------------------------------------------------------- dynamic MatMuls
def _dynamic_ir():
    """matmul_mlp with its last MatMul quantized per run (as protect{fallback=dynamic} leaves it)."""
    ir = optimized("matmul_mlp")[1].ir.copy()
    node = next(n for n in ir.nodes if n.op == "MatMul")
    layer = ir.quant.layers.pop(node.name)
    ir.quant.dynamic[node.name] = ir.quant.tensors.pop(layer.weight)
    return ir


def test_qop_writes_dynamic_matmuls_as_the_qdq_exporter_does():
    ir = _dynamic_ir()
    proto = export_qop(ir)
    ops = op_counts(proto)
    assert ops.get("DynamicQuantizeLinear", 0) == 1 and ops.get("MatMulInteger", 0) == 1 and "MatMul" not in ops
    feed = feed_for(MODEL_BUILDERS["matmul_mlp"](), seed=8, batch=3)
    np.testing.assert_allclose(run_ort(proto, feed, "all")[0], run_ort(export_qdq(ir), feed, "all")[0],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("exporter", [export_qop, export_int_only])
def test_export_is_deterministic_and_leaves_the_ir_alone(exporter):
    ir = optimized("residual_block")[1].ir
    before = ir.to_bytes()
    a = exporter(ir).SerializeToString(deterministic=True)
    assert exporter(ir).SerializeToString(deterministic=True) == a
    assert ir.to_bytes() == before


@pytest.mark.parametrize("exporter", [export_qop, export_int_only])
def test_uncalibrated_and_unsupported_tables_are_refused(exporter):
    model = conv_pool_gemm()
    ir = import_proto(model)
    ir, _ = PassManager(parse_pipeline("canonicalize,fold-bn,plan")).run(ir, PassContext(seed=0))
    with pytest.raises(ExportError, match="calibrat"):
        exporter(ir)
    ir = optimized("one_conv")[1].ir.copy()
    entry = ir.quant.get("y")
    entry.scheme = dataclasses.replace(entry.scheme, bits=16)
    with pytest.raises(ExportError, match="8-bit activations"):
        exporter(ir)
    ir = optimized("one_conv")[1].ir.copy()
    ir.quant.get("y").scale = np.full(4, 0.1, np.float32)
    with pytest.raises(ExportError, match="per-channel"):
        exporter(ir)


def test_optimize_exports_the_requested_format(tmp_path: Path):
    model = depthwise_block()
    data = make_samples(model, 16, seed=1)
    qop = qonnx.optimize(model, data, export_format="qop")
    assert op_counts(qop.model).get("QLinearConv", 0) == 3
    assert qop.fusion is not None and qop.fusion.float_layers == [] and qop.fidelity["sqnr_db"] > 25
    ints = qonnx.optimize(model, data, export_format="int-only")
    assert op_counts(ints.model).get("ConvInteger", 0) == 3
    assert ints.fusion.integer_ops["ConvInteger"] == 3 and ints.fidelity["sqnr_db"] > 25
    with pytest.raises(InputError, match="unknown export format"):
        qonnx.optimize(model, data, export_format="qlinear")


# --------------------------------------------------------------------------- real model
@pytest.mark.realmodel
def test_fmnist_cnn_qop_and_int_only():
    task = Path(__file__).resolve().parents[2] / "models" / ".cache" / "fmnist_cnn"
    if not (task / "model.onnx").exists():
        pytest.skip("fmnist_cnn is not prepared (models/prepare.py)")
    result = qonnx.optimize(task / "model.onnx", task / "calib.npz", pipeline="w8a8-static", check_fusion=False)
    qop, ints = export_qop(result.ir), export_int_only(result.ir)
    assert op_counts(qop).get("QLinearConv", 0) == 7 and op_counts(qop).get("QGemm", 0) == 1
    data = np.load(task / "eval.npz")
    name = next(iter(data.files))
    x = data[name][:64]
    qdq_out = run_ort(result.model, {name: x}, "all")[0]
    qop_out = run_ort(qop, {name: x}, "all")[0]
    np.testing.assert_allclose(qop_out, qdq_out, rtol=1e-5, atol=1e-5)
    int_out = run_ort(ints, {name: x}, "all")[0]
    ref = IntegerReference(ints)
    np.testing.assert_array_equal(int_out, ref.run({name: x})[ints.graph.output[0].name])
    assert np.mean(np.argmax(int_out, 1) == np.argmax(qdq_out, 1)) >= 0.95

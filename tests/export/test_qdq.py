"""QDQ export: the patterns ORT's CPU EP fuses, parameters, numerics, determinism, metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qonnx
from qonnx.errors import ExportError
from qonnx.export.qdq import export_qdq
from qonnx.infra.context import PassContext
from qonnx.infra.manager import PassManager
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import optimized_graph
from tests.helpers import (
    MODEL_BUILDERS,
    attention_like,
    build_model,
    conv_bn_relu_conv,
    conv_pool_gemm,
    depthwise_block,
    feed_for,
    import_proto,
    make_samples,
    matmul_mlp,
    one_conv,
    op_counts,
    randn,
    residual_block,
    rng,
    run_ort,
    sqnr,
)

SQNR_FLOOR_DB = 25.0
FLOAT_LAYERS = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def residual_add_gap(seed: int = 12) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, Add with the skip, GlobalAveragePool (no Relu after the Add)."""
    g = rng(seed)
    inits = {"w0": randn(g, 4, 3, 3, 3, scale=0.3), "b0": randn(g, 4, scale=0.1),
             "w1": randn(g, 4, 4, 3, 3, scale=0.3), "b1": randn(g, 4, scale=0.1)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,1,1] y) {
        c0 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w0, b0)
        r0 = Relu (c0)
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r0, w1, b1)
        s = Add (c1, r0)
        y = GlobalAveragePool (s)
    }""", inits)


ALL_BUILDERS = {**MODEL_BUILDERS, "residual_add_gap": residual_add_gap}

_CACHE: dict[str, tuple[onnx.ModelProto, qonnx.OptimizeResult]] = {}


def optimized(name: str):
    """(float model, optimize result) for a named tiny model, computed once per session."""
    if name not in _CACHE:
        model = ALL_BUILDERS[name]()
        # The attention model exercises activation x activation MatMuls, which the default plan keeps float.
        pipeline = ("canonicalize,fold-bn,plan{activation_matmul=true},calibrate,bias-correction"
                    if name == "attention_like" else "w8a8")
        _CACHE[name] = (model, qonnx.optimize(model, make_samples(model, 24, seed=1), pipeline=pipeline, seed=0))
    return _CACHE[name]


class Graph:
    """Lookups over an exported (or ORT-optimized) model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def nodes(self, op):
        return [n for n in self.model.graph.node if n.op_type == op]

    def dq_params(self, tensor: str):
        """(codes or None, scale, zero point, axis) of the DQ producing `tensor`."""
        dq = self.producer[tensor]
        assert dq.op_type == "DequantizeLinear", f"'{tensor}' is produced by {dq.op_type}"
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        return self.inits.get(dq.input[0]), self.inits[dq.input[1]], self.inits[dq.input[2]], axis


def float_layers_with_constant_weights(opt: onnx.ModelProto) -> list[str]:
    g = Graph(opt)
    bad = []
    for n in opt.graph.node:
        if n.op_type in FLOAT_LAYERS and len(n.input) > 1:
            w = n.input[1]
            src = g.producer.get(w)
            if w in g.inits or (src is not None and src.op_type == "DequantizeLinear"):
                bad.append(f"{n.op_type}:{n.name}")
    return bad


# --------------------------------------------------------------------------- ORT fusion
EXPECTED_KERNELS = {
    "conv_bn_relu_conv": {"QLinearConv": 2},
    "depthwise_block": {"QLinearConv": 3},
    "residual_block": {"QLinearConv": 3, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1},
    "residual_add_gap": {"QLinearConv": 2, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1},
    "conv_pool_gemm": {"QLinearConv": 1, "QGemm": 1},
    "pad_conv": {"QLinearConv": 1},
    "shape_chain_pad": {"QLinearConv": 1},
    "identity_dropout": {"QLinearConv": 1},
    "one_conv": {"QLinearConv": 1},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_ort_fuses_every_layer(name):
    _, result = optimized(name)
    opt = optimized_graph(result.model)
    ops = op_counts(opt)
    for op, count in EXPECTED_KERNELS[name].items():
        assert ops.get(op, 0) == count, f"{op}: {ops}"
    assert float_layers_with_constant_weights(opt) == []
    for op in ("Conv", "Gemm", "Add", "GlobalAveragePool"):
        assert ops.get(op, 0) == 0, f"float {op} left in ORT's graph: {ops}"
    assert result.fusion is not None and result.fusion.float_layers == []
    assert result.notes == []


@pytest.mark.parametrize("name", ["matmul_mlp", "attention_like"])
def test_matmuls_run_as_integer_kernels(name):
    _, result = optimized(name)
    opt = optimized_graph(result.model)
    ops = op_counts(opt)
    assert "MatMul" not in ops and "FusedMatMul" not in ops, ops
    # MatMul -> QLinearMatMul / MatMulIntegerToFloat; a MatMul + bias Add may become QGemm.
    integer = ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0)
    assert integer == {"matmul_mlp": 2, "attention_like": 5}[name], ops
    if name == "attention_like":
        assert ops.get("QLinearMatMul", 0) >= 2  # the activation x activation MatMuls
    assert float_layers_with_constant_weights(opt) == []


def test_default_plan_keeps_activation_matmuls_float_and_says_why():
    model = ALL_BUILDERS["attention_like"]()
    result = qonnx.optimize(model, make_samples(model, 24, seed=1), seed=0)
    ops = op_counts(optimized_graph(result.model))
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == 2, ops
    reasons = [r for r in result.ir.quant.kept_float.values() if "two activations" in r]
    assert len(reasons) == 2


def test_maxpool_and_reshape_run_on_integers():
    _, result = optimized("conv_pool_gemm")
    opt = optimized_graph(result.model)
    ops = op_counts(opt)
    # Tied parameters let ORT drop the Q/DQ pairs around MaxPool and Reshape.
    assert ops.get("DequantizeLinear", 0) == 0, ops
    assert ops.get("QuantizeLinear", 0) == 1, ops  # only the model input


# --------------------------------------------------------------------------- exported parameters
@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_one_dq_per_q(name):
    _, result = optimized(name)
    g = Graph(result.model)
    qs = g.nodes("QuantizeLinear")
    assert qs
    for q in qs:
        consumers = g.consumers.get(q.output[0], [])
        assert [c.op_type for c in consumers] == ["DequantizeLinear"], q.name
        assert q.output[0] not in {o.name for o in result.model.graph.output}


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_weights_biases_and_activations(name):
    _, result = optimized(name)
    g = Graph(result.model)
    layers = [n for n in result.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert layers
    for node in layers:
        x_codes, s_x, z_x, _ = g.dq_params(node.input[0])
        assert x_codes is None  # activations come through Q -> DQ
        assert s_x.dtype == np.float32 and z_x.dtype == np.uint8
        w_codes, s_w, z_w, axis = g.dq_params(node.input[1])
        if w_codes is None:  # activation x activation MatMul
            assert node.op_type == "MatMul" and z_w.dtype == np.uint8
            continue
        assert w_codes.dtype == np.int8
        assert np.all(z_w == 0) and z_w.dtype == np.int8
        assert w_codes.min() >= -127  # symmetric (restricted) int8 grid
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        want_axis = {"Conv": 0, "Gemm": 0 if trans_b else 1, "MatMul": 1}[node.op_type]
        assert axis == want_axis, node.name
        assert s_w.shape == (w_codes.shape[want_axis],)
        assert np.all(s_w > 0)
        if len(node.input) > 2 and node.input[2]:
            b_codes, s_b, z_b, b_axis = g.dq_params(node.input[2])
            assert b_codes.dtype == np.int32 and np.all(z_b == 0)
            assert b_axis == 0
            np.testing.assert_allclose(s_b, np.float32(s_x) * s_w, rtol=1e-6)


def test_activation_parameters_are_per_tensor_scalars():
    # A per-tensor scale/zero point is a scalar in ONNX; a 1-D [1] tensor means per-axis,
    # and ORT's QLinearAdd/QLinearMul selectors refuse it (see the residual fusion test).
    names = [n for n in sorted(ALL_BUILDERS) if n != "residual_block"]
    wrong = []
    for name in names:
        _, result = optimized(name)
        g = Graph(result.model)
        for q in g.nodes("QuantizeLinear"):
            scale, zp = g.inits[q.input[1]], g.inits[q.input[2]]
            assert zp.dtype == np.uint8 and scale.dtype == np.float32 and np.all(scale > 0)
            if scale.shape != () or zp.shape != ():
                wrong.append(f"{name}/{q.name}: scale {scale.shape}, zero point {zp.shape}")
    assert wrong == []


@pytest.mark.parametrize(("name", "tensor"), [("one_conv", "y"), ("conv_bn_relu_conv", "r1"),
                                              ("depthwise_block", "r1"), ("depthwise_block", "r2")])
def test_activations_after_relu_or_clip_have_zero_point_zero(name, tensor):
    _, result = optimized(name)
    g = Graph(result.model)
    q = next(n for n in g.nodes("QuantizeLinear") if n.name.startswith(tensor + "_"))
    zp = g.inits[q.input[2]]
    assert zp.dtype == np.uint8 and int(zp.reshape(-1)[0]) == 0


def test_bias_and_weight_codes_reproduce_the_float_values():
    model, result = optimized("conv_bn_relu_conv")
    ir = result.ir
    g = Graph(result.model)
    for layer in ir.quant.layers.values():
        w = ir.constant_value(ir.tensors()[layer.weight])
        node = next(n for n in result.model.graph.node if n.op_type == "Conv" and
                    n.input[1].startswith(layer.weight + "_"))
        codes, s_w, _, _ = g.dq_params(node.input[1])
        deq = codes.astype(np.float32) * s_w[:, None, None, None]
        np.testing.assert_allclose(deq, w, atol=float(s_w.max()) / 2 + 1e-7)
        # Per-channel min/max: every channel uses its grid's extreme code.
        assert np.all(np.abs(codes).reshape(len(codes), -1).max(axis=1) == 127)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_quantized_outputs_stay_close_to_float(name):
    model, result = optimized(name)
    feed = feed_for(model, seed=99, batch=1)
    ref = run_ort(model, feed)[0]
    got = run_ort(result.model, feed, level="all")[0]
    assert got.shape == ref.shape
    assert sqnr(ref, got) > SQNR_FLOOR_DB
    # The QDQ model (unfused reference semantics) agrees with ORT's fused kernels.
    unfused = run_ort(result.model, feed, level="disable")[0]
    assert sqnr(unfused, got) > SQNR_FLOOR_DB + 10


def test_fidelity_is_reported_on_held_out_samples():
    _, result = optimized("conv_bn_relu_conv")
    assert result.fidelity is not None
    assert result.fidelity["samples"] >= 1
    assert result.fidelity["sqnr_db"] > SQNR_FLOOR_DB


def _conv2d_int(x: np.ndarray, w: np.ndarray, pads: list[int]) -> np.ndarray:
    """int64 NCHW convolution (stride 1, no dilation, group 1)."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N,C,H,W,kh,kw
    return np.einsum("nchwij,ocij->nohw", win.astype(np.int64), w.astype(np.int64))


def test_one_conv_integer_reference_matches_ort_within_one_lsb():
    model, result = optimized("one_conv")
    exported = result.model
    opt = optimized_graph(exported)
    assert op_counts(opt).get("QLinearConv", 0) == 1
    g = Graph(exported)
    conv = g.nodes("Conv")[0]
    _, s_x, z_x, _ = g.dq_params(conv.input[0])
    w_q, s_w, _, _ = g.dq_params(conv.input[1])
    b_q, _, _, _ = g.dq_params(conv.input[2])
    out_name = exported.graph.output[0].name
    out_dq = g.producer[out_name]
    s_y, z_y = g.inits[out_dq.input[1]], g.inits[out_dq.input[2]]
    # (per-tensor parameters read shape-agnostically: their shape is checked elsewhere)
    s_x, z_x = np.float32(s_x.reshape(-1)[0]), int(z_x.reshape(-1)[0])
    s_y, z_y = np.float32(s_y.reshape(-1)[0]), int(z_y.reshape(-1)[0])
    pads = next(list(a.ints) for a in conv.attribute if a.name == "pads")

    total = 0
    for seed in range(4):
        x = feed_for(model, seed=200 + seed, batch=1)["x"] * (1 + seed)  # include saturation
        x_q = np.clip(np.rint(x / s_x) + z_x, 0, 255).astype(np.int64)
        acc = _conv2d_int(x_q - z_x, w_q, pads) + b_q.astype(np.int64)[None, :, None, None]
        multiplier = (s_x * s_w / s_y).astype(np.float32)
        y_ref = np.clip(np.rint(acc.astype(np.float32) * multiplier[None, :, None, None]) + z_y, 0, 255)
        y_ort = run_ort(exported, {"x": x}, level="all")[0]
        codes = np.rint(y_ort / s_y) + z_y
        diff = np.abs(codes - y_ref)
        assert diff.max() <= 1
        total += int(np.count_nonzero(diff))
    assert total <= 0.01 * 4 * y_ref.size  # usually exact


# --------------------------------------------------------------------------- export contract
def calibrated_ir(builder=conv_bn_relu_conv):
    from qonnx.data.calibration import open_calibration

    model = builder()
    ir = import_proto(model)
    ctx = PassContext(calibration=open_calibration(make_samples(model, 8), ir), seed=0)
    ir, _ = PassManager(parse_pipeline("w8a8")).run(ir, ctx)
    return ir


def test_export_does_not_modify_the_input_ir():
    ir = calibrated_ir()
    before = ir.to_bytes()
    states = {k: (v.state, np.array(v.scale).tobytes()) for k, v in ir.quant.tensors.items()}
    names = sorted(t for t in ir.tensors())
    proto = export_qdq(ir)
    assert ir.to_bytes() == before
    assert {k: (v.state, np.array(v.scale).tobytes()) for k, v in ir.quant.tensors.items()} == states
    assert sorted(ir.tensors()) == names
    assert export_qdq(ir).SerializeToString(deterministic=True) == proto.SerializeToString(deterministic=True)


def test_export_keeps_the_model_interface():
    for name in ("conv_bn_relu_conv", "residual_add_gap", "attention_like", "matmul_mlp"):
        model, result = optimized(name)

        def sig(m):
            return [(v.name, v.type.tensor_type.elem_type) for v in m.graph.input if
                    v.name not in {i.name for i in m.graph.initializer}], \
                   [(v.name, v.type.tensor_type.elem_type) for v in m.graph.output]

        assert sig(result.model) == sig(model), name
        onnx.checker.check_model(result.model, full_check=True)


def test_export_of_an_uncalibrated_plan_is_refused():
    model = conv_bn_relu_conv()
    with pytest.raises(ExportError, match="calibrat"):
        qonnx.optimize(model, None, pipeline="canonicalize,fold-bn,plan")


def test_data_free_pipeline_without_layers_exports_the_float_graph():
    model = conv_bn_relu_conv()
    result = qonnx.optimize(model, None, pipeline="canonicalize,fold-bn")
    assert "QuantizeLinear" not in op_counts(result.model)
    feed = feed_for(model, batch=1)
    np.testing.assert_allclose(run_ort(result.model, feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_optimize_does_not_modify_a_proto_argument():
    model = conv_bn_relu_conv()
    before = model.SerializeToString(deterministic=True)
    qonnx.optimize(model, make_samples(model, 8))
    assert model.SerializeToString(deterministic=True) == before


# --------------------------------------------------------------------------- determinism, metadata
@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "attention_like", "conv_pool_gemm"])
def test_same_inputs_give_byte_identical_output(name):
    model = ALL_BUILDERS[name]()
    data = make_samples(model, 12, seed=5)
    a = qonnx.optimize(model, data, seed=3).to_bytes()
    b = qonnx.optimize(ALL_BUILDERS[name](), {k: v.copy() for k, v in data.items()}, seed=3).to_bytes()
    assert a == b


def test_metadata_says_how_to_reproduce():
    model = conv_bn_relu_conv()
    result = qonnx.optimize(model, make_samples(model, 8), pipeline="w8a8-minmax", seed=17)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["qonnx.version"] == qonnx.__version__
    assert meta["qonnx.seed"] == "17"
    assert meta["qonnx.pipeline"] == parse_pipeline("w8a8-minmax").canonical()
    assert result.model.producer_name == "qonnx"


def test_existing_metadata_is_kept():
    model = one_conv()
    model.metadata_props.add(key="author", value="tests")
    result = qonnx.optimize(model, make_samples(model, 8))
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["author"] == "tests" and "qonnx.pipeline" in meta


def test_exported_size_shrinks():
    g = rng(70)
    model = build_model("""
    agraph (float[1,16,8,8] x) => (float[1,32,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }""", {"w": randn(g, 32, 16, 3, 3, scale=0.1), "b": randn(g, 32, scale=0.1)})
    result = qonnx.optimize(model, make_samples(model, 8))
    assert result.size_after < 0.5 * result.size_before


@pytest.mark.parametrize("builder", [depthwise_block, residual_block, matmul_mlp, attention_like, conv_pool_gemm],
                         ids=lambda b: b.__name__)
def test_ir_copy_round_trip_is_lossless(builder):
    ir = import_proto(builder())
    assert ir.copy().to_bytes() == ir.to_bytes()


# --------------------------------------------------------------------------- more graph shapes
def _two_branch(op_text: str, out_shape: str = "float[1,4,8,8]", seed: int = 80) -> onnx.ModelProto:
    g = rng(seed)
    inits = {"wa": randn(g, 4, 3, 1, 1, scale=0.3), "ba": randn(g, 4, scale=0.1),
             "wb": randn(g, 4, 3, 1, 1, scale=0.3), "bb": randn(g, 4, scale=0.1),
             "wc": randn(g, 4, 8, 1, 1, scale=0.3), "bc": randn(g, 4, scale=0.1)}
    return build_model(f"""
    agraph (float[1,3,8,8] x) => ({out_shape} y) {{
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        ra = Relu (a)
        b = Conv <kernel_shape = [1, 1]> (x, wb, bb)
        rb = Relu (b)
        {op_text}
    }}""", inits)


def _check_fused(model, expected: dict[str, int]):
    result = qonnx.optimize(model, make_samples(model, 16, seed=2))
    opt = optimized_graph(result.model)
    ops = op_counts(opt)
    for op, count in expected.items():
        assert ops.get(op, 0) == count, f"{op}: {ops}"
    assert float_layers_with_constant_weights(opt) == []
    feed = feed_for(model, seed=5, batch=1)
    assert sqnr(run_ort(model, feed)[0], run_ort(result.model, feed, "all")[0]) > SQNR_FLOOR_DB
    return result


def test_concat_becomes_qlinearconcat():
    model = _two_branch("""cat = Concat <axis = 1> (ra, rb)
        y = Conv <kernel_shape = [1, 1]> (cat, wc, bc)""")
    _check_fused(model, {"QLinearConv": 3, "QLinearConcat": 1})


def test_mul_then_average_pool_exports_a_model_ort_can_load():
    model = _two_branch("""m = Mul (ra, rb)
        y = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (m)""", "float[1,4,4,4]")
    _check_fused(model, {"QLinearConv": 2, "QLinearMul": 1, "QLinearAveragePool": 1})


def test_relu_output_shared_by_two_convs_and_an_add():
    g = rng(81)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        r = Relu (a)
        p = Conv <kernel_shape = [1, 1]> (r, wb, bb)
        q = Conv <kernel_shape = [1, 1]> (r, wc, bc)
        y = Add (p, q)
    }""", {"wa": randn(g, 4, 3, 1, 1), "ba": randn(g, 4), "wb": randn(g, 4, 4, 1, 1), "bb": randn(g, 4),
           "wc": randn(g, 4, 4, 1, 1), "bc": randn(g, 4)})
    result = _check_fused(model, {"QLinearConv": 3, "QLinearAdd": 1})
    g2 = Graph(result.model)
    assert len(g2.nodes("QuantizeLinear")) == len(g2.nodes("DequantizeLinear")) - 6  # 3 weights + 3 biases


def test_graph_output_that_also_feeds_a_layer():
    g = rng(82)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        y = Relu (a)
        z = Conv <kernel_shape = [1, 1]> (y, wc, bc)
    }""", {"wa": randn(g, 4, 3, 1, 1), "ba": randn(g, 4), "wc": randn(g, 4, 4, 1, 1), "bc": randn(g, 4)})
    result = _check_fused(model, {"QLinearConv": 2})
    feed = feed_for(model, seed=6, batch=1)
    for ref, got in zip(run_ort(model, feed), run_ort(result.model, feed, "all"), strict=True):
        assert sqnr(ref, got) > SQNR_FLOOR_DB


@pytest.mark.parametrize("add_name", ["asum", "zsum"])
def test_add_then_relu_then_conv_does_not_depend_on_tensor_names(add_name):
    # The ResNet block tail: Add -> Relu -> Conv. Whether export works must not depend
    # on how the Add output happens to sort against the Relu output.
    g = rng(83)
    model = build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        a = Conv <kernel_shape = [1, 1]> (x, wa, ba)
        ra = Relu (a)
        b = Conv <kernel_shape = [1, 1]> (ra, wb, bb)
        {add_name} = Add (b, ra)
        r2 = Relu ({add_name})
        y = Conv <kernel_shape = [1, 1]> (r2, wc, bc)
    }}""", {"wa": randn(g, 4, 3, 1, 1), "ba": randn(g, 4), "wb": randn(g, 4, 4, 1, 1), "bb": randn(g, 4),
            "wc": randn(g, 4, 4, 1, 1), "bc": randn(g, 4)})
    _check_fused(model, {"QLinearConv": 3, "QLinearAdd": 1})

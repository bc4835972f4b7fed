"""plan: which tensors get quant-table entries, with which schemes; the float graph is untouched."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.core.qtable import Role
from qonnx.infra.context import PassContext
from qonnx.passes import REGISTRY, parse_pipeline
from tests.helpers import (
    attention_like,
    build_model,
    conv_bn_relu_conv,
    conv_pool_gemm,
    depthwise_block,
    import_proto,
    matmul_mlp,
    randn,
    residual_block,
    rng,
)

UINT8_ASYM = dict(bits=8, signed=False, symmetric=False, axis=None)


def plan(model, spec: str = "plan"):
    (p,) = parse_pipeline(spec).passes
    return p.run(model, PassContext(seed=0))


def prepared(builder, *args, fold: bool = True):
    model = import_proto(builder(*args))
    ctx = PassContext(seed=0)
    model = REGISTRY["canonicalize"]().run(model, ctx).model
    if fold:
        model = REGISTRY["fold-bn"]().run(model, ctx).model
    return model


def scheme_of(model, name):
    entry = model.quant.get(name)
    assert entry is not None, f"no quant entry for '{name}' (entries: {sorted(model.quant.tensors)})"
    return entry


def assert_scheme(entry, **want):
    for key, value in want.items():
        assert getattr(entry.scheme, key) == value, f"{key}: {getattr(entry.scheme, key)} != {value}"


def node_by_weight(model, weight):
    return next(n for n in model.nodes if len(n.inputs) > 1 and n.inputs[1].name == weight)


# --------------------------------------------------------------------------- structure
def test_conv_bn_relu_conv_plan():
    model = prepared(conv_bn_relu_conv)
    result = plan(model)
    assert result.modified is True
    q = result.model.quant
    # Two integer layers, two weights, two biases.
    assert len(q.layers) == 2
    assert set(q.of_role(Role.WEIGHT)) == {"w1", "w2"}
    assert set(q.of_role(Role.BIAS)) == {"b1", "b2"}
    # Activations: the input, the Relu output (absorbed) and the last Conv output.
    assert set(q.of_role(Role.ACTIVATION)) == {"x", "r1", "y"}
    assert "n1" not in q.tensors and "c1" not in q.tensors
    first = q.layers[node_by_weight(result.model, "w1").name]
    assert (first.input, first.weight, first.bias, first.output) == ("x", "w1", "b1", "r1")
    assert result.stats["layers"] == 2 and result.stats["kept_float"] == 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_weight_scheme(per_channel):
    model = prepared(conv_bn_relu_conv)
    plan(model, f"plan{{per_channel={str(per_channel).lower()}}}")
    for w in ("w1", "w2"):
        assert_scheme(scheme_of(model, w), bits=8, signed=True, symmetric=True,
                      axis=0 if per_channel else None)
        assert model.quant.get(w).role is Role.WEIGHT


def test_bias_scheme_points_at_its_activation_and_weight():
    model = prepared(conv_bn_relu_conv)
    plan(model)
    bias = scheme_of(model, "b2")
    assert bias.role is Role.BIAS
    assert_scheme(bias, bits=32, signed=True)
    assert bias.bias_of == ("r1", "w2")


def test_activations_are_uint8_asymmetric():
    for builder in (conv_bn_relu_conv, depthwise_block, conv_pool_gemm, matmul_mlp, attention_like):
        model = prepared(builder)
        plan(model)
        acts = model.quant.of_role(Role.ACTIVATION)
        assert acts, builder.__name__
        for entry in acts.values():
            assert_scheme(entry, **UINT8_ASYM)


def test_clip_outputs_are_quantized_instead_of_conv_outputs():
    model = prepared(depthwise_block)
    plan(model)
    acts = set(model.quant.of_role(Role.ACTIVATION))
    assert {"r1", "r2"} <= acts
    assert not {"c1", "c2"} & acts
    assert len(model.quant.layers) == 3
    dw = model.quant.layers[node_by_weight(model, "wd").name]
    assert (dw.input, dw.output) == ("r1", "r2")
    assert_scheme(scheme_of(model, "wd"), axis=0)


def test_clip_with_nonzero_min_is_not_absorbed():
    g = rng(50)
    model = import_proto(build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = Conv <kernel_shape = [1, 1]> (x, w, b)
        y = Clip (c, lo, hi)
    }""", {"w": randn(g, 4, 3, 1, 1), "b": randn(g, 4), "lo": np.array(-1.0, np.float32),
           "hi": np.array(1.0, np.float32)}))
    plan(model)
    layer = next(iter(model.quant.layers.values()))
    assert layer.output == "c"
    assert "c" in model.quant.tensors


@pytest.mark.parametrize(("trans_b", "axis"), [(1, 0), (0, 1)])
def test_gemm_weight_axis(trans_b, axis):
    model = prepared(conv_pool_gemm, 3, trans_b)
    plan(model)
    assert_scheme(scheme_of(model, "wg"), axis=axis, signed=True, symmetric=True)
    assert model.quant.get("bg").role is Role.BIAS
    assert len(model.quant.layers) == 2


def test_matmul_weight_axis_is_the_output_column():
    model = import_proto(matmul_mlp())  # planned as imported: MatMul + a separate Add
    plan(model)
    for w in ("w1", "w2"):
        assert_scheme(scheme_of(model, w), axis=1, signed=True)
    # A MatMul has no bias input: the separate Add's constant is not a quantized bias.
    assert "b1" not in model.quant.tensors
    assert not model.quant.of_role(Role.BIAS)


def test_maxpool_and_reshape_outputs_are_tied_to_their_source():
    model = prepared(conv_pool_gemm)
    plan(model)
    q = model.quant
    assert q.get("r1") is not None and q.get("r1").tied_to is None
    assert q.get("p1").tied_to == "r1"
    assert q.get("f1").tied_to == "r1"
    assert q.root("f1") == "r1"
    gemm = next(layer for layer in q.layers.values() if layer.op == "Gemm")
    assert gemm.input == "f1"


def test_add_is_quantized_when_both_inputs_are():
    model = prepared(residual_block)
    plan(model)
    acts = set(model.quant.of_role(Role.ACTIVATION))
    # c2 (a Conv output, no activation after it) and r0 (absorbed Relu) feed the Add.
    assert {"c2", "r0", "s"} <= acts


def test_add_with_a_constant_or_float_input_is_not_quantized():
    g = rng(51)
    model = import_proto(build_model("""
    agraph (float[1,3,8,8] x, float[1,4,8,8] skip) => (float[1,4,8,8] y, float[1,4,8,8] z) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Add (c, k)
        z = Add (c, skip)
    }""", {"w": randn(g, 4, 3, 3, 3), "b": randn(g, 4), "k": randn(g, 1, 4, 1, 1)}))
    plan(model)
    assert not {"y", "z", "skip", "k"} & set(model.quant.tensors)


def test_attention_matmul_quantizes_both_activations():
    model = prepared(attention_like)
    plan(model, "plan{activation_matmul=true}")
    q = model.quant
    scores = next(n for n in model.nodes if n.op == "MatMul" and n.inputs[0].name == "q")
    layer = q.layers[scores.name]
    assert layer.weight is None and layer.bias is None
    assert q.get("q") is not None and q.get("q").role is Role.ACTIVATION
    assert q.get("kt") is not None and q.get("kt").role is Role.ACTIVATION
    assert len(q.layers) == 5
    assert set(q.of_role(Role.WEIGHT)) == {"wq", "wk", "wv"}


def test_exclude_keeps_a_node_float_and_records_it():
    model = prepared(conv_bn_relu_conv)
    second = node_by_weight(model, "w2").name
    plan(model, f"plan{{exclude=[{second}]}}")
    q = model.quant
    assert second in q.kept_float
    assert "exclude" in q.kept_float[second]
    assert second not in q.layers
    assert "w2" not in q.tensors and "b2" not in q.tensors
    assert len(q.layers) == 1


def test_gemm_with_trans_a_is_kept_float_with_a_reason():
    g = rng(52)
    model = import_proto(build_model("""
    agraph (float[10,2] x) => (float[2,6] y) {
        y = Gemm <transA = 1, transB = 1> (x, wg, bg)
    }""", {"wg": randn(g, 6, 10), "bg": randn(g, 6)}))
    result = plan(model)
    node = model.nodes[0].name
    assert node in model.quant.kept_float
    assert not model.quant.layers
    assert result.modified is False


def test_weight_shared_with_different_layouts_is_not_quantized_twice():
    g = rng(53)
    model = import_proto(build_model("""
    agraph (float[2,8] x) => (float[2,8] y, float[2,8] z) {
        y = Gemm <transB = 1> (x, w)
        z = Gemm <transB = 0> (x, w)
    }""", {"w": randn(g, 8, 8)}))
    plan(model)
    q = model.quant
    assert len(q.layers) == 1
    assert len(q.kept_float) == 1
    assert "different layout" in next(iter(q.kept_float.values()))


def test_weight_that_is_a_graph_input_is_kept_float():
    model = import_proto(build_model("""
    agraph (float[1,3,8,8] x, float[4,3,3,3] w) => (float[1,4,6,6] y) {
        y = Conv <kernel_shape = [3, 3]> (x, w)
    }"""))
    result = plan(model)
    assert result.modified is False
    assert model.nodes[0].name in model.quant.kept_float
    assert not model.quant.tensors


def test_integer_input_layer_is_kept_float():
    model = import_proto(build_model("""
    agraph (int32[2,4] x) => (int32[2,3] y) {
        y = MatMul (x, w)
    }""", {"w": np.ones((4, 3), np.int32)}))
    result = plan(model)
    assert result.modified is False
    assert not model.quant.tensors
    assert "float" in model.quant.kept_float[model.nodes[0].name]


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("builder", [conv_bn_relu_conv, depthwise_block, conv_pool_gemm, matmul_mlp, attention_like],
                         ids=lambda b: b.__name__)
def test_plan_does_not_touch_the_float_graph(builder):
    model = prepared(builder)
    before = model.to_bytes()
    plan(model)
    assert model.to_bytes() == before
    tensors = model.tensors()
    for name, entry in model.quant.tensors.items():
        assert name in tensors
        assert entry.scale is None and entry.zero_point is None  # plan sets no parameters
        if entry.role is not Role.ACTIVATION:
            assert model.is_constant(tensors[name])


# --------------------------------------------------------------------------- negative cases
def test_model_without_layers_plans_nothing():
    model = import_proto(build_model("""
    agraph (float[1,4] x) => (float[1,4] y) {
        r = Relu (x)
        y = Sigmoid (r)
    }"""))
    result = plan(model)
    assert result.modified is False
    assert len(model.quant) == 0 and not model.quant.layers


# --------------------------------------------------------------------------- idempotence
@pytest.mark.parametrize("builder", [conv_bn_relu_conv, conv_pool_gemm, attention_like], ids=lambda b: b.__name__)
def test_second_run_changes_nothing(builder):
    model = prepared(builder)
    first = plan(model)
    assert first.modified is True
    snapshot = {k: (v.role, v.scheme, v.tied_to, v.bias_of) for k, v in model.quant.tensors.items()}
    layers = dict(model.quant.layers)
    second = plan(first.model)
    assert second.modified is False
    assert {k: (v.role, v.scheme, v.tied_to, v.bias_of) for k, v in model.quant.tensors.items()} == snapshot
    assert model.quant.layers == layers


def test_changed_options_rerun_is_reported_as_modified():
    model = prepared(conv_bn_relu_conv)
    plan(model)
    result = plan(model, "plan{per_channel=false}")
    assert model.quant.get("w1").scheme.axis is None
    # The schemes changed, so the pass did modify the model.
    assert result.modified is True

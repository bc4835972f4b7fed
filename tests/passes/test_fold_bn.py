"""fold-bn: BatchNormalization folded backwards into Conv / ConvTranspose / Gemm (exact)."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.infra.context import PassContext
from qonnx.passes import REGISTRY
from tests.helpers import (
    bn_params,
    build_model,
    conv_bn_relu_conv,
    feed_for,
    import_proto,
    op_counts,
    randn,
    rng,
    run_ort,
)


def fold(model):
    return REGISTRY["fold-bn"]().run(model, PassContext(seed=0))


def assert_fold_exact(original, folded_model, batch=2):
    """algorithms.md §2.1: max|Δ| ≤ 1e-5·max|y| against ORT on the unfolded model."""
    feed = feed_for(original, seed=7, batch=batch)
    ref = run_ort(original, feed)
    new = run_ort(folded_model.to_onnx(), feed)
    for a, b in zip(ref, new, strict=True):
        assert a.shape == b.shape
        bound = 1e-5 * float(np.max(np.abs(a)))
        assert float(np.max(np.abs(a.astype(np.float64) - b))) <= bound


def conv_bn(seed=30, *, bias=True, group=1, extra="", outputs="float[1,8,6,6] y", extra_inits=None,
            bn_out="y", conv_out="c", weight="w", eps=1e-5):
    g = rng(seed)
    cin = 4 if group == 1 else 8
    inits = {"w": randn(g, 8, cin // group, 3, 3, scale=0.4), **bn_params(g, 8)}
    if bias:
        inits["b"] = randn(g, 8, scale=0.2)
    inits.update(extra_inits or {})
    conv_inputs = f"x, {weight}, b" if bias else f"x, {weight}"
    text = f"""
    agraph (float[1,{cin},8,8] x) => ({outputs}) {{
        {conv_out} = Conv <kernel_shape = [3, 3], group = {group}> ({conv_inputs})
        {bn_out} = BatchNormalization <epsilon = {eps}> ({conv_out}, bn_g, bn_b, bn_m, bn_v)
        {extra}
    }}"""
    return build_model(text, inits)


def gemm_bn(trans_b: int, seed=31, bias=True):
    g = rng(seed)
    inits = {"wg": randn(g, 6, 10) if trans_b else randn(g, 10, 6), **bn_params(g, 6)}
    if bias:
        inits["bg"] = randn(g, 6)
    args = "x, wg, bg" if bias else "x, wg"
    return build_model(f"""
    agraph (float[N,10] x) => (float[N,6] y) {{
        m = Gemm <transB = {trans_b}> ({args})
        y = BatchNormalization (m, bn_g, bn_b, bn_m, bn_v)
    }}""", inits)


def conv_transpose_bn(seed=32, group=1):
    g = rng(seed)
    inits = {"wt": randn(g, 4, 6 // group, 3, 3, scale=0.3), "bt": randn(g, 6), **bn_params(g, 6)}
    return build_model(f"""
    agraph (float[1,4,5,5] x) => (float[1,6,7,7] y) {{
        t = ConvTranspose <kernel_shape = [3, 3], group = {group}> (x, wt, bt)
        y = BatchNormalization (t, bn_g, bn_b, bn_m, bn_v)
    }}""", inits)


# --------------------------------------------------------------------------- structure
def test_conv_bn_relu_conv_structure():
    model = import_proto(conv_bn_relu_conv())
    result = fold(model)
    assert result.modified is True
    assert result.stats["folded"] == 1
    assert op_counts(result.model) == {"Conv": 2, "Relu": 1}
    # The Conv now produces the BN's output tensor, and the BN's affine is kept.
    conv = next(n for n in result.model.nodes if n.op == "Conv" and n.inputs[1].name == "w1")
    assert conv.outputs[0].name == "n1"
    norm = result.model.folded_norms["n1"]
    ref = conv_bn_relu_conv()
    inits = {i.name: i for i in ref.graph.initializer}
    from onnx import numpy_helper

    np.testing.assert_array_equal(norm.gamma, numpy_helper.to_array(inits["bn_g"]))
    np.testing.assert_array_equal(norm.beta, numpy_helper.to_array(inits["bn_b"]))


def test_conv_without_bias_gets_one():
    result = fold(import_proto(conv_bn(bias=False)))
    assert result.modified is True
    conv = result.model.nodes[0]
    assert op_counts(result.model) == {"Conv": 1}
    assert len(conv.inputs) == 3 and result.model.is_constant(conv.inputs[2])


def test_folded_weights_follow_the_formula():
    original = conv_bn(seed=33)
    from onnx import numpy_helper

    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in original.graph.initializer}
    sigma = np.sqrt(p["bn_v"] + 1e-5)
    w_ref = p["w"] * (p["bn_g"] / sigma)[:, None, None, None]
    b_ref = (p["b"] - p["bn_m"]) * p["bn_g"] / sigma + p["bn_b"]
    model = fold(import_proto(original)).model
    conv = model.nodes[0]
    np.testing.assert_allclose(model.constant_value(conv.inputs[1]), w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.constant_value(conv.inputs[2]), b_ref, rtol=1e-6, atol=1e-7)
    assert model.constant_value(conv.inputs[1]).dtype == np.float32


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_structure(trans_b):
    result = fold(import_proto(gemm_bn(trans_b)))
    assert result.modified is True
    assert op_counts(result.model) == {"Gemm": 1}


def test_conv_transpose_bn_structure():
    result = fold(import_proto(conv_transpose_bn()))
    assert result.modified is True
    assert op_counts(result.model) == {"ConvTranspose": 1}


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "builder",
    [
        conv_bn_relu_conv,
        lambda: conv_bn(seed=34),
        lambda: conv_bn(seed=35, bias=False),
        lambda: conv_bn(seed=36, group=8),  # depthwise
        lambda: conv_bn(seed=37, eps=1e-3),
        lambda: gemm_bn(0),
        lambda: gemm_bn(1),
        lambda: gemm_bn(1, bias=False),
        conv_transpose_bn,
    ],
    ids=["conv_bn_relu_conv", "conv_bn", "conv_bn_nobias", "depthwise_bn", "eps1e-3", "gemm_transB0",
         "gemm_transB1", "gemm_nobias", "convtranspose_bn"],
)
def test_fold_is_exact(builder):
    original = builder()
    result = fold(import_proto(original))
    assert result.modified is True
    assert "BatchNormalization" not in op_counts(result.model)
    assert_fold_exact(original, result.model)


def test_fold_is_exact_with_extreme_statistics():
    g = rng(38)
    original = conv_bn(seed=38, extra_inits={
        "bn_v": np.concatenate([np.full(4, 1e-6), np.full(4, 1e3)]).astype(np.float32),
        "bn_g": g.uniform(-2, 2, 8).astype(np.float32),  # negative gammas flip channels
        "bn_m": g.uniform(-5, 5, 8).astype(np.float32),
    })
    result = fold(import_proto(original))
    assert result.modified is True
    assert_fold_exact(original, result.model)


# --------------------------------------------------------------------------- negative cases
def test_conv_output_with_two_consumers_is_kept():
    original = conv_bn(outputs="float[1,8,6,6] y, float[1,8,6,6] z", extra="z = Relu (c)")
    result = fold(import_proto(original))
    assert result.modified is False
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert_fold_exact(original, result.model)


def test_conv_output_that_is_a_graph_output_is_kept():
    original = conv_bn(outputs="float[1,8,6,6] y, float[1,8,6,6] c")
    result = fold(import_proto(original))
    assert result.modified is False
    assert "BatchNormalization" in op_counts(result.model)


def test_shared_weights_are_kept():
    g = rng(39)
    original = build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
        c = Conv <kernel_shape = [3, 3]> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        z = Conv <kernel_shape = [3, 3]> (x, w, b2)
    }""", {"w": randn(g, 4, 4, 3, 3), "b": randn(g, 4), "b2": randn(g, 4), **bn_params(g, 4)})
    result = fold(import_proto(original))
    assert result.modified is False
    assert_fold_exact(original, result.model)


def test_shared_bias_is_kept():
    g = rng(40)
    original = build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
        c = Conv <kernel_shape = [3, 3]> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
        z = Conv <kernel_shape = [3, 3]> (x, w2, b)
    }""", {"w": randn(g, 4, 4, 3, 3), "w2": randn(g, 4, 4, 3, 3), "b": randn(g, 4), **bn_params(g, 4)})
    result = fold(import_proto(original))
    assert result.modified is False
    assert_fold_exact(original, result.model)


def test_weights_that_are_graph_inputs_are_kept():
    g = rng(41)
    original = build_model("""
    agraph (float[1,4,8,8] x, float[4,4,3,3] w) => (float[1,4,6,6] y) {
        c = Conv <kernel_shape = [3, 3]> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }""", {"b": randn(g, 4), **bn_params(g, 4)})
    result = fold(import_proto(original))
    assert result.modified is False
    assert "BatchNormalization" in op_counts(result.model)


def test_bn_parameters_that_are_graph_inputs_are_kept():
    g = rng(42)
    original = build_model("""
    agraph (float[1,4,8,8] x, float[4] bn_g) => (float[1,4,6,6] y) {
        c = Conv <kernel_shape = [3, 3]> (x, w, b)
        y = BatchNormalization (c, bn_g, bn_b, bn_m, bn_v)
    }""", {"w": randn(g, 4, 4, 3, 3), "b": randn(g, 4),
           **{k: v for k, v in bn_params(g, 4).items() if k != "bn_g"}})
    result = fold(import_proto(original))
    assert result.modified is False


def test_bn_after_a_non_linear_op_or_input_is_kept():
    g = rng(43)
    original = build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {
        y = BatchNormalization (x, bn_g, bn_b, bn_m, bn_v)
        r = Relu (x)
        z = BatchNormalization (r, bn_g, bn_b, bn_m, bn_v)
    }""", bn_params(g, 4))
    result = fold(import_proto(original))
    assert result.modified is False
    assert op_counts(result.model)["BatchNormalization"] == 2


def test_padded_bn_then_conv_is_not_forward_folded():
    # BN -> Conv with padding: folding forward is inexact (padding inserts zeros after the BN).
    g = rng(44)
    original = build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        n = BatchNormalization (x, bn_g, bn_b, bn_m, bn_v)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (n, w, b)
    }""", {"w": randn(g, 4, 4, 3, 3), "b": randn(g, 4), **bn_params(g, 4)})
    result = fold(import_proto(original))
    assert result.modified is False
    assert_fold_exact(original, result.model)


def test_gemm_with_alpha_or_beta_is_kept():
    g = rng(45)
    original = build_model("""
    agraph (float[2,10] x) => (float[2,6] y) {
        m = Gemm <transB = 1, alpha = 0.5> (x, wg, bg)
        y = BatchNormalization (m, bn_g, bn_b, bn_m, bn_v)
    }""", {"wg": randn(g, 6, 10), "bg": randn(g, 6), **bn_params(g, 6)})
    result = fold(import_proto(original))
    assert result.modified is False


def test_grouped_conv_transpose_is_kept():
    original = conv_transpose_bn(group=2)
    result = fold(import_proto(original))
    assert result.modified is False
    assert_fold_exact(original, result.model)


def test_model_without_bn_is_not_modified():
    g = rng(46)
    original = build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,6,6] y) {
        y = Conv <kernel_shape = [3, 3]> (x, w, b)
    }""", {"w": randn(g, 4, 4, 3, 3), "b": randn(g, 4)})
    result = fold(import_proto(original))
    assert result.modified is False
    assert result.model.folded_norms == {}


# --------------------------------------------------------------------------- idempotence
@pytest.mark.parametrize("builder", [conv_bn_relu_conv, lambda: gemm_bn(1), conv_transpose_bn],
                         ids=["conv", "gemm", "convtranspose"])
def test_second_run_changes_nothing(builder):
    first = fold(import_proto(builder()))
    assert first.modified is True
    data = first.model.to_bytes()
    second = fold(first.model)
    assert second.modified is False
    assert second.model.to_bytes() == data


# --------------------------------------------------------------------------- BatchNorm decomposed (Keras)
def _decomposed_bn_block(seed=31, tail="y = Add (m, beta)", extra=None):
    g = rng(seed)
    inits = {"w": randn(g, 6, 3, 3, 3, scale=0.3), "mean": randn(g, 1, 6, 1, 1),
             "scale": np.abs(randn(g, 1, 6, 1, 1)) + 0.5, "beta": randn(g, 1, 6, 1, 1), **(extra or {})}
    return build_model("""
    agraph (float[N,3,8,8] x) => (float[N,6,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
        s = Sub (c, mean)
        m = Mul (s, scale)
        %s
    }""" % tail, inits)


def test_decomposed_batchnorm_folds_into_the_conv_exactly():
    model = _decomposed_bn_block()
    result = fold(import_proto(model))
    assert result.modified and result.stats["affine_chains_folded"] == 1 and result.stats["folded"] == 0
    assert op_counts(result.model) == {"Conv": 1}  # the Conv gained a bias and produces y itself
    assert result.model.outputs[0].name == "y"
    assert_fold_exact(model, result.model)
    assert fold(result.model).modified is False  # idempotent
    assert not result.model.folded_norms  # no statistics survive a decomposed BatchNorm


def test_reversed_sub_division_and_scalars_fold_too():
    g = rng(32)
    model = build_model("""
    agraph (float[N,4] x) => (float[N,5] y) {
        h = Gemm <transB = 1> (x, w, b)
        a = Mul (two, h)
        r = Sub (c, a)
        y = Div (r, d)
    }""", {"w": randn(g, 5, 4), "b": randn(g, 5), "two": np.array(2.0, np.float32), "c": randn(g, 1, 5),
           "d": np.abs(randn(g, 5)) + 0.5})
    result = fold(import_proto(model))
    assert result.stats["affine_chains_folded"] == 1 and op_counts(result.model) == {"Gemm": 1}
    assert_fold_exact(model, result.model)


@pytest.mark.parametrize("tail, why", [
    ("y = Add (m, spatial)", "a constant that varies over space is not a per-channel affine"),
    ("y = Div (m, zeros)", "division by a constant with a zero (inf is not an affine map)"),
])
def test_non_channel_affine_tails_stop_the_chain(tail, why):
    extra = {"spatial": randn(rng(33), 1, 1, 8, 8),
             "zeros": np.array([1.0, 0.0, 1.0, 2.0, 1.0, 1.0], np.float32).reshape(1, 6, 1, 1)}
    model = _decomposed_bn_block(tail=tail, extra={k: v for k, v in extra.items() if k in tail})
    result = fold(import_proto(model))
    # Sub and Mul still fold; the last node stays, reading the folded Conv.
    assert result.stats["affine_chains_folded"] == 1, why
    assert op_counts(result.model) == {"Conv": 1, tail.split()[2]: 1}
    if "zeros" not in tail:  # x/0 gives inf on both sides: nothing to compare
        assert_fold_exact(model, result.model)


def test_affine_chain_after_a_shared_conv_output_is_kept():
    g = rng(34)
    model = build_model("""
    agraph (float[N,3,8,8] x) => (float[N,3,8,8] y, float[N,3,8,8] z) {
        y = Conv <kernel_shape = [1, 1]> (x, w)
        z = Mul (y, scale)
    }""", {"w": randn(g, 3, 3, 1, 1), "scale": randn(g, 1, 3, 1, 1)})
    result = fold(import_proto(model))
    assert result.modified is False and op_counts(result.model) == {"Conv": 1, "Mul": 1}


# --------------------------------------------------------------------------- forward folding (BN before the layer)
def _bn_then(layer_text, inits, in_shape="float[N,4,6,6]", out_shape="float[N,6,4,4]", channels=4, seed=51):
    g = rng(seed)
    return build_model("""
    agraph (%s x) => (%s y) {
        n = BatchNormalization (x, bn_g, bn_b, bn_m, bn_v)
        %s
    }""" % (in_shape, out_shape, layer_text), {**inits(g), **bn_params(g, channels)})


@pytest.mark.parametrize("layer_text, inits, out_shape", [
    ("y = Conv <kernel_shape = [3, 3]> (n, w, b)",
     lambda g: {"w": randn(g, 6, 4, 3, 3, scale=0.3), "b": randn(g, 6)}, "float[N,6,4,4]"),
    ("y = Conv <kernel_shape = [3, 3], group = 2> (n, w)",
     lambda g: {"w": randn(g, 6, 2, 3, 3, scale=0.3)}, "float[N,6,4,4]"),
    ("y = Conv <kernel_shape = [3, 3], group = 4> (n, w)",
     lambda g: {"w": randn(g, 8, 1, 3, 3, scale=0.3)}, "float[N,8,4,4]"),
])
def test_bn_before_an_unpadded_conv_folds_forward_exactly(layer_text, inits, out_shape):
    model = _bn_then(layer_text, inits, out_shape=out_shape)
    result = fold(import_proto(model))
    assert result.stats["folded_forward"] == 1 and op_counts(result.model) == {"Conv": 1}
    assert_fold_exact(model, result.model)
    assert fold(result.model).modified is False


@pytest.mark.parametrize("trans_b, shape", [(0, (4, 3)), (1, (3, 4))])
def test_bn_before_a_gemm_folds_forward_exactly(trans_b, shape):
    model = _bn_then(f"y = Gemm <transB = {trans_b}> (n, w, b)",
                     lambda g: {"w": randn(g, *shape), "b": randn(g, 3)}, in_shape="float[N,4]", out_shape="float[N,3]")
    result = fold(import_proto(model))
    assert result.stats["folded_forward"] == 1 and op_counts(result.model) == {"Gemm": 1}
    assert_fold_exact(model, result.model)


def test_bn_before_a_padded_conv_is_kept():
    # Padding inserts zeros after the BN; folded, they would become BN(0) = offset: not exact, so no fold.
    model = _bn_then("y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (n, w)",
                     lambda g: {"w": randn(g, 6, 4, 3, 3, scale=0.3)}, out_shape="float[N,6,6,6]")
    result = fold(import_proto(model))
    assert result.modified is False and op_counts(result.model) == {"BatchNormalization": 1, "Conv": 1}

"""canonicalize: constant folding (Shape chains), Pad-into-Conv, Identity/Dropout removal."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.infra.context import PassContext
from qonnx.passes import REGISTRY, parse_pipeline
from tests.helpers import (
    build_model,
    conv_bn_relu_conv,
    feed_for,
    identity_dropout,
    import_proto,
    matmul_mlp,
    one_conv,
    op_counts,
    pad_conv,
    randn,
    rng,
    run_ort,
    shape_chain_pad,
)

RTOL, ATOL = 1e-5, 1e-6


def canonicalize(model):
    return REGISTRY["canonicalize"]().run(model, PassContext(seed=0))


def conv_node(model):
    convs = [n for n in model.nodes if n.op == "Conv"]
    assert len(convs) == 1
    return convs[0]


def assert_same_outputs(original, result_model, batch=1):
    feed = feed_for(original, batch=batch)
    before = run_ort(original, feed)
    after = run_ort(result_model.to_onnx(), feed)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- structure
def test_shape_chain_is_folded_and_pad_moves_into_conv():
    model = import_proto(shape_chain_pad())
    assert {"Shape", "Gather", "Concat", "Pad"} <= set(op_counts(model))
    result = canonicalize(model)
    assert result.modified is True
    assert op_counts(result.model) == {"Conv": 1}
    assert list(conv_node(result.model).attrs["pads"]) == [1, 1, 1, 1]
    assert result.stats["pads_into_conv"] == 1
    assert result.stats["nodes_folded"] >= 6


def test_zero_pad_folds_into_conv():
    result = canonicalize(import_proto(pad_conv()))
    assert result.modified is True
    assert op_counts(result.model) == {"Conv": 1}
    conv = conv_node(result.model)
    assert list(conv.attrs["pads"]) == [1, 1, 1, 1]
    assert conv.inputs[0].name == "x"


def test_explicit_zero_pad_value_folds():
    result = canonicalize(import_proto(pad_conv(value=0.0)))
    assert result.modified is True
    assert "Pad" not in op_counts(result.model)


def test_pad_adds_to_existing_conv_pads():
    g = rng(20)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,10] y) {
        p = Pad (x, pads)
        y = Conv <kernel_shape = [3, 3], pads = [1, 0, 0, 1]> (p, w, b)
    }""", {"pads": np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64),
           "w": randn(g, 4, 3, 3, 3), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert result.modified is True
    assert list(conv_node(result.model).attrs["pads"]) == [2, 2, 0, 2]
    assert_same_outputs(model, result.model)


def test_identity_and_dropout_are_dropped_keeping_the_interface():
    model = import_proto(identity_dropout())
    result = canonicalize(model)
    assert result.modified is True
    ops = op_counts(result.model)
    assert ops == {"Conv": 1, "Relu": 1}
    assert [t.name for t in result.model.inputs] == ["x"]
    assert [t.name for t in result.model.outputs] == ["y"]
    assert result.stats["identities_dropped"] == 3


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("builder", [shape_chain_pad, pad_conv, identity_dropout, conv_bn_relu_conv],
                         ids=lambda b: b.__name__)
def test_canonicalize_is_exact(builder):
    original = builder()
    result = canonicalize(import_proto(original))
    assert_same_outputs(original, result.model)
    # And the result is a valid model ORT runs with its own optimizations too.
    feed = feed_for(original, batch=1)
    np.testing.assert_allclose(run_ort(result.model.to_onnx(), feed, "all")[0], run_ort(original, feed)[0],
                               rtol=1e-4, atol=1e-5)


def test_shape_chain_with_dynamic_batch_stays_exact():
    g = rng(21)
    model = build_model("""
    agraph (float[N,4] x) => (float[N,4] y) {
        sh = Shape (x)
        n = Gather <axis = 0> (sh, zero)
        four = Identity (c4)
        nn = Unsqueeze (n, ax0)
        ff = Unsqueeze (four, ax0)
        shape = Concat <axis = 0> (nn, ff)
        r = Reshape (x, shape)
        y = MatMul (r, w)
    }""", {"zero": np.array(0, np.int64), "c4": np.array(4, np.int64), "ax0": np.array([0], np.int64),
           "w": randn(g, 4, 4)})
    result = canonicalize(import_proto(model))
    for batch in (1, 3):
        feed = {"x": randn(rng(batch), batch, 4)}
        np.testing.assert_allclose(run_ort(result.model.to_onnx(), feed)[0], run_ort(model, feed)[0],
                                   rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- negative cases
def test_pad_with_nonzero_value_is_kept():
    model = pad_conv(value=0.5)
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert op_counts(result.model) == {"Pad": 1, "Conv": 1}
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_non_constant_pad_modes_are_kept(mode):
    model = pad_conv(mode=mode)
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert op_counts(result.model) == {"Pad": 1, "Conv": 1}
    assert_same_outputs(model, result.model)


def test_pad_whose_output_is_also_a_graph_output_is_kept():
    model = pad_conv(consumers=2)
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert "Pad" in op_counts(result.model)
    assert_same_outputs(model, result.model)


def test_pad_with_two_consumers_is_kept():
    g = rng(22)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,3,10,10] z) {
        p = Pad (x, pads)
        y = Conv <kernel_shape = [3, 3]> (p, w, b)
        z = Relu (p)
    }""", {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": randn(g, 4, 3, 3, 3), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert "Pad" in op_counts(result.model)


def test_pad_of_batch_or_channel_axes_is_kept():
    g = rng(23)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        p = Pad (x, pads)
        y = Conv <kernel_shape = [1, 1]> (p, w, b)
    }""", {"pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64), "w": randn(g, 4, 4, 1, 1), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert "Pad" in op_counts(result.model)


def test_pad_into_conv_with_auto_pad_is_kept():
    g = rng(24)
    model = build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,10,10] y) {
        p = Pad (x, pads)
        y = Conv <kernel_shape = [3, 3], auto_pad = "SAME_UPPER"> (p, w, b)
    }""", {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": randn(g, 4, 3, 3, 3), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert "Pad" in op_counts(result.model)
    assert_same_outputs(model, result.model)


def test_pad_value_from_a_graph_input_is_kept():
    # The pad value is only known at run time: folding the Pad as zero padding would
    # change the output whenever the caller passes a non-zero value.
    g = rng(25)
    model = build_model("""
    agraph (float[1,3,8,8] x, float pv) => (float[1,4,8,8] y) {
        p = Pad (x, pads, pv)
        y = Conv <kernel_shape = [3, 3]> (p, w, b)
    }""", {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": randn(g, 4, 3, 3, 3), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert "Pad" in op_counts(result.model)
    assert result.modified is False
    feed = {"x": randn(g, 1, 3, 8, 8), "pv": np.array(2.5, np.float32)}
    np.testing.assert_allclose(run_ort(result.model.to_onnx(), feed)[0], run_ort(model, feed)[0],
                               rtol=RTOL, atol=ATOL)


def test_pads_from_a_graph_input_are_kept():
    g = rng(26)
    model = build_model("""
    agraph (float[1,3,8,8] x, int64[8] pads) => (float[1,4,?,?] y) {
        p = Pad (x, pads)
        y = Conv <kernel_shape = [3, 3]> (p, w, b)
    }""", {"w": randn(g, 4, 3, 3, 3), "b": randn(g, 4)})
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert "Pad" in op_counts(result.model)


def test_identity_between_graph_input_and_output_is_kept():
    model = build_model("""
    agraph (float[1,4] x) => (float[1,4] y) {
        y = Identity (x)
    }""")
    result = canonicalize(import_proto(model))
    assert result.modified is False
    assert [t.name for t in result.model.inputs] == ["x"]
    assert [t.name for t in result.model.outputs] == ["y"]
    assert_same_outputs(model, result.model)


def test_dropout_with_an_unused_mask_output_is_dropped():
    model = build_model("""
    agraph (float[1,4] x) => (float[1,4] y) {
        d, mask = Dropout (x)
        y = Relu (d)
    }""")
    result = canonicalize(import_proto(model))
    assert result.modified is True
    assert op_counts(result.model) == {"Relu": 1}
    assert_same_outputs(model, result.model)


def test_dropout_whose_mask_is_used_is_kept():
    model = build_model("""
    agraph (float[1,4] x) => (float[1,4] y, bool[1,4] mask) {
        d, mask = Dropout (x)
        y = Relu (d)
    }""")
    result = canonicalize(import_proto(model))
    assert "Dropout" in op_counts(result.model)
    assert [t.name for t in result.model.outputs] == ["y", "mask"]


def test_canonical_model_is_not_modified():
    result = canonicalize(import_proto(one_conv()))
    assert result.modified is False
    assert op_counts(result.model) == {"Conv": 1, "Relu": 1}


# --------------------------------------------------------------------------- MatMul + Add -> Gemm
def test_matmul_plus_constant_add_becomes_gemm():
    original = matmul_mlp()
    result = canonicalize(import_proto(original))
    assert result.modified is True
    ops = op_counts(result.model)
    assert ops == {"Gemm": 1, "Relu": 1, "MatMul": 1}
    gemm = next(n for n in result.model.nodes if n.op == "Gemm")
    assert gemm.inputs[1].name == "w1" and int(gemm.attrs.get("transB", 0)) == 0
    assert result.model.constant_value(gemm.inputs[2]).shape == (32,)
    for batch in (1, 3):
        assert_same_outputs(original, result.model, batch=batch)


@pytest.mark.parametrize(
    "text",
    [
        # 3-D activations: Gemm needs 2-D inputs.
        """agraph (float[2,5,16] x) => (float[2,5,32] y) {
            m = MatMul (x, w)
            y = Add (m, b)
        }""",
        # The bias is a run-time input.
        """agraph (float[2,16] x, float[32] b) => (float[2,32] y) {
            m = MatMul (x, w)
            y = Add (m, b)
        }""",
        # The MatMul output is also used elsewhere.
        """agraph (float[2,16] x) => (float[2,32] y, float[2,32] z) {
            m = MatMul (x, w)
            y = Add (m, b)
            z = Relu (m)
        }""",
        # The Add broadcasts to a larger shape than the MatMul output.
        """agraph (float[2,16] x) => (float[3,2,32] y) {
            m = MatMul (x, w)
            y = Add (m, b3)
        }""",
        # A [32,1] column broadcasts against the rows: (1x32) + (32x1) is 32x32, not a bias.
        """agraph (float[1,16] x) => (float[32,32] y) {
            m = MatMul (x, w)
            y = Add (m, bcol)
        }""",
    ],
    ids=["rank3", "runtime-bias", "fan-out", "broadcast-up", "column-vector"],
)
def test_matmul_add_that_is_not_a_gemm_is_kept(text):
    g = rng(27)
    inits = {"w": randn(g, 16, 32), "b": randn(g, 32), "b3": randn(g, 3, 1, 32), "bcol": randn(g, 32, 1)}
    used = {k: v for k, v in inits.items() if k in text.split("{", 1)[1] and k not in text.split("=>")[0]}
    model = build_model(text, used)
    result = canonicalize(import_proto(model))
    assert "Gemm" not in op_counts(result.model)
    assert result.modified is False
    g2 = rng(28)
    feed = {vi.name: randn(g2, *[d.dim_value for d in vi.type.tensor_type.shape.dim])
            for vi in model.graph.input if vi.name not in used}
    for a, b in zip(run_ort(model, feed), run_ort(result.model.to_onnx(), feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- idempotence
@pytest.mark.parametrize("builder", [shape_chain_pad, pad_conv, identity_dropout, matmul_mlp],
                         ids=lambda b: b.__name__)
def test_second_run_changes_nothing(builder):
    first = canonicalize(import_proto(builder()))
    assert first.modified is True
    text = first.model.to_bytes()
    second = canonicalize(first.model)
    assert second.modified is False
    assert second.model.to_bytes() == text


def test_noop_cast_is_dropped_and_a_real_cast_is_kept():
    from tests.helpers import build_model, import_proto, randn, rng

    g = rng(12)
    model = build_model("""
    agraph (float[N,4] x) => (float[N,3] y, double[N,3] z) {
        h = MatMul (x, w)
        c = Cast <to = 1> (h)
        y = Add (c, b)
        z = Cast <to = 11> (y)
    }""", {"w": randn(g, 4, 3), "b": randn(g, 3)})
    ir = import_proto(model)
    (p,) = parse_pipeline("canonicalize").passes
    result = p.run(ir, PassContext())
    ops = [n.op for n in result.model.nodes]
    assert result.modified is True
    assert ops.count("Cast") == 1 and "Gemm" in ops  # the float->float Cast no longer hides MatMul+Add
    assert p.run(result.model, PassContext()).modified is False


def test_batch_size_shape_chain_before_reshape_becomes_a_constant_target():
    from tests.helpers import build_model, import_proto, randn, rng

    model = build_model("""
    agraph (float[N,4,2,2] x) => (float[N,16] y) {
        r = Relu (x)
        s = Shape (x)
        zero = Constant <value = int64 {0}> ()
        n = Gather <axis = 0> (s, zero)
        axes = Constant <value = int64[1] {0}> ()
        n1 = Unsqueeze (n, axes)
        minus = Constant <value = int64[1] {-1}> ()
        target = Concat <axis = 0> (n1, minus)
        y = Reshape (r, target)
    }""")
    ir = import_proto(model)
    (p,) = parse_pipeline("canonicalize").passes
    feed = {"x": randn(rng(1), 3, 4, 2, 2)}
    before = run_ort(model, feed)[0]
    result = p.run(ir, PassContext())
    ops = [n.op for n in result.model.nodes]
    assert result.stats["static_reshapes"] == 1 and ops == ["Relu", "Reshape"]
    np.testing.assert_array_equal(run_ort(result.model.to_onnx(), feed)[0], before)
    assert p.run(result.model, PassContext()).modified is False


def _opset11_softmax(axis: int):
    text = """<ir_version: 6, opset_import: ["" : 11]>
    agraph (float[N,T,1,6] x) => (float[N,T,5] y) {
        s = Squeeze (x)
        h = MatMul (s, w)
        l = Add (h, b)
        y = Softmax <axis = %d> (l)
    }""" % axis
    g = rng(21)
    # Squeeze without axes hides the rank from shape inference, as in PP-OCR's export.
    return build_model(text, {"w": randn(g, 6, 5), "b": randn(g, 5)})


def test_opset11_last_axis_softmax_loses_its_flatten_reshape_wrapper():
    # Where the input rank is unknown (as in PP-OCR), the opset 11 -> 13 upgrade wraps Softmax in
    # Flatten/Reshape (the old 2-D coercion semantics); over the last axis that is an identity, and the logits must stay visible (sensitivity's KL target).
    model = _opset11_softmax(axis=2)
    ir = import_proto(model)
    assert {"Flatten", "Reshape", "Shape"} <= set(op_counts(ir))
    result = canonicalize(ir)
    assert result.stats["last_axis_softmaxes"] == 1
    ops = [n.op for n in result.model.nodes]
    assert ops == ["Squeeze", "MatMul", "Add", "Softmax"]
    softmax = result.model.nodes[-1]
    assert softmax.attrs["axis"] == -1 and softmax.outputs[0].name == "y"
    feed = {"x": randn(rng(2), 2, 3, 1, 6)}
    np.testing.assert_allclose(run_ort(result.model.to_onnx(), feed)[0], run_ort(model, feed)[0], rtol=1e-6, atol=1e-7)
    assert canonicalize(result.model).modified is False


def test_opset11_softmax_over_inner_axes_keeps_its_wrapper():
    # axis=1 on a 3-D input normalizes over T*5 values together: not a last-axis Softmax.
    ir = import_proto(_opset11_softmax(axis=1))
    result = canonicalize(ir)
    assert result.stats["last_axis_softmaxes"] == 0
    assert {"Flatten", "Reshape"} <= set(op_counts(result.model))


# --------------------------------------------------------------------------- NHWC round trips (tf2onnx/Keras)
def _nhwc_residual_block():
    """Keras-style: NHWC graph, each Conv wrapped in Transposes, BN decomposed, ReLU6, Pad, residual Add."""
    g = rng(41)
    inits = {"w1": randn(g, 4, 4, 1, 1, scale=0.4), "w2": randn(g, 4, 1, 3, 3, scale=0.4),
             "mean": randn(g, 4), "scale": np.abs(randn(g, 4)) + 0.5, "beta": randn(g, 4),
             "pads": np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    return build_model("""
    agraph (float[N,8,8,4] x) => (float[N,8,8,4] y) {
        t0 = Transpose <perm = [0, 3, 1, 2]> (x)
        c1 = Conv <kernel_shape = [1, 1]> (t0, w1)
        t1 = Transpose <perm = [0, 2, 3, 1]> (c1)
        s1 = Sub (t1, mean)
        m1 = Mul (s1, scale)
        a1 = Add (m1, beta)
        r1 = Clip (a1, lo, hi)
        p1 = Pad (r1, pads)
        t2 = Transpose <perm = [0, 3, 1, 2]> (p1)
        c2 = Conv <kernel_shape = [3, 3], group = 4> (t2, w2)
        t3 = Transpose <perm = [0, 2, 3, 1]> (c2)
        y = Add (x, t3)
    }""", inits)


def test_nhwc_round_trips_cancel_and_leave_a_plain_nchw_chain():
    model = _nhwc_residual_block()
    result = canonicalize(import_proto(model))
    counts = op_counts(result.model)
    # Inside: Conv -> Sub/Mul/Add -> Clip -> Conv with the Pad folded in; only the layout edges stay transposed.
    assert counts["Transpose"] == 2 and "Pad" not in counts and counts["Conv"] == 2
    assert result.stats["transposes_removed"] == 2
    depthwise = next(n for n in result.model.nodes if n.op == "Conv" and n.attrs.get("group") == 4)
    assert list(depthwise.attrs["pads"]) == [1, 1, 1, 1]  # the NHWC Pad, permuted, became the Conv's pads
    assert_same_outputs(model, result.model, batch=2)
    assert canonicalize(result.model).modified is False
    folded = REGISTRY["fold-bn"]().run(result.model, PassContext())
    assert folded.stats["affine_chains_folded"] == 1 and "Sub" not in op_counts(folded.model)
    assert_same_outputs(model, folded.model, batch=2)


def test_a_transpose_that_never_meets_its_inverse_stays_where_it_is():
    g = rng(42)
    model = build_model("""
    agraph (float[N,4,8,8] x) => (float[N,8,8,4] y) {
        c = Conv <kernel_shape = [1, 1]> (x, w)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        y = Relu (t)
    }""", {"w": randn(g, 4, 4, 1, 1)})
    result = canonicalize(import_proto(model))
    assert result.stats["transposes_removed"] == 0
    assert [n.op for n in result.model.nodes] == ["Conv", "Transpose", "Relu"]

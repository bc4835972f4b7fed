"""relu6-to-relu: Clip(0, 6) after Conv/Gemm becomes Relu (approximate; DFQ's preparation for CLE)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qonnx.core.ir import Model
from qonnx.errors import PreconditionError
from qonnx.infra.context import PassContext
from qonnx.passes import REGISTRY, parse_pipeline
from tests.helpers import build_model, depthwise_block, feed_for, import_proto, op_counts, randn, rng, run_ort


def relu6(model, **options):
    cls = REGISTRY["relu6-to-relu"]
    return cls(cls.Options(**options)).run(model, PassContext(seed=0))


def conv_clip(seed=70, lo="0.0", hi="6.0", producer="Conv", scale=0.3):
    """A layer followed by Clip(lo, hi) with constant bounds (empty string: bound absent)."""
    g = rng(seed)
    inits = {}
    if lo != "":
        inits["lo"] = np.array(float(lo), np.float32)
    if hi != "":
        inits["hi"] = np.array(float(hi), np.float32)
    bounds = ("lo" if lo != "" else "") + (", hi" if hi != "" else "")  # "Clip (c, , hi)": no min
    if producer == "Conv":
        inits.update({"w": randn(g, 4, 3, 3, 3, scale=scale), "b": randn(g, 4, scale=0.1)})
        shapes, layer = "(float[1,3,8,8] x) => (float[1,4,8,8] y)", \
            "c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)"
    elif producer == "Gemm":
        inits.update({"w": randn(g, 6, 10, scale=scale), "b": randn(g, 6, scale=0.1)})
        shapes, layer = "(float[N,10] x) => (float[N,6] y)", "c = Gemm <transB = 1> (x, w, b)"
    else:  # an Add of the input to itself: not a layer
        shapes, layer = "(float[1,3,8,8] x) => (float[1,3,8,8] y)", "c = Add (x, x)"
    return build_model(f"""
    agraph {shapes} {{
        {layer}
        y = Clip (c, {bounds})
    }}""", inits)


def conv_clip_opset10(seed=71, lo=0.0, hi=6.0):
    """Clip-6 with min/max attributes (before opset 11), kept as is via Model.from_onnx."""
    g = rng(seed)
    w = numpy_helper.from_array(randn(g, 4, 3, 3, 3, scale=0.5), "w")
    b = numpy_helper.from_array(randn(g, 4, scale=0.1), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Clip", ["c"], ["y"], min=lo, max=hi, name="clip")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=5)
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- structure
def test_mobilenet_block_clips_become_relus():
    result = relu6(import_proto(depthwise_block()))
    assert result.modified is True
    assert result.stats == {"replaced": 2}
    assert op_counts(result.model) == {"Conv": 3, "Relu": 2}
    # The bound constants went with the Clips; tensor names are kept.
    assert {"lo", "hi"}.isdisjoint(result.model.tensors())
    assert {"r1", "r2"} <= set(result.model.tensors())


def test_gemm_clip_becomes_relu():
    result = relu6(import_proto(conv_clip(producer="Gemm")))
    assert result.modified is True
    assert op_counts(result.model) == {"Gemm": 1, "Relu": 1}


def test_attribute_bounds_before_opset_11():
    proto = conv_clip_opset10()
    model = Model.from_onnx(proto)
    result = relu6(model)
    assert result.modified is True
    assert op_counts(result.model) == {"Conv": 1, "Relu": 1}
    relu = next(n for n in result.model.nodes if n.op == "Relu")
    assert relu.attrs == {} and len(relu.inputs) == 1
    onnx.checker.check_model(result.model.to_onnx())


def test_clip_without_max_is_replaced():
    result = relu6(import_proto(conv_clip(hi="")))
    assert result.modified is True
    assert op_counts(result.model) == {"Conv": 1, "Relu": 1}


def test_any_upper_bound_with_upper_none():
    assert relu6(import_proto(conv_clip(hi="1.0"))).modified is False
    result = relu6(import_proto(conv_clip(hi="1.0")), upper=None)
    assert result.modified is True and result.stats["replaced"] == 1


# --------------------------------------------------------------------------- numerics
def test_outputs_unchanged_where_activations_stay_below_six():
    original = conv_clip(scale=0.05)  # pre-activations far below 6
    result = relu6(import_proto(original))
    assert result.modified is True
    feed = feed_for(original, seed=3)
    ref, new = run_ort(original, feed)[0], run_ort(result.model.to_onnx(), feed)[0]
    assert float(np.max(ref)) < 6.0
    np.testing.assert_array_equal(ref, new)


def test_pass_is_approximate_and_equals_relu():
    original = conv_clip(scale=3.0)  # many pre-activations above 6
    result = relu6(import_proto(original))
    assert REGISTRY["relu6-to-relu"].exact is False
    feed = feed_for(original, seed=4)
    ref, new = run_ort(original, feed)[0], run_ort(result.model.to_onnx(), feed)[0]
    assert float(np.max(new)) > 6.0 and float(np.max(ref)) <= 6.0
    np.testing.assert_array_equal(np.minimum(new, 6.0), ref)  # Relu, clipped again, is the old model
    assert float(np.min(new)) >= 0.0


def test_attribute_form_numerics():
    proto = conv_clip_opset10(lo=0.0, hi=6.0)
    result = relu6(Model.from_onnx(proto))
    feed = feed_for(proto, seed=5)
    ref, new = run_ort(proto, feed)[0], run_ort(result.model.to_onnx(), feed)[0]
    np.testing.assert_array_equal(np.minimum(new, 6.0), ref)


# --------------------------------------------------------------------------- negative cases
@pytest.mark.parametrize("lo, hi", [("0.1", "6.0"), ("-1.0", "6.0"), ("0.0", "1.0"), ("", "6.0")],
                         ids=["min0.1", "min-1", "max1", "no_min"])
def test_other_clips_are_left_alone(lo, hi):
    model = import_proto(conv_clip(lo=lo, hi=hi))
    data = model.to_bytes()
    result = relu6(model)
    assert result.modified is False
    assert result.model.to_bytes() == data


def test_attribute_clip_with_nonzero_min_is_left_alone():
    result = relu6(Model.from_onnx(conv_clip_opset10(lo=-6.0, hi=6.0)))
    assert result.modified is False


def test_clip_not_after_a_layer_is_left_alone():
    result = relu6(import_proto(conv_clip(producer="Add")))
    assert result.modified is False
    assert op_counts(result.model) == {"Add": 1, "Clip": 1}


def test_clip_with_bounds_from_graph_inputs_is_left_alone():
    g = rng(72)
    original = build_model("""
    agraph (float[1,3,8,8] x, float hi) => (float[1,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Clip (c, lo, hi)
    }""", {"w": randn(g, 4, 3, 3, 3), "b": randn(g, 4), "lo": np.array(0.0, np.float32)})
    result = relu6(import_proto(original))
    assert result.modified is False


# --------------------------------------------------------------------------- idempotence and ordering
def test_second_run_changes_nothing():
    first = relu6(import_proto(depthwise_block()))
    assert first.modified is True
    data = first.model.to_bytes()
    second = relu6(first.model)
    assert second.modified is False and second.stats == {"replaced": 0}
    assert second.model.to_bytes() == data


def test_relu6_to_relu_must_come_before_calibrate():
    with pytest.raises(PreconditionError, match="relu6-to-relu"):
        parse_pipeline("plan,calibrate,relu6-to-relu").validate(frozenset({"calibration-data"}))
    parse_pipeline("relu6-to-relu,cle,plan,calibrate").validate(frozenset({"calibration-data"}))


def test_option_round_trip():
    for text in ("relu6-to-relu", "relu6-to-relu{upper=None}", "relu6-to-relu{upper=1.0}"):
        pipe = parse_pipeline(text)
        assert str(parse_pipeline(str(pipe))) == str(pipe) == text
    assert parse_pipeline("relu6-to-relu{upper=none}").passes[0].options.upper is None

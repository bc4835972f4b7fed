"""The numpy integer reference: op semantics against ORT, overflow detection, the integer check and its CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.app.cli import main
from qonnx.errors import UnsupportedModelError
from qonnx.export.intref import OPS, IntegerOverflowError, IntegerReference, integer_check
from tests.helpers import depthwise_block, make_samples, run_ort, save_npz


def graph(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def vi(name: str, elem: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None)


def same_as_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    want = run_ort(model, feed, "all")
    got = IntegerReference(model).run(feed)
    for out, w in zip(model.graph.output, want, strict=True):
        assert got[out.name].dtype == w.dtype, out.name
        np.testing.assert_array_equal(got[out.name], w)


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0]},
    {"kernel_shape": [2, 3], "dilations": [2, 1]},
    {"kernel_shape": [3, 3], "group": 2, "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "group": 4, "pads": [1, 1, 1, 1], "strides": [2, 1]},  # depthwise
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_conv_integer_matches_ort(attrs):
    gen = np.random.default_rng(0)
    group = attrs.get("group", 1)
    x = gen.integers(0, 256, (2, 4, 7, 9)).astype(np.uint8)
    w = gen.integers(-127, 128, (4, 4 // group, *attrs["kernel_shape"])).astype(np.int8)
    model = graph([helper.make_node("ConvInteger", ["x", "w", "xz"], ["y"], **attrs)],
                  [vi("x", TensorProto.UINT8)], [vi("y", TensorProto.INT32)], {"w": w, "xz": np.array(37, np.uint8)})
    same_as_ort(model, {"x": x})


def test_matmul_integer_quantize_dequantize_and_integer_arithmetic_match_ort():
    gen = np.random.default_rng(1)
    a = gen.integers(0, 256, (3, 5, 16)).astype(np.uint8)
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["acc64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["acc64", "m"], ["p"]),
        helper.make_node("Sub", ["p", "off"], ["s"]),
        helper.make_node("Div", ["s", "d"], ["q"]),  # negative numerators: truncation toward zero
        helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
        helper.make_node("ReduceSum", ["acc", "axes"], ["r"], keepdims=1),
        helper.make_node("DequantizeLinear", ["acc", "s32", "z32"], ["deq"], axis=2),
        helper.make_node("QuantizeLinear", ["f", "fs", "fz"], ["fq"]),
        helper.make_node("QuantizeLinear", ["f", "fs", "fz8"], ["fq8"]),
    ]
    inits = {"b": gen.integers(-128, 128, (16, 6)).astype(np.int8), "az": np.array(128, np.uint8),
             "bz": np.arange(-3, 3).astype(np.int8), "m": np.array(1 << 20, np.int64),
             "off": np.array(1 << 35, np.int64), "d": np.array(1 << 13, np.int64),
             "lo": np.array(-(1 << 20), np.int64), "hi": np.array(1 << 20, np.int64),
             "axes": np.array([1], np.int64), "s32": np.linspace(1e-3, 2e-3, 6).astype(np.float32),
             "z32": np.zeros(6, np.int32), "fs": np.array(0.5, np.float32), "fz": np.array(10, np.uint8),
             "fz8": np.array(-3, np.int8)}
    # Ties (k + 0.5) round half to even, both saturations, negative zero.
    f = np.array([0.25, 0.75, -0.25, 1.25, -6.25, 500.0, -500.0, -0.0, 63.75, 3.3e-8], np.float32)
    model = graph(nodes, [vi("a", TensorProto.UINT8), vi("f", TensorProto.FLOAT)],
                  [vi(n, t) for n, t in [("c", TensorProto.INT64), ("r", TensorProto.INT32),
                                         ("deq", TensorProto.FLOAT), ("fq", TensorProto.UINT8),
                                         ("fq8", TensorProto.INT8)]], inits)
    same_as_ort(model, {"a": a, "f": f})


def test_max_pool_with_padding_and_pass_through_ops_match_ort():
    gen = np.random.default_rng(2)
    x = gen.integers(0, 256, (1, 3, 6, 6)).astype(np.uint8)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["sq"]),
             helper.make_node("Flatten", ["sq"], ["y"], axis=1),
             helper.make_node("Concat", ["y", "y"], ["cat"], axis=0),
             helper.make_node("Cast", ["cat"], ["idx"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "idx"], ["g"], axis=0)]
    model = graph(nodes, [vi("x", TensorProto.UINT8)], [vi("g", TensorProto.UINT8)],
                  {"shape": np.array([0, -1], np.int64), "ax": np.array([1], np.int64),
                   "table": (255 - np.arange(256)).astype(np.uint8)})
    same_as_ort(model, {"x": x})


def test_int32_overflow_is_detected_where_ort_wraps():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    model = graph(nodes, [vi("a", TensorProto.INT32)], [vi("y", TensorProto.INT32)],
                  {"b": np.array(2**31 - 1, np.int32)})
    feed = {"a": np.array([0, 1], np.int32)}
    assert run_ort(model, feed, "all")[0][1] == -(2**31)  # ORT wraps silently
    with pytest.raises(IntegerOverflowError, match="Add"):
        IntegerReference(model).run(feed)


def test_conv_integer_accumulator_overflow_is_detected():
    channels = 66_000  # 255 * 128 * 66000 > 2^31: a wide reduction overflows the int32 accumulator
    model = graph([helper.make_node("ConvInteger", ["x", "w"], ["y"], kernel_shape=[1, 1])],
                  [vi("x", TensorProto.UINT8)], [vi("y", TensorProto.INT32)],
                  {"w": np.full((1, channels, 1, 1), -128, np.int8)})
    feed = {"x": np.full((1, channels, 1, 1), 255, np.uint8)}
    with pytest.raises(IntegerOverflowError, match="ConvInteger"):
        IntegerReference(model).run(feed)
    feed = {"x": np.full((1, channels, 1, 1), 100, np.uint8)}  # 100*128*66000 fits
    same_as_ort(model, feed)


def test_int64_product_overflow_is_detected():
    model = graph([helper.make_node("Mul", ["a", "b"], ["y"])], [vi("a", TensorProto.INT64)],
                  [vi("y", TensorProto.INT64)], {"b": np.array(2**40, np.int64)})
    with pytest.raises(IntegerOverflowError):
        IntegerReference(model).run({"a": np.array([2**30], np.int64)})


def test_unsupported_and_float_ops_are_named():
    model = graph([helper.make_node("Softmax", ["x"], ["y"])], [vi("x", TensorProto.FLOAT)],
                  [vi("y", TensorProto.FLOAT)], {})
    with pytest.raises(UnsupportedModelError, match="Softmax"):
        IntegerReference(model)
    model = graph([helper.make_node("Add", ["x", "x"], ["y"])], [vi("x", TensorProto.FLOAT)],
                  [vi("y", TensorProto.FLOAT)], {})
    with pytest.raises(UnsupportedModelError, match="float operand"):
        IntegerReference(model).run({"x": np.ones(2, np.float32)})


# --------------------------------------------------------------------------- integer check
def _int_only_model():
    model = depthwise_block()
    return model, qonnx.optimize(model, make_samples(model, 16, seed=1), export_format="int-only").model


def test_integer_check_reports_exact_agreement():
    model, proto = _int_only_model()
    feeds = [make_samples(model, 1, seed=s) for s in range(4)]
    report = integer_check(proto, feeds)
    assert report.samples == 4 and report.exact_fraction == 1.0 and report.max_lsb == 0.0
    assert "100.0000%" in report.describe()


def test_integer_check_measures_differences_in_lsb(monkeypatch):
    model, proto = _int_only_model()
    original = OPS["DequantizeLinear"]

    def off_by_one(x, scale, zero_point=None, **attrs):  # a reference one code above ORT everywhere
        return original(x, scale, zero_point, **attrs) + np.float32(scale)

    monkeypatch.setitem(OPS, "DequantizeLinear", off_by_one)
    report = integer_check(proto, [make_samples(model, 1, seed=0)])
    assert report.exact_fraction < 0.01
    assert report.max_lsb == 1.0


def test_cli_optimize_int_only_then_inspect_integer_check(tmp_path):
    model, _ = _int_only_model()
    src, data = tmp_path / "m.onnx", save_npz(tmp_path / "calib.npz", make_samples(model, 16, seed=1))
    onnx.save(model, str(src))
    runner = CliRunner()
    out = tmp_path / "m.int.onnx"
    result = runner.invoke(main, ["optimize", str(src), "-o", str(out), "--calib-data", str(data),
                                  "--format", "int-only"])
    assert result.exit_code == 0, result.output
    assert "ConvInteger" in result.output
    result = runner.invoke(main, ["inspect", str(out), "--integer-check", "--data", str(data), "--samples", "5",
                                  "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "integer check on 5 samples: 100.0000%" in result.output and "max difference 0 LSB" in result.output
    qop = tmp_path / "m.qop.onnx"
    result = runner.invoke(main, ["optimize", str(src), "-o", str(qop), "--calib-data", str(data), "--format", "qop"])
    assert result.exit_code == 0 and "QLinearConv" in result.output, result.output
    result = runner.invoke(main, ["inspect", str(qop), "--integer-check", "--data", str(data)])
    assert result.exit_code == 2 and "does not implement QLinearConv" in result.output
    result = runner.invoke(main, ["inspect", str(out), "--integer-check"])
    assert result.exit_code == 2 and "--data" in result.output

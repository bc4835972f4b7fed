"""quant.quantize must be bit-exact with ONNX QuantizeLinear (reference evaluator and ORT)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qonnx.numerics.quant import (
    MIN_SCALE,
    QuantScheme,
    dequantize,
    expand_blocked,
    fake_quantize,
    quantize,
    scale_zero_point,
)

ONNX_TYPE = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}


def _qdq_model(
    x_shape, s_shape, zp: np.ndarray, elem: int, axis: int | None, block: int | None
) -> onnx.ModelProto:
    """Q(x, s, zp) followed by DQ(q, 1, 0): the codes come back as float, which also works for int4
    (ORT's Python binding cannot return int4 tensors)."""
    attrs = {} if axis is None else {"axis": axis}
    if block is not None:
        attrs["block_size"] = block
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "one", "zero"], ["y"]),
    ]
    inits = [
        helper.make_tensor("zp", elem, list(zp.shape), zp.ravel().tolist()),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("zero", elem, [], [0]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, list(s_shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def onnx_codes(x, scale, zp, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(reference evaluator, onnxruntime) codes of QuantizeLinear for this scheme."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp, np.int64)
    model = _qdq_model(
        x.shape, scale.shape, zp, ONNX_TYPE[scheme.onnx_dtype_name], scheme.axis, scheme.block_size
    )
    feeds = {"x": x, "s": scale}
    ref = ReferenceEvaluator(model).run(None, feeds)[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    return ref.astype(np.int64), got.astype(np.int64)


SCHEMES = {
    "int8": QuantScheme(bits=8, signed=True, symmetric=False),
    "uint8": QuantScheme(bits=8, signed=False, symmetric=False),
    "int4": QuantScheme(bits=4, signed=True, symmetric=False),
    "uint4": QuantScheme(bits=4, signed=False, symmetric=False),
}


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("scale", [0.5, 0.25, 0.1])
def test_ties_round_half_to_even(name: str, scale: float) -> None:
    scheme = SCHEMES[name]
    zp = 1 if scheme.signed else 3
    k = np.arange(-12, 12)
    # (k + 0.5) * scale is exact for power-of-two scales: real ties on both even and odd k.
    x = ((k + 0.5) * scale).astype(np.float32)
    ours = quantize(x, np.float32(scale), zp, scheme)
    ref, rt = onnx_codes(x, np.float32(scale), zp, scheme)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, rt)
    if scale in (0.5, 0.25):
        expected = np.clip(np.where(k % 2 == 0, k, k + 1) + zp, scheme.qmin, scheme.qmax)  # half to even
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_random_values_bit_exact(name: str) -> None:
    """ORT divides by the scale (no reciprocal multiply); so must we, for non-power-of-two scales."""
    scheme = SCHEMES[name]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * 2).astype(np.float32)
    for scale in (0.0237, 1 / 3, 0.00859375):
        zp = -3 if scheme.signed else 5
        ours = quantize(x, np.float32(scale), zp, scheme)
        ref, rt = onnx_codes(x, np.float32(scale), zp, scheme)
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(ours, rt)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_saturation(name: str) -> None:
    scheme = SCHEMES[name]
    x = np.array([-1000.0, -300.0, -7.9, 0.0, 7.9, 300.0, 1000.0], np.float32)
    ours = quantize(x, np.float32(0.5), 0, scheme)
    ref, rt = onnx_codes(x, np.float32(0.5), 0, scheme)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, rt)
    assert ours[0] == scheme.qmin and ours[-1] == scheme.qmax


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_saturation_beyond_integer_range_matches_ort() -> None:
    """|x/s| beyond 2^63: a plain float->int cast wraps (the ONNX reference gives -128 for +1e30); ORT saturates."""
    scheme = SCHEMES["int8"]
    x = np.array([1e30, -1e30, 3e9, -3e9, 1e10], np.float32)
    ours = quantize(x, np.float32(1e-8), 0, scheme)
    _, rt = onnx_codes(x, np.float32(1e-8), 0, scheme)
    np.testing.assert_array_equal(ours, rt)
    np.testing.assert_array_equal(ours, [127, -128, 127, -128, 127])


@pytest.mark.parametrize("name", ["int8", "uint8", "int4"])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_axis(name: str, axis: int) -> None:
    base = SCHEMES[name]
    scheme = QuantScheme(bits=base.bits, signed=base.signed, symmetric=False, axis=axis)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32) * 3
    n = x.shape[axis]
    scale = rng.uniform(0.05, 0.6, n).astype(np.float32)
    zp = rng.integers(scheme.qmin, scheme.qmax // 2 + 1, n)
    ours = quantize(x, scale, zp, scheme)
    ref, rt = onnx_codes(x, scale, zp, scheme)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, rt)


@pytest.mark.parametrize("axis", [0, 1])
def test_blocked_int4(axis: int) -> None:
    # Not narrow: QuantizeLinear saturates at the type minimum (-8), a narrow scheme at -7.
    scheme = QuantScheme(bits=4, signed=True, symmetric=False, axis=axis, block_size=4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 6)).astype(np.float32)  # 10 rows: a ragged last block on axis 0
    shape = list(x.shape)
    shape[axis] = -(-x.shape[axis] // 4)
    scale = rng.uniform(0.1, 0.4, shape).astype(np.float32)
    zp = np.zeros(shape, np.int64)
    ours = quantize(x, scale, zp, scheme)
    ref, rt = onnx_codes(x, scale, zp, scheme)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, rt)
    full_s = expand_blocked(scale, x.shape, axis, 4)
    np.testing.assert_array_equal(
        fake_quantize(x, scale, zp, scheme), dequantize(ours, full_s, np.zeros(x.shape, np.int64), axis)
    )


def test_narrow_symmetric_matches_onnx_inside_its_range() -> None:
    """Narrow grids clip at -qmax; QuantizeLinear only agrees where x/s >= -qmax - 0.5 (documented difference)."""
    scheme = QuantScheme(bits=8, signed=True, symmetric=True)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 1.0, 5000).astype(np.float32)
    scale, zp = scale_zero_point(-1.0, 1.0, scheme)
    ours = quantize(x, scale, zp, scheme)
    ref, rt = onnx_codes(x, scale, zp, QuantScheme(bits=8, signed=True, symmetric=False))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, rt)


def test_dequantize_rejects_unexpanded_blocked_scale() -> None:
    q = np.zeros((10, 6), np.int64)
    with pytest.raises(ValueError, match="expand_blocked"):
        dequantize(q, np.ones((3, 6), np.float32), np.zeros((3, 6), np.int64), 0)


# ------------------------------------------------------------ scale_zero_point
def test_symmetric_int8_zero_point_and_restricted_range() -> None:
    scheme = QuantScheme(bits=8, signed=True, symmetric=True)
    scale, zp = scale_zero_point(-3.0, 5.0, scheme)
    assert zp == 0
    assert scale == pytest.approx(5.0 / 127, rel=1e-6)
    q = quantize(np.array([-5.0, -100.0, 5.0, 100.0], np.float32), scale, zp, scheme)
    np.testing.assert_array_equal(q, [-127, -127, 127, 127])  # -128 is never produced


def test_asymmetric_uint8_contains_zero() -> None:
    scheme = QuantScheme(bits=8, signed=False, symmetric=False)
    scale, zp = scale_zero_point(0.5, 2.0, scheme)  # widened to [0, 2]
    assert zp == 0 and scale == pytest.approx(2.0 / 255, rel=1e-6)
    scale, zp = scale_zero_point(-1.0, 3.0, scheme)
    assert zp == 64 and scale == pytest.approx(4.0 / 255, rel=1e-6)
    # Real 0 is exactly representable (zero padding, ReLU outputs).
    assert fake_quantize(np.zeros(3, np.float32), scale, zp, scheme).tolist() == [0.0, 0.0, 0.0]
    scale, zp = scale_zero_point(-4.0, -1.0, scheme)  # widened to [-4, 0]
    assert zp == 255


def test_dead_channel_gets_finite_positive_scale() -> None:
    for scheme in (QuantScheme(bits=8, axis=0), QuantScheme(bits=8, signed=False, symmetric=False, axis=0)):
        scale, zp = scale_zero_point(np.array([0.0, -1.0, 0.0]), np.array([0.0, 1.0, 1e-12]), scheme)
        assert np.all(np.isfinite(scale)) and np.all(scale > 0)
        assert scale[0] == np.float32(MIN_SCALE) and scale[2] == np.float32(MIN_SCALE)
        assert zp[0] == (0 if scheme.signed else scheme.qmin)
        w = np.zeros((3, 4), np.float32)
        np.testing.assert_array_equal(fake_quantize(w, scale, zp, scheme), w)


def test_steps_per_side() -> None:
    assert QuantScheme(bits=8).steps_per_side == 127
    assert QuantScheme(bits=4).steps_per_side == 7
    assert QuantScheme(bits=8, signed=False, symmetric=False).steps_per_side == 255
    assert QuantScheme(bits=8, signed=True, symmetric=False).steps_per_side == 255

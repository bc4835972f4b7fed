"""high-bias-absorption: structure, numerics, negative cases, idempotence."""

from __future__ import annotations

import numpy as np

from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from tests.helpers import (
    bn_params,
    build_model,
    conv_bn_relu_conv,
    feed_for,
    import_proto,
    randn,
    rng,
    run_ort,
)


def run(model, spec: str):
    ctx, result = PassContext(), None
    for p in parse_pipeline(spec):
        result = p.run(model, ctx)
    return result


def high_bias_model(seed: int = 40, pad: int = 0):
    """Conv -> BN (large beta) -> Relu -> Conv 3x3; the BN makes most channels always on."""
    g = rng(seed)
    inits = {"w1": randn(g, 6, 3, 1, 1, scale=0.05), "b1": randn(g, 6, scale=0.01),
             "w2": randn(g, 4, 6, 3, 3, scale=0.3), "b2": randn(g, 4, scale=0.1), **bn_params(g, 6)}
    inits["bn_b"] = np.array([4.0, 5.0, 0.2, 3.0, -1.0, 6.0], np.float32)  # high biases on most channels
    inits["bn_g"] = np.array([0.5, 0.4, 0.5, -0.3, 0.5, 0.6], np.float32)  # one negative gamma
    pads = f"pads = [{pad}, {pad}, {pad}, {pad}], " if pad else ""
    side = 8 if pad else 6
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,{side},{side}] y) {{
        c1 = Conv <kernel_shape = [1, 1]> (x, w1, b1)
        n1 = BatchNormalization (c1, bn_g, bn_b, bn_m, bn_v)
        r1 = Relu (n1)
        y = Conv <{pads}kernel_shape = [3, 3]> (r1, w2, b2)
    }}""", inits)


def matched_bn(proto):
    """Set the BN running statistics to the conv output's on the test feed (as training would)."""
    from onnx import numpy_helper

    from qonnx.runtime.ort import make_session, with_outputs

    feed = feed_for(proto, seed=11, batch=1)
    conv = make_session(with_outputs(proto, ["c1"]).SerializeToString()).run(["c1"], feed)[0]
    stats = {"bn_m": conv.mean(axis=(0, 2, 3)), "bn_v": conv.var(axis=(0, 2, 3)) + 1e-3}
    for init in proto.graph.initializer:
        if init.name in stats:
            init.CopyFrom(numpy_helper.from_array(stats[init.name].astype(np.float32), init.name))
    return proto, feed


def test_structure_only_biases_and_bn_statistics_change():
    model = import_proto(high_bias_model())
    run(model, "fold-bn")
    weights = {n.inputs[1].name: model.constant_value(n.inputs[1]).copy() for n in model.nodes if n.op == "Conv"}
    beta = np.asarray(model.folded_norms["n1"].beta, np.float64).copy()
    gamma = np.asarray(model.folded_norms["n1"].gamma, np.float64)
    result = run(model, "high-bias-absorption")
    assert result.modified and result.stats == {"pairs": 1, "channels": 4}
    for name, w in weights.items():
        assert np.array_equal(model.constant_value(model.tensors()[name]), w)
    c = np.maximum(0, beta - 3 * np.abs(gamma))
    assert np.allclose(model.folded_norms["n1"].beta, beta - c, atol=1e-6)
    assert np.isclose(c[3], 3.0 - 3 * 0.3)  # |gamma| used for the negative gamma


def test_outputs_unchanged_where_preactivations_exceed_c_without_padding():
    proto, feed = matched_bn(high_bias_model())
    model = import_proto(proto)
    run(model, "fold-bn,high-bias-absorption")
    ref, new = run_ort(proto, feed)[0], run_ort(model.to_onnx(), feed)[0]
    err = np.max(np.abs(ref - new))
    assert err <= 1e-5 * np.max(np.abs(ref)), err


def test_padded_next_conv_changes_only_at_the_border():
    proto, feed = matched_bn(high_bias_model(pad=1))
    model = import_proto(proto)
    run(model, "fold-bn,high-bias-absorption")
    diff = np.abs(run_ort(proto, feed)[0] - run_ort(model.to_onnx(), feed)[0])
    scale = np.max(np.abs(run_ort(proto, feed)[0]))
    assert np.max(diff[..., 1:-1, 1:-1]) <= 1e-5 * scale  # interior: exact
    assert np.max(diff) > 1e-3 * scale  # border: the padded zeros do not carry c (measured, not hidden)


def test_min_bound_left_by_cle_moves_with_the_shift():
    proto, feed = matched_bn(high_bias_model())
    model = import_proto(proto)
    run(model, "fold-bn")
    # Emulate what CLE leaves after a ReLU6: Relu followed by a per-channel Min bound.
    relu = next(n for n in model.nodes if n.op == "Relu")
    out = relu.outputs[0]
    mid = model.make_variable("r1_relu", dtype=out.dtype)
    relu.outputs = [mid]
    bound = model.make_constant("bound", np.full((1, 6, 1, 1), 6.0, np.float32))
    model.add_node("Min", [mid, bound], [out])
    model.cleanup()
    before = run_ort(model.to_onnx(), feed)[0]
    run(model, "high-bias-absorption")
    after = run_ort(model.to_onnx(), feed)[0]
    assert np.max(np.abs(before - after)) <= 1e-5 * np.max(np.abs(before))
    new_bound = next(model.constant_value(n.inputs[1]) for n in model.nodes if n.op == "Min")
    assert np.all(new_bound.reshape(-1) <= 6.0) and np.any(new_bound.reshape(-1) < 6.0)


def test_nothing_without_bn_statistics_or_high_biases():
    model = import_proto(high_bias_model())
    assert run(model.copy(), "high-bias-absorption").modified is False  # BN not folded: no statistics
    low = import_proto(conv_bn_relu_conv())  # betas in [-0.5, 0.5], gammas >= 0.5: c = 0 everywhere
    assert run(low, "fold-bn,high-bias-absorption").modified is False


def test_second_run_changes_nothing():
    model = import_proto(high_bias_model())
    run(model, "fold-bn,high-bias-absorption")
    assert run(model, "high-bias-absorption").modified is False


def test_must_run_before_calibrate():
    import pytest

    from qonnx.errors import PreconditionError

    with pytest.raises(PreconditionError, match="high-bias-absorption"):
        parse_pipeline("plan,estimate-ranges,high-bias-absorption").validate(frozenset())

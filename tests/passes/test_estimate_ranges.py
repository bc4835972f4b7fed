"""Data-free quantization: estimate-ranges (from BN moments or synthetic images) and the dfq presets."""

from __future__ import annotations

import numpy as np
import pytest

import qonnx
from qonnx.app.api import evaluate_fidelity
from qonnx.core.qtable import QuantState, Role
from qonnx.data.calibration import open_calibration
from qonnx.errors import PreconditionError
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from tests.helpers import build_model, conv_bn_relu_conv, depthwise_block, import_proto, randn, rng


# --------------------------------------------------------------------------- passes
def test_estimate_ranges_calibrates_every_tensor_without_data():
    model = import_proto(conv_bn_relu_conv())
    ctx = PassContext()
    for p in parse_pipeline("fold-bn,plan,estimate-ranges"):
        result = p.run(model, ctx)
    table = model.quant
    assert table.layers and all(e.state is QuantState.CALIBRATED for e in table.tensors.values())
    relu = table.get("r1")
    assert relu.zero_point == 0  # the range starts at the ReLU's 0
    assert result.stats["layers_kept_float"] == 0


def test_estimate_ranges_keeps_layers_with_unknown_inputs_float():
    g = rng(5)
    model = import_proto(build_model("""
    agraph (float[N,4] x) => (float[N,3] y) {
        s = Softmax (x)
        y = Gemm <transB = 1> (s, w, b)
    }""", {"w": randn(g, 3, 4), "b": randn(g, 3)}))
    ctx = PassContext()
    for p in parse_pipeline("plan,estimate-ranges"):
        result = p.run(model, ctx)
    assert result.stats["layers_kept_float"] == 1
    assert "no data-free range estimate" in next(iter(model.quant.kept_float.values()))
    assert not model.quant.layers


def test_estimate_ranges_rejects_a_bad_input_range():
    with pytest.raises(PreconditionError, match="input_range"):
        model = import_proto(conv_bn_relu_conv())
        ctx = PassContext()
        for p in parse_pipeline("plan,estimate-ranges{input_range=[1.0;-1.0]}"):
            p.run(model, ctx)


def bn_matched_to_data(samples: dict[str, np.ndarray]):
    """conv_bn_relu_conv whose BN running statistics are those of its conv output on `samples`
    (what a trained network's BN holds), so that data-free estimates have something true to find."""
    from onnx import numpy_helper

    proto = conv_bn_relu_conv()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    from qonnx.runtime.ort import make_session, with_outputs

    session = make_session(with_outputs(proto, ["c1"]).SerializeToString())
    conv = np.concatenate([session.run(["c1"], {"x": x[None]})[0] for x in samples["x"]])
    stats = {"bn_m": conv.mean(axis=(0, 2, 3)), "bn_v": conv.var(axis=(0, 2, 3))}
    for init in proto.graph.initializer:
        if init.name in stats:
            init.CopyFrom(numpy_helper.from_array(stats[init.name].astype(np.float32), init.name))
    assert inits["bn_m"].shape == stats["bn_m"].shape
    return proto


def test_dfq_runs_without_calibration_data_and_stays_close_to_float():
    samples = {"x": np.random.default_rng(9).uniform(-1, 1, (32, 3, 8, 8)).astype(np.float32)}
    original = bn_matched_to_data(samples)
    result = qonnx.optimize(original, None, pipeline="dfq")
    assert "calibrate" not in [p.name for p in result.pipeline]
    sqnr = evaluate_fidelity(original.SerializeToString(), result.to_bytes(),
                                       open_calibration(samples, import_proto(original)))
    assert sqnr["sqnr_db"] > 20, sqnr


def test_dfq_is_deterministic():
    a = qonnx.optimize(depthwise_block(), None, pipeline="dfq").to_bytes()
    b = qonnx.optimize(depthwise_block(), None, pipeline="dfq").to_bytes()
    assert a == b


def test_roles_after_dfq_have_parameters():
    result = qonnx.optimize(depthwise_block(), None, pipeline="dfq")
    for role in (Role.ACTIVATION, Role.WEIGHT, Role.BIAS):
        assert all(e.calibrated for e in result.ir.quant.of_role(role).values())


def test_per_channel_min_bounds_left_by_cle_are_estimated():
    """dfq-pertensor: CLE turns ReLU6 into Relu + Min(b / s); estimate-ranges must see through it."""
    result = qonnx.optimize(depthwise_block(), None, pipeline="dfq-pertensor")
    assert result.ir.quant.layers and not result.ir.quant.kept_float


# --------------------------------------------------------------------------- synthetic images (no BN statistics)
def _estimate(model, text="plan,estimate-ranges"):
    ctx = PassContext()
    result = None
    for p in parse_pipeline(text):
        result = p.run(model, ctx)
    return result


def test_image_model_without_bn_statistics_takes_ranges_from_synthetic_images():
    from tests.helpers import one_conv

    model = import_proto(one_conv())
    result = _estimate(model)
    assert result.stats["source"] == "synthetic" and result.stats["samples"] == 128
    entries = model.quant.of_role(Role.ACTIVATION)
    assert entries and all(e.method == "synthetic" and e.state is QuantState.CALIBRATED for e in entries.values())
    assert model.quant.get("y").zero_point == 0  # the Relu output starts at 0
    again = import_proto(one_conv())
    _estimate(again)
    assert all(np.array_equal(again.quant.get(n).scale, e.scale) for n, e in entries.items())  # deterministic


def test_folded_bn_statistics_keep_the_moment_estimate():
    model = import_proto(conv_bn_relu_conv())
    assert _estimate(model, "fold-bn,plan,estimate-ranges").stats["source"] == "moments"
    forced = import_proto(conv_bn_relu_conv())
    assert _estimate(forced, "fold-bn,plan,estimate-ranges{source=synthetic,samples=4}").stats["source"] == "synthetic"


def test_synthetic_source_refuses_a_model_without_image_inputs():
    with pytest.raises(PreconditionError, match="must be an image"):
        _estimate(import_proto(depthwise_block()), "plan,estimate-ranges{source=synthetic}")
    with pytest.raises(PreconditionError, match="samples"):
        _estimate(import_proto(depthwise_block()), "plan,estimate-ranges{samples=0}")

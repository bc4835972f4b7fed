"""Data-free quantization: Gaussian moments, estimate-ranges, analytic bias correction, the dfq preset."""

from __future__ import annotations

import numpy as np
import pytest

import qonnx
from qonnx.analyses.moments import clipped_gaussian_moments, gaussian_expectation, propagate_moments
from qonnx.app.api import evaluate_fidelity
from qonnx.core.qtable import QuantState, Role
from qonnx.data.calibration import open_calibration
from qonnx.errors import PreconditionError
from qonnx.infra.manager import PassContext
from qonnx.infra.pipeline import Pipeline
from tests.helpers import build_model, conv_bn_relu_conv, depthwise_block, import_proto, randn, rng


# --------------------------------------------------------------------------- analytic expectations
@pytest.mark.parametrize("mean,std,low,high", [
    (0.3, 1.0, 0.0, np.inf),  # ReLU
    (-1.5, 0.7, 0.0, np.inf),  # mostly-off ReLU
    (2.0, 3.0, 0.0, 6.0),  # ReLU6
    (5.5, 1.2, 0.0, 6.0),  # ReLU6 near the top
    (0.0, 2.0, -1.0, 1.0),
])
def test_clipped_gaussian_moments_match_monte_carlo(mean, std, low, high):
    z = np.random.default_rng(0).normal(mean, std, 4_000_000)
    x = np.clip(z, low, high)
    m, v = clipped_gaussian_moments(np.array([mean]), np.array([std]), low, high)
    assert abs(m[0] - x.mean()) <= 1e-3 * max(1.0, abs(x.mean()))
    assert abs(v[0] - x.var()) <= 1e-3 * max(1.0, x.var())


def test_negative_gamma_is_used_as_its_magnitude_and_zero_std_is_a_point_mass():
    pos = clipped_gaussian_moments(np.array([0.5]), np.array([2.0]), 0.0, 6.0)
    neg = clipped_gaussian_moments(np.array([0.5]), np.array([-2.0]), 0.0, 6.0)
    assert np.allclose(pos, neg)
    m, v = clipped_gaussian_moments(np.array([7.0, -1.0]), np.array([0.0, 0.0]), 0.0, 6.0)
    assert np.allclose(m, [6.0, 0.0]) and np.allclose(v, 0.0)


@pytest.mark.parametrize("fn", [np.tanh, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)], ids=["tanh", "hardswish"])
def test_quadrature_of_other_activations_matches_numerical_integration(fn):
    from scipy.integrate import quad

    mu, sd = 0.4, 1.5
    density = lambda z: np.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))  # noqa: E731
    first = quad(lambda z: fn(z) * density(z), -np.inf, np.inf, points=None, limit=200)[0]
    second = quad(lambda z: fn(z) ** 2 * density(z), -np.inf, np.inf, limit=200)[0]
    m, v = gaussian_expectation(fn, np.array([mu]), np.array([sd]))
    assert abs(m[0] - first) < 1e-5 and abs(v[0] - (second - first ** 2)) < 1e-5


# --------------------------------------------------------------------------- propagation
def test_folded_bn_statistics_set_the_layer_output_moments():
    model = import_proto(conv_bn_relu_conv())
    Pipeline.parse("fold-bn").passes[0].run(model, PassContext())
    norm = model.folded_norms["n1"]
    moments = propagate_moments(model, (-1.0, 1.0))
    assert np.allclose(moments["n1"].mean, norm.beta) and np.allclose(moments["n1"].var, norm.gamma ** 2)
    relu_mean, _ = clipped_gaussian_moments(norm.beta, norm.gamma, 0.0, np.inf)
    assert np.allclose(moments["r1"].mean, relu_mean)
    assert moments["r1"].low == 0.0 and "y" in moments


def test_linear_layer_moments_follow_from_independent_inputs():
    """A 1x1 conv of independent uniform inputs: exact mean and variance."""
    g = rng(3)
    w, b = randn(g, 5, 4, 1, 1), randn(g, 5)
    model = import_proto(build_model("""
    agraph (float[N,4,6,6] x) => (float[N,5,6,6] y) {
        y = Conv (x, w, b)
    }""", {"w": w, "b": b}))
    moments = propagate_moments(model, (0.0, 2.0))
    x = np.random.default_rng(4).uniform(0, 2, size=(200_000, 4))
    y = x @ w[:, :, 0, 0].T + b
    assert np.allclose(moments["y"].mean, y.mean(0), atol=5e-3)
    assert np.allclose(moments["y"].var, y.var(0), rtol=2e-2)


def test_unknown_ops_leave_tensors_unknown():
    model = import_proto(build_model("""
    agraph (float[N,4] x) => (float[N,4] y) {
        s = Softmax (x)
        y = Relu (s)
    }"""))
    moments = propagate_moments(model, (-1.0, 1.0))
    assert "x" in moments and "s" not in moments and "y" not in moments


# --------------------------------------------------------------------------- passes
def test_estimate_ranges_calibrates_every_tensor_without_data():
    model = import_proto(conv_bn_relu_conv())
    ctx = PassContext()
    for p in Pipeline.parse("fold-bn,plan,estimate-ranges"):
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
    for p in Pipeline.parse("plan,estimate-ranges"):
        result = p.run(model, ctx)
    assert result.stats["layers_kept_float"] == 1
    assert "no data-free range estimate" in next(iter(model.quant.kept_float.values()))
    assert not model.quant.layers


def test_estimate_ranges_rejects_a_bad_input_range():
    with pytest.raises(PreconditionError, match="input_range"):
        model = import_proto(conv_bn_relu_conv())
        ctx = PassContext()
        for p in Pipeline.parse("plan,estimate-ranges{input_range=[1.0;-1.0]}"):
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


def test_analytic_bias_correction_moves_the_bias_by_the_expected_shift_and_is_idempotent():
    model = import_proto(conv_bn_relu_conv())
    ctx = PassContext()
    for p in Pipeline.parse("fold-bn,plan{per_channel=false},estimate-ranges"):
        p.run(model, ctx)
    bias_name = model.quant.layers[next(n for n in model.quant.layers if model.quant.layers[n].input == "r1")].bias
    before = model.constant_value(model.tensors()[bias_name]).copy()
    bc = Pipeline.parse("bias-correction{mode=analytic}").passes[0]
    first = bc.run(model, ctx)
    assert first.modified and first.stats["mode"] == "analytic"
    shift = model.quant.get(bias_name).correction
    assert np.allclose(model.constant_value(model.tensors()[bias_name]), before - shift, atol=1e-6)
    assert bc.run(model, ctx).modified is False


def test_analytic_bias_correction_needs_no_data_but_empirical_does():
    Pipeline.parse("plan,estimate-ranges,bias-correction{mode=analytic}").validate(frozenset())
    with pytest.raises(PreconditionError, match="calibration-data"):
        Pipeline.parse("plan,estimate-ranges,bias-correction").validate(frozenset())


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


def test_relu_and_min_left_by_cle_have_the_moments_of_the_clip_they_replace():
    """CLE's exact rewrite of Clip(0, 6) as Relu + Min(6 / s) must not change the moment estimate: treating
    the rectified tensor as Gaussian and clipping it again underestimated E[h^2] by up to a third."""
    g = rng(63)
    inits = {"w": randn(g, 4, 3, 1, 1, scale=2.0), "b": np.array([0.5, 2.0, -1.0, 5.0], np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    clip = build_model("""
    agraph (float[1,3,4,4] x) => (float[1,4,4,4] y) {
        c = Conv (x, w, b)
        y = Clip (c, lo, hi)
    }""", inits)
    s = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    rewritten_inits = {"w": inits["w"] / s[:, None, None, None], "b": inits["b"] / s,
                       "bound": (6.0 / s).reshape(1, 4, 1, 1)}
    rewritten = build_model("""
    agraph (float[1,3,4,4] x) => (float[1,4,4,4] y) {
        c = Conv (x, w, b)
        r = Relu (c)
        y = Min (r, bound)
    }""", rewritten_inits)
    before = propagate_moments(import_proto(clip), (-1.0, 1.0))["y"]
    after = propagate_moments(import_proto(rewritten), (-1.0, 1.0))["y"]
    np.testing.assert_allclose(after.mean * s, before.mean, rtol=1e-5)
    np.testing.assert_allclose(after.var * s**2, before.var, rtol=1e-5)


def test_prelu_with_a_per_channel_slope_matches_monte_carlo():
    g = rng(64)
    slope = np.array([0.0, 0.25, -0.5], np.float32).reshape(3, 1, 1)
    model = import_proto(build_model("""
    agraph (float[1,3,4,4] x) => (float[1,3,4,4] y) {
        c = Conv (x, w, b)
        y = PRelu (c, slope)
    }""", {"w": randn(g, 3, 3, 1, 1, scale=1.0), "b": np.array([0.3, -0.4, 1.0], np.float32), "slope": slope}))
    moments = propagate_moments(model, (-1.0, 1.0))
    pre, out = moments["c"], moments["y"]
    z = rng(65).normal(pre.mean, np.sqrt(pre.var), size=(400_000, 3))
    y = np.where(z >= 0, z, slope.reshape(1, 3) * z)
    np.testing.assert_allclose(out.mean, y.mean(0), atol=3e-3)
    np.testing.assert_allclose(out.var, y.var(0), rtol=1e-2)
    assert out.low <= y.min() and out.high >= np.quantile(y, 0.999)


def test_min_below_a_clips_lower_bound_gives_the_constant():
    g = rng(66)
    model = import_proto(build_model("""
    agraph (float[1,2,4,4] x) => (float[1,2,4,4] y) {
        c = Conv (x, w, b)
        r = Clip (c, lo, hi)
        y = Min (r, u)
    }""", {"w": randn(g, 2, 2, 1, 1), "b": np.zeros(2, np.float32), "lo": np.array(1.0, np.float32),
           "hi": np.array(6.0, np.float32), "u": np.array([0.5, 3.0], np.float32).reshape(1, 2, 1, 1)}))
    y = propagate_moments(model, (-1.0, 1.0))["y"]
    assert y.mean[0] == pytest.approx(0.5) and y.var[0] == pytest.approx(0.0, abs=1e-12)
    assert 1.0 < y.mean[1] < 3.0 and y.var[1] > 0


def test_per_channel_bounds_equal_one_call_per_channel():
    mean, std, high = np.array([0.5, 2.0, 5.0]), np.array([1.0, 2.0, 0.5]), np.array([1.0, 6.0, 4.0])
    together = clipped_gaussian_moments(mean, std, 0.0, high)
    for i in range(3):
        alone = clipped_gaussian_moments(mean[i:i + 1], std[i:i + 1], 0.0, float(high[i]))
        assert np.allclose(together[0][i], alone[0]) and np.allclose(together[1][i], alone[1])


# --------------------------------------------------------------------------- synthetic images (no BN statistics)
def test_pink_noise_images_are_deterministic_in_range_and_spatially_correlated():
    from qonnx.data.synthetic import pink_noise_images

    a = pink_noise_images([1, 3, 32, 32], 4, (-1.0, 1.0), seed=3)
    b = pink_noise_images([1, 3, 32, 32], 4, (-1.0, 1.0), seed=3)
    assert a.shape == (4, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0 and a.std() > 0.1
    # Neighbouring pixels are alike and the colour channels move together, as in photographs.
    neighbour = np.corrcoef(a[..., :-1].ravel(), a[..., 1:].ravel())[0, 1]
    channels = np.corrcoef(a[:, 0].ravel(), a[:, 1].ravel())[0, 1]
    assert neighbour > 0.8 and channels > 0.5
    nhwc = pink_noise_images([1, 32, 32, 3], 2, (0.0, 255.0), seed=3)
    assert nhwc.shape == (2, 32, 32, 3) and nhwc.min() >= 0.0 and nhwc.max() <= 255.0


@pytest.mark.parametrize("shape", [[1, 4, 8, 8], [1, 3, None, 8], [1, 16], [1, 3, 4, 4]])
def test_pink_noise_refuses_inputs_that_are_not_images(shape):
    from qonnx.data.synthetic import image_layout, pink_noise_images

    assert image_layout(shape) is None
    with pytest.raises(ValueError, match="synthetic images"):
        pink_noise_images(shape, 1, (-1.0, 1.0))


def _estimate(model, text="plan,estimate-ranges"):
    ctx = PassContext()
    result = None
    for p in Pipeline.parse(text):
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

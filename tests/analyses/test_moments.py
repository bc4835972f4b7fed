"""Gaussian moments for data-free quantization: clipped and other activations, propagation through the graph."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.analyses.moments import clipped_gaussian_moments, gaussian_expectation, propagate_moments
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from tests.helpers import build_model, conv_bn_relu_conv, import_proto, randn, rng


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
    parse_pipeline("fold-bn").passes[0].run(model, PassContext())
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

"""Numerical core of AdaRound (qonnx/rounding/adaround.py), graph-independent.

1. The moment form of L_rec and its gradient equals the direct computation on a naive, position-by-position
   reference convolution (itself checked against onnxruntime) for Conv (pads, strides, dilations, groups,
   depthwise, 1-D, auto_pad) and MatMul, symmetric and asymmetric, streamed and chunked.
2. h(V0) = frac(W/s) and W~(V0) = W.
3. Finite-difference check of dL/dV.
4. After a full run every h is 0 or 1 and the hard weights lie on the grid.
5. Brute-force optimal rounding on least-squares toys with <= 12 weights.
6. Shape and argument errors raise ValueError.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qonnx.rounding.adaround import (
    GAMMA,
    ZETA,
    ConvSpec,
    LayerMoments,
    RoundingProblem,
    adaround_weights,
    beta_schedule,
    blocks_to_conv_weight,
    blocks_to_matmul_weight,
    conv_weight_blocks,
    im2col,
    matmul_weight_blocks,
    nearest_codes,
    reconstruction_grad,
    reconstruction_loss,
)
from tests.helpers import install_step_clock


# --------------------------------------------------------------------------- references
def _window_index(pos: tuple[int, ...], kernel: tuple[int, ...], strides, dilations) -> list[np.ndarray]:
    return [np.arange(k) * d + p * s for p, k, s, d in zip(pos, kernel, strides, dilations)]


def direct_conv(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int) -> np.ndarray:
    """Naive Conv: one explicit input window per output position (no im2col), float64."""
    n, c = x.shape[:2]
    o, kernel = w.shape[0], w.shape[2:]
    r = len(kernel)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(r)]
    cg, og = c // group, o // group
    y = np.zeros((n, o, *out))
    for pos in itertools.product(*(range(m) for m in out)):
        idx = _window_index(pos, kernel, strides, dilations)
        window = xp[np.ix_(np.arange(n), np.arange(c), *idx)].reshape(n, c, -1)
        for gi in range(group):
            wg = w[gi * og:(gi + 1) * og].reshape(og, cg, -1).astype(np.float64)
            y[(slice(None), slice(gi * og, (gi + 1) * og), *pos)] = np.einsum(
                "nck,ock->no", window[:, gi * cg:(gi + 1) * cg], wg
            )
    return y


def direct_conv_weight_grad(x: np.ndarray, dy: np.ndarray, w_shape, strides, pads, dilations, group) -> np.ndarray:
    """Adjoint of direct_conv in the weight: dL/dW[o, c, k] = sum_{n, pos} dy[n, o, pos] x_pad[n, c, window(pos, k)]."""
    n, c = x.shape[:2]
    o, kernel = w_shape[0], tuple(w_shape[2:])
    r = len(kernel)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    cg, og = c // group, o // group
    grad = np.zeros((o, cg, math.prod(kernel)))
    for pos in itertools.product(*(range(m) for m in dy.shape[2:])):
        idx = _window_index(pos, kernel, strides, dilations)
        window = xp[np.ix_(np.arange(n), np.arange(c), *idx)].reshape(n, c, -1)
        for gi in range(group):
            grad[gi * og:(gi + 1) * og] += np.einsum(
                "no,nck->ock", dy[(slice(None), slice(gi * og, (gi + 1) * og), *pos)], window[:, gi * cg:(gi + 1) * cg]
            )
    return grad.reshape(w_shape)


def ort_conv(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})[0]


def rel_err(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------- 1. moment identity
# name, x shape, w shape, Conv attributes (ONNX names; missing = ONNX default)
CONVS = [
    ("2d_pad_stride_dil_group", (2, 4, 9, 10), (6, 2, 3, 3),
     dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2], group=2)),
    ("2d_plain", (2, 3, 7, 7), (5, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    ("depthwise", (2, 5, 8, 8), (5, 1, 3, 3), dict(pads=[1, 1, 1, 1], group=5)),
    ("depthwise_mult2_stride_dil", (2, 3, 9, 9), (6, 1, 3, 3),
     dict(strides=[2, 2], pads=[2, 1, 2, 0], dilations=[2, 2], group=3)),
    ("1d", (3, 3, 20), (4, 3, 5), dict(strides=[2], pads=[2, 1])),
    ("1d_group_dil", (2, 4, 17), (6, 2, 3), dict(strides=[3], pads=[0, 2], dilations=[2], group=2)),
    ("1d_depthwise", (2, 6, 12), (6, 1, 3), dict(pads=[1, 1], group=6)),
    ("2d_same_upper", (2, 3, 7, 8), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ("2d_same_lower_even_kernel", (1, 2, 6, 7), (2, 2, 2, 4), dict(strides=[2, 3], auto_pad="SAME_LOWER")),
    ("2d_valid", (2, 3, 5, 6), (4, 3, 2, 2), dict(auto_pad="VALID")),
]


def _conv_case(shape_x, shape_w, attrs, seed: int):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal(shape_x)
    w = gen.standard_normal(shape_w) * 0.3
    spec = ConvSpec.from_attrs(shape_w, attrs)
    begins, ends = spec.resolve_pads(shape_x[2:])
    return gen, x, w, spec, list(begins) + list(ends)


@pytest.mark.parametrize("name,shape_x,shape_w,attrs", CONVS, ids=[c[0] for c in CONVS])
def test_reference_conv_matches_onnxruntime(name, shape_x, shape_w, attrs):
    _, x, w, spec, pads = _conv_case(shape_x, shape_w, attrs, 0)
    ref = direct_conv(x, w, spec.strides, pads, spec.dilations, spec.group)
    got = ort_conv(x, w, attrs)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5
    # im2col rows times the block weights is the same conv (rows are (image, position) row-major).
    cols = im2col(x, spec)
    y = np.einsum("gmi,goi->mgo", cols, conv_weight_blocks(w, spec.group)).reshape(ref.shape[0], -1, ref.shape[1])
    assert rel_err(y.transpose(0, 2, 1).reshape(ref.shape), ref) < 1e-12


@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("name,shape_x,shape_w,attrs", CONVS, ids=[c[0] for c in CONVS])
def test_conv_moment_loss_and_grad_equal_direct(name, shape_x, shape_w, attrs, asymmetric):
    gen, x, w, spec, pads = _conv_case(shape_x, shape_w, attrs, 1)
    x_hat = x + 0.1 * gen.standard_normal(x.shape) if asymmetric else x
    w_tilde = w + 0.05 * gen.standard_normal(w.shape)

    # Stream two batches, one image per chunk, constant via the weight; and an H-keeping variant.
    mom = LayerMoments.for_conv(w, spec, chunk_bytes=1)
    alt = LayerMoments(spec.group, spec.block_in, conv=spec)
    n1 = max(1, x.shape[0] // 2)
    for m in (mom, alt):
        if asymmetric:
            m.add(x_hat[:n1], x[:n1])
            m.add(x_hat[n1:], x[n1:])
        else:
            m.add(x[:n1])  # x=None: symmetric
            xs = x[n1:]
            m.add(xs, xs)  # the same object: symmetric too
    assert mom.symmetric is (not asymmetric)

    y_hat = direct_conv(x_hat, w_tilde, spec.strides, pads, spec.dilations, spec.group)
    y = direct_conv(x, w, spec.strides, pads, spec.dilations, spec.group)
    rows = y.shape[0] * math.prod(y.shape[2:])
    assert mom.count == rows
    loss_direct = float(np.sum((y_hat - y) ** 2)) / rows
    grad_direct = direct_conv_weight_grad(x_hat, 2.0 * (y_hat - y) / rows, w.shape, spec.strides, pads,
                                          spec.dilations, spec.group)

    wt_b, w_b = conv_weight_blocks(w_tilde, spec.group), conv_weight_blocks(w, spec.group)
    for m in (mom, alt):
        assert rel_err(reconstruction_loss(wt_b, w_b, m), loss_direct) < 1e-9
        grad = blocks_to_conv_weight(reconstruction_grad(wt_b, w_b, m), w.shape)
        assert rel_err(grad, grad_direct) < 1e-9
    if asymmetric:
        # The constant is tr(W H W^T) = mean ||W x_hat - W x||^2 (W~ = W).
        y_w = direct_conv(x_hat, w, spec.strides, pads, spec.dilations, spec.group)
        assert rel_err(mom.const_term(w_b), np.sum((y_w - y) ** 2) / rows) < 1e-9
    else:
        assert mom.cross is None and mom.const_term(w_b) == 0.0


def test_direct_weight_grad_is_the_derivative_of_the_direct_loss():
    """The reference adjoint itself, checked by a directional central difference (exact for a quadratic)."""
    name, shape_x, shape_w, attrs = CONVS[0]
    gen, x, w, spec, pads = _conv_case(shape_x, shape_w, attrs, 2)
    x_hat = x + 0.1 * gen.standard_normal(x.shape)
    w_tilde = w + 0.05 * gen.standard_normal(w.shape)
    y = direct_conv(x, w, spec.strides, pads, spec.dilations, spec.group)
    rows = y.shape[0] * math.prod(y.shape[2:])

    def loss(wt: np.ndarray) -> float:
        return float(np.sum((direct_conv(x_hat, wt, spec.strides, pads, spec.dilations, spec.group) - y) ** 2)) / rows

    y_hat = direct_conv(x_hat, w_tilde, spec.strides, pads, spec.dilations, spec.group)
    grad = direct_conv_weight_grad(x_hat, 2.0 * (y_hat - y) / rows, w.shape, spec.strides, pads,
                                   spec.dilations, spec.group)
    direction = gen.standard_normal(w.shape)
    eps = 1e-3
    fd = (loss(w_tilde + eps * direction) - loss(w_tilde - eps * direction)) / (2 * eps)
    assert abs(fd - np.sum(grad * direction)) < 1e-9 * abs(fd)


@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
def test_matmul_moment_loss_and_grad_equal_direct(asymmetric):
    gen = np.random.default_rng(3)
    x = gen.standard_normal((3, 4, 7)) + 0.5
    x_hat = x + 0.1 * gen.standard_normal(x.shape) if asymmetric else x
    w_kn = gen.standard_normal((7, 5))
    wt_kn = w_kn + 0.05 * gen.standard_normal(w_kn.shape)
    mom = LayerMoments.for_linear(matmul_weight_blocks(w_kn)[0], chunk_bytes=7 * 8 * 2 * 5)  # 5-row chunks
    mom.add(x_hat, None if not asymmetric else x)
    assert mom.count == 12 and mom.symmetric is (not asymmetric)

    resid = x_hat @ wt_kn - x @ w_kn
    loss_direct = float(np.sum(resid**2)) / 12
    grad_kn = 2.0 * x_hat.reshape(-1, 7).T @ resid.reshape(-1, 5) / 12
    wt_b, w_b = matmul_weight_blocks(wt_kn), matmul_weight_blocks(w_kn)
    assert rel_err(reconstruction_loss(wt_b, w_b, mom), loss_direct) < 1e-9
    assert rel_err(blocks_to_matmul_weight(reconstruction_grad(wt_b, w_b, mom)), grad_kn) < 1e-9
    # 2-D [O, I] weights give the same numbers in 2-D.
    g2 = reconstruction_grad(wt_kn.T, w_kn.T, mom)
    assert g2.shape == (5, 7) and rel_err(g2, grad_kn.T) < 1e-9


def test_chunked_and_streamed_moments_equal_one_shot():
    name, shape_x, shape_w, attrs = CONVS[3]
    gen, x, w, spec, _ = _conv_case(shape_x, shape_w, attrs, 4)
    x_hat = x + 0.1 * gen.standard_normal(x.shape)
    one = LayerMoments.for_conv(w, spec)
    one.add(x_hat, x)
    many = LayerMoments.for_conv(w, spec, chunk_bytes=1)
    for i in range(x.shape[0]):
        many.add(x_hat[i:i + 1], x[i:i + 1])
    assert one.count == many.count
    assert rel_err(many.gram, one.gram) < 1e-12 and rel_err(many.cross, one.cross) < 1e-12
    wb = conv_weight_blocks(w, spec.group)
    assert rel_err(many.const_term(wb), one.const_term(wb)) < 1e-12


def test_float32_compute_dtype_is_close():
    name, shape_x, shape_w, attrs = CONVS[0]
    gen, x, w, spec, _ = _conv_case(shape_x, shape_w, attrs, 5)
    m64 = LayerMoments.for_conv(w, spec)
    m32 = LayerMoments.for_conv(w, spec, compute_dtype=np.float32)
    for m in (m64, m32):
        m.add(x)
    assert m32.gram.dtype == np.float64
    assert rel_err(m32.gram, m64.gram) < 1e-5


# --------------------------------------------------------------------------- 2. initialisation
def _grid_case(seed: int, shape=(3, 4, 6), q=(-7, 7)):
    gen = np.random.default_rng(seed)
    w = gen.standard_normal(shape) * 0.2
    o = shape[0] * shape[1]
    absmax = np.abs(w).reshape(o, -1).max(1)
    scale = absmax / q[1] * gen.uniform(0.9, 1.0, o)  # a few weights beyond the grid ends
    x = gen.standard_normal((200, shape[2])) @ (np.eye(shape[2]) + 0.3 * gen.standard_normal((shape[2],) * 2))
    return gen, w, scale, x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_init_h_is_frac_and_soft_weight_is_w(dtype):
    gen, w, scale, x = _grid_case(6)
    g = w.shape[0]
    moments = LayerMoments.from_arrays(np.stack([x.T @ x / len(x)] * g))
    prob = RoundingProblem.build(w, scale, moments, -7, 7, dtype=dtype)
    v0 = prob.init_v()
    assert v0.dtype == dtype
    ratio = w / scale.reshape(g, -1, 1)
    assert np.max(np.abs(prob.h(v0.astype(np.float64)) - (ratio - np.floor(ratio)))) < 1e-6
    soft = prob.soft_weight(v0)
    inside = prob.free
    assert 0 < (~inside).sum() < inside.size  # some weights sit beyond the grid: they are frozen
    s = np.broadcast_to(scale.reshape(g, -1, 1), w.shape)
    # (W~ - W)/s = h(V0) - frac(W/s) for free weights: as exact as V0 is in its dtype.
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert np.max(np.abs(soft - w)[inside] / s[inside]) < tol
    # Frozen weights are pinned to the grid end whatever h is.
    assert np.allclose(soft[~inside], np.clip(np.round(w / s), -7, 7)[~inside] * s[~inside], rtol=0, atol=1e-12)


def test_init_with_zero_point_and_uint_grid():
    gen = np.random.default_rng(7)
    zp = np.array([5.0, 8.0, 10.0])
    scale = np.array([0.02, 0.03, 0.05])
    codes_f = gen.uniform(0.0, 15.0, (3, 6))
    w = (codes_f - zp[:, None]) * scale[:, None]
    moments = LayerMoments.from_arrays(np.eye(6))
    prob = RoundingProblem.build(w, scale, moments, 0, 15, zero_point=zp, dtype=np.float64)
    v0 = prob.init_v()
    assert prob.free.all()
    assert np.max(np.abs(prob.soft_weight(v0) - w[None])) < 1e-12
    assert np.array_equal(prob.hard_codes(np.full_like(v0, -1.0))[0], np.floor(codes_f))
    assert np.array_equal(prob.hard_codes(np.full_like(v0, 1.0))[0], np.floor(codes_f) + 1)
    # nearest_codes agrees with rint on the same grid.
    assert np.array_equal(nearest_codes(w, scale, 0, 15, zp), np.clip(np.rint(codes_f), 0, 15))


# --------------------------------------------------------------------------- 3. gradient check
@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0])
def test_dl_dv_matches_finite_differences(beta):
    gen, w, scale, x = _grid_case(8)
    g = w.shape[0]
    x_hat = x + 0.05 * gen.standard_normal(x.shape)
    d = x_hat - x
    moments = LayerMoments.from_arrays(
        np.stack([x_hat.T @ x_hat / len(x)] * g), np.stack([d.T @ x_hat / len(x)] * g),
        np.stack([d.T @ d / len(x)] * g), count=len(x),
    )
    prob = RoundingProblem.build(w, scale, moments, -7, 7, dtype=np.float64)
    v = gen.uniform(-2.0, 2.0, w.shape)  # h strictly inside (0, 1)
    reg = 0.01
    loss, grad = prob.loss_grad(v, beta, reg)

    # The loss is L_rec of the soft weights plus the regularizer over the free weights.
    h = prob.h(v)
    f_reg = 0.0 if beta is None else np.sum((1 - np.abs(2 * h - 1) ** beta)[prob.free])
    assert rel_err(loss, reconstruction_loss(prob.soft_weight(v), w, moments) + reg * f_reg) < 1e-12

    eps = 1e-6
    fd = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        e = np.zeros_like(v)
        e[idx] = eps
        fd[idx] = (prob.loss_grad(v + e, beta, reg)[0] - prob.loss_grad(v - e, beta, reg)[0]) / (2 * eps)
    assert np.max(np.abs(fd - grad)) < 1e-6 * np.max(np.abs(grad))
    assert np.all(grad[~prob.free] == 0.0)


def test_gradient_is_zero_where_h_is_clipped():
    gen, w, scale, x = _grid_case(9)
    moments = LayerMoments.from_arrays(np.stack([x.T @ x / len(x)] * w.shape[0]))
    prob = RoundingProblem.build(w, scale, moments, -7, 7, dtype=np.float64)
    v = np.where(gen.random(w.shape) < 0.5, -3.0, 3.0)  # |V| > log(11): h exactly 0 or 1
    _, grad = prob.loss_grad(v, 5.0, 0.01)
    assert np.all(grad == 0.0)


def test_beta_schedule():
    assert beta_schedule(0, 100, (20, 2), 0.2) is None
    assert beta_schedule(19, 100, (20, 2), 0.2) is None
    assert beta_schedule(20, 100, (20, 2), 0.2) == pytest.approx(20.0)
    assert beta_schedule(60, 100, (20, 2), 0.2) == pytest.approx(11.0)
    assert beta_schedule(99, 100, (20, 2), 0.2) == pytest.approx(2.0, abs=0.01)


# --------------------------------------------------------------------------- 4. end state
@pytest.mark.parametrize("qmax", [7, 127], ids=["int4", "int8"])
def test_full_run_ends_binary_and_on_grid(qmax):
    gen = np.random.default_rng(10)
    w = gen.standard_normal((8, 4, 3, 3)) * np.sqrt(2 / 36)
    x = np.maximum(gen.standard_normal((4, 4, 10, 10)), 0.0)
    x_hat = x + 0.02 * gen.standard_normal(x.shape)
    moments = LayerMoments.for_conv(w, pads=[1, 1, 1, 1])
    moments.add(x_hat, x)
    scale = np.abs(w).reshape(8, -1).max(1) / qmax
    wb = conv_weight_blocks(w)
    codes, stats = adaround_weights(wb, scale, moments, -qmax, qmax)

    assert stats.iterations == stats.planned_iterations == 10_000 and not stats.stopped_early
    assert stats.soft_fraction == 0.0  # every h is exactly 0 or 1 before hardening
    assert codes.shape == wb.shape and np.issubdtype(codes.dtype, np.integer)
    assert codes.min() >= -qmax and codes.max() <= qmax
    floor = np.floor(wb / scale.reshape(1, -1, 1))
    assert np.isin(codes - floor, (0, 1)).all()  # each weight went down or up, never further
    hard = scale.reshape(1, -1, 1) * codes
    assert np.allclose(hard / scale.reshape(1, -1, 1), np.round(hard / scale.reshape(1, -1, 1)), atol=1e-9)
    assert stats.loss_adaround == pytest.approx(reconstruction_loss(hard, wb, moments), rel=1e-12)
    assert stats.loss_nearest == pytest.approx(
        reconstruction_loss(scale.reshape(1, -1, 1) * nearest_codes(wb, scale, -qmax, qmax), wb, moments), rel=1e-12)
    # (loss_float, the loss of W itself, is no lower bound: with x_hat != x a rounded W~ can compensate.)
    assert stats.loss_adaround < stats.loss_nearest
    # Deterministic.
    again, _ = adaround_weights(wb, scale, moments, -qmax, qmax)
    assert np.array_equal(codes, again)


def test_depthwise_blocks_run_vectorised():
    gen = np.random.default_rng(11)
    w = gen.standard_normal((16, 1, 3, 3)) * 0.3
    x = gen.standard_normal((2, 16, 6, 6))
    moments = LayerMoments.for_conv(w, pads=[1, 1, 1, 1], group=16)
    moments.add(x)
    scale = np.abs(w).reshape(16, -1).max(1) / 7
    wb = conv_weight_blocks(w, 16)
    assert wb.shape == (16, 1, 9) and moments.gram.shape == (16, 9, 9)
    codes, stats = adaround_weights(wb, scale, moments, -7, 7, iterations=2000)
    assert codes.shape == (16, 1, 9) and stats.iterations == 2000
    assert stats.loss_adaround <= stats.loss_nearest
    assert blocks_to_conv_weight(codes, w.shape).shape == w.shape


def test_time_budget_shortens_the_schedule_and_progress_counts():
    gen = np.random.default_rng(12)
    w = gen.standard_normal((64, 256)) * 0.05
    x = gen.standard_normal((512, 256))
    moments = LayerMoments.for_linear(w)
    moments.add(x)
    seen: list[int] = []
    codes, stats = adaround_weights(w, np.abs(w).max(1) / 7, moments, -7, 7, iterations=1_000_000,
                                    time_budget_s=0.3, progress=seen.append)
    assert stats.iterations < 1_000_000 and stats.planned_iterations < 1_000_000
    assert seen == list(range(1, stats.iterations + 1))
    assert codes.shape == w.shape and codes.min() >= -7 and codes.max() <= 7
    assert stats.seconds < 10.0


def test_time_budget_schedule_is_refitted_when_steps_get_dearer(monkeypatch):
    """Steps cost 1 ms in the warm start and 3 ms once the regularizer is on: a schedule fitted once to the
    first steps plans ~3 000 steps, is cut at the budget after ~1 400 and hardens half-decided weights."""
    install_step_clock(monkeypatch, lambda problem, beta: 1e-3 if beta is None else 3e-3)
    gen = np.random.default_rng(14)
    w = gen.standard_normal((16, 32)) * 0.05
    moments = LayerMoments.for_linear(w)
    moments.add(gen.standard_normal((1000, 32)))
    _, stats = adaround_weights(w, np.abs(w).max(1) / 7, moments, -7, 7, iterations=1_000_000,
                                time_budget_s=3.0, lr_reference_steps=10_000)
    assert not stats.stopped_early and stats.iterations == stats.planned_iterations
    # The whole schedule fits the budget: 0.2 N x 1 ms + 0.8 N x 3 ms = 3 s gives N ~ 1 150.
    assert 1000 <= stats.iterations <= 1500, stats.iterations
    assert stats.soft_fraction == 0.0
    assert stats.loss_adaround < stats.loss_nearest


def test_step_seconds_is_positive_and_grows_with_the_layer():
    from qonnx.rounding.adaround import step_seconds

    small, large = step_seconds((1, 8, 8)), step_seconds((1, 512, 512))
    assert 0.0 < small < large


def test_short_schedules_keep_lr_times_steps_and_still_harden():
    gen = np.random.default_rng(13)
    w = gen.standard_normal((32, 48)) * 0.05
    x = gen.standard_normal((2000, 48)) @ (np.eye(48) + 0.3 * gen.standard_normal((48, 48)))
    moments = LayerMoments.for_linear(w)
    moments.add(x)
    scale = np.abs(w).max(1) / 7
    _, plain = adaround_weights(w, scale, moments, -7, 7, iterations=400)
    _, scaled = adaround_weights(w, scale, moments, -7, 7, iterations=400, lr_reference_steps=10_000)
    _, reference = adaround_weights(w, scale, moments, -7, 7, iterations=10_000)
    # lr 1e-3 for 400 steps barely moves V: many weights are still undecided when hardened.
    assert plain.soft_fraction > 0.2 and scaled.soft_fraction < 0.05
    assert scaled.loss_adaround < plain.loss_adaround
    assert scaled.loss_adaround <= 1.05 * reference.loss_adaround
    # The reference schedule itself is unchanged by the option.
    _, same = adaround_weights(w, scale, moments, -7, 7, iterations=10_000, lr_reference_steps=10_000)
    assert same.loss_adaround == reference.loss_adaround


# --------------------------------------------------------------------------- 5. brute force
def _toy_problems(n_in: int, asymmetric: bool, seeds: range, rho: float, kind: str):
    """Least-squares toys y = w x, O = 1, stacked one per seed as group blocks (groups are independent)."""
    grams, crosses, dds, ws, scales = [], [], [], [], []
    for seed in seeds:
        gen = np.random.default_rng(1000 * n_in + seed)
        if kind == "ar":  # AR(1) correlation rho^|i-j|: well conditioned for rho = 0.5
            idx = np.arange(n_in)
            chol = np.linalg.cholesky(rho ** np.abs(idx[:, None] - idx[None]))
            x = gen.standard_normal((4000, n_in)) @ chol.T
        else:  # random mixing: badly conditioned (cond(G) ~ 1e2..1e3)
            mix = np.eye(n_in) + rho * gen.standard_normal((n_in, n_in))
            x = gen.standard_normal((4000, n_in)) @ mix / np.sqrt(1 + rho**2 * n_in)
        x_hat = x + 0.05 * gen.standard_normal(x.shape) if asymmetric else x
        d = x_hat - x
        w = gen.standard_normal((1, n_in)) * 0.3
        grams.append(x_hat.T @ x_hat / len(x))
        crosses.append(d.T @ x_hat / len(x))
        dds.append(d.T @ d / len(x))
        ws.append(w)
        scales.append(np.abs(w).max() / 7)
    dd = np.stack(dds)
    moments = LayerMoments.from_arrays(np.stack(grams), np.stack(crosses), dd, count=4000)
    return np.stack(ws), np.array(scales), moments, dd


def _brute_force(w: np.ndarray, scale: np.ndarray, moments: LayerMoments, dd: np.ndarray) -> np.ndarray:
    """Optimal L_rec over floor/ceil of every weight (2^I combinations), per block."""
    n_in = w.shape[2]
    combos = np.array(list(itertools.product((0.0, 1.0), repeat=n_in)))
    best = []
    for g in range(w.shape[0]):
        base = np.floor(w[g, 0] / scale[g])
        dw = scale[g] * np.clip(base + combos, -7, 7) - w[g, 0]
        we = w[g, 0] @ moments.cross[g]
        loss = np.einsum("ki,ij,kj->k", dw, moments.gram[g], dw) + 2 * dw @ we + w[g, 0] @ dd[g] @ w[g, 0]
        best.append(loss.min())
    return np.array(best)


def _per_block_loss(codes: np.ndarray, w: np.ndarray, scale: np.ndarray, moments: LayerMoments,
                    dd: np.ndarray) -> np.ndarray:
    """L_rec of each block alone (the layer loss is their sum)."""
    out = []
    for g in range(w.shape[0]):
        sub = LayerMoments.from_arrays(moments.gram[g], moments.cross[g], dd[g])
        out.append(reconstruction_loss(scale[g] * codes[g], w[g], sub))
    return np.array(out)


@pytest.fixture(scope="module")
def toy_results() -> dict[str, dict[str, np.ndarray]]:
    """AdaRound (defaults: 10k iterations, lambda 0.01, beta 20 -> 2) vs nearest vs brute force, I = 10..12."""
    results: dict[str, dict[str, list[np.ndarray]]] = {}
    for kind, rho in (("ar", 0.5), ("mix", 0.5)):
        acc: dict[str, list[np.ndarray]] = {"ada": [], "near": [], "opt": []}
        for n_in, asymmetric in itertools.product((10, 11, 12), (False, True)):
            w, scale, moments, dd = _toy_problems(n_in, asymmetric, range(8), rho, kind)
            codes, stats = adaround_weights(w, scale, moments, -7, 7)
            assert stats.iterations == 10_000
            acc["ada"].append(_per_block_loss(codes, w, scale, moments, dd))
            acc["near"].append(_per_block_loss(nearest_codes(w, scale, -7, 7), w, scale, moments, dd))
            acc["opt"].append(_brute_force(w, scale, moments, dd))
        results[kind] = {k: np.concatenate(v) for k, v in acc.items()}
    return results


def test_bruteforce_is_a_lower_bound(toy_results):
    for res in toy_results.values():
        assert np.all(res["opt"] <= res["ada"] * (1 + 1e-12))
        assert np.all(res["opt"] <= res["near"] * (1 + 1e-12))


def test_adaround_near_optimal_on_well_conditioned_toys(toy_results):
    """AR(0.5)-correlated inputs (cond(G) ~ 8), 48 toys: never worse than nearest, 1% of optimal on average
    and on nearly every toy (measured: 47 of 48, mean +0.1%)."""
    res = toy_results["ar"]
    ratio = res["ada"] / res["opt"]
    assert np.all(res["ada"] <= res["near"] * (1 + 1e-12))
    assert np.mean(res["ada"] < res["near"] * (1 - 1e-9)) > 0.4  # strictly better wherever nearest is not optimal
    assert np.mean(ratio) < 1.01
    assert np.mean(ratio <= 1.01) >= 0.95


def test_adaround_beats_nearest_on_ill_conditioned_toys(toy_results):
    """Random-mixing inputs (cond(G) ~ 1e2..1e3): nearest is far off; AdaRound recovers most of the gap."""
    res = toy_results["mix"]
    excess_ada = res["ada"] / res["opt"] - 1
    excess_near = res["near"] / res["opt"] - 1
    assert np.mean(excess_near) > 0.5
    assert np.mean(excess_ada) < 0.25 * np.mean(excess_near)
    # The local search after hardening starts from nearest too: no toy ends worse than nearest (2 of 48 did
    # with annealing alone).
    assert np.all(res["ada"] <= res["near"] * (1 + 1e-12))


@pytest.mark.xfail(strict=True, reason=(
    "AdaRound, even finished by a local search over single and paired flips, is not an exact solver of the "
    "(closest-vector-like) rounding problem. Measured here: AR(0.5) toys 47/48 within 1% of the brute-force "
    "optimum (worst +5%); random-mixing toys 32/48 (worst +49%), none worse than nearest. Without the search: "
    "43/48 and 22/48, 2 worse than nearest"))
def test_adaround_within_one_percent_of_optimal_on_every_toy(toy_results):
    for res in toy_results.values():
        assert np.all(res["ada"] <= 1.01 * res["opt"])


# --------------------------------------------------------------------------- helpers and errors
def test_nearest_codes_round_half_to_even_and_clip():
    w = np.array([[0.5, 1.5, -0.5, 2.5, 100.0, -100.0]])
    assert nearest_codes(w, 1.0, -8, 7).tolist() == [[0, 2, 0, 2, 7, -8]]
    blocks = np.array([[[0.26, -0.26]], [[0.26, -0.26]]])
    assert nearest_codes(blocks, [0.1, 0.2], -7, 7).tolist() == [[[3, -3]], [[1, -1]]]


def test_layout_helpers_roundtrip():
    w = np.arange(6 * 2 * 3 * 3, dtype=np.float64).reshape(6, 2, 3, 3)
    b = conv_weight_blocks(w, 3)
    assert b.shape == (3, 2, 18) and np.array_equal(b[1, 0], w[2].ravel())
    assert np.array_equal(blocks_to_conv_weight(b, w.shape), w)
    kn = np.arange(12.0).reshape(4, 3)
    assert matmul_weight_blocks(kn).shape == (1, 3, 4)
    assert np.array_equal(blocks_to_matmul_weight(matmul_weight_blocks(kn)), kn)


def test_conv_spec_from_attrs():
    spec = ConvSpec.from_attrs((8, 2, 3, 3), {"group": 2, "auto_pad": b"SAME_UPPER", "strides": [2, 2],
                                              "kernel_shape": [3, 3]})
    assert spec.channels == 4 and spec.block_in == 18 and spec.auto_pad == "SAME_UPPER"
    assert spec.resolve_pads((7, 8)) == ((1, 0), (1, 1))
    assert spec.output_shape((7, 8)) == (4, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: ConvSpec.from_weight((4, 3, 3, 3), kernel_shape=[3, 2]), "kernel_shape"),
    (lambda: ConvSpec.from_weight((4, 3, 3, 3), pads=[1, 1]), "pads"),
    (lambda: ConvSpec.from_weight((4, 3, 3, 3), group=3), "groups"),
    (lambda: ConvSpec.from_weight((4, 3, 3, 3), strides=[0, 1]), ">= 1"),
    (lambda: ConvSpec.from_weight((4, 3), ), "conv weight"),
    (lambda: ConvSpec.from_weight((4, 3, 3, 3), auto_pad="SAME"), "auto_pad"),
    (lambda: im2col(np.zeros((1, 2, 5, 5)), ConvSpec.from_weight((4, 3, 3, 3))), "channels"),
    (lambda: im2col(np.zeros((1, 3, 5)), ConvSpec.from_weight((4, 3, 3, 3))), "2-D conv input"),
    (lambda: im2col(np.zeros((1, 3, 2, 5)), ConvSpec.from_weight((4, 3, 3, 3))), "smaller than"),
])
def test_bad_conv_geometry_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shape_mismatches_raise():
    gen = np.random.default_rng(13)
    w = gen.standard_normal((4, 3, 3, 3))
    conv = LayerMoments.for_conv(w, pads=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="same shape"):
        conv.add(np.zeros((2, 3, 5, 5)), np.zeros((2, 3, 5, 6)))
    with pytest.raises(ValueError, match="channels"):
        conv.add(np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match="no rows"):
        _ = conv.gram
    conv.add(gen.standard_normal((2, 3, 5, 5)), gen.standard_normal((2, 3, 5, 5)))
    wb = conv_weight_blocks(w)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(wb[:, :2], wb, conv)
    with pytest.raises(ValueError, match="do not match the moments"):
        reconstruction_loss(wb[..., :5], wb[..., :5], conv)
    with pytest.raises(ValueError, match="different weight"):
        conv.const_term(wb + 1.0)
    with pytest.raises(ValueError, match="does not match"):
        LayerMoments.for_conv(w, ConvSpec.from_weight((4, 2, 3, 3)))

    lin = LayerMoments.for_linear(np.zeros((5, 7)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 7\]"):
        lin.add(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="gram"):
        LayerMoments.from_arrays(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="both cross"):
        LayerMoments.from_arrays(np.eye(3), cross=np.eye(3))
    with pytest.raises(ValueError, match="cross has shape"):
        LayerMoments.from_arrays(np.eye(3), cross=np.eye(4), dd=np.eye(4))


def test_bad_quantization_arguments_raise():
    w = np.random.default_rng(14).standard_normal((4, 6))
    moments = LayerMoments.from_arrays(np.eye(6))
    with pytest.raises(ValueError, match="one per output channel"):
        adaround_weights(w, np.ones(3), moments, -7, 7, iterations=1)
    with pytest.raises(ValueError, match="does not broadcast"):
        adaround_weights(w, np.ones((2, 4, 1)), moments, -7, 7, iterations=1)
    with pytest.raises(ValueError, match="qmin < qmax"):
        adaround_weights(w, 0.1, moments, 7, -7, iterations=1)
    with pytest.raises(ValueError, match="> 0"):
        adaround_weights(w, -0.1, moments, -7, 7, iterations=1)
    with pytest.raises(ValueError, match="zero point"):
        adaround_weights(w, 0.1, moments, -7, 7, zero_point=0.5, iterations=1)
    with pytest.raises(ValueError, match="do not match the moments"):
        adaround_weights(w[:, :5], 0.1, moments, -7, 7, iterations=1)
    with pytest.raises(ValueError, match="warm_start"):
        adaround_weights(w, 0.1, moments, -7, 7, warm_start=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        adaround_weights(np.full((4, 6), np.nan), 0.1, moments, -7, 7, iterations=1)


def test_constants_are_the_papers():
    assert (ZETA, GAMMA) == (1.1, -0.1)

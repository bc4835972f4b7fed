"""The torch interpreter of the canonical IR: each supported op against ORT's float output."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import build_model, import_proto, randn, rng, run_ort

torch = pytest.importorskip("torch")

from qonnx.errors import PreconditionError  # noqa: E402
from qonnx.qat.interpreter import GraphModule  # noqa: E402

OPSET18 = '<ir_version: 8, opset_import: ["" : 18]>'


def _compare(proto, feed, atol=1e-5):
    module = GraphModule(import_proto(proto)).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(feed[n]) for n in module.input_names])
    want = run_ort(proto, feed)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b, atol=atol, rtol=1e-5)


def conv_ops_model():
    g = rng(0)
    inits = {"w1": randn(g, 8, 3, 3, 3, scale=0.3), "b1": randn(g, 8), "wd": randn(g, 8, 1, 3, 3),
             "w2": randn(g, 6, 8, 1, 1), "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
             "bn_g": randn(g, 6), "bn_b": randn(g, 6), "bn_m": randn(g, 6),
             "bn_v": np.abs(randn(g, 6)) + 0.5, "wg": randn(g, 5, 6), "bg": randn(g, 5),
             "k": randn(g, 1, 6, 1, 1), "shape": np.array([0, -1], np.int64)}
    return build_model("""
    agraph (float[N,3,9,9] x) => (float[N,5] y, float[N,6,1,2] z) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 0, 2, 1], strides = [2, 1], dilations = [1, 1]> (x, w1, b1)
        r1 = Clip (c1, lo, hi)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8, dilations = [2, 2]> (r1, wd)
        l2 = LeakyRelu <alpha = 0.1> (c2)
        c3 = Conv <kernel_shape = [1, 1]> (l2, w2)
        n3 = BatchNormalization <epsilon = 0.001> (c3, bn_g, bn_b, bn_m, bn_v)
        h3 = HardSwish (n3)
        s3 = HardSigmoid (h3)
        m3 = Mul (h3, s3)
        a3 = Add (m3, k)
        d3 = Div (a3, k)
        e3 = Sub (d3, k)
        p3 = MaxPool <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 1, 1]> (e3)
        z = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (p3)
        g3 = GlobalAveragePool (e3)
        f3 = Reshape (g3, shape)
        q3 = Sigmoid (f3)
        y0 = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (q3, wg, bg)
        y = Softmax <axis = 1> (y0)
    }""", inits)


def transformer_ops_model():
    g = rng(1)
    inits = {"wq": randn(g, 8, 8, scale=0.3), "gamma": randn(g, 8), "two": np.array(2.0, np.float32),
             "eps": np.array(1e-5, np.float32), "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32),
             "rt2": np.array(1.4142135, np.float32), "axes": np.array([-1], np.int64),
             "ax0": np.array([1], np.int64)}
    return build_model(OPSET18 + """
    agraph (float[N,4,8] x) => (float[N,8,4] y, float[N,4,16] z, float[N,32] f) {
        mu = ReduceMean <keepdims = 1> (x, axes)
        xc = Sub (x, mu)
        sq = Pow (xc, two)
        var = ReduceMean <keepdims = 1> (sq, axes)
        ve = Add (var, eps)
        sd = Sqrt (ve)
        xn = Div (xc, sd)
        ln = Mul (xn, gamma)
        h = MatMul (ln, wq)
        hs = Div (h, rt2)
        er = Erf (hs)
        e1 = Add (er, one)
        gh = Mul (h, e1)
        ge = Mul (gh, half)
        t = Transpose <perm = [0, 2, 1]> (ge)
        u = Unsqueeze (t, ax0)
        y = Squeeze (u, ax0)
        f = Flatten <axis = 1> (ge)
        z = Concat <axis = 2> (ge, x)
    }""", inits)


@pytest.mark.parametrize("builder,shape", [(conv_ops_model, (3, 3, 9, 9)), (transformer_ops_model, (2, 4, 8))])
def test_ops_match_onnxruntime(builder, shape):
    proto = builder()
    _compare(proto, {"x": randn(rng(5), *shape)})


def test_parameters_are_keyed_by_initializer_name():
    module = GraphModule(import_proto(conv_ops_model()))
    params = module.named_graph_parameters()
    assert {"w1", "b1", "wd", "w2", "wg", "bg", "bn_g", "bn_b"} == set(params)
    assert tuple(params["w1"].shape) == (8, 3, 3, 3)
    assert module.const("shape") is not None and "shape" not in params


def test_unsupported_op_is_named():
    proto = build_model("""
    agraph (float[N,4] x) => (float[N,4] y) {
        y = Softplus (x)
    }""")
    with pytest.raises(PreconditionError, match="Softplus"):
        GraphModule(import_proto(proto))


@pytest.mark.realmodel
def test_fmnist_model_matches_onnxruntime():
    from pathlib import Path

    import onnx

    path = Path(__file__).resolve().parents[2] / "models" / ".cache" / "fmnist_cnn"
    if not (path / "model.onnx").exists():
        pytest.skip("fmnist model not prepared")
    proto = onnx.load(str(path / "model.onnx"))
    x = np.load(path / "calib.npz")["input"][:16]
    _compare(proto, {"input": x}, atol=1e-4)

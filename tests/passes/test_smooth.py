"""smooth (SmoothQuant-style channel migration): structure, numerics, negative cases, idempotence."""

from __future__ import annotations

import numpy as np
import pytest

import qonnx
from qonnx.data.calibration import open_calibration
from qonnx.errors import PreconditionError
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import make_session
from tests.helpers import build_model, import_proto, randn, rng


def gelu_mlp(seed: int = 41):
    """Input channel 3 carries 60x larger values and its weight row is 60x smaller (a typical outlier channel)."""
    g = rng(seed)
    w1 = randn(g, 16, 32, scale=0.3)
    w1[3] /= 60.0
    return build_model("""
    agraph (float[N,16] x) => (float[N,8] y) {
        h = MatMul (x, w1)
        a = Relu (h)
        y = MatMul (a, w2)
    }""", {"w1": w1, "w2": randn(g, 32, 8, scale=0.3)})


def outlier_channel_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    x = randn(rng(seed), n, 16)
    x[:, 3] *= 60.0  # one outlier channel: after w1 it spreads, but x itself quantizes coarsely
    return {"x": x}


def smooth(model, data, spec: str = "smooth{min_sqnr=40}"):
    ir = import_proto(model)
    ctx = PassContext(calibration=open_calibration(data, ir), seed=0)
    (p,) = parse_pipeline(spec).passes
    return ir, p.run(ir, ctx), ctx, p


def test_smooth_inserts_a_mul_and_keeps_the_function():
    model, data = gelu_mlp(), outlier_channel_data()
    ir, result, _, _ = smooth(model, data)
    assert result.modified is True and result.stats["smoothed"] >= 1
    assert [n.op for n in ir.nodes].count("Mul") == result.stats["smoothed"]
    feed = outlier_channel_data(8, 5)
    before = make_session(model.SerializeToString()).run(None, feed)[0]
    after = make_session(ir.to_bytes()).run(None, feed)[0]
    assert np.max(np.abs(before - after)) <= 1e-5 * np.max(np.abs(before))


def test_smooth_improves_quantized_fidelity_on_an_outlier_channel():
    model, data, held_out = gelu_mlp(), outlier_channel_data(), outlier_channel_data(64, 7)
    ref = make_session(model.SerializeToString()).run(None, held_out)[0]

    def sqnr(spec: str) -> float:
        out = make_session(qonnx.optimize(model, data, pipeline=spec, holdout=0).to_bytes()).run(None, held_out)[0]
        return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))

    plain = sqnr("plan,calibrate{method=minmax}")
    smoothed = sqnr("smooth{min_sqnr=40},plan,calibrate{method=minmax}")
    assert smoothed > plain + 3, (plain, smoothed)


def test_smooth_leaves_well_conditioned_inputs_alone_and_is_idempotent():
    model = gelu_mlp()
    data = {"x": randn(rng(3), 64, 16)}
    _, result, _, _ = smooth(model, data, "smooth")  # default threshold: Gaussian inputs quantize fine
    assert result.modified is False
    ir, first, ctx, p = smooth(model, outlier_channel_data())
    assert first.modified is True
    assert p.run(ir, ctx).modified is False  # smoothed inputs are never smoothed twice


def test_smooth_after_plan_is_refused():
    with pytest.raises(PreconditionError, match="smooth"):
        parse_pipeline("plan,smooth").validate(frozenset({"calibration-data"}))

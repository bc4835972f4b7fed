"""bias-correction: structure, numerics, negative cases, idempotence; the analytic (data-free) mode."""

from __future__ import annotations

import numpy as np
import pytest

import qonnx
from qonnx.errors import PreconditionError
from qonnx.export.qdq import export_qdq
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import make_session
from tests.helpers import build_model, conv_bn_relu_conv, import_proto, make_samples, randn, rng
from tests.helpers import run_passes as run


def biased_conv(seed: int = 21):
    """A Conv whose input has a large mean (post-ReLU-like): rounding errors shift the output mean."""
    g = rng(seed)
    w = randn(g, 6, 4, 3, 3, scale=0.05)
    w[0, 0, 0, 0] = 4.0  # one large weight: per-tensor rounding of all the others is coarse and biased
    inits = {"w": w, "b": randn(g, 6, scale=0.1)}
    return build_model("""
    agraph (float[N,4,8,8] x) => (float[N,6,8,8] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    }""", inits)


def layer_output_mean_error(float_model, ir, data) -> float:
    """|mean(quantized output) - mean(original float output)|, averaged over channels."""
    ref = make_session(float_model.SerializeToString()).run(None, data)[0]
    quant = make_session(export_qdq(ir).SerializeToString()).run(None, data)[0]
    return float(np.mean(np.abs((quant - ref).mean(axis=(0, 2, 3)))))


def test_bias_correction_structure_and_numerics():
    model = biased_conv()
    g = rng(3)
    data = {"x": (np.abs(randn(g, 64, 4, 8, 8)) * 3 + 2).astype(np.float32)}
    # Per-tensor weights make the rounding error large enough to see.
    before_ir, _, _ = run(import_proto(model), "plan{per_channel=false},calibrate{method=minmax}", data)
    after_ir, results, _ = run(import_proto(model), "plan{per_channel=false},calibrate{method=minmax},bias-correction",
                               data)
    corrected = results[-1]
    assert corrected.modified is True and corrected.stats["layers_corrected"] == 1
    assert len(after_ir.nodes) == len(before_ir.nodes)  # only the bias values change
    held_out = {"x": (np.abs(randn(rng(9), 64, 4, 8, 8)) * 3 + 2).astype(np.float32)}
    before = layer_output_mean_error(model, before_ir, held_out)
    after = layer_output_mean_error(model, after_ir, held_out)
    assert after < 0.25 * before, (before, after)


def test_bias_correction_brings_the_quantized_output_mean_back_to_float():
    model = conv_bn_relu_conv()
    data, held_out = make_samples(model, 48, seed=4), make_samples(model, 24, seed=5)["x"]
    float_session = make_session(model.SerializeToString())  # static batch 1: one sample per run
    reference = np.concatenate([float_session.run(None, {"x": x[None]})[0] for x in held_out])

    def mean_error(spec: str) -> float:
        result = qonnx.optimize(model, data, pipeline=spec, holdout=0)
        session = make_session(result.to_bytes())
        out = np.concatenate([session.run(None, {"x": x[None]})[0] for x in held_out])
        return float(np.abs((out - reference).mean(axis=(0, 2, 3))).mean())

    base = "canonicalize,fold-bn,plan{per_channel=false},calibrate{method=minmax}"
    assert mean_error(base + ",bias-correction") < mean_error(base)


def test_bias_correction_leaves_layers_without_bias_or_weights_alone():
    g = rng(2)
    model = build_model("""
    agraph (float[N,8] x) => (float[N,4] y) {
        y = MatMul (x, w)
    }""", {"w": randn(g, 8, 4)})
    _, results, _ = run(import_proto(model), "plan,calibrate,bias-correction", make_samples(model, 16))
    assert results[-1].modified is False


def test_bias_correction_is_idempotent():
    model = biased_conv()
    data = {"x": (np.abs(randn(rng(3), 32, 4, 8, 8)) + 1).astype(np.float32)}
    ir, results, ctx = run(import_proto(model), "plan{per_channel=false},calibrate,bias-correction", data)
    assert results[-1].modified is True
    first = ir.constant_value(ir.tensors()["b"]).copy()
    (again,) = parse_pipeline("bias-correction").passes
    assert again.run(ir, ctx).modified is False  # the stored correction is replaced, never stacked
    assert np.array_equal(ir.constant_value(ir.tensors()["b"]), first)


def test_bias_correction_after_rounding_is_warned_about_not_refused(caplog):
    p = parse_pipeline("bias-correction")
    with caplog.at_level("WARNING"):
        warnings = p.validate(frozenset({"calibration-data", "calibrated", "rounded"}))
    assert len(warnings) == 1 and "bias-correction" in warnings[0] and "AdaRound" in warnings[0]
    assert "redundant" in caplog.text
    assert parse_pipeline("bias-correction").validate(frozenset({"calibration-data", "calibrated"})) == []




# --------------------------------------------------------------------------- analytic (data-free) mode
def test_analytic_bias_correction_moves_the_bias_by_the_expected_shift_and_is_idempotent():
    model = import_proto(conv_bn_relu_conv())
    ctx = PassContext()
    for p in parse_pipeline("fold-bn,plan{per_channel=false},estimate-ranges"):
        p.run(model, ctx)
    bias_name = model.quant.layers[next(n for n in model.quant.layers if model.quant.layers[n].input == "r1")].bias
    before = model.constant_value(model.tensors()[bias_name]).copy()
    bc = parse_pipeline("bias-correction{mode=analytic}").passes[0]
    first = bc.run(model, ctx)
    assert first.modified and first.stats["mode"] == "analytic"
    shift = model.quant.get(bias_name).correction
    assert np.allclose(model.constant_value(model.tensors()[bias_name]), before - shift, atol=1e-6)
    assert bc.run(model, ctx).modified is False


def test_analytic_bias_correction_needs_no_data_but_empirical_does():
    parse_pipeline("plan,estimate-ranges,bias-correction{mode=analytic}").validate(frozenset())
    with pytest.raises(PreconditionError, match="calibration-data"):
        parse_pipeline("plan,estimate-ranges,bias-correction").validate(frozenset())

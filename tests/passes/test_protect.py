"""protect: structure, numerics, negative cases, idempotence."""

from __future__ import annotations

import numpy as np
import pytest

import qonnx
from qonnx.errors import PreconditionError
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import make_session
from tests.helpers import build_model, conv_bn_relu_conv, import_proto, make_samples, randn, rng
from tests.helpers import run_passes as run


def outlier_mlp(seed: int = 31):
    """Two MatMuls fed with data that has rare huge values (a heavy tail, like GELU outputs)."""
    g = rng(seed)
    return build_model("""
    agraph (float[N,16] x) => (float[N,8] y) {
        h = MatMul (x, w1)
        y = MatMul (h, w2)
    }""", {"w1": randn(g, 16, 16, scale=0.3), "w2": randn(g, 16, 8, scale=0.3)})


def outlier_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    g = rng(seed)
    x = randn(g, n, 16)
    x[g.random(x.shape) < 0.002] *= 40.0  # rare large values: min/max ranges leave the bulk few codes
    return {"x": x}


def test_protect_keeps_low_sqnr_layers_float_and_recalibrates():
    model = outlier_mlp()
    ir, results, _ = run(import_proto(model), "plan,calibrate{method=minmax},protect{min_sqnr=32,fallback=float}",
                         outlier_data())
    protect = results[-1]
    assert protect.modified is True and protect.stats["protected"] >= 1
    kept = [r for r in ir.quant.kept_float.values() if "protect" in r]
    assert kept and "dB" in kept[0]
    assert len(ir.quant.layers) == 2 - protect.stats["protected"]
    assert not ir.quant.dynamic
    assert all(e.calibrated for e in ir.quant.tensors.values())


def _input_sqnrs(model, data) -> dict[str, float]:
    """Each MatMul's expected input SQNR, as protect reports it in the reason of a layer it takes out."""
    ir, _, _ = run(import_proto(model), "plan,calibrate{method=minmax},protect{min_sqnr=99,fallback=float}", data)
    return {node: float(reason.split("SQNR ")[1].split(" dB")[0]) for node, reason in ir.quant.kept_float.items()}


def test_protect_quantizes_per_run_the_matmuls_between_the_two_thresholds():
    model, data = outlier_mlp(), outlier_data()
    sqnrs = _input_sqnrs(model, data)
    low, high = min(sqnrs.values()), max(sqnrs.values())
    assert high - low > 1, sqnrs  # the fixture's two inputs must fall on either side of a threshold
    between = f"protect{{min_sqnr={low - 1:.2f},dynamic_sqnr={(low + high) / 2:.2f},fallback=float}}"
    ir, results, _ = run(import_proto(model), f"plan,calibrate{{method=minmax}},{between}", data)
    (per_run,) = [n for n, s in sqnrs.items() if s < (low + high) / 2]
    assert set(ir.quant.dynamic) == {per_run} and results[-1].stats == {"protected": 0, "per_run": 1, "dynamic": 1}
    assert "per run" in ir.quant.kept_float[per_run] and len(ir.quant.layers) == 1

    off = between.replace(f"dynamic_sqnr={(low + high) / 2:.2f}", "dynamic_sqnr=0")
    ir, results, _ = run(import_proto(model), f"plan,calibrate{{method=minmax}},{off}", data)
    assert not ir.quant.dynamic and len(ir.quant.layers) == 2 and results[-1].modified is False


def test_protect_keeps_static_the_layers_that_have_no_dynamic_form():
    """A Conv whose input quantizes between the thresholds keeps its calibrated range (no DynamicQuantizeConv)."""
    model = conv_bn_relu_conv()
    ir, results, _ = run(import_proto(model), "canonicalize,fold-bn,plan,calibrate,protect{min_sqnr=0,dynamic_sqnr=99}",
                         make_samples(model, 32))
    assert results[-1].modified is False and not ir.quant.dynamic and len(ir.quant.layers) == 2


def test_protect_improves_fidelity_on_outlier_inputs():
    model = outlier_mlp()
    data, held_out = outlier_data(64, 0), outlier_data(64, 1)
    plain = qonnx.optimize(model, data, pipeline="plan,calibrate{method=minmax}", holdout=0)
    guarded = qonnx.optimize(model, data, pipeline="plan,calibrate{method=minmax},protect{min_sqnr=32}", holdout=0)
    ref = make_session(model.SerializeToString()).run(None, held_out)[0]

    def sqnr(result):
        out = make_session(result.to_bytes()).run(None, held_out)[0]
        return 10 * np.log10(np.sum(ref**2) / max(float(np.sum((ref - out) ** 2)), 1e-30))

    assert sqnr(guarded) > sqnr(plain) + 3


def test_protect_leaves_well_quantized_layers_alone_and_is_idempotent():
    model = conv_bn_relu_conv()
    ir, results, ctx = run(import_proto(model), "canonicalize,fold-bn,plan,calibrate,protect", make_samples(model, 32))
    assert results[-1].modified is False and results[-1].stats["protected"] == 0
    (again,) = parse_pipeline("protect").passes
    assert again.run(ir, ctx).modified is False


def test_plan_exclude_with_an_unknown_node_name_is_an_error():
    model = outlier_mlp()
    with pytest.raises(PreconditionError, match="no_such_node"):
        run(import_proto(model), "plan{exclude=[no_such_node]}", outlier_data())


def test_protect_dynamic_fallback_runs_as_dynamic_quantize_matmul():
    from qonnx.runtime.ort import optimized_graph

    model = outlier_mlp()
    data, held_out = outlier_data(64, 0), outlier_data(64, 1)
    spec = "plan,calibrate{method=minmax},protect{min_sqnr=32,fallback=dynamic}"
    result = qonnx.optimize(model, data, pipeline=spec, holdout=0)
    assert result.ir.quant.dynamic, result.ir.quant.kept_float
    ops = [n.op_type for n in optimized_graph(result.model).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == len(result.ir.quant.dynamic)
    assert all("dynamic" in result.ir.quant.kept_float[n] for n in result.ir.quant.dynamic)
    ref = make_session(model.SerializeToString()).run(None, held_out)[0]
    out = make_session(result.to_bytes()).run(None, held_out)[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)) > 25


def test_per_run_matmuls_survive_a_later_replan():
    """keep-fast re-plans with more layers excluded: protect's per-run MatMuls must stay per run."""
    from qonnx.quantize.planning import replan_excluding

    model, data = outlier_mlp(), outlier_data()
    sqnrs = _input_sqnrs(model, data)
    split = (min(sqnrs.values()) + max(sqnrs.values())) / 2
    ir, _, ctx = run(import_proto(model), f"plan,calibrate{{method=minmax}},protect{{min_sqnr={split:.2f}}}", data)
    per_run = dict(ir.quant.dynamic)
    assert len(per_run) == 1 and len(ir.quant.layers) == 1
    (other,) = [name for name in ir.quant.layers]
    replan_excluding(ir, {other: "measured slower (test)"})
    assert set(ir.quant.dynamic) == set(per_run) and not ir.quant.layers


@pytest.mark.parametrize("per_channel", [True, False])
def test_per_run_weights_follow_the_plans_per_channel_choice(per_channel):
    model, data = outlier_mlp(), outlier_data()
    spec = (f"plan{{per_channel={str(per_channel).lower()}}},calibrate{{method=minmax}},"
            "protect{min_sqnr=32,fallback=dynamic}")
    ir, _, _ = run(import_proto(model), spec, data)
    assert ir.quant.dynamic
    for node, entry in ir.quant.dynamic.items():
        columns = 16 if node == "MatMul_0" else 8
        assert entry.scheme.axis == (1 if per_channel else None)
        assert np.size(entry.scale) == (columns if per_channel else 1)
    result = qonnx.optimize(model, data, pipeline=spec, holdout=0)
    out = make_session(result.to_bytes()).run(None, data)[0]
    assert np.isfinite(out).all()

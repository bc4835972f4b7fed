"""Sensitivity (measured and Hutchinson), per-unit sessions, costs, the size sweep and `qonnx sensitivity`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qonnx.analyses.costs import PRECISIONS, compute_costs, find_units, layer_macs, weight_bytes
from qonnx.analyses.sensitivity import (
    SensitivityReport,
    SensitivitySettings,
    analyze_sensitivity,
    loss_target,
    quantized_weight,
)
from qonnx.data.calibration import open_calibration
from qonnx.errors import PreconditionError
from qonnx.infra.context import PassContext
from qonnx.infra.manager import PassManager
from qonnx.numerics.hessian import kl_divergence
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import make_session
from qonnx.runtime.probe import UnitProbe
from tests.helpers import (
    build_model,
    conv_pool_gemm,
    import_proto,
    make_samples,
    randn,
    residual_block,
    rng,
    save_model,
    save_npz,
)


def sensitive_classifier(seed: int = 20) -> onnx.ModelProto:
    """x[N,16] -> Mul (feature 0 scaled by 1e-3) -> MatMul w1 -> Relu -> MatMul w2 -> logits z -> Softmax.

    Row 0 of w1 reads the almost silent feature 0 and holds weights 40x the others: they barely
    matter to the output but set every channel's 4-bit step (max/7), on which the informative weights
    round to zero. w1 is by far the more sensitive layer.
    """
    g = rng(seed)
    w1 = randn(g, 16, 32, scale=0.3)
    w1[0] = 12.0
    w2 = randn(g, 32, 10, scale=0.3)
    gain = np.ones(16, np.float32)
    gain[0] = 1e-3
    return build_model("""
    agraph (float[N,16] x) => (float[N,10] y) {
        s = Mul (x, gain)
        h = MatMul (s, w1)
        r = Relu (h)
        z = MatMul (r, w2)
        y = Softmax <axis = -1> (z)
    }""", {"gain": gain, "w1": w1, "w2": w2})


def planned(proto: onnx.ModelProto, n: int = 32, seed: int = 0, plan: str = "plan"):
    model = import_proto(proto)
    calib = open_calibration(make_samples(proto, n, seed), model)
    ctx = PassContext(calibration=calib, seed=seed)
    model, _ = PassManager(parse_pipeline(f"canonicalize,{plan}")).run(model, ctx)
    return model, ctx


# ------------------------------------------------------------------------------------------ loss target
def test_loss_target_looks_through_softmax_and_picks_kl_for_logits():
    model, _ = planned(sensitive_classifier())
    assert loss_target(model) == ("z", "kl")
    model, _ = planned(residual_block())  # [1,4,1,1] pooled features: not class scores
    assert loss_target(model)[1] == "mse"
    model, _ = planned(conv_pool_gemm())  # [1,10] logits
    assert loss_target(model) == ("y", "kl")
    assert loss_target(model, "mse") == ("y", "mse")


# ------------------------------------------------------------------------------------------ probes
@pytest.mark.parametrize("builder", [residual_block, conv_pool_gemm, sensitive_classifier])
def test_unit_probe_reproduces_the_model_and_applies_the_weight(builder):
    """The downstream session with the float weight gives the full model's target; a changed weight
    gives what the full model gives with that weight as its initializer."""
    proto = builder()
    model, ctx = planned(proto)
    model.toposort()
    full = model.to_onnx()
    target, _ = loss_target(model)
    feeds = list(ctx.calibration.head(8).batches(4))
    reference = make_session(onnx_with_output(full, target))
    expected = np.concatenate([reference.run([target], f)[0] for f in feeds])
    for unit in find_units(model):
        probe = UnitProbe(full, unit.weight, target, feeds)
        assert probe.affects_output
        w = model.constant_value(model.tensors()[unit.weight])
        np.testing.assert_allclose(probe.run(w), expected, rtol=1e-5, atol=1e-6)
        changed = (w * 0.5).astype(np.float32)
        edited = onnx_with_output(full, target)
        for init in edited.graph.initializer:
            if init.name == unit.weight:
                init.CopyFrom(onnx.numpy_helper.from_array(changed, unit.weight))
        want = np.concatenate([make_session(edited).run([target], f)[0] for f in feeds])
        np.testing.assert_allclose(probe.run(changed), want, rtol=1e-5, atol=1e-6)


def onnx_with_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from qonnx.runtime.ort import with_outputs

    return with_outputs(proto, [name])


# ------------------------------------------------------------------------------------------ estimators
def test_measured_sensitivity_is_the_kl_of_the_single_layer_quantized_model():
    model, ctx = planned(sensitive_classifier())
    settings = SensitivitySettings("measured", samples=16, weight_method="minmax")
    report = analyze_sensitivity(model, ctx, settings)
    feeds = list(ctx.calibration.head(16).batches(8))
    full = model.to_onnx()
    ref = np.concatenate([make_session(onnx_with_output(full, "z")).run(["z"], f)[0] for f in feeds])
    for unit in find_units(model):
        w = model.constant_value(model.tensors()[unit.weight])
        for precision in ("int4", "int8"):
            edited = onnx_with_output(full, "z")
            q = quantized_weight(w, unit, precision, "minmax")
            for init in edited.graph.initializer:
                if init.name == unit.weight:
                    init.CopyFrom(onnx.numpy_helper.from_array(q, unit.weight))
            out = np.concatenate([make_session(edited).run(["z"], f)[0] for f in feeds])
            omega = {layer.weight: layer.omega for layer in report.layers}[unit.weight][precision]
            assert omega == pytest.approx(kl_divergence(ref, out), rel=1e-3, abs=1e-9)
    by_weight = {layer.weight: layer.omega for layer in report.layers}
    assert by_weight["w1"]["int4"] > 10 * by_weight["w2"]["int4"]  # the outlier layer
    assert all(o["int8"] < o["int4"] for o in by_weight.values())
    assert all(o["float"] == 0.0 for o in by_weight.values())


def test_hessian_sensitivity_orders_layers_like_measured_and_reports_its_statistics():
    model, ctx = planned(sensitive_classifier())
    hess = analyze_sensitivity(model, ctx, SensitivitySettings("hessian", samples=16, probes=16))
    meas = analyze_sensitivity(model, ctx, SensitivitySettings("measured", samples=16))
    h = {layer.weight: layer for layer in hess.layers}
    m = {layer.weight: layer for layer in meas.layers}
    assert h["w1"].omega["int4"] > 10 * h["w2"].omega["int4"]
    for layer in hess.layers:
        assert layer.trace_per_param > 0 and layer.trace_stderr < 0.5 * layer.trace_per_param
        assert abs(layer.step_ratio - 1.0) < 0.25  # eps = half a 4-bit step is in the quadratic regime
        assert layer.evaluations == 1 + 2 * 16 + 2 * 2
        # int8 errors are small: the second-order estimate and the measured KL agree within a factor 2
        ratio = layer.omega["int8"] / m[layer.weight].omega["int8"]
        assert 0.5 < ratio < 2.0, (layer.weight, ratio)


def test_sensitivity_is_deterministic_cached_in_the_context_and_reused_from_json(tmp_path):
    model, ctx = planned(sensitive_classifier())
    settings = SensitivitySettings("hessian", samples=8, probes=4)
    path = tmp_path / "sens.json"
    first = analyze_sensitivity(model, ctx, settings, cache_file=path)
    assert first.source == "computed" and path.exists()
    assert analyze_sensitivity(model, ctx, settings) is first  # context cache
    model2, ctx2 = planned(sensitive_classifier())
    again = analyze_sensitivity(model2, ctx2, settings, cache_file=path)
    assert again.source == str(path)
    assert [layer.omega for layer in again.layers] == [layer.omega for layer in first.layers]
    recomputed = analyze_sensitivity(model2, PassContext(calibration=ctx2.calibration, seed=0), settings)
    assert [layer.omega for layer in recomputed.layers] == [layer.omega for layer in first.layers]
    # another seed draws other probes: the file does not match and is rewritten
    other = analyze_sensitivity(model2, PassContext(calibration=ctx2.calibration, seed=7), settings,
                                cache_file=path)
    assert other.source == "computed"
    assert json.loads(path.read_text())["settings"]["seed"] == 7
    roundtrip = SensitivityReport.from_json(json.loads(path.read_text()), "x")
    assert roundtrip.layers == other.layers


def test_sensitivity_settings_reject_unknown_values():
    with pytest.raises(PreconditionError, match="unknown sensitivity objective 'fisher'"):
        SensitivitySettings("fisher")
    with pytest.raises(PreconditionError, match="unknown sensitivity loss"):
        SensitivitySettings(loss="l1")
    model, _ = planned(sensitive_classifier())
    with pytest.raises(PreconditionError, match="needs calibration data"):
        analyze_sensitivity(model, PassContext(), SensitivitySettings())


# ------------------------------------------------------------------------------------------ costs
def test_layer_macs_and_weight_bytes():
    assert layer_macs("Conv", (8, 4, 3, 3), (1, 8, 5, 5)) == 8 * 25 * 36
    assert layer_macs("Conv", (8, 1, 3, 3), (1, 8, 5, 5)) == 8 * 25 * 9  # depthwise
    assert layer_macs("Gemm", (10, 64), (1, 10), trans_b=True) == 640
    assert layer_macs("MatMul", (16, 32), (1, 5, 32)) == 5 * 32 * 16
    model, ctx = planned(residual_block())
    costs = compute_costs(model, ctx)
    unit = costs.units[1]  # w1: [4, 4, 3, 3], per-channel
    assert weight_bytes(unit, "int8") == 144 + 4 * 4 + 4
    assert weight_bytes(unit, "int4") == 72 + 4 * 4 + 2
    assert weight_bytes(unit, "float") == 4 * 144
    assert costs.macs.tolist() == [64 * 4 * 27, 64 * 4 * 36, 64 * 4 * 36]
    k4, k8 = PRECISIONS.index("int4"), PRECISIONS.index("int8")
    np.testing.assert_array_equal(costs.bops[:, k8], costs.macs * 64)
    np.testing.assert_array_equal(costs.bops[:, k4], costs.macs * 32)


def test_latency_microbenchmark_runs_each_layer_as_the_exporter_writes_it(ctx):
    from qonnx.analyses.costs import layer_shapes
    from qonnx.export.micro import measure_latency_costs, micro_model
    from qonnx.runtime.fusion import fusion_report

    model, mctx = planned(conv_pool_gemm())
    costs = compute_costs(model, mctx)
    shapes = layer_shapes(model, mctx)
    nodes = {n.name: n for n in model.nodes}
    conv = costs.units[0]
    layer, in_shape = nodes[conv.nodes[0]], shapes[conv.nodes[0]][0]
    int8 = onnx.load_from_string(micro_model(model, layer, conv, in_shape, "int8"))
    assert fusion_report(int8).integer_ops["QLinearConv"] == 1
    int4 = onnx.load_from_string(micro_model(model, layer, conv, in_shape, "int4"))
    assert {i.data_type for i in int4.graph.initializer} >= {onnx.TensorProto.INT4, onnx.TensorProto.UINT8}
    assert int4.opset_import[0].version == 21
    flt = onnx.load_from_string(micro_model(model, layer, conv, in_shape, "float"))
    conv_node = next(n for n in flt.graph.node if n.op_type == "Conv")
    assert conv_node.input[1] in {i.name for i in flt.graph.initializer}  # float weight, no DequantizeLinear
    latency = measure_latency_costs(model, mctx, costs, ("int4", "int8"))
    assert np.all(latency[:, :2] > 0) and np.all(np.isfinite(latency[:, :2]))
    assert np.isnan(latency[:, 2]).all()  # float was not asked for


# ------------------------------------------------------------------------------------------ sweep, CLI
def _files(tmp_path, proto, n=40):
    model = save_model(proto, tmp_path / "m.onnx")
    calib = save_npz(tmp_path / "calib.npz", make_samples(proto, n, 0))
    return model, calib


def test_pareto_sweep_trades_size_for_sensitivity_and_plots(tmp_path):
    from PIL import Image

    from qonnx.app.pareto import pareto_sweep, plot_pareto

    model, calib = _files(tmp_path, residual_block())
    sweep = pareto_sweep(model, calib, fractions=(0.0, 0.5, 1.0), holdout=8, cache_file=tmp_path / "s.json")
    points = sweep["points"]
    assert [p["fraction"] for p in points] == [0.0, 0.5, 1.0]
    sizes = [p["size_total"] for p in points]
    assert sizes == sorted(sizes) and all(p["size_total"] <= p["size_budget"] for p in points)
    omegas = [p["predicted_omega"] for p in points]
    assert omegas == sorted(omegas, reverse=True) and omegas[0] > omegas[-1]
    assert set(points[0]["choice"].values()) == {"int4"} and set(points[-1]["choice"].values()) == {"int8"}
    assert points[-1]["fidelity"]["sqnr_db"] > points[0]["fidelity"]["sqnr_db"]
    assert len(sweep["layers"]) == 3 and {"omega_int4", "omega_int8", "bytes_int4"} <= set(sweep["layers"][0])
    plot_pareto(sweep, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG" and image.size == (1000, 420)
        assert len(image.getcolors(maxcolors=1 << 20)) > 3  # axes, two colored series


def test_cli_sensitivity_writes_table_sweep_and_plot(tmp_path):
    from click.testing import CliRunner

    from qonnx.app.cli import main

    model, calib = _files(tmp_path, sensitive_classifier())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sensitivity", str(model), "--calib-data", str(calib), "--out", str(out),
                                       "--points", "3", "--holdout", "8"])
    assert result.exit_code == 0, result.output
    assert {"sensitivity.json", "layers.csv", "pareto.json", "pareto.png"} <= {p.name for p in out.iterdir()}
    rows = (out / "layers.csv").read_text().splitlines()
    assert rows[0].startswith("weight,nodes") and len(rows) == 3
    assert "w1" in result.output and "predicted" in result.output
    sweep = json.loads((out / "pareto.json").read_text())
    assert len(sweep["points"]) == 3
    bad = CliRunner().invoke(main, ["sensitivity", str(model), "--calib-data", str(calib), "--out", str(out),
                                    "--objective", "fisher"])
    assert bad.exit_code != 0 and "fisher" in bad.output


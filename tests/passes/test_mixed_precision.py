"""The mixed-precision pass: structure, budgets in exact bytes, baselines, pins/ties, errors, idempotence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qonnx.analyses.costs import PRECISIONS, compute_costs, find_units
from qonnx.core.qtable import Role
from qonnx.data.calibration import open_calibration
from qonnx.errors import PipelineParseError, PreconditionError
from qonnx.export.qdq import export_qdq
from qonnx.infra.context import PassContext
from qonnx.infra.instruments import StructuralVerifier
from qonnx.infra.manager import PassManager
from qonnx.numerics.ilp import InfeasibleBudget
from qonnx.passes import parse_pipeline
from qonnx.passes.mixed_precision import (
    FLOAT_REASON,
    apply_choice,
    baseline_choice,
    parse_budget,
)
from tests.analyses.test_sensitivity import sensitive_classifier
from tests.helpers import build_model, conv_pool_gemm, import_proto, make_samples, randn, residual_block, rng


def run(proto: onnx.ModelProto, text: str, n: int = 32, seed: int = 0, model=None, ctx=None):
    model = model if model is not None else import_proto(proto)
    if ctx is None:
        ctx = PassContext(calibration=open_calibration(make_samples(proto, n, seed), model), seed=seed)
    model, records = PassManager(parse_pipeline(text), [StructuralVerifier()]).run(model, ctx)
    return model, records, ctx


def bits(model) -> dict[str, int | str]:
    return {n: e.scheme.bits for n, e in model.quant.of_role(Role.WEIGHT).items()}


def four_layer_mlp(seed: int = 30) -> onnx.ModelProto:
    """Four MatMul layers of different sizes and sensitivities (layer c's weights carry outliers)."""
    g = rng(seed)
    wc = randn(g, 24, 24, scale=0.3)
    wc[0] = 6.0
    gain = np.ones(24, np.float32)
    gain[0] = 1e-3
    return build_model("""
    agraph (float[N,16] x) => (float[N,10] y) {
        a = MatMul (x, wa)
        ra = Relu (a)
        b = MatMul (ra, wb)
        rb = Relu (b)
        s = Mul (rb, gain)
        c = MatMul (s, wc)
        rc = Relu (c)
        y = MatMul (rc, wd)
    }""", {"wa": randn(g, 16, 32, scale=0.3), "wb": randn(g, 32, 24, scale=0.3), "gain": gain, "wc": wc,
           "wd": randn(g, 24, 10, scale=0.3)})


# ------------------------------------------------------------------------------------------ structure
def test_mixed_precision_writes_bits_into_the_quant_table_and_calibrate_follows():
    proto = sensitive_classifier()
    # w1 (16x32) at int8 and w2 (32x10) at int4 fit 0.7 of the way from all-int4 to all-int8
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{size=0.7},calibrate{weights=mse}")
    rec = next(r for r in records if r.name == "mixed-precision")
    assert rec.modified and rec.stats["int4"] == 1 and rec.stats["int8"] == 1
    assert bits(model) == {"w1": 8, "w2": 4}  # the outlier layer keeps 8 bits
    entry = model.quant.get("w2")
    assert entry.calibrated and np.abs(entry.scale).max() > 0 and entry.method == "mse"
    exported = export_qdq(model)
    types = {i.name: i.data_type for i in exported.graph.initializer}
    assert types["w2_quantized"] == onnx.TensorProto.INT4 and types["w1_quantized"] == onnx.TensorProto.INT8


def _exported_weight_bytes(proto: onnx.ModelProto, weights: list[str]) -> int:
    """Bytes of the weight initializers the exporter wrote (codes, scales, zero points) by element type."""
    width = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8,
             onnx.TensorProto.UINT8: 8, onnx.TensorProto.FLOAT: 32}
    total = 0
    for init in proto.graph.initializer:
        if any(init.name in (w, f"{w}_quantized", f"{w}_scale", f"{w}_zero_point") for w in weights):
            n = int(np.prod(init.dims, dtype=np.int64))
            total += -(-n * width[init.data_type] // 8)
    return total


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_size_budget_is_met_in_exact_exported_bytes(fraction):
    proto = four_layer_mlp()
    model, records, ctx = run(proto, f"canonicalize,plan,mixed-precision{{size={fraction}}},calibrate")
    stats = next(r for r in records if r.name == "mixed-precision").stats
    costs = compute_costs(model, ctx)
    k4, k8 = PRECISIONS.index("int4"), PRECISIONS.index("int8")
    low, high = costs.size[:, k4].sum(), costs.size[:, k8].sum()
    assert stats["size_budget"] == pytest.approx(low + fraction * (high - low))
    exported = _exported_weight_bytes(export_qdq(model), [u.weight for u in costs.units])
    assert exported == stats["size_total"] <= stats["size_budget"]
    assert set(bits(model).values()) == ({4} if fraction == 0 else {8} if fraction == 1 else {4, 8})


def test_absolute_budgets_with_units_and_bops():
    assert parse_budget("size", "3.5MB") == (3.5e6, True)
    assert parse_budget("size", "2KiB") == (2048.0, True)
    assert parse_budget("size", "0.4") == (0.4, False)
    assert parse_budget("bops", "1.5Gops") == (1.5e9, True)
    assert parse_budget("latency", "250us") == (0.25, True)
    with pytest.raises(PreconditionError, match="unknown size unit 'MHz'"):
        parse_budget("size", "3MHz")
    proto = four_layer_mlp()
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{size=2000B},calibrate")
    assert next(r for r in records if r.name == "mixed-precision").stats["size_total"] <= 2000
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{bops=0.5},calibrate")
    stats = next(r for r in records if r.name == "mixed-precision").stats
    assert stats["bops_total"] <= stats["bops_budget"] and stats["int4"] and stats["int8"]


def test_measured_ilp_beats_greedy_and_random_in_predicted_sensitivity():
    proto = four_layer_mlp()
    totals = {}
    for strategy in ("ilp", "greedy", "random"):
        _, records, _ = run(proto, f"canonicalize,plan,mixed-precision{{size=0.45,strategy={strategy}}}")
        stats = next(r for r in records if r.name == "mixed-precision").stats
        assert stats["size_total"] <= stats["size_budget"]
        totals[strategy] = stats["predicted_omega"]
    assert totals["ilp"] <= totals["greedy"] and totals["ilp"] <= totals["random"]


# ------------------------------------------------------------------------------------------ baselines
def test_baseline_choice_greedy_promotes_most_sensitive_that_fit_and_random_is_seeded():
    omega = np.array([[5.0, 1.0], [9.0, 2.0], [1.0, 0.5], [3.0, 0.1]])
    size = np.array([[1.0, 2.0], [5.0, 10.0], [1.0, 2.0], [1.0, 2.0]])
    budget = {"size": size[:, 0].sum() + 2.0}  # room for two small promotions, not the big one
    greedy = baseline_choice("greedy", omega, {"size": size}, budget)
    assert greedy.tolist() == [1, 0, 0, 1]  # unit 1 (most sensitive) does not fit; then 0 and 3
    pinned = baseline_choice("greedy", omega, {"size": size}, budget, pins={2: 1})
    assert pinned.tolist() == [1, 0, 1, 0]
    a = baseline_choice("random", omega, {"size": size}, budget, rng=np.random.default_rng(1))
    b = baseline_choice("random", omega, {"size": size}, budget, rng=np.random.default_rng(1))
    assert a.tolist() == b.tolist() and (size[np.arange(4), a].sum() <= budget["size"])
    with pytest.raises(InfeasibleBudget, match="below the cheapest configuration"):
        baseline_choice("greedy", omega, {"size": size}, {"size": 3.0})


# ------------------------------------------------------------------------------------------ pins, ties, float
def test_keep_8bit_pins_and_ties_are_respected():
    proto = four_layer_mlp()
    # 0.37 is just above the smallest size with first and last at int8 (0.3632, see the infeasible test)
    model, _, _ = run(proto, "canonicalize,plan,mixed-precision{size=0.37,keep_8bit=[first;last]}")
    assert bits(model) == {"wa": 8, "wb": 4, "wc": 4, "wd": 8}
    free, _, _ = run(proto, "canonicalize,plan,mixed-precision{size=0.37}")
    assert bits(free)["wc"] == 8  # without pins the outlier layer would get the room
    names = {n.name for n in import_proto(proto).nodes if n.op == "MatMul"}
    first, third = sorted(names)[0], sorted(names)[2]
    model, _, _ = run(proto, f"canonicalize,plan,mixed-precision{{size=0.3,tie=[{first}+{third}]}}")
    b = bits(model)
    assert b["wa"] == b["wc"]


def test_shared_weight_is_one_unit():
    g = rng(3)
    proto = build_model("""
    agraph (float[N,8] x) => (float[N,8] y) {
        a = MatMul (x, w)
        r = Relu (a)
        y = MatMul (r, w)
    }""", {"w": randn(g, 8, 8, scale=0.4)})
    model, _, ctx = run(proto, "canonicalize,plan")
    units = find_units(model)
    assert len(units) == 1 and len(units[0].nodes) == 2
    costs = compute_costs(model, ctx, units)
    assert costs.macs[0] == 2 * 64


def test_float_choice_replans_the_layer_as_excluded():
    proto = sensitive_classifier()
    model, _, ctx = run(proto, "canonicalize,plan")
    units = find_units(model)
    apply_choice(model, units, {"w1": "float", "w2": "int4"})
    assert all(reason == FLOAT_REASON for reason in model.quant.kept_float.values())
    assert set(model.quant.kept_float) == set(units[0].nodes)
    assert bits(model) == {"w2": 4}
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{size=3,relative_to=int8,"
                                   "precisions=[int4;int8;float]},calibrate")
    stats = next(r for r in records if r.name == "mixed-precision").stats
    assert stats["float"] >= 1 and stats["size_total"] <= stats["size_budget"]


# ------------------------------------------------------------------------------------------ errors
def test_infeasible_budget_names_the_smallest_achievable_value():
    proto = four_layer_mlp()
    with pytest.raises(InfeasibleBudget, match=r"size.*below the smallest achievable .*smallest feasible: "
                                               r"size >= 0\.5\d* \(relative_to=int8\)"):
        run(proto, "canonicalize,plan,mixed-precision{size=0.3,relative_to=int8}")
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible: size >= 0\.\d+ \(relative_to=int4-int8\)"):
        run(proto, "canonicalize,plan,mixed-precision{size=0,keep_8bit=[first]}")


@pytest.mark.parametrize("text, error, message", [
    ("mixed-precision{size=0.5,objective=fisher}", PipelineParseError, "objective' must be one of measured, hessian"),
    ("mixed-precision{size=0.5,strategy=best}", PipelineParseError, "strategy' must be one of"),
    ("mixed-precision", PreconditionError, "needs a budget"),
    ("mixed-precision{size=0.5,precisions=[int2]}", PreconditionError, "precisions must be among"),
    ("mixed-precision{size=0.5,keep_8bit=[nope]}", PreconditionError, "keep_8bit names 'nope'"),
    ("mixed-precision{size=0.5,tie=[nope+other]}", PreconditionError, "tie names 'nope'"),
    ("mixed-precision{size=0.5,precisions=[int8;float]}", PreconditionError, "needs those precisions"),
])
def test_bad_options_fail_with_a_message_naming_the_problem(text, error, message):
    with pytest.raises(error, match=message):
        run(four_layer_mlp(), f"canonicalize,plan,{text}")


def test_ordering_rules_and_requirements():
    with pytest.raises(PreconditionError, match="before calibrate"):
        run(four_layer_mlp(), "canonicalize,plan,calibrate,mixed-precision{size=0.5}")
    with pytest.raises(PreconditionError, match="needs plan"):
        run(four_layer_mlp(), "canonicalize,mixed-precision{size=0.5}")
    proto = four_layer_mlp()
    model = import_proto(proto)
    with pytest.raises(PreconditionError, match="calibration-data"):
        PassManager(parse_pipeline("plan,mixed-precision{size=0.5}")).run(model, PassContext())


# ------------------------------------------------------------------------------------------ idempotence
@pytest.mark.parametrize("options", ["size=0.5", "size=1.2,relative_to=int8,precisions=[int4;int8;float]"])
def test_second_run_changes_nothing(options):
    proto = sensitive_classifier()
    model, _, ctx = run(proto, f"canonicalize,plan,mixed-precision{{{options}}}")
    first = (bits(model), dict(model.quant.kept_float))
    result = parse_pipeline(f"mixed-precision{{{options}}}").passes[0].run(model, ctx)
    assert result.modified is False
    assert (bits(model), dict(model.quant.kept_float)) == first


def test_pass_is_deterministic_and_sensitivity_file_is_reused(tmp_path: Path):
    proto = four_layer_mlp()
    cache = tmp_path / "sens.json"
    text = f"canonicalize,plan,mixed-precision{{size=0.4,objective=hessian,probes=4,cache={cache}}}"
    a, rec_a, _ = run(proto, text)
    b, rec_b, _ = run(proto, text)
    assert bits(a) == bits(b)
    assert next(r for r in rec_a if r.name == "mixed-precision").stats["sensitivity_source"] == "computed"
    assert next(r for r in rec_b if r.name == "mixed-precision").stats["sensitivity_source"] == str(cache)


def test_conv_model_with_latency_budget():
    proto = conv_pool_gemm()
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{latency=10,relative_to=int8},calibrate")
    stats = next(r for r in records if r.name == "mixed-precision").stats
    assert 0 < stats["latency_total"] <= stats["latency_budget"]
    model, records, _ = run(residual_block(), "canonicalize,plan,mixed-precision{size=0.5},calibrate")
    assert set(bits(model).values()) == {4, 8}


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.realmodel
def test_lite0_halfway_budget_ilp_is_no_worse_than_the_baselines():
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from models.prepare import prepare_task
    from models.tasks import task_dir
    from qonnx.core.ir import load_model

    folder = task_dir("efficientnet_lite0")
    if not (folder / "model.onnx").exists():
        prepare_task("efficientnet_lite0", folder.parent)
    model = load_model(folder / "model.onnx")
    calib = open_calibration(folder / "calib.npz", model).head(8)
    ctx = PassContext(calibration=calib, seed=0)
    model, _ = PassManager(parse_pipeline("canonicalize,fold-bn,plan")).run(model, ctx)
    results = {}
    for strategy in ("ilp", "greedy", "random"):
        candidate = model.copy()
        p = parse_pipeline(f"mixed-precision{{size=0.5,samples=4,strategy={strategy}}}").passes[0]
        results[strategy] = p.run(candidate, ctx).stats  # the sensitivity is computed once, then cached
    ilp = results["ilp"]
    assert ilp["layers"] == 50 and ilp["int4"] > 0 and ilp["int8"] > 0 and ilp["optimal"]
    assert all(r["size_total"] <= r["size_budget"] for r in results.values())
    assert ilp["predicted_omega"] <= results["greedy"]["predicted_omega"]
    assert ilp["predicted_omega"] < 0.5 * results["random"]["predicted_omega"]


def test_float_is_no_choice_for_a_conv_between_quantized_activations():
    """ORT would quantize such a 'float' Conv itself (per-tensor int8): the pass does not offer it."""
    proto = residual_block()
    model, records, _ = run(proto, "canonicalize,plan,mixed-precision{size=4,relative_to=int8,"
                                   "precisions=[int4;int8;float]}")
    stats = next(r for r in records if r.name == "mixed-precision").stats
    assert stats["float"] == 0 and stats["int8"] == 3 and not model.quant.kept_float
    weight_only, records, _ = run(proto, "canonicalize,plan{activations=float},mixed-precision{size=4,"
                                         "relative_to=int8,precisions=[int4;int8;float]}")
    assert next(r for r in records if r.name == "mixed-precision").stats["float"] == 3

"""embeddings: int8 lookup tables with a scale per row. Structure, numerics, negative cases, idempotence."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.data.calibration import open_calibration
from qonnx.export.qdq import export_qdq
from qonnx.export.qop import export_qop
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from tests.helpers import build_model, import_proto, op_counts, rng, run_ort

VOCAB, DIM = 600, 128  # 76,800 elements: above the default min_elements


def table_values(seed: int = 40, vocab: int = VOCAB) -> np.ndarray:
    g = rng(seed)
    table = g.standard_normal((vocab, DIM)).astype(np.float32)
    return table * g.uniform(0.01, 2.0, size=(vocab, 1)).astype(np.float32)  # rows of very different norms


def embedder(seed: int = 40, vocab: int = VOCAB):
    """ids[N,S] -> Gather(table) -> MatMul(w) -> y: a word embedding and one layer after it."""
    w = (rng(seed + 1).standard_normal((DIM, 16)) * 0.1).astype(np.float32)
    return build_model("""
    agraph (int64[N,S] ids) => (float[N,S,16] y) {
        emb = Gather <axis = 0> (table, ids)
        y = MatMul (emb, w)
    }""", {"table": table_values(seed, vocab), "w": w})


def shared_table_model():
    """The table is also read as a MatMul weight (tied embeddings)."""
    w = (rng(41).standard_normal((DIM, 16)) * 0.1).astype(np.float32)
    return build_model("""
    agraph (int64[N,S] ids, float[N,S,128] x) => (float[N,S,16] y, float[N,S,600] z) {
        emb = Gather <axis = 0> (table, ids)
        y = MatMul (emb, w)
        t = Transpose <perm = [1, 0]> (table)
        z = MatMul (x, t)
    }""", {"table": table_values(), "w": w})


def ids_feed(n: int = 4, s: int = 12, seed: int = 0, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    return {"ids": rng(seed).integers(0, vocab, size=(n, s)).astype(np.int64)}


def run(model, spec: str, data=None):
    ctx = PassContext(calibration=open_calibration(data, model) if data else None, seed=0)
    results = []
    for p in parse_pipeline(spec):
        result = p.run(model, ctx)
        model = result.model
        results.append(result)
    return model, results


def test_lookup_is_exported_as_int8_rows_scaled_after_the_gather():
    ir, results = run(import_proto(embedder()), "embeddings")
    assert results[-1].modified is True and results[-1].stats == {"tables": 1, "elements": VOCAB * DIM}
    proto = export_qdq(ir)
    ops = op_counts(proto)
    assert ops["Gather"] == 2 and ops["Cast"] == 1 and ops["Mul"] == 1 and "DequantizeLinear" not in ops
    inits = {i.name: i for i in proto.graph.initializer}
    assert "table" not in inits  # the float table is gone, only its int8 codes and row scales remain
    assert inits["table_quantized"].data_type == 3 and list(inits["table_scale"].dims) == [VOCAB, 1]
    assert len(proto.SerializeToString()) < 0.3 * len(embedder().SerializeToString())


@pytest.mark.parametrize("exporter", [export_qdq, export_qop])
def test_looked_up_rows_are_within_half_a_step_of_the_float_rows(exporter):
    model = embedder()
    ir, _ = run(import_proto(model), "embeddings")
    rows = table_values()
    step = np.abs(rows).max(axis=1) / 127
    probe = build_model("""
    agraph (int64[N,S] ids) => (float[N,S,128] emb) {
        emb = Gather <axis = 0> (table, ids)
    }""", {"table": rows})
    probe_ir, _ = run(import_proto(probe), "embeddings")
    feed = ids_feed()
    (got,) = run_ort(exporter(probe_ir), feed)
    err = np.abs(got - rows[feed["ids"]])
    assert np.all(err <= step[feed["ids"]][..., None] / 2 * (1 + 1e-5))
    assert err.max() > 0  # it is quantized, not passed through
    (y_float,) = run_ort(model, feed)
    (y_quant,) = run_ort(exporter(ir), feed)
    assert 10 * np.log10(np.sum(y_float**2) / np.sum((y_float - y_quant) ** 2)) > 35


def test_small_shared_and_constant_index_tables_stay_float():
    small = embedder(vocab=100)  # 12,800 elements
    ir, results = run(import_proto(small), "embeddings")
    assert results[-1].modified is False and not ir.quant.gathers
    ir, results = run(import_proto(small), "embeddings{min_elements=1000}")
    assert len(ir.quant.gathers) == 1
    ir, results = run(import_proto(shared_table_model()), "embeddings")
    assert not ir.quant.gathers  # quantizing the lookup would keep a float copy for the MatMul
    constant_ids = build_model("""
    agraph (float[5,128] x) => (float[5,128] y) {
        e = Gather <axis = 0> (table, ids)
        y = Add (e, x)
    }""", {"table": table_values(), "ids": np.arange(5, dtype=np.int64)})
    ir, _ = run(import_proto(constant_ids), "embeddings")
    assert not ir.quant.gathers  # constant folding's business, not a lookup


def test_embeddings_is_idempotent_and_survives_replanning():
    model = embedder()
    data = ids_feed(8)
    ir, results = run(import_proto(model), "plan,embeddings,calibrate", data)
    assert len(ir.quant.gathers) == 1 and ir.quant.layers
    (again,) = parse_pipeline("embeddings").passes
    assert again.run(ir, None).modified is False
    (plan,) = parse_pipeline("plan").passes
    plan.run(ir, None)
    assert len(ir.quant.gathers) == 1  # plan's clear() forgets plan's decisions only


def test_w8a8_preset_quantizes_the_table_and_output_is_deterministic():
    model, data = embedder(), ids_feed(16)
    first = qonnx.optimize(model, data, holdout=0)
    second = qonnx.optimize(model, data, holdout=0)
    assert first.to_bytes() == second.to_bytes()
    assert first.ir.quant.gathers and first.size_after < 0.35 * first.size_before


@pytest.mark.parametrize("ids", [np.array(7, np.int64), np.array([3, -1, 599], np.int64),
                                 np.array([[0, -600], [5, 5]], np.int64)], ids=["scalar", "1-d negative", "2-d"])
def test_any_index_shape_and_negative_indices_look_up_the_same_rows(ids):
    rows = table_values()
    rows[5] = 0.0  # an all-zero row: smallest scale, codes 0, still exactly zero
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids.shape))],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [*ids.shape, DIM])],
        [numpy_helper.from_array(rows, "table")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ir, _ = run(import_proto(probe), "embeddings")
    (got,) = run_ort(export_qdq(ir), {"ids": ids})
    want = rows[ids]
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= np.abs(want).max(axis=-1, keepdims=True) / 254 * (1 + 1e-5))
    assert np.all(got[ids == 5] == 0.0)


def test_qop_export_of_a_planned_model_keeps_the_lookup_and_the_layers():
    model, data = embedder(), ids_feed(8)
    ir, _ = run(import_proto(model), "plan,embeddings,calibrate", data)
    proto = export_qop(ir)
    ops = op_counts(proto)
    assert ops.get("Cast") == 1 and "table" not in {i.name for i in proto.graph.initializer}
    assert ops.get("MatMulIntegerToFloat") == 1  # the layer after the lookup is still an integer kernel
    (y_float,) = run_ort(model, data)
    (y_quant,) = run_ort(proto, data)
    assert 10 * np.log10(np.sum(y_float**2) / np.sum((y_float - y_quant) ** 2)) > 25


def test_a_lookup_table_for_a_missing_gather_is_an_error_not_a_silent_float():
    from qonnx.errors import ExportError, VerificationError
    from qonnx.infra.instruments import StructuralVerifier

    ir, results = run(import_proto(embedder()), "embeddings")
    ir.quant.gathers["no_such_gather"] = ir.quant.gathers.popitem()[1]
    for exporter in (export_qdq, export_qop):
        with pytest.raises(ExportError, match="no_such_gather"):
            exporter(ir)
    with pytest.raises(VerificationError, match="no_such_gather"):
        StructuralVerifier().after_pass(parse_pipeline("embeddings").passes[0], None, ir, None, None)


def test_float16_and_non_finite_tables_stay_float():
    half = build_model("""
    agraph (int64[N,S] ids) => (float16[N,S,128] emb) {
        emb = Gather <axis = 0> (table, ids)
    }""", {"table": table_values().astype(np.float16)})
    ir, _ = run(import_proto(half), "embeddings")
    assert not ir.quant.gathers
    rows = table_values()
    rows[3, 3] = np.inf
    bad = build_model("""
    agraph (int64[N,S] ids) => (float[N,S,128] emb) {
        emb = Gather <axis = 0> (table, ids)
    }""", {"table": rows})
    ir, _ = run(import_proto(bad), "embeddings")
    assert not ir.quant.gathers

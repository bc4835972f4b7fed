"""keep-fast: measured decisions, tested with controlled timings (monkeypatched) and one real measurement."""

from __future__ import annotations

import pytest

import qonnx.passes.keep_fast as keep_fast
from qonnx.data.calibration import open_calibration
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import Latency
from tests.helpers import conv_bn_relu_conv, import_proto, make_samples


def planned(model, data):
    ir = import_proto(model)
    ctx = PassContext(calibration=open_calibration(data, ir), seed=0)
    for p in parse_pipeline("canonicalize,fold-bn,plan,calibrate"):
        ir = p.run(ir, ctx).model
    return ir, ctx


@pytest.fixture
def model_and_ctx():
    model = conv_bn_relu_conv()
    return planned(model, make_samples(model, 16))


def run_with(monkeypatch, ir, ctx, ratio):
    """Run keep-fast with INT8 latency = ratio(number of integer layers in the candidate) x FP32."""
    def fake_measure(sessions, feed, **_):
        return [Latency(1.0, 1.0, 1.0, 30), Latency(ratio(fake_measure.current), 1.0, 1.0, 30)]

    original_export = keep_fast.export_qdq

    def tracking_export(candidate):
        fake_measure.current = len(candidate.quant.layers)
        return original_export(candidate)

    monkeypatch.setattr(keep_fast, "measure_latency", fake_measure)
    monkeypatch.setattr(keep_fast, "export_qdq", tracking_export)
    (p,) = parse_pipeline("keep-fast{seconds=0}").passes
    return p.run(ir, ctx)


def test_int8_clearly_faster_changes_nothing(monkeypatch, model_and_ctx):
    ir, ctx = model_and_ctx
    layers = dict(ir.quant.layers)
    result = run_with(monkeypatch, ir, ctx, lambda n: 0.5)
    assert result.modified is False and result.stats["int8_vs_fp32"] == 0.5
    assert ir.quant.layers.keys() == layers.keys()


def test_int8_slower_everywhere_keeps_the_model_float_and_says_why(monkeypatch, model_and_ctx):
    ir, ctx = model_and_ctx
    result = run_with(monkeypatch, ir, ctx, lambda n: 1.5)
    assert result.modified is True and not ir.quant.layers
    assert all("keep-fast" in reason for reason in ir.quant.kept_float.values())
    # idempotence: nothing left to decide
    (again,) = parse_pipeline("keep-fast{seconds=0}").passes
    assert again.run(ir, ctx).modified is False


def test_optimize_says_the_model_was_kept_float_and_why(monkeypatch):
    import qonnx

    monkeypatch.setattr(keep_fast, "measure_latency",
                        lambda sessions, feed, **_: [Latency(1.0, 1.0, 1.0, 30), Latency(1.5, 1.0, 1.0, 30)])
    model = conv_bn_relu_conv()
    result = qonnx.optimize(model, make_samples(model, 16), pipeline="canonicalize,fold-bn,plan,calibrate,keep-fast",
                            holdout=0)
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    (note,) = [n for n in result.notes if "float model" in n]
    assert note.startswith("every layer was kept float") and "2 layers" in note and "measured slower" in note


def test_int8_wins_once_small_layers_are_float(monkeypatch, model_and_ctx):
    ir, ctx = model_and_ctx
    total = len(ir.quant.layers)
    # Slower with every layer in int8, clearly faster once the smallest ones are float.
    result = run_with(monkeypatch, ir, ctx, lambda n: 1.2 if n == total else 0.8)
    assert result.modified is True
    assert 0 < len(ir.quant.layers) < total
    assert result.stats["int8_vs_fp32"] == 0.8


def test_real_measurement_on_a_tiny_model_never_returns_a_slower_model(model_and_ctx):
    ir, ctx = model_and_ctx
    (p,) = parse_pipeline("keep-fast{seconds=0.2}").passes
    result = p.run(ir, ctx)
    assert result.stats["int8_vs_fp32"] <= 1.0 or result.stats["int8_vs_fp32"] is None


def test_measure_latency_times_every_session_equally_with_varying_neighbours():
    from qonnx.runtime.ort import measure_latency

    calls: list[int] = []

    class Recorder:
        def __init__(self, index: int):
            self.index = index

        def run(self, outputs, feed):
            calls.append(self.index)

    sessions = [Recorder(i) for i in range(4)]
    results = measure_latency(sessions, {}, warmup=2, runs=60)
    assert [r.runs for r in results] == [60] * 4
    timed = calls[8:]  # after 2 warm-up runs of each
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
    # Each session follows more than one neighbour (a fixed cycle would give each exactly one predecessor,
    # and a model's time depends on whose weights the run before left in the caches).
    predecessors = {i: {b for a, b in zip(timed[1:], timed) if a == i} for i in range(4)}
    assert all(len(p) >= 3 for p in predecessors.values()), predecessors
    # Seeded: the same calls in the same order every time.
    first = list(calls)
    calls.clear()
    measure_latency(sessions, {}, warmup=2, runs=60)
    assert calls == first

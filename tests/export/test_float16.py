"""float16 and bfloat16 models: per-type verifier tolerances, float16 QDQ export, bfloat16 refused.

The float16 model is the float32 Conv+BN+Relu+Conv of tests/helpers with every weight cast to float16, so
agreement is measured against the float32 model with the same weights.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.errors import ExportError, QonnxError, UnsupportedModelError, VerificationError
from qonnx.export import EXPORTERS
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext
from qonnx.infra.instruments import NumericVerifier, StructuralVerifier
from qonnx.infra.manager import PassManager
from qonnx.infra.pipeline import Pipeline
from qonnx.passes import parse_pipeline
from qonnx.runtime.compare import VERIFY_RTOL, float_types, verify_rtol
from qonnx.runtime.fusion import fusion_report
from qonnx.runtime.ort import make_session, truncated
from tests.helpers import conv_bn_relu_conv, feed_for, import_proto, make_samples, matmul_mlp, run_ort, sqnr

# w8a8 on this model loses ~34 dB against float whatever the float type; 25 dB is the floor every QDQ export
# of the tiny models meets (tests/export/test_qdq.py). float16 arithmetic adds noise ~60 dB below the signal,
# so a float16 QDQ model must be as close to the float32 model as the float32 QDQ model is, within 1 dB
# (calibration sees float16 activations, so the ranges differ a little).
SQNR_FLOOR_DB = 25.0
SQNR_MARGIN_DB = 1.0


def with_float_type(model: onnx.ModelProto, elem_type: int, opset: int) -> onnx.ModelProto:
    """The model with every float32 initializer, input and output converted to `elem_type`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32:
            init.CopyFrom(helper.make_tensor(init.name, elem_type, values.shape,
                                             values.astype(np.float64).reshape(-1).tolist()))
    for value in [*out.graph.input, *out.graph.output]:
        value.type.tensor_type.elem_type = elem_type
    out.opset_import[0].version = opset
    onnx.checker.check_model(out, full_check=True)
    return out


def float16_cnn() -> onnx.ModelProto:
    return with_float_type(conv_bn_relu_conv(), TensorProto.FLOAT16, 17)


def bfloat16_cnn() -> onnx.ModelProto:
    return with_float_type(conv_bn_relu_conv(), TensorProto.BFLOAT16, 22)  # Conv takes bfloat16 from opset 22


def as_float16(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float16) for k, v in arrays.items()}


def _truncated_keeps_types() -> bool:
    """Whether runtime/ort.truncated (activation statistics) can expose a float16 intermediate tensor."""
    proto = float16_cnn()
    try:
        session = make_session(truncated(proto, ["r1"]).SerializeToString())
        session.run(None, as_float16(feed_for(proto, batch=1)))
    except Exception:
        return False
    return True


needs_float16_statistics = pytest.mark.xfail(
    not _truncated_keeps_types(), strict=True,
    reason="runtime/ort.py truncated() declares every exposed tensor float32, so ORT refuses to expose a "
           "float16 activation for calibration (fix requested from the owner of runtime/ort.py)")


# ----------------------------------------------------------------------------- tolerances per type
def test_verifier_tolerance_follows_the_coarsest_float_type():
    assert VERIFY_RTOL == {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
    assert float_types(import_proto(conv_bn_relu_conv())) == {"float32"}
    assert verify_rtol(import_proto(conv_bn_relu_conv())) == 1e-4
    assert float_types(import_proto(float16_cnn())) == {"float16"}
    assert verify_rtol(import_proto(float16_cnn())) == 2e-3
    assert "bfloat16" in float_types(import_proto(bfloat16_cnn()))
    assert verify_rtol(import_proto(bfloat16_cnn())) == 1.6e-2


def test_fold_bn_on_a_float16_model_passes_the_numeric_verifier():
    # Folding rounds the new weights to float16: the outputs move by about half an ulp, above float32's 1e-4.
    mgr = PassManager(parse_pipeline("fold-bn"), [StructuralVerifier(), NumericVerifier()])
    model, records = mgr.run(import_proto(float16_cnn()), PassContext())
    assert records[0].modified and "BatchNormalization" not in {n.op for n in model.nodes}
    assert 1e-4 < records[0].stats["max_rel_change"] < 2e-3
    assert float_types(model) == {"float16"}


class NudgeWeights(Pass):
    """Claims to be exact but scales a weight by 1 + 5e-4: above float32's tolerance, inside float16's."""

    name = "nudge-weights"
    summary = "changes a weight a little"

    def run(self, model, ctx):
        w = model.tensors()["w2"]
        w.values = (np.asarray(w.values, np.float64) * (1 + 5e-4)).astype(np.asarray(w.values).dtype)
        return PassResult(model, True)


def test_float32_keeps_its_tolerance():
    mgr = PassManager(Pipeline([NudgeWeights()]), [StructuralVerifier(), NumericVerifier()])
    with pytest.raises(VerificationError, match="above 0.0001"):
        mgr.run(import_proto(conv_bn_relu_conv()), PassContext())


# ----------------------------------------------------------------------------- float16 quantization
@pytest.fixture(scope="module")
def float16_result():
    if not _truncated_keeps_types():
        pytest.xfail("runtime/ort.py truncated() cannot expose float16 tensors yet")
    model = float16_cnn()
    return model, qonnx.optimize(model, as_float16(make_samples(model, 24, seed=1)), pipeline="w8a8-static",
                                 seed=0, holdout=0)


@needs_float16_statistics
def test_float16_cnn_quantizes_and_agrees_with_float32(float16_result):
    model, result = float16_result
    assert sorted(result.ir.quant.layers) == ["Conv_0", "Conv_3"] and not result.ir.quant.kept_float
    out = result.model
    opset = next(o.version for o in out.opset_import if o.domain == "")
    assert opset >= 19  # float16 QuantizeLinear/DequantizeLinear (the opset-17 model was converted)
    inits = {i.name: i for i in out.graph.initializer}
    scales = {n.input[1]: inits[n.input[1]].data_type for n in out.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert len(scales) == 7 and set(scales.values()) == {TensorProto.FLOAT16}  # x, r1, y; w1, w2; b1, b2
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [TensorProto.FLOAT16]

    float32 = conv_bn_relu_conv()
    feed32 = feed_for(float32, seed=7, batch=16)
    ref = run_ort(float32, feed32)[0].astype(np.float64)
    q32 = qonnx.optimize(float32, make_samples(float32, 24, seed=1), pipeline="w8a8-static", seed=0, holdout=0)
    sqnr32 = sqnr(ref, run_ort(q32.model, feed32)[0])
    for level in ("disable", "all"):
        q16 = run_ort(out, as_float16(feed32), level=level)[0]
        assert q16.dtype == np.float16
        assert sqnr(ref, q16) >= max(SQNR_FLOOR_DB, sqnr32 - SQNR_MARGIN_DB)
    # The float16 model itself is within float16's tolerance of the float32 one.
    f16 = run_ort(model, as_float16(feed32))[0].astype(np.float64)
    assert np.max(np.abs(f16 - ref)) / np.max(np.abs(ref)) < VERIFY_RTOL["float16"]


@needs_float16_statistics
def test_float16_qdq_runs_in_float_in_ort(float16_result):
    # ORT's CPU EP fuses no float16 QDQ group into an integer kernel: no QLinearConv, the Convs stay.
    _, result = float16_result
    report = fusion_report(result.model)
    assert report.integer_count == 0


@needs_float16_statistics
def test_float16_notes_say_the_layers_run_in_float(float16_result):
    _, result = float16_result
    if not fusion_report(result.model).float_layers:
        pytest.xfail("runtime/fusion.py does not look through the Casts ORT inserts around float16 Convs, so the "
                     "notes miss them (fix requested from its owner)")
    assert sum("Conv" in note and "runs in float" in note for note in result.notes) == 2


def test_float16_dynamic_matmul_runs_in_float32_between_casts():
    # DynamicQuantizeLinear takes float32 only: a float16 MatMul quantized per run (protect{fallback=dynamic})
    # reads a Cast of its input and writes a Cast of its output.
    float32 = matmul_mlp()
    ir = import_proto(with_float_type(float32, TensorProto.FLOAT16, 17))
    ctx = PassContext()
    for p in parse_pipeline("plan{activations=float},calibrate-weights"):  # weight-only: no data needed
        ir = p.run(ir, ctx).model
    node = next(n for n in ir.nodes if n.op == "MatMul")
    ir.quant.dynamic[node.name] = ir.quant.tensors.pop(ir.quant.layers.pop(node.name).weight)
    out = EXPORTERS["qdq"](ir)
    ops = {n.op_type for n in out.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "Cast"} <= ops
    feed = feed_for(float32, seed=4, batch=3)
    ref = run_ort(float32, feed)[0]
    for level in ("disable", "all"):
        got = run_ort(out, as_float16(feed), level=level)[0]
        assert got.dtype == np.float16 and sqnr(ref, got) >= SQNR_FLOOR_DB


@pytest.mark.parametrize("fmt", sorted(set(EXPORTERS) - {"qdq"}))
def test_float16_qlinear_formats_are_refused_in_one_line(fmt):
    model = import_proto(float16_cnn())  # a weight-only plan: calibrated without data
    plan = parse_pipeline("canonicalize,fold-bn,plan{activations=float},calibrate-weights")
    ctx = PassContext()
    for p in plan:
        model = p.run(model, ctx).model
    with pytest.raises(ExportError) as info:
        EXPORTERS[fmt](model)
    message = str(info.value)
    assert "float16" in message and "qdq" in message and "\n" not in message and len(message) < 300


# ----------------------------------------------------------------------------- bfloat16
def test_bfloat16_is_refused_before_the_first_pass():
    mgr = PassManager(parse_pipeline("canonicalize,fold-bn"), [StructuralVerifier(), NumericVerifier()])
    with pytest.raises(UnsupportedModelError) as info:
        mgr.run(import_proto(bfloat16_cnn()), PassContext())
    message = str(info.value)
    assert "bfloat16" in message and "CPU execution provider" in message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("calibration", ["float32", "bfloat16"])
def test_bfloat16_model_is_refused_in_one_line(calibration):
    model = bfloat16_cnn()
    samples = make_samples(conv_bn_relu_conv(), 8)
    if calibration == "bfloat16":
        samples = {k: v.astype(ml_dtypes.bfloat16) for k, v in samples.items()}
    with pytest.raises(QonnxError) as info:
        qonnx.optimize(model, samples, pipeline="w8a8-static")
    message = str(info.value)
    # The input's problem, said as such: not blamed on a pass (before: "pass 'fold-bn' failed: ...").
    assert "failed" not in message and ("bfloat16" in message or "ONNX Runtime" in message)
    assert "\n" not in message and len(message) < 300

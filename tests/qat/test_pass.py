"""The qat pass: structure, export round-trip (ORT == torch fake-quant), gains over nearest rounding, negative
cases, determinism and checkpoint/resume."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import build_model, import_proto, randn, rng, run_ort

torch = pytest.importorskip("torch")

from qonnx.app.api import optimize  # noqa: E402
from qonnx.app.cli import main  # noqa: E402
from qonnx.core.qtable import QuantState, Role  # noqa: E402
from qonnx.data.calibration import open_calibration  # noqa: E402
from qonnx.errors import InputError, PreconditionError  # noqa: E402
from qonnx.infra.context import PassContext  # noqa: E402
from qonnx.infra.manager import PassManager  # noqa: E402
from qonnx.passes import parse_pipeline  # noqa: E402
from qonnx.qat.model import Student  # noqa: E402
from qonnx.qat.options import TrainConfig  # noqa: E402
from qonnx.qat.train import Trainer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # The trainer used directly does not set threads (the pass does): OpenMP spinning on a busy core is slow.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


W4A4 = "canonicalize,fold-bn,plan{weight_bits=4,activations=uint4},calibrate{weights=mse}"


def classifier(seed: int = 0):
    """Conv-BN-Relu, depthwise, pointwise, GAP, Gemm: the fmnist CNN in miniature, dynamic batch."""
    g = rng(seed)
    inits = {"w1": randn(g, 8, 1, 3, 3, scale=0.5), "b1": randn(g, 8, scale=0.1),
             "bn_g": g.uniform(0.5, 1.5, 8).astype(np.float32), "bn_b": randn(g, 8, scale=0.2),
             "bn_m": randn(g, 8, scale=0.1), "bn_v": g.uniform(0.5, 2, 8).astype(np.float32),
             "wd": randn(g, 8, 1, 3, 3, scale=0.5), "bd": randn(g, 8, scale=0.1),
             "w2": randn(g, 16, 8, 1, 1, scale=0.4), "b2": randn(g, 16, scale=0.1),
             "wg": randn(g, 10, 16, scale=0.5), "bg": randn(g, 10, scale=0.1)}
    return build_model("""
    agraph (float[N,1,8,8] x) => (float[N,10] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        n1 = BatchNormalization (c1, bn_g, bn_b, bn_m, bn_v)
        r1 = Relu (n1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (r1, wd, bd)
        r2 = Relu (c2)
        c3 = Conv <kernel_shape = [1, 1]> (r2, w2, b2)
        r3 = Relu (c3)
        p = GlobalAveragePool (r3)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }""", inits)


def samples(n=96, seed=0):
    return {"x": randn(rng(seed), n, 1, 8, 8)}


def quantize(text, proto=None, n=96, seed=0, fmt="qdq"):
    proto = proto or classifier()
    return optimize(proto, samples(n), pipeline=text, holdout=0, check_fusion=False, seed=seed, export_format=fmt)


def kl(ref, out):
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lq = out - out.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - lq), 1)))


def test_structure_codes_and_export():
    result = quantize(W4A4 + ",qat{steps=40,batch_size=16}")
    table = result.ir.quant
    weights = table.of_role(Role.WEIGHT)
    assert weights and all(e.state is QuantState.ROUNDED and e.codes is not None for e in weights.values())
    for e in weights.values():
        assert e.codes.min() >= -7 and e.codes.max() <= 7 and "qat" in e.method
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Clip") == len(table.of_role(Role.ACTIVATION))  # one narrowing Clip per 4-bit activation
    stats = result.records[-1].stats
    assert stats["steps"] == 40 and stats["loss"] == "kl" and stats["labels"] is False


@pytest.mark.parametrize("bits", [4, 3])
def test_exported_model_matches_torch_fake_quant(bits):
    plan = f"canonicalize,fold-bn,plan{{weight_bits={bits},activations=uint{bits}}},calibrate{{weights=mse}}"
    result = quantize(plan + ",qat{steps=30,batch_size=16}")
    acts = result.ir.quant.of_role(Role.ACTIVATION).values()
    assert {(e.scheme.qmin, e.scheme.qmax) for e in acts} == {(0, 2**bits - 1)}
    assert all(int(abs(e.codes).max()) <= 2 ** (bits - 1) - 1 for e in result.ir.quant.of_role(Role.WEIGHT).values())
    feed = samples(32, seed=7)
    student = Student(result.ir)
    with torch.no_grad():
        want = student.module(torch.from_numpy(feed["x"]))[0].numpy()
    got = run_ort(result.model, feed, level="all")[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_qat_reduces_distillation_loss_over_nearest():
    proto = classifier()
    feed = samples(64, seed=11)
    ref = run_ort(proto, feed)[0]
    nearest = kl(ref, run_ort(quantize(W4A4, proto).model, feed)[0])
    learned = kl(ref, run_ort(quantize(W4A4 + ",qat{steps=150,batch_size=32,lr=0.001,lr_scale=0.0001}",
                                      proto).model, feed)[0])
    assert learned < 0.8 * nearest, (nearest, learned)


@pytest.mark.parametrize("fmt", ["qop", "int-only"])
def test_8bit_result_exports_as_qop_and_int_only(fmt):
    text = "canonicalize,fold-bn,plan,calibrate,qat{steps=10,batch_size=16}"
    result = quantize(text, fmt=fmt)
    feed = samples(8, seed=3)
    ref = run_ort(quantize(text).model, feed)[0]
    got = run_ort(result.model, feed, level="all")[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_labels_cross_entropy_and_dampening_freezing_report(tmp_path):
    data = samples(64, seed=2)
    data["labels"] = (np.arange(64) % 10).astype(np.int64)
    np.savez(tmp_path / "train.npz", **data)
    report = tmp_path / "report"
    text = (W4A4 + f",qat{{steps=40,batch_size=16,train_data={tmp_path / 'train.npz'},dampen=0.1,freeze=0.1,"
            f"freeze_final=0.05,momentum=0.02,log_every=10,report={report}}}")
    result = quantize(text)
    stats = result.records[-1].stats
    assert stats["loss"] == "ce" and stats["labels"] is True and stats["samples"] == 64
    import json

    log = json.loads((report / "oscillations.json").read_text())["log"]
    assert [row["step"] for row in log] == [10, 20, 30, 40]
    assert set(log[0]["layers"]) == set(result.ir.quant.of_role(Role.WEIGHT))
    assert (report / "oscillations.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_identical_bytes():
    text = W4A4 + ",qat{steps=25,batch_size=16,weight_quantizer=octav,freeze=0.1,freeze_final=0.05,momentum=0.05}"
    assert quantize(text).to_bytes() == quantize(text).to_bytes()


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    proto = classifier()
    data = samples()

    def prepared():
        ir = import_proto(proto)
        ctx = PassContext(calibration=open_calibration(data, ir), seed=0)
        ir, _ = PassManager(parse_pipeline(W4A4), []).run(ir, ctx)
        return ir

    config = TrainConfig(steps=30, batch_size=16, dampen=0.1, freeze=0.1, freeze_final=0.05, momentum=0.05,
                         checkpoint=str(tmp_path / "ck.pt"), checkpoint_every=7)
    full = prepared()
    Trainer(full, data, None, TrainConfig(**{**config.__dict__, "checkpoint": ""})).run()
    interrupted = prepared()
    assert not Trainer(interrupted, data, None, TrainConfig(**{**config.__dict__, "stop_at": 14})).run().finished
    resumed = prepared()
    Trainer(resumed, data, None, config).run()
    for name, entry in full.quant.of_role(Role.WEIGHT).items():
        np.testing.assert_array_equal(entry.codes, resumed.quant.get(name).codes)
        np.testing.assert_array_equal(entry.scale, resumed.quant.get(name).scale)
    assert full.to_bytes() == resumed.to_bytes()
    with pytest.raises(PreconditionError, match="checkpoint"):
        Trainer(prepared(), data, None, TrainConfig(**{**config.__dict__, "lr": 0.5})).run()


def test_bn_statistics_are_reestimated_when_bn_is_kept():
    result = quantize("canonicalize,plan{weight_bits=4,activations=uint4},calibrate{weights=mse},"
                      "qat{steps=10,batch_size=16,bn_batches=3}")
    assert result.records[-1].stats["bn_reestimated"] == 1
    mean = import_proto(classifier()).constant_value(import_proto(classifier()).tensors()["bn_m"])
    assert not np.allclose(result.ir.constant_value(result.ir.tensors()["bn_m"]), mean)


def prepared_w4a4(proto=None, n=96):
    ir = import_proto(proto or classifier())
    ctx = PassContext(calibration=open_calibration(samples(n), ir), seed=0)
    ir, _ = PassManager(parse_pipeline(W4A4), []).run(ir, ctx)
    return ir


@pytest.mark.parametrize("bias_correction,kept_bn,reserved_steps", [
    (False, False, 0.0),  # folded BN, no correction: nothing runs after training
    # 3 batches (of the 6 in 96 samples) x (the float model + the student up to each of the 4 layers, half a
    # forward on average) x half a step
    (True, False, 4.5),
    (False, True, 1.5),  # BN re-estimation: 3 batches x 1 forward pass x half a step
])
def test_time_budget_keeps_time_only_for_the_finish_that_runs(monkeypatch, bias_correction, kept_bn, reserved_steps):
    ir = prepared_w4a4() if not kept_bn else optimize(
        classifier(), samples(), pipeline="canonicalize,plan{weight_bits=4,activations=uint4},calibrate", holdout=0,
        check_fusion=False).ir
    config = TrainConfig(steps=1000, batch_size=16, bn_batches=3, bias_correction=bias_correction, time_budget=100.0)
    trainer = Trainer(ir, samples(), None, config)
    monkeypatch.setattr("qonnx.qat.train.time.perf_counter", lambda: 20.0)
    # 10 steps took 10 s of the 20 s spent so far: 80 s left, 1 s a step, less the finish.
    assert trainer._fit_budget(10, 1000, 0, 10.0, 0.0) == 10 + int(80 - reserved_steps)


def test_bias_correction_zeroes_every_corrected_layers_mean_error_on_its_batches():
    from qonnx.qat.train import _channel_means

    ir = prepared_w4a4()
    trainer = Trainer(ir, samples(), None, TrainConfig(steps=5, batch_size=16, bn_batches=2, bias_correction=True))
    assert trainer.run().stats["bias_corrected"] == 4
    student = trainer.student.module.eval()
    teacher = student.__class__(prepared_w4a4()).eval()  # the float model (BN folded, like the student)
    batches = [trainer.inputs_batch(i) for i in range(2)]
    with torch.no_grad():
        for bias, out in trainer._corrected_layers():  # deeper layers see the earlier layers' corrections
            error = sum(_channel_means(student.capture_run(b, [out])[out]) - _channel_means(
                teacher.capture_run(b, [out])[out]) for b in batches) / len(batches)
            act, weight = student.weight_hook(bias)._refs  # the int32 bias grid is s_x * s_w
            step = (act.scale * weight.step_size()).reshape(-1).double()
            assert torch.all(error.abs() <= 0.5 * step + 1e-6), (out, error, step)


def test_distillation_targets_are_the_float_models_outputs():
    from qonnx.qat.train import _teacher_outputs

    ir = prepared_w4a4()
    feed = samples(40, seed=3)
    got = _teacher_outputs(ir, ["x"], [feed["x"]], 16, 1).numpy()
    np.testing.assert_allclose(got, run_ort(classifier(), feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,error,match", [
    ("steps=0", PreconditionError, "steps"),
    ("freeze=0.01,freeze_final=0.1", PreconditionError, "freeze_final"),
    ("loss=ce", PreconditionError, "labels"),
    ("train_data=/nonexistent/train.npz", InputError, "does not exist"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        quantize(W4A4 + ",qat{" + options + "}")


@pytest.mark.parametrize("arrays,match", [
    ({"other": np.zeros((8, 1, 8, 8), np.float32)}, r"lacks model input\(s\) \['x'\]"),
    ({"x": np.zeros((8, 1, 8, 8), np.float32), "labels": np.zeros(7, np.int64)}, "disagree on the number of samples"),
    ({"x": np.array([{"a": 1}] * 8, dtype=object)}, "pickle|object"),
])
def test_bad_train_data_is_refused_without_unpickling(tmp_path, arrays, match):
    path = tmp_path / "train.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=match):
        quantize(W4A4 + f",qat{{steps=2,train_data={path}}}")


def test_unsupported_op_is_refused():
    proto = build_model("""
    agraph (float[N,4] x) => (float[N,4] y) {
        h = MatMul (x, w)
        y = Softplus (h)
    }""", {"w": randn(rng(0), 4, 4)})
    with pytest.raises(PreconditionError, match="Softplus"):
        optimize(proto, {"x": randn(rng(1), 16, 4)}, pipeline="plan,calibrate,qat{steps=2}", holdout=0,
                 check_fusion=False)


def test_needs_calibration_first():
    with pytest.raises(PreconditionError, match="calibrated"):
        quantize("canonicalize,plan,qat{steps=2}")


def test_cli_finetune(tmp_path):
    import onnx

    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(classifier(), str(model))
    np.savez(calib, **samples(64))
    res = CliRunner().invoke(main, ["finetune", str(model), "-o", str(out), "--calib-data", str(calib),
                                    "--passes", W4A4, "--steps", "12", "--batch-size", "16", "--dampen", "0.1",
                                    "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "qat: steps=12" in res.output and out.exists() and (tmp_path / "rep" / "oscillations.json").exists()

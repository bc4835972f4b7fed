"""Models ONNX Runtime cannot load or run are refused up front, in one line naming ORT's reason.

Issue 23: a custom-domain op, opset 99 or token ids outside the vocabulary were reported as "pass 'fold-bn'
failed" with ORT's multi-line log and a reproducer folder beside the output; a model ORT rejects with nothing
to quantize gave a traceback from `evaluate_fidelity`. `optimize` now runs the float model once (one sample)
before any pass, and the reproducer stays for qonnx's own failures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from qonnx.app.api import evaluate_fidelity, optimize
from qonnx.app.cli import main
from qonnx.data.calibration import open_calibration
from qonnx.errors import InputError, QonnxError
from qonnx.infra.manager import PassManager
from tests.helpers import (
    build_model,
    conv_bn_relu_conv,
    import_proto,
    make_int_input_model,
    make_samples,
    save_model,
    save_npz,
)


def _custom_op() -> onnx.ModelProto:
    model = conv_bn_relu_conv()
    model.graph.node[2].op_type, model.graph.node[2].domain = "MyRelu", "custom.dom"
    model.opset_import.append(helper.make_opsetid("custom.dom", 1))
    return model


def _opset_99() -> onnx.ModelProto:
    model = conv_bn_relu_conv()
    model.opset_import[0].version = 99
    return model


def _nothing_to_quantize() -> onnx.ModelProto:
    model = build_model("""
    agraph (float[1,4] x) => (float[1,4] y) {
        y = Relu (x)
    }""")
    model.graph.node[0].op_type, model.graph.node[0].domain = "Nope", "custom.dom"
    model.opset_import.append(helper.make_opsetid("custom.dom", 1))
    return model


def _case(kind: str, tmp_path: Path) -> tuple[Path, Path, str]:
    """(model, calibration data, a word of ORT's reason) for a model ORT cannot run."""
    if kind == "ids-outside-vocabulary":
        model = make_int_input_model()  # a 20-row embedding table
        data = {"ids": np.full((8, 5), 50, np.int32)}
        needle = "idx=50"
    else:
        model = {"custom-domain": _custom_op, "opset-99": _opset_99, "nothing-to-quantize": _nothing_to_quantize}[kind]()
        data = make_samples(model, 12)
        needle = {"custom-domain": "custom.dom:MyRelu", "opset-99": "99", "nothing-to-quantize": "custom.dom:Nope"}[kind]
    return save_model(model, tmp_path / "m.onnx"), save_npz(tmp_path / "c.npz", data), needle


KINDS = ["custom-domain", "opset-99", "ids-outside-vocabulary", "nothing-to-quantize"]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert len(lines[0]) < 300, lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_model_ort_cannot_run_is_refused_before_any_pass(tmp_path, kind, monkeypatch):
    model, data, needle = _case(kind, tmp_path)
    monkeypatch.setattr(PassManager, "run", lambda *a, **k: pytest.fail("a pass ran"))
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, ["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz"])
    finally:
        os.chdir(old)
    assert result.exit_code == 2, (result.output, result.exception)
    line = _one_line(result.stderr)
    assert "ONNX Runtime" in line and needle in line, line
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "out.onnx.reproducer").exists()


@pytest.mark.parametrize("kind", ["custom-domain", "ids-outside-vocabulary"])
def test_console_script_prints_one_line_and_no_ort_log(tmp_path, kind):
    _case(kind, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "qonnx.app.cli", "optimize", "m.onnx", "-o", "out.onnx",
                           "--calib-data", "c.npz"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "ONNX Runtime" in _one_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


def test_refusal_without_calibration_data_uses_seeded_inputs(tmp_path):
    save_model(_custom_op(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="ONNX Runtime cannot load the input model.*custom.dom:MyRelu") as err:
        optimize(tmp_path / "m.onnx", pipeline="canonicalize", reproducer_dir=tmp_path / "rep")
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert not (tmp_path / "rep").exists()


def test_a_model_ort_runs_is_not_refused(tmp_path):
    model = conv_bn_relu_conv()
    result = optimize(model, make_samples(model, 8), pipeline="canonicalize,fold-bn")
    assert [r.name for r in result.records] == ["canonicalize", "fold-bn"]


def test_evaluate_fidelity_reports_ort_failures_in_one_line():
    good = conv_bn_relu_conv()
    data = open_calibration(make_samples(good, 4), import_proto(good))
    bad = _custom_op().SerializeToString()
    with pytest.raises(InputError, match="input model") as err:
        evaluate_fidelity(bad, good.SerializeToString(), data)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(QonnxError, match="quantized model") as err:
        evaluate_fidelity(good.SerializeToString(), bad, data)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300

"""The core install is torch-free: with torch blocked, qonnx imports, lists passes and quantizes, and the qat
pass fails with the install hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from tests.helpers import conv_bn_relu_conv, make_samples

BLOCK = "import sys; sys.modules['torch'] = None\n"


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_core_works_and_qat_explains_without_torch(tmp_path):
    onnx.save(conv_bn_relu_conv(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", **make_samples(conv_bn_relu_conv(), 16))
    code = """
from click.testing import CliRunner
from qonnx.app.cli import main
import qonnx, qonnx.passes
r = CliRunner().invoke(main, ["passes"])
assert r.exit_code == 0 and "qat:" in r.output, r.output
r = CliRunner().invoke(main, ["optimize", "m.onnx", "-o", "q.onnx", "--calib-data", "c.npz", "--preset", "w8a8-static"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(main, ["optimize", "m.onnx", "-o", "t.onnx", "--calib-data", "c.npz",
                              "--passes", "canonicalize,plan,calibrate,qat{steps=2}"])
assert r.exit_code == 2, r.output
print(r.output)
assert "torch" not in sys.modules or sys.modules["torch"] is None
"""
    result = run_blocked(code, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "pip install qonnx-opt[qat]" in result.stdout + result.stderr
    assert (tmp_path / "q.onnx").exists() and not (tmp_path / "t.onnx").exists()

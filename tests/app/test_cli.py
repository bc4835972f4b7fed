"""The `qonnx` command line: optimize, bench, passes; bad inputs give a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import external_data_helper

from qonnx.app.cli import main
from qonnx.passes import PRESETS, REGISTRY, parse_pipeline
from tests.helpers import (
    conv_bn_relu_conv,
    feed_for,
    file_state,
    make_if_model,
    make_int_input_model,
    make_samples,
    op_counts,
    residual_block,
    run_ort,
    save_model,
    save_npz,
    sqnr,
)

QONNX = shutil.which("qonnx") or str(Path(sys.executable).parent / "qonnx")


@pytest.fixture
def work(tmp_path):
    """A folder with a float model m.onnx and calibration data c.npz for it."""
    model = conv_bn_relu_conv()
    save_model(model, tmp_path / "m.onnx")
    save_npz(tmp_path / "c.npz", make_samples(model, 12))
    return tmp_path


def invoke(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)


def run_cli(args, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real console script, as a user runs it."""
    return subprocess.run([QONNX, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------- optimize
def test_optimize_writes_a_model_and_prints_the_summary(work):
    before = file_state(work / "m.onnx")
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], work)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"pipeline: {PRESETS['w8a8'][0]}" in out
    assert "quantized layers: 2" in out and "2 QLinearConv" in out
    assert "size: " in out and "->" in out
    assert "fidelity on held-out samples:" in out and "sqnr_db=" in out
    assert "time per pass: canonicalize" in out
    assert "wrote out.onnx" in out
    assert file_state(work / "m.onnx") == before
    exported = onnx.load(str(work / "out.onnx"))
    onnx.checker.check_model(exported)
    assert op_counts(exported)["QuantizeLinear"] >= 2
    meta = {p.key: p.value for p in exported.metadata_props}
    assert meta["qonnx.seed"] == "0"
    assert not (work / "out.onnx.reproducer").exists()


@pytest.mark.parametrize(
    ("args", "pipeline"),
    [
        (["--preset", "w8a8-minmax"], "canonicalize,fold-bn,plan,embeddings,calibrate{method=minmax},bias-correction"),
        (["--passes", "fold-bn,plan{per_channel=false},calibrate{method=percentile}"],
         "fold-bn,plan{per_channel=false},calibrate{method=percentile}"),
        (["--passes", "canonicalize,fold-bn"], "canonicalize,fold-bn"),
    ],
)
def test_optimize_with_preset_or_passes(work, args, pipeline):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz", *args], work)
    assert result.exit_code == 0, result.output
    assert f"pipeline: {pipeline}" in result.stdout
    meta = {p.key: p.value for p in onnx.load(str(work / "out.onnx")).metadata_props}
    assert meta["qonnx.pipeline"] == parse_pipeline(pipeline).canonical()


def test_optimize_data_free_needs_no_calibration_data(work):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--data-free"], work)
    assert result.exit_code == 0, result.output
    assert f"pipeline: {PRESETS['dfq'][0]}" in result.stdout
    assert "quantized layers: 2" in result.stdout
    assert "fidelity on held-out samples" not in result.stdout  # nothing to measure it on


def test_optimize_data_free_with_calibration_data_is_refused(work):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--data-free", "--calib-data", "c.npz"], work)
    assert result.exit_code != 0
    assert "--data-free" in result.output and not (work / "out.onnx").exists()


def test_optimize_json_report_and_seed(work):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz", "--seed", "7",
                     "--json", "report.json"], work)
    assert result.exit_code == 0, result.output
    report = json.loads((work / "report.json").read_text())
    assert report["pipeline"] == PRESETS["w8a8"][0]
    assert report["layers"] == 2 and report["integer_kernels"] == 2
    assert [p["name"] for p in report["passes"]] == PRESETS["w8a8"][0].split(",")
    assert report["size_before"] > 0 and report["size_after"] > 0
    meta = {p.key: p.value for p in onnx.load(str(work / "out.onnx")).metadata_props}
    assert meta["qonnx.seed"] == "7"


def test_real_console_script_matches_the_in_process_result(work):
    # The static preset: the default one's keep-fast decisions depend on machine timings.
    proc = run_cli(["optimize", "m.onnx", "-o", "sub.onnx", "--calib-data", "c.npz", "--preset", "w8a8-static"], work)
    assert proc.returncode == 0, proc.stderr
    assert "wrote sub.onnx" in proc.stdout
    assert proc.stderr.strip() == ""
    result = invoke(["optimize", "m.onnx", "-o", "inproc.onnx", "--calib-data", "c.npz", "--preset", "w8a8-static"],
                    work)
    assert result.exit_code == 0, result.output
    # Determinism across processes: byte-identical output.
    assert (work / "sub.onnx").read_bytes() == (work / "inproc.onnx").read_bytes()


def test_quantized_output_is_close_to_float(work):
    assert invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], work).exit_code == 0
    model = onnx.load(str(work / "m.onnx"))
    feed = feed_for(model, seed=3, batch=1)
    ref = run_ort(model, feed)[0]
    got = run_ort(onnx.load(str(work / "out.onnx")), feed, "all")[0]
    assert sqnr(ref, got) > 25.0


def test_if_model_is_processed_without_crash(tmp_path):
    model = make_if_model()
    save_model(model, tmp_path / "if.onnx")
    save_npz(tmp_path / "c.npz", make_samples(model, 8))
    result = invoke(["optimize", "if.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], tmp_path)
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert "If" in op_counts(out)
    for seed, sign in ((1, 1.0), (2, -1.0)):  # exercise both branches
        feed = {"x": np.abs(feed_for(model, seed=seed, batch=1)["x"]) * sign}
        ref = run_ort(model, feed)[0]
        got = run_ort(out, feed, "all")[0]
        assert sqnr(ref, got) > 25.0


def test_int32_input_model_is_processed_without_crash(tmp_path):
    model = make_int_input_model()
    save_model(model, tmp_path / "ids.onnx")
    ids = np.random.default_rng(0).integers(0, 20, size=(8, 5)).astype(np.int32)
    np.savez(tmp_path / "c.npz", ids=ids)
    result = invoke(["optimize", "ids.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], tmp_path)
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    feed = {"ids": ids[:1]}
    assert sqnr(run_ort(model, feed)[0], run_ort(out, feed, "all")[0]) > 25.0


def test_resnet_style_block_is_processed(tmp_path):
    model = residual_block()
    save_model(model, tmp_path / "res.onnx")
    save_npz(tmp_path / "c.npz", make_samples(model, 8))
    proc = run_cli(["optimize", "res.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_external_data_inside_the_model_folder_is_loaded(tmp_path):
    model = conv_bn_relu_conv()
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    assert (tmp_path / "ext.bin").exists()
    save_npz(tmp_path / "c.npz", make_samples(model, 8))
    result = invoke(["optimize", "ext.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], tmp_path)
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- bad inputs
def _external_outside(tmp_path: Path, location: str) -> Path:
    model = conv_bn_relu_conv()
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "outside.bin").write_bytes(np.zeros(8 * 3 * 3 * 3, np.float32).tobytes())
    for t in model.graph.initializer:
        if t.name == "w1":
            external_data_helper.set_external_data(t, location=location)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            t.ClearField("float_data")
    path = tmp_path / "sub" / "ext.onnx"
    onnx.save(model, str(path))
    return path


def _bad_model(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """(model path, words the error must contain) for a bad model input."""
    if kind == "not-onnx":
        p = tmp_path / "notes.onnx"
        p.write_text("this is a text file, not a model\n")
        return p, ["notes.onnx"]
    if kind == "truncated":
        data = (tmp_path / "m.onnx").read_bytes()
        p = tmp_path / "half.onnx"
        p.write_bytes(data[: len(data) // 2])
        return p, ["half.onnx"]
    if kind == "missing":
        return tmp_path / "nope.onnx", ["nope.onnx", "does not exist"]
    if kind == "external-outside":
        return _external_outside(tmp_path, "../outside.bin"), ["../outside.bin"]
    if kind == "external-absolute":
        return _external_outside(tmp_path, str(tmp_path / "outside.bin")), ["outside.bin"]
    if kind == "already-quantized":
        src = tmp_path / "q_src.onnx"
        assert invoke(["optimize", "m.onnx", "-o", src.name, "--calib-data", "c.npz"], tmp_path).exit_code == 0
        return src, ["already quantized"]
    if kind == "empty-file":
        p = tmp_path / "empty.onnx"
        p.write_bytes(b"")
        return p, ["empty.onnx"]
    raise AssertionError(kind)


BAD_MODELS = ["not-onnx", "truncated", "missing", "external-outside", "external-absolute", "already-quantized",
              "empty-file"]


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_gives_a_one_line_error(work, kind):
    path, needles = _bad_model(kind, work)
    before = file_state(path) if path.exists() else None
    calib_before = file_state(work / "c.npz")
    proc = run_cli(["optimize", path, "-o", "out.onnx", "--calib-data", "c.npz"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, *needles)
    if before is not None:
        assert file_state(path) == before
    assert file_state(work / "c.npz") == calib_before
    assert not (work / "out.onnx").exists()


def _bad_data(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    good = make_samples(conv_bn_relu_conv(), 12)
    x = good["x"]
    p = tmp_path / f"{kind}.npz"
    if kind == "wrong-names":
        np.savez(p, input_1=x)
        return p, ["'x'", "input_1"]
    if kind == "extra-name":
        np.savez(p, x=x, mask=x)
        return p, ["mask"]
    if kind == "wrong-shape":
        np.savez(p, x=x[:, :, :7, :7])
        return p, ["shape"]
    if kind == "wrong-dtype":
        np.savez(p, x=x.astype(np.float64))
        return p, ["dtype", "float64"]
    if kind in ("nan", "inf"):
        x = x.copy()
        x[4, 1, 2, 3] = np.nan if kind == "nan" else np.inf
        np.savez(p, x=x)
        return p, ["NaN or Inf"]
    if kind == "empty":
        np.savez(p, x=x[:0])
        return p, ["empty"]
    if kind == "pickled":
        objs = np.empty((4,), dtype=object)
        objs[:] = [{"a": 1}] * 4
        np.savez(p, x=objs)
        return p, ["pickle"]
    if kind == "not-zip":
        p.write_text("not a zip archive")
        return p, [p.name]
    if kind == "missing":
        return tmp_path / "absent.npz", ["absent.npz"]
    raise AssertionError(kind)


BAD_DATA = ["wrong-names", "extra-name", "wrong-shape", "wrong-dtype", "nan", "inf", "empty", "pickled", "not-zip",
            "missing"]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_calibration_data_gives_a_one_line_error(work, kind):
    data, needles = _bad_data(kind, work)
    model_before = file_state(work / "m.onnx")
    data_before = file_state(data) if data.exists() else None
    proc = run_cli(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", data], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, *needles)
    assert file_state(work / "m.onnx") == model_before
    if data_before is not None:
        assert file_state(data) == data_before
    assert not (work / "out.onnx").exists()


@pytest.mark.parametrize("kind", ["wrong-names", "nan", "pickled", "empty"])
def test_bad_calibration_data_in_process(work, kind):
    data, needles = _bad_data(kind, work)
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", data], work)
    assert result.exit_code not in (0, None)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_output_equal_to_input_is_refused(work):
    before = file_state(work / "m.onnx")
    for target in ("m.onnx", "./m.onnx", str(work / "m.onnx")):
        proc = run_cli(["optimize", "m.onnx", "-o", target, "--calib-data", "c.npz"], work)
        assert proc.returncode != 0
        assert_one_line_error(proc.stderr, "input")
        assert file_state(work / "m.onnx") == before


def test_output_equal_to_the_calibration_data_is_refused(work):
    # The calibration file is an input too: writing the model over it destroys the user's data.
    before = file_state(work / "c.npz")
    proc = run_cli(["optimize", "m.onnx", "-o", "c.npz", "--calib-data", "c.npz"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, "c.npz")
    assert file_state(work / "c.npz") == before


@pytest.mark.parametrize("target", ["no_such_dir/out.onnx", "m.onnx/out.onnx", "c.npz/deeper/out.onnx"])
def test_output_directory_missing_or_not_a_directory(work, target):
    # A path under a regular file cannot be created, even by root.
    before = file_state(work / "m.onnx")
    proc = run_cli(["optimize", "m.onnx", "-o", target, "--calib-data", "c.npz"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, str(Path(target).parent))
    assert file_state(work / "m.onnx") == before


def test_output_path_is_a_directory(work):
    (work / "outdir").mkdir()
    proc = run_cli(["optimize", "m.onnx", "-o", "outdir", "--calib-data", "c.npz"], work)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_missing_calibration_data_for_calibrate(work):
    proc = run_cli(["optimize", "m.onnx", "-o", "out.onnx"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, "smooth", "--calib-data")  # the first pass that needs data
    assert not (work / "out.onnx").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--passes", "fold-bn,no-such-pass"], ["no-such-pass"]),
        (["--passes", "plan{per_chanel=false}"], ["plan", "per_chanel"]),
        (["--passes", "calibrate{method=kmeans}"], ["calibrate", "method"]),
        (["--preset", "w9a9"], ["w9a9"]),
        (["--preset", "w8a8", "--passes", "fold-bn"], ["preset"]),
    ],
)
def test_bad_pipelines(work, args, needles):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz", *args], work)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert not (work / "out.onnx").exists()


# --------------------------------------------------------------------------- passes
def test_passes_lists_every_registered_pass(work):
    proc = run_cli(["passes"], work)
    assert proc.returncode == 0
    for name, cls in REGISTRY.items():
        assert f"{name}: {cls.summary}" in proc.stdout
    assert "presets:" in proc.stdout and "w8a8" in proc.stdout


# --------------------------------------------------------------------------- bench
def test_bench_writes_json_rows(work):
    assert invoke(["optimize", "m.onnx", "-o", "q.onnx", "--calib-data", "c.npz"], work).exit_code == 0
    before = file_state(work / "m.onnx"), file_state(work / "q.onnx")
    result = invoke(["bench", "m.onnx", "q.onnx", "--data", "c.npz", "--threads", "1,2", "--runs", "5",
                     "--json", "out.json"], work)
    assert result.exit_code == 0, result.output
    rows = json.loads((work / "out.json").read_text())
    assert [Path(r["model"]).name for r in rows] == ["m.onnx", "q.onnx"]
    for row in rows:
        assert row["size_bytes"] == (work / Path(row["model"]).name).stat().st_size
        for t in (1, 2):
            assert row[f"latency_ms_t{t}"] > 0
            assert f"latency_ratio_t{t}" in row
    assert rows[0]["fidelity"] is None
    fid = rows[1]["fidelity"]
    assert fid["samples"] == 12 and fid["sqnr_db"] > 25
    assert "q.onnx" in result.stdout and "SQNR" in result.stdout
    assert (file_state(work / "m.onnx"), file_state(work / "q.onnx")) == before


def test_bench_without_data_uses_generated_inputs(work):
    result = invoke(["bench", "m.onnx", "--runs", "3"], work)
    assert result.exit_code == 0, result.output
    assert "m.onnx" in result.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--threads", "0"], ["thread"]),
        (["--threads", "two"], ["two"]),
    ],
)
def test_bench_bad_options(work, args, needles):
    proc = run_cli(["bench", "m.onnx", "--runs", "2", *args], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, *needles)


def test_bench_with_a_non_onnx_candidate(work):
    (work / "junk.onnx").write_text("junk")
    proc = run_cli(["bench", "m.onnx", "junk.onnx", "--runs", "2"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, "junk.onnx")


def test_bench_with_nan_data(work):
    data, needles = _bad_data("nan", work)
    proc = run_cli(["bench", "m.onnx", "--data", data, "--runs", "2"], work)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, *needles)


def test_version_and_help(work):
    result = invoke(["--version"], work)
    assert result.exit_code == 0 and "qonnx" in result.stdout
    result = invoke(["optimize", "--help"], work)
    assert result.exit_code == 0 and "--calib-data" in result.stdout

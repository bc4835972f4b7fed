"""No path qonnx writes (-o, --json, the reproducer folder) may replace a file it reads; interrupts never exit 0.

Issue 23: `-o` naming the model's external-data file, or `--json` naming the model, the calibration data or `-o`,
exited 0 after destroying the input. Every refusal here is one `error:` line (under 300 characters), exit 2, given
before any work starts (no output, no reproducer).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from qonnx.app import api, paths
from qonnx.app.api import optimize, quantize_file
from qonnx.errors import InputError
from tests.app.test_cli import invoke
from tests.helpers import conv_bn_relu_conv, file_state, make_samples, save_model, save_npz


@pytest.fixture
def work(tmp_path):
    """m.onnx, c.npz, ext/model.onnx with its weights in ext/w.bin, and a calibration folder calib/."""
    model = conv_bn_relu_conv()
    save_model(model, tmp_path / "m.onnx")
    samples = make_samples(model, 8)
    save_npz(tmp_path / "c.npz", samples)
    (tmp_path / "ext").mkdir()
    onnx.save(conv_bn_relu_conv(), str(tmp_path / "ext" / "model.onnx"), save_as_external_data=True,
              location="w.bin", size_threshold=0)
    (tmp_path / "calib").mkdir()
    for i, x in enumerate(samples["x"]):
        np.save(tmp_path / "calib" / f"{i:03d}.npy", x)
    return tmp_path


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) < 300, lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def inputs_state(work: Path) -> dict[str, tuple[bytes, int]]:
    files = [work / "m.onnx", work / "c.npz", work / "ext" / "model.onnx", work / "ext" / "w.bin",
             *sorted((work / "calib").iterdir())]
    return {str(p): file_state(p) for p in files}


def nothing_written(work: Path, output: str = "out.onnx") -> None:
    assert not (work / output).exists() or (work / output).is_dir()
    assert not (work / (output + ".reproducer")).exists()


# --------------------------------------------------------------------------- -o
def test_output_naming_the_external_data_file_is_refused(work):
    before = inputs_state(work)
    result = invoke(["optimize", "ext/model.onnx", "-o", "ext/w.bin", "--calib-data", "c.npz"], work)
    one_line_error(result, "w.bin", "external data")
    assert inputs_state(work) == before
    onnx.load(str(work / "ext" / "model.onnx"))  # still loads with its weights


@pytest.mark.parametrize("target", ["m.onnx", "c.npz", "ext/w.bin", "calib/003.npy"])
def test_output_hard_linked_to_an_input_is_refused(work, target):
    os.link(work / target, work / "link.onnx")
    before = inputs_state(work)
    result = invoke(["optimize", "ext/model.onnx" if target.startswith("ext") else "m.onnx", "-o", "link.onnx",
                     "--calib-data", "calib" if target.startswith("calib") else "c.npz"], work)
    # Hard-linked external data is refused by the model reader itself, before the output is compared with it.
    one_line_error(result, *(["hard link"] if target.startswith("ext") else ["link.onnx", "hard link"]))
    assert inputs_state(work) == before


def test_output_naming_a_file_of_the_calibration_folder_is_refused(work):
    before = inputs_state(work)
    result = invoke(["optimize", "m.onnx", "-o", "calib/002.npy", "--calib-data", "calib"], work)
    one_line_error(result, "002.npy", "calibration")
    assert inputs_state(work) == before


def test_output_symlink_to_the_external_data_is_refused(work):
    (work / "alias.bin").symlink_to(work / "ext" / "w.bin")
    result = invoke(["optimize", "ext/model.onnx", "-o", "alias.bin", "--calib-data", "c.npz"], work)
    one_line_error(result, "alias.bin")


@pytest.mark.parametrize("option", ["-o", "--json"])
def test_output_naming_an_existing_folder_is_one_line(work, option):
    (work / "outdir").mkdir()
    args = ["-o", "outdir"] if option == "-o" else ["-o", "out.onnx", "--json", "outdir"]
    result = invoke(["optimize", "m.onnx", *args, "--calib-data", "c.npz"], work)
    one_line_error(result, "outdir", "folder")
    nothing_written(work)


# --------------------------------------------------------------------------- --json
@pytest.mark.parametrize("target", ["m.onnx", "c.npz", "out.onnx", "calib/001.npy"])
def test_json_naming_an_input_or_the_output_is_refused(work, target):
    before = inputs_state(work)
    calib = "calib" if target.startswith("calib") else "c.npz"
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", calib, "--json", target], work)
    one_line_error(result, target.split("/")[-1])
    assert inputs_state(work) == before
    nothing_written(work)  # checked before any work starts


def test_json_naming_the_external_data_file_is_refused(work):
    before = inputs_state(work)
    result = invoke(["optimize", "ext/model.onnx", "-o", "out.onnx", "--calib-data", "c.npz",
                     "--json", "ext/w.bin"], work)
    one_line_error(result, "w.bin")
    assert inputs_state(work) == before
    nothing_written(work)


def test_json_in_a_missing_folder_is_refused_before_any_work(work):
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz", "--json", "nope/r.json"], work)
    one_line_error(result, "nope")
    nothing_written(work)


def test_json_write_failure_is_one_line(work, monkeypatch):
    """A full disk while the report is written: one error line and exit 2, not a traceback after `wrote OUT`."""
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".r.json.tmp-{os.getpid()}"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--passes", "canonicalize", "--json", "r.json"], work)
    one_line_error(result, "r.json")
    assert not (work / "r.json").exists()
    assert not [p.name for p in work.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("command", [
    ["inspect", "m.onnx", "--json", "m.onnx"],
    ["bench", "m.onnx", "--data", "c.npz", "--json", "c.npz"],
    ["attribute", "m.onnx", "--calib-data", "c.npz", "--json", "m.onnx"],
    ["inspect", "m.onnx", "--json", "outdir"],
])
def test_other_commands_apply_the_rule_to_their_json(work, command):
    (work / "outdir").mkdir()
    before = inputs_state(work)
    one_line_error(invoke(command, work), command[-1])
    assert inputs_state(work) == before


def test_error_lines_are_capped_under_300_characters(work, monkeypatch):
    def huge_error(*args, **kwargs):
        raise InputError("calibration data has unknown inputs " + ", ".join(f"'k{i}'" for i in range(5000)))

    monkeypatch.setattr(api, "quantize_file", huge_error)
    one_line_error(invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], work), "unknown inputs")


# --------------------------------------------------------------------------- reproducer folder
def test_reproducer_folder_holding_the_model_is_refused(work):
    (work / "out.onnx.reproducer").mkdir()
    save_model(conv_bn_relu_conv(), work / "out.onnx.reproducer" / "before.onnx")
    before = file_state(work / "out.onnx.reproducer" / "before.onnx")
    result = invoke(["optimize", "out.onnx.reproducer/before.onnx", "-o", "out.onnx", "--calib-data", "c.npz"], work)
    one_line_error(result, "reproducer")
    assert file_state(work / "out.onnx.reproducer" / "before.onnx") == before
    assert not (work / "out.onnx").exists()


def test_reproducer_folder_that_is_the_calibration_folder_is_refused(work):
    (work / "calib").rename(work / "out.onnx.reproducer")
    result = invoke(["optimize", "m.onnx", "-o", "out.onnx", "--calib-data", "out.onnx.reproducer"], work)
    one_line_error(result, "reproducer", "calibration")
    assert not (work / "out.onnx").exists()


# --------------------------------------------------------------------------- the Python API and the rule itself
def test_python_api_applies_the_same_rule(work):
    with pytest.raises(InputError, match="external data"):
        quantize_file(work / "ext" / "model.onnx", work / "ext" / "w.bin", work / "c.npz")
    with pytest.raises(InputError, match="report"):
        quantize_file(work / "m.onnx", work / "out.onnx", work / "c.npz", report_path=work / "c.npz")
    (work / "rep").mkdir()
    save_model(conv_bn_relu_conv(), work / "rep" / "before.onnx")
    with pytest.raises(InputError, match="reproducer"):
        optimize(work / "rep" / "before.onnx", work / "c.npz", reproducer_dir=work / "rep")
    assert not (work / "out.onnx").exists()


def test_run_reads_lists_the_model_its_external_data_and_the_calibration_files(work):
    reads = {r.path for r in paths.run_reads(work / "ext" / "model.onnx", work / "calib")}
    assert (work / "ext" / "model.onnx").resolve() in reads
    assert (work / "ext" / "w.bin").resolve() in reads
    assert (work / "calib" / "005.npy").resolve() in reads


def test_refusals_stay_one_short_line_with_long_paths(work):
    deep = work
    for _ in range(6):
        deep = deep / ("d" * 40)
    deep.mkdir(parents=True)
    model = save_model(conv_bn_relu_conv(), deep / "model.onnx")
    with pytest.raises(InputError) as err:
        paths.check_outputs(paths.run_reads(model, None), [paths.Target(model, "output")])
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message


def test_fresh_outputs_do_not_parse_the_model(work, monkeypatch):
    """The common case (outputs that do not exist yet) costs no read of the model."""
    monkeypatch.setattr(paths, "run_reads", lambda *a, **k: pytest.fail("reads listed for fresh outputs"))
    paths.check_run(work / "m.onnx", work / "c.npz", [paths.Target(work / "new.onnx", "output")])


# --------------------------------------------------------------------------- interrupts
SLOW_WRITE = r"""
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    if ".out.onnx.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
        print("writing", flush=True)
        time.sleep(30)
    real_fsync(fd)
os.fsync = slow_fsync
from qonnx.app.cli import main
main(sys.argv[1:], prog_name="qonnx")
"""

SWALLOWED = r"""
import os, signal, sys, time
import qonnx.app.api as api
real_save = api.save_model
def save_model(proto, path):
    try:  # library code that swallows the interrupt (a __del__, a callback): the run must still fail
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        pass
    return real_save(proto, path)
api.save_model = save_model
from qonnx.app.cli import main
main(sys.argv[1:], prog_name="qonnx")
"""


def _start(script: str, work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, "optimize", "m.onnx", "-o", "out.onnx", "--passes",
                             "canonicalize"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_during_the_write_exits_nonzero_and_leaves_no_temporary_file(work, signum, code):
    proc = _start(SLOW_WRITE, work)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().strip() == "writing", "the run never reached the write"
        time.sleep(0.1)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, (proc.returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "interrupt" in lines[0], stderr
    assert not (work / "out.onnx").exists()
    assert not [p.name for p in work.iterdir() if ".tmp-" in p.name]


def test_a_swallowed_interrupt_still_fails_the_run(work):
    proc = _start(SWALLOWED, work)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "interrupt" in stderr and "Traceback" not in stderr

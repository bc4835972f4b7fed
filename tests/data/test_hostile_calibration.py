"""Hostile or broken calibration data (issue 23): refused in one short line, never a traceback, a hang or a
read of what a header merely declares."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qonnx.data import calibration as calibration_module
from qonnx.data.calibration import InputSpec, open_calibration
from qonnx.errors import InputError
from tests.helpers import build_model, conv_bn_relu_conv, import_proto, matmul_mlp, randn, rng

BOMB_SHAPE = (1, 3, 32768, 21846)  # 8.6 GB of float32, declared in a header of 128 bytes


@pytest.fixture(scope="module")
def conv_ir():
    return import_proto(conv_bn_relu_conv())  # x: float32 [1,3,8,8]


@pytest.fixture(scope="module")
def mlp_ir():
    return import_proto(matmul_mlp())  # x: float32 [N,16]


@pytest.fixture(scope="module")
def dynamic_ir():
    """A conv whose input has dynamic batch, height and width."""
    return import_proto(build_model("""
    agraph (float[N,3,H,W] x) => (float[N,4,H,W] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }""", {"w": randn(rng(5), 4, 3, 3, 3, scale=0.3)}))


@pytest.fixture(scope="module")
def bf16_ir():
    return import_proto(build_model("""
    agraph (bfloat16[N,4] x) => (float[N,4] y) {
        y = Cast <to = 1> (x)
    }"""))


def npy_header(shape, descr: str = "<f4", fortran: bool = False) -> bytes:
    """The bytes of an .npy header (format 1.0) declaring `shape`, written by hand: nothing of that size exists."""
    text = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    pad = -(10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 300, (len(message), message[:400])
    return message


def collect(cs, batch_size: int = 4) -> list[dict[str, np.ndarray]]:
    return list(cs.batches(batch_size))


@pytest.fixture
def npy_module():
    return importlib.import_module("qonnx.data.npy")


@pytest.fixture
def bytes_read(monkeypatch):
    """Bytes handed out by every read of a zip member (decompressed)."""
    count = [0]
    original = zipfile.ZipExtFile.read

    def counting(self, n=-1):
        data = original(self, n)
        count[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    return count


def call_with_timeout(fn, fifo: Path | None = None, timeout: float = 5.0):
    """fn() in a thread; fails (and unblocks a reader stuck on `fifo`) instead of hanging the suite."""
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if fifo is not None:
            try:  # a writer that opens and closes lets the blocked reader see end-of-file
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            thread.join(timeout)
        pytest.fail(f"hung for {timeout} s")
    return outcome


# --------------------------------------------------------------------------- headers before rows
def test_zip_bomb_is_refused_from_its_header_without_reading_the_row(tmp_path, conv_ir, bytes_read):
    path = write_zip(tmp_path / "bomb.npz", {"x.npy": npy_header(BOMB_SHAPE) + b"\0" * 64})
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)  # refused on opening: no batch was asked for
    message = one_line(info.value)
    assert "'x'" in message and "32768" in message and "shape" in message
    assert bytes_read[0] < 1024  # the header only


def test_row_over_the_limit_for_dynamic_dims_is_refused_on_opening(tmp_path, dynamic_ir, bytes_read, npy_module):
    path = write_zip(tmp_path / "bomb.npz", {"x.npy": npy_header(BOMB_SHAPE) + b"\0" * 64})
    with pytest.raises(InputError) as info:
        open_calibration(path, dynamic_ir)
    message = one_line(info.value)
    assert "'x'" in message and "limit" in message
    assert bytes_read[0] < 1024
    assert npy_module.MAX_ROW_BYTES == 256 << 20


def test_row_limit_applies_to_dynamic_dims(tmp_path, monkeypatch, dynamic_ir, npy_module):
    monkeypatch.setattr(npy_module, "MAX_ROW_BYTES", 1000)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 10, 10), np.float32))  # 1200 bytes a row
    with pytest.raises(InputError, match="limit"):
        open_calibration(tmp_path / "c.npz", dynamic_ir)
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 3, 8, 8), np.float32))  # 768 bytes a row
    assert len(open_calibration(tmp_path / "ok.npz", dynamic_ir)) == 2


def test_header_declaring_more_than_the_member_holds_is_refused_on_opening(tmp_path, conv_ir):
    body = np.zeros((4, 3, 8, 8), np.float32).tobytes()
    path = write_zip(tmp_path / "c.npz", {"x.npy": npy_header((10, 3, 8, 8)) + body})
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)
    assert "truncated" in one_line(info.value)


def test_wrong_dtype_and_shape_are_refused_on_opening(tmp_path, conv_ir):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 8, 8), np.float64))
    with pytest.raises(InputError, match="float64"):
        open_calibration(tmp_path / "d.npz", conv_ir)
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 3, 7, 8), np.float32))
    with pytest.raises(InputError, match="shape"):
        open_calibration(tmp_path / "s.npz", conv_ir)


def test_rows_are_read_in_bounded_chunks(tmp_path, monkeypatch, mlp_ir, npy_module):
    monkeypatch.setattr(npy_module, "READ_CHUNK", 100)
    x = randn(rng(1), 40, 16)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    asked: list[int] = []
    original = zipfile.ZipExtFile.read

    def recording(self, n=-1):
        asked.append(n)
        return original(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", recording)
    cs = open_calibration(tmp_path / "c.npz", mlp_ir)
    asked.clear()
    got = np.concatenate([b["x"] for b in cs.batches(16)])
    np.testing.assert_array_equal(got, x)
    assert asked and max(asked) <= 100 and -1 not in asked


def test_a_sample_file_in_a_folder_is_checked_from_its_header(tmp_path, conv_ir):
    write_zip(tmp_path / "s000.npz", {"x.npy": npy_header(BOMB_SHAPE[1:]) + b"\0" * 64})
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path, conv_ir))
    message = one_line(info.value)
    assert "shape" in message and "axis" in message and "s000.npz" in message


# --------------------------------------------------------------------------- the cap on samples
def test_default_cap_is_1024_and_documented(tmp_path, mlp_ir, caplog):
    assert calibration_module.DEFAULT_MAX_SAMPLES == 1024
    assert inspect.signature(open_calibration).parameters["max_samples"].default == 1024
    assert "1024" in (open_calibration.__doc__ or "") or "DEFAULT_MAX_SAMPLES" in (open_calibration.__doc__ or "")
    x = randn(rng(2), 1030, 16)
    np.savez(tmp_path / "c.npz", x=x)
    with caplog.at_level(logging.WARNING, logger="qonnx.data.calibration"):
        cs = open_calibration(tmp_path / "c.npz", mlp_ir)
    assert len(cs) == 1024
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cs.batches(512)]), x[:1024])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "1030" in text and "1024" in text and "\n" not in text


def test_cap_and_holdout_split(tmp_path, mlp_ir, caplog):
    x = randn(rng(3), 30, 16)
    np.savez(tmp_path / "c.npz", x=x)
    with caplog.at_level(logging.WARNING):
        cs = open_calibration(tmp_path / "c.npz", mlp_ir, max_samples=20)
    assert len(cs) == 20
    assert any("30" in r.getMessage() and "20" in r.getMessage() for r in caplog.records)
    calib, held = cs.split(5)
    assert held is not None and len(calib) == 15 and len(held) == 5
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in calib.batches(4)]), x[:15])
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in held.batches(4)]), x[15:20])


def test_no_cap_and_no_notice_when_the_data_fits(tmp_path, mlp_ir, caplog):
    x = randn(rng(4), 30, 16)
    np.savez(tmp_path / "c.npz", x=x)
    with caplog.at_level(logging.WARNING):
        assert len(open_calibration(tmp_path / "c.npz", mlp_ir, max_samples=None)) == 30
        assert len(open_calibration(tmp_path / "c.npz", mlp_ir, max_samples=30)) == 30
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cap_on_a_folder_and_on_arrays(tmp_path, conv_ir, mlp_ir):
    for i in range(5):
        np.save(tmp_path / f"s{i}.npy", randn(rng(i), 1, 3, 8, 8)[0])
    assert len(open_calibration(tmp_path, conv_ir, max_samples=3)) == 3
    assert len(open_calibration({"x": randn(rng(5), 9, 16)}, mlp_ir, max_samples=4)) == 4


def test_one_shot_iterator_is_not_read_past_the_cap(mlp_ir, caplog):
    pulled = [0]

    def feeds():
        for i in range(10_000):
            pulled[0] += 1
            yield {"x": randn(rng(i), 2, 16)}

    with caplog.at_level(logging.WARNING):
        cs = open_calibration(feeds(), mlp_ir, max_samples=7)
    assert len(cs) == 7
    assert pulled[0] <= 5
    assert sum(len(b["x"]) for b in cs.batches(3)) == 7
    assert any("7" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_max_samples(mlp_ir, bad):
    with pytest.raises(InputError) as info:
        open_calibration({"x": randn(rng(0), 3, 16)}, mlp_ir, max_samples=bad)
    assert "max_samples" in one_line(info.value)


# --------------------------------------------------------------------------- regular files only
@pytest.mark.parametrize("name", ["calib.npz", "calib"])
def test_fifo_as_calibration_data_is_refused_without_hanging(tmp_path, conv_ir, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    outcome = call_with_timeout(lambda: open_calibration(fifo, conv_ir), fifo)
    error = outcome.get("error")
    assert isinstance(error, InputError), outcome
    assert "regular file" in one_line(error)


def test_device_as_calibration_data_is_refused(tmp_path, conv_ir):
    link = tmp_path / "c.npz"
    link.symlink_to("/dev/zero")
    outcome = call_with_timeout(lambda: open_calibration(link, conv_ir))
    error = outcome.get("error")
    assert isinstance(error, InputError), outcome
    assert "regular file" in one_line(error)


def test_fifo_inside_a_sample_folder_is_refused_without_hanging(tmp_path, conv_ir):
    np.save(tmp_path / "s0.npy", randn(rng(0), 3, 8, 8))
    fifo = tmp_path / "s1.npy"
    os.mkfifo(fifo)
    outcome = call_with_timeout(lambda: collect(open_calibration(tmp_path, conv_ir)), fifo)
    error = outcome.get("error")
    assert isinstance(error, InputError), outcome
    message = one_line(error)
    assert "s1.npy" in message and "regular file" in message


def test_fifo_inside_an_image_folder_is_refused_without_hanging(tmp_path, conv_ir):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    outcome = call_with_timeout(lambda: collect(open_calibration(tmp_path, conv_ir)), fifo)
    error = outcome.get("error")
    assert isinstance(error, InputError), outcome
    message = one_line(error)
    assert "b.png" in message and "regular file" in message


# --------------------------------------------------------------------------- archive errors
def _corrupt_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY") + 128 + 40  # inside the first row, past the 128-byte header
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_crc_error_in_a_member_is_one_line(tmp_path, mlp_ir):
    np.savez(tmp_path / "c.npz", x=randn(rng(6), 6, 16))
    _corrupt_data_byte(tmp_path / "c.npz")
    with pytest.raises(InputError) as info:  # a small member is checked with its header, a large one at its end
        collect(open_calibration(tmp_path / "c.npz", mlp_ir))
    message = one_line(info.value)
    assert "c.npz" in message and "'x.npy'" in message and "CRC" in message


def test_crc_error_found_at_the_end_of_a_large_member_is_one_line(tmp_path, mlp_ir):
    np.savez(tmp_path / "c.npz", x=randn(rng(6), 512, 16))  # 32 kB: beyond zipfile's read-ahead
    data = bytearray((tmp_path / "c.npz").read_bytes())
    data[data.index(b"\x93NUMPY") + 128 + 30000] ^= 0xFF
    (tmp_path / "c.npz").write_bytes(bytes(data))
    cs = open_calibration(tmp_path / "c.npz", mlp_ir)
    with pytest.raises(InputError) as info:
        collect(cs, 64)
    message = one_line(info.value)
    assert "c.npz" in message and "'x'" in message and "CRC" in message


def test_corrupt_compressed_member_is_one_line(tmp_path, mlp_ir):
    np.savez_compressed(tmp_path / "c.npz", x=randn(rng(7), 64, 16))
    data = bytearray((tmp_path / "c.npz").read_bytes())
    start = 30 + len("x.npy")  # the deflate stream follows the first local header
    for i in range(start + 200, start + 260):
        data[i] ^= 0x5A
    (tmp_path / "c.npz").write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", mlp_ir), 64)
    one_line(info.value)


def test_crc_error_in_a_folder_sample_is_one_line(tmp_path, conv_ir):
    np.savez(tmp_path / "s0.npz", x=randn(rng(8), 3, 8, 8))
    _corrupt_data_byte(tmp_path / "s0.npz")
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path, conv_ir))
    assert "s0.npz" in one_line(info.value)


def test_member_that_is_not_npy_is_refused(tmp_path, conv_ir):
    buf = npy_header((2, 3, 8, 8)) + np.zeros((2, 3, 8, 8), np.float32).tobytes()
    path = write_zip(tmp_path / "c.npz", {"x.npy": buf, "notes.txt": b"hello"})
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)
    message = one_line(info.value)
    assert "notes.txt" in message and ".npy" in message


def test_header_with_thousands_of_dims_is_one_line(tmp_path, conv_ir):
    path = write_zip(tmp_path / "c.npz", {"x.npy": npy_header((1,) * 2000)})
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)
    one_line(info.value)


def test_oversized_npy_header_is_one_line(tmp_path, conv_ir):
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 8, 8), " + " " * 20000 + "}\n"
    head = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text.encode()
    path = write_zip(tmp_path / "c.npz", {"x.npy": head})
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)
    one_line(info.value)


# --------------------------------------------------------------------------- bounded messages
def test_thousands_of_keys_give_a_short_message(tmp_path, conv_ir):
    small = npy_header((1, 1)) + b"\0\0\0\0"
    members = {f"key_{i:04d}.npy": small for i in range(5000)}
    path = write_zip(tmp_path / "c.npz", members)
    with pytest.raises(InputError) as info:
        open_calibration(path, conv_ir)
    message = one_line(info.value)
    assert "'key_0000'" in message and "5000" in message and "'x'" in message


def test_many_unknown_keys_in_arrays_give_a_short_message(conv_ir):
    feed = {f"input_{i}": np.zeros((1, 3, 8, 8), np.float32) for i in range(500)}
    with pytest.raises(InputError) as info:
        collect(open_calibration(feed, conv_ir))
    message = one_line(info.value)
    assert "'input_0'" in message and "500" in message


def test_disagreeing_counts_with_long_keys_give_a_short_message(tmp_path):
    names = [f"in_{i}_" + "z" * 200 for i in range(3)]
    inputs = ", ".join(f"float[N,2] {n}" for n in names)
    body = "\n".join(f"o{i} = Relu ({n})" for i, n in enumerate(names))
    outs = ", ".join(f"float[N,2] o{i}" for i in range(3))
    ir = import_proto(build_model(f"agraph ({inputs}) => ({outs}) {{ {body} }}"))
    np.savez(tmp_path / "c.npz", **{n: np.zeros((i + 2, 2), np.float32) for i, n in enumerate(names)})
    with pytest.raises(InputError) as info:
        open_calibration(tmp_path / "c.npz", ir)
    assert "disagree" in one_line(info.value)


def test_long_path_gives_a_short_message(tmp_path, conv_ir):
    deep = tmp_path.joinpath(*["d" * 200] * 5)
    with pytest.raises(InputError) as info:
        open_calibration(deep / "calib.npz", conv_ir)
    message = one_line(info.value)
    assert "calib.npz" in message and "does not exist" in message


def test_newline_in_a_file_name_stays_one_line(tmp_path, conv_ir):
    np.save(tmp_path / "bad\nname.npy", randn(rng(0), 3, 7, 7))
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path, conv_ir))
    message = one_line(info.value)
    assert "shape" in message and "bad\\nname.npy" in message  # the file is named, its newline escaped


# --------------------------------------------------------------------------- bfloat16
def test_bfloat16_input_is_recognised(bf16_ir):
    (spec,) = InputSpec.of_model(bf16_ir)
    assert spec.dtype is None
    assert spec.onnx_type == 16 and spec.type_name == "bfloat16"


def test_float32_npz_for_a_bfloat16_input_is_refused_on_opening(tmp_path, bf16_ir):
    np.savez(tmp_path / "c.npz", x=np.ones((3, 4), np.float32))
    with pytest.raises(InputError) as info:
        open_calibration(tmp_path / "c.npz", bf16_ir)
    message = one_line(info.value)
    assert "'x'" in message and "bfloat16" in message and "float32" in message


def test_float32_arrays_for_a_bfloat16_input_are_refused(bf16_ir):
    with pytest.raises(InputError) as info:
        collect(open_calibration({"x": np.ones((3, 4), np.float32)}, bf16_ir))
    message = one_line(info.value)
    assert "'x'" in message and "bfloat16" in message and "float32" in message


def test_float16_input_still_works(tmp_path):
    ir = import_proto(build_model("agraph (float16[N,4] x) => (float16[N,4] y) { y = Relu (x) }"))
    x = randn(rng(9), 5, 4).astype(np.float16)
    np.savez(tmp_path / "c.npz", x=x)
    got = np.concatenate([b["x"] for b in open_calibration(tmp_path / "c.npz", ir).batches(2)])
    np.testing.assert_array_equal(got, x)


# --------------------------------------------------------------------------- dynamic height and width
def test_folder_of_different_sizes_for_a_dynamic_hw_model(tmp_path, dynamic_ir):
    from qonnx.runtime.ort import make_session

    sizes = [(8, 8)] * 3 + [(12, 10)] * 2 + [(8, 8)] + [(6, 9)] * 20
    samples = [randn(rng(i), 3, h, w) for i, (h, w) in enumerate(sizes)]
    for i, s in enumerate(samples):
        np.save(tmp_path / f"s{i:03d}.npy", s)
    cs = open_calibration(tmp_path, dynamic_ir)
    batches = collect(cs, 16)
    assert [b["x"].shape for b in batches] == [(3, 3, 8, 8), (2, 3, 12, 10), (1, 3, 8, 8), (16, 3, 6, 9),
                                               (4, 3, 6, 9)]
    np.testing.assert_array_equal(np.concatenate([b["x"].reshape(len(b["x"]), -1)[:, :9] for b in batches]),
                                  np.stack([s.reshape(-1)[:9] for s in samples]))
    session = make_session(dynamic_ir.to_bytes())
    for b in batches:
        assert session.run(None, b)[0].shape[2:] == b["x"].shape[2:]


def test_uniform_folder_batches_are_unchanged(tmp_path, mlp_ir):
    x = randn(rng(10), 37, 16)
    for i, s in enumerate(x):
        np.save(tmp_path / f"s{i:03d}.npy", s)
    sizes = [len(b["x"]) for b in open_calibration(tmp_path, mlp_ir).batches(16)]
    assert sizes == [16, 16, 5]


def test_module_constants_are_documented(npy_module):
    assert "MAX_ROW_BYTES" in (npy_module.__doc__ or "") and "max_samples" in (calibration_module.__doc__ or "")

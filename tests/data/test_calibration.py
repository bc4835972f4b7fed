"""Calibration data readers and their validation against the model's inputs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from qonnx.data.calibration import CalibrationSet, open_calibration
from qonnx.errors import InputError
from tests.helpers import (
    build_model,
    conv_bn_relu_conv,
    import_proto,
    make_int_input_model,
    matmul_mlp,
    randn,
    rng,
)

N = 10


@pytest.fixture(scope="module")
def conv_ir():
    return import_proto(conv_bn_relu_conv())  # input x: float32 [1,3,8,8] (static batch 1)


@pytest.fixture(scope="module")
def mlp_ir():
    return import_proto(matmul_mlp())  # input x: float32 [N,16] (dynamic batch)


@pytest.fixture(scope="module")
def two_input_ir():
    g = rng(60)
    return import_proto(build_model("""
    agraph (float[N,4] a, float[N,4] b) => (float[N,3] y) {
        s = Add (a, b)
        y = MatMul (s, w)
    }""", {"w": randn(g, 4, 3)}))


def samples(shape=(3, 8, 8), n=N, seed=0):
    return randn(rng(seed), n, *shape)


def collect(cs: CalibrationSet, batch_size: int = 4) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for feed in cs.batches(batch_size):
        for k, v in feed.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- readers
def test_npz_reader_streams_all_samples_in_order(tmp_path, conv_ir, monkeypatch):
    x = samples()
    np.savez(tmp_path / "c.npz", x=x)
    # Streaming: the archive is read member by member, never loaded whole with np.load.
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load used on an .npz"))
    cs = open_calibration(tmp_path / "c.npz", conv_ir)
    assert len(cs) == N
    batches = list(cs.batches(4))
    # The model's input has a static batch of 1: batches follow it.
    assert all(b["x"].shape == (1, 3, 8, 8) for b in batches)
    np.testing.assert_array_equal(collect(cs)["x"], x)


def test_npz_reader_dynamic_batch_and_compressed(tmp_path, mlp_ir):
    x = samples((16,), n=11)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    cs = open_calibration(str(tmp_path / "c.npz"), mlp_ir)
    sizes = [len(b["x"]) for b in cs.batches(4)]
    assert sizes == [4, 4, 3]
    np.testing.assert_array_equal(collect(cs)["x"], x)


def test_npz_split_and_head_read_the_right_rows(tmp_path, mlp_ir):
    x = samples((16,), n=12)
    np.savez(tmp_path / "c.npz", x=x)
    cs = open_calibration(tmp_path / "c.npz", mlp_ir)
    calib, held = cs.split(3)
    np.testing.assert_array_equal(collect(calib, 5)["x"], x[:9])
    np.testing.assert_array_equal(collect(held, 2)["x"], x[9:])
    np.testing.assert_array_equal(collect(cs.head(5), 2)["x"], x[:5])
    assert cs.split(0)[1] is None and cs.split(12)[1] is None


def test_npz_with_several_inputs(tmp_path, two_input_ir):
    a, b = samples((4,), seed=1), samples((4,), seed=2)
    np.savez(tmp_path / "c.npz", a=a, b=b)
    got = collect(open_calibration(tmp_path / "c.npz", two_input_ir), 3)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_folder_of_npy_samples(tmp_path, conv_ir):
    x = samples()
    for i, s in enumerate(x):
        np.save(tmp_path / f"s{i:03d}.npy", s)
    cs = open_calibration(tmp_path, conv_ir)
    assert len(cs) == N
    np.testing.assert_array_equal(collect(cs)["x"], x)


def test_folder_of_npz_samples(tmp_path, two_input_ir):
    a, b = samples((4,), seed=3), samples((4,), seed=4)
    for i in range(N):
        np.savez(tmp_path / f"s{i:03d}.npz", a=a[i], b=b[i])
    got = collect(open_calibration(tmp_path, two_input_ir), 4)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_npy_folder_for_a_two_input_model_is_refused(tmp_path, two_input_ir):
    np.save(tmp_path / "s0.npy", samples((4,), n=1)[0])
    with pytest.raises(InputError, match="single-input"):
        open_calibration(tmp_path, two_input_ir)


def test_dict_of_arrays(mlp_ir):
    x = samples((16,))
    cs = open_calibration({"x": x}, mlp_ir)
    assert len(cs) == N
    np.testing.assert_array_equal(collect(cs)["x"], x)


def test_list_of_feed_dicts(mlp_ir):
    x = samples((16,))
    feeds = [{"x": x[:3]}, {"x": x[3:7]}, {"x": x[7:]}]
    cs = open_calibration(feeds, mlp_ir)
    assert len(cs) == N
    np.testing.assert_array_equal(collect(cs, 2)["x"], x)
    # A list can be read again (calibration may stream several times).
    np.testing.assert_array_equal(collect(cs, 5)["x"], x)


def test_generator_is_read_once_and_replayable(mlp_ir):
    x = samples((16,))
    calls = []

    def gen():
        calls.append(1)
        for i in range(0, N, 2):
            yield {"x": x[i:i + 2]}

    cs = open_calibration(gen(), mlp_ir)
    assert len(cs) == N
    np.testing.assert_array_equal(collect(cs)["x"], x)
    np.testing.assert_array_equal(collect(cs)["x"], x)
    assert calls == [1]


def test_ort_style_calibration_data_reader(conv_ir):
    x = samples()

    class Reader:  # the onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.items = iter([{"x": x[i:i + 1]} for i in range(N)])

        def get_next(self):
            return next(self.items, None)

    cs = open_calibration(Reader(), conv_ir)
    assert len(cs) == N
    np.testing.assert_array_equal(collect(cs)["x"], x)


def _write_png(path, color, size=(12, 10)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_image_folder_with_preprocessing(tmp_path, conv_ir):
    colors = [(255, 0, 128), (0, 255, 64), (10, 20, 30)]
    for i, c in enumerate(colors):
        _write_png(tmp_path / f"img{i}.png", c)
    (tmp_path / "labels.txt").write_text("not an image\n")
    cs = open_calibration(tmp_path, conv_ir, "resize=10,crop=8,scale=1/255,mean=0.5,std=0.25")
    assert len(cs) == 3
    got = collect(cs)["x"]
    assert got.shape == (3, 3, 8, 8) and got.dtype == np.float32
    for i, c in enumerate(colors):  # a solid image stays solid through resize and crop
        want = (np.asarray(c, np.float32) / 255 - 0.5) / 0.25
        np.testing.assert_allclose(got[i].reshape(3, -1).mean(axis=1), want, atol=1e-5)
        np.testing.assert_allclose(got[i], np.broadcast_to(want[:, None, None], (3, 8, 8)), atol=1e-5)


def test_image_folder_bgr_and_default_spec(tmp_path, conv_ir):
    _write_png(tmp_path / "a.png", (200, 100, 50))
    rgb = collect(open_calibration(tmp_path, conv_ir))["x"]
    bgr = collect(open_calibration(tmp_path, conv_ir, "color=bgr"))["x"]
    np.testing.assert_allclose(rgb[0, :, 0, 0], [200, 100, 50], atol=1e-4)
    np.testing.assert_allclose(bgr[0, :, 0, 0], [50, 100, 200], atol=1e-4)


def test_image_folder_errors(tmp_path, conv_ir, two_input_ir):
    _write_png(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(InputError, match="colour|color|unknown key"):
        open_calibration(tmp_path, conv_ir, "colour=rgb")
    with pytest.raises(InputError, match="single-input"):
        open_calibration(tmp_path, two_input_ir)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="broken.png"):
        collect(open_calibration(tmp_path, conv_ir))


# --------------------------------------------------------------------------- errors
def test_missing_input_name(tmp_path, two_input_ir):
    np.savez(tmp_path / "c.npz", a=samples((4,)))
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", two_input_ir))
    assert "'b'" in str(info.value) and "lacks" in str(info.value)


def test_unknown_input_name(tmp_path, conv_ir):
    np.savez(tmp_path / "c.npz", x=samples(), image=samples())
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", conv_ir))
    assert "'image'" in str(info.value) and "unknown" in str(info.value)


def test_wrong_names_only(conv_ir):
    with pytest.raises(InputError) as info:
        collect(open_calibration({"input_1": samples()}, conv_ir))
    message = str(info.value)
    assert "'x'" in message and "'input_1'" in message


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8])
def test_wrong_dtype(tmp_path, conv_ir, dtype):
    np.savez(tmp_path / "c.npz", x=samples().astype(dtype))
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", conv_ir))
    assert "dtype" in str(info.value) and np.dtype(dtype).name in str(info.value)


def test_wrong_integer_dtype_for_an_integer_input():
    ir = import_proto(make_int_input_model())
    with pytest.raises(InputError, match="dtype"):
        collect(open_calibration({"ids": np.zeros((4, 5), np.int64)}, ir))
    got = collect(open_calibration({"ids": np.zeros((4, 5), np.int32)}, ir))
    assert got["ids"].dtype == np.int32


@pytest.mark.parametrize("shape", [(3, 7, 7), (4, 8, 8), (3, 8), (1, 3, 8, 8)])
def test_wrong_shape(tmp_path, conv_ir, shape):
    np.savez(tmp_path / "c.npz", x=samples(shape))
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", conv_ir))
    assert "shape" in str(info.value)


def test_wrong_shape_in_a_sample_folder(tmp_path, conv_ir):
    x = samples()
    for i, s in enumerate(x):
        np.save(tmp_path / f"s{i:03d}.npy", s if i != 5 else s[:, :7, :7])
    with pytest.raises(InputError, match="shape"):
        collect(open_calibration(tmp_path, conv_ir))


def test_one_odd_sample_in_a_folder_for_a_dynamic_batch_model(tmp_path, mlp_ir):
    # Samples are stacked into batches: a sample of another shape must give an
    # InputError naming the problem, not numpy's stacking error.
    x = samples((16,))
    for i, s in enumerate(x):
        np.save(tmp_path / f"s{i:03d}.npy", s if i != 2 else s[:15])
    with pytest.raises(InputError, match="shape"):
        collect(open_calibration(tmp_path, mlp_ir), 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, conv_ir, bad):
    x = samples()
    x[6, 1, 2, 3] = bad
    np.savez(tmp_path / "c.npz", x=x)
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", conv_ir))
    assert "NaN or Inf" in str(info.value)
    assert "sample 6" in str(info.value)


def test_empty_sets(tmp_path, conv_ir):
    np.savez(tmp_path / "c.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="empty"):
        open_calibration(tmp_path / "c.npz", conv_ir)
    with pytest.raises(InputError, match="empty"):
        open_calibration([], conv_ir)
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="empty"):
        open_calibration(tmp_path / "folder", conv_ir)
    np.savez(tmp_path / "none.npz")
    with pytest.raises(InputError, match="no arrays"):
        open_calibration(tmp_path / "none.npz", conv_ir)


UNPICKLED: list[str] = []


def _mark_unpickled(tag):
    UNPICKLED.append(tag)
    return tag


class Trap:
    """Unpickling this object calls _mark_unpickled (stands in for arbitrary code execution)."""

    def __reduce__(self):
        return (_mark_unpickled, ("trap",))


def _forbid_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("qonnx unpickled calibration data")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path, conv_ir, monkeypatch):
    objs = np.empty((N,), dtype=object)
    objs[:] = [Trap() for _ in range(N)]
    np.savez(tmp_path / "c.npz", x=objs)
    UNPICKLED.clear()
    _forbid_unpickling(monkeypatch)
    with pytest.raises(InputError) as info:
        collect(open_calibration(tmp_path / "c.npz", conv_ir))
    assert "pickle" in str(info.value)
    assert UNPICKLED == []


def test_sample_folder_with_pickled_objects_is_refused_without_unpickling(tmp_path, conv_ir, monkeypatch):
    objs = np.empty((2,), dtype=object)
    objs[:] = [Trap(), Trap()]
    np.save(tmp_path / "s0.npy", objs, allow_pickle=True)
    UNPICKLED.clear()
    _forbid_unpickling(monkeypatch)
    with pytest.raises(InputError, match="pickle"):
        collect(open_calibration(tmp_path, conv_ir))
    assert UNPICKLED == []


def test_non_zip_file_named_npz(tmp_path, conv_ir):
    (tmp_path / "c.npz").write_text("this is not a zip archive\n")
    with pytest.raises(InputError) as info:
        open_calibration(tmp_path / "c.npz", conv_ir)
    assert "c.npz" in str(info.value) and "npz" in str(info.value)


def test_zip_with_a_non_npy_member_payload(tmp_path, conv_ir):
    import zipfile

    with zipfile.ZipFile(tmp_path / "c.npz", "w") as z:
        z.writestr("x.npy", b"garbage, not an npy header")
    with pytest.raises(InputError, match="x.npy"):
        collect(open_calibration(tmp_path / "c.npz", conv_ir))


def test_truncated_npz(tmp_path, conv_ir):
    np.savez(tmp_path / "full.npz", x=samples())
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        collect(open_calibration(tmp_path / "c.npz", conv_ir))


def test_missing_path(tmp_path, conv_ir):
    with pytest.raises(InputError) as info:
        open_calibration(tmp_path / "nope.npz", conv_ir)
    assert "nope.npz" in str(info.value) and "does not exist" in str(info.value)


def test_unsupported_file_and_object(tmp_path, conv_ir):
    np.save(tmp_path / "x.npy", samples())
    with pytest.raises(InputError, match="neither"):
        open_calibration(tmp_path / "x.npy", conv_ir)
    with pytest.raises(InputError, match="unsupported"):
        open_calibration(42, conv_ir)


def test_iterable_of_non_dicts_is_refused(conv_ir):
    with pytest.raises(InputError, match="dict"):
        open_calibration([samples()], conv_ir)


def test_npz_arrays_disagreeing_on_sample_count(tmp_path, two_input_ir):
    np.savez(tmp_path / "c.npz", a=samples((4,), n=5), b=samples((4,), n=6))
    with pytest.raises(InputError, match="disagree"):
        open_calibration(tmp_path / "c.npz", two_input_ir)


# --------------------------------------------------------------------------- streaming through ORT
def test_stream_tensors_gives_each_batch_and_lets_go_of_the_one_before(mlp_ir):
    from qonnx.runtime.ort import stream_tensors

    proto = mlp_ir.to_onnx()
    first = mlp_ir.nodes[0]
    hidden = first.outputs[0].name
    w = mlp_ir.constant_value(first.inputs[1])
    cs = open_calibration({"x": samples((16,))}, mlp_ir)
    seen = []
    for feed, values in stream_tensors(proto, [hidden, "x"], cs.batches(4)):
        assert set(values) == {hidden, "x"}
        np.testing.assert_array_equal(values["x"], feed["x"])
        seen.append((values, values[hidden], feed["x"]))
    assert len(seen) == 3  # 10 samples in batches of 4
    for i, (values, kept, x) in enumerate(seen):
        # Emptied once the next batch was asked for (the last one when the stream ended): a caller holding
        # two batches of outputs during a run made ORT's arena grow by a quarter on long calibration runs.
        assert values == {}, i
        # An array the caller kept is still its batch's tensor.
        np.testing.assert_allclose(kept, x @ w, rtol=1e-5, atol=1e-6)

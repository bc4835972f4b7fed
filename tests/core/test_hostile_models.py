"""Hostile or broken model files (issue 23): every refusal is one InputError line, never a traceback.

Reading (qonnx/core/modelio.py): external data named with a NUL byte, hard-linked, or of the wrong length;
tensors whose bytes disagree with their dims. Writing: no temporary file survives an interrupt. Folding
(qonnx/core/ir.py): a constant subgraph whose output would be huge is neither folded nor evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from qonnx.core.folding import FOLD_SIZE_LIMIT, fold_size_limit
from qonnx.core.ir import import_model, load_model
from qonnx.core.modelio import external_data_files, read_model_proto, write_bytes_atomic
from qonnx.errors import InputError
from tests.helpers import build_model, conv_bn_relu_conv, import_proto, randn, rng


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and len(text) < 300, text
    return text


def add_model(w: TensorProto | None = None) -> onnx.ModelProto:
    """y = x + w, with `w` a [4, 4] float32 initializer (or the given tensor)."""
    model = build_model("""
    agraph (float[4,4] x) => (float[4,4] y) {
        y = Add (x, w)
    }""", check=False)
    model.graph.initializer.append(w if w is not None else numpy_helper.from_array(randn(rng(0), 4, 4), "w"))
    return model


def save_external(model: onnx.ModelProto, folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location=location, size_threshold=0)
    return folder / "model.onnx"


def write_raw(model: onnx.ModelProto, path: Path) -> Path:
    """Write the proto as is (onnx.save would try to move external data around)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def set_external(tensor: TensorProto, **entries: str) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)


# --------------------------------------------------------------------------- item 0: what a model file reads
def test_external_data_files_names_the_resolved_files_a_model_reads(tmp_path):
    path = save_external(add_model(), tmp_path / "ext")
    assert external_data_files(path) == [(tmp_path / "ext" / "w.bin").resolve()]
    assert external_data_files(write_raw(add_model(), tmp_path / "plain.onnx")) == []


def test_external_data_files_lists_each_file_once_in_first_use_order(tmp_path):
    model = add_model()
    model.graph.initializer.append(numpy_helper.from_array(randn(rng(1), 4, 4), "v"))
    model.graph.node.append(helper.make_node("Add", ["y", "v"], ["z"]))
    model.graph.output[0].name = "z"
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "b.bin").write_bytes(np.zeros(16, np.float32).tobytes())
    (folder / "a.bin").write_bytes(np.zeros(32, np.float32).tobytes())
    set_external(model.graph.initializer[0], location="b.bin")
    set_external(model.graph.initializer[1], location="a.bin", offset="64", length="64")
    model.graph.initializer.append(numpy_helper.from_array(randn(rng(2), 4, 4), "u"))
    set_external(model.graph.initializer[2], location="a.bin", length="64")
    path = write_raw(model, folder / "model.onnx")
    assert external_data_files(path) == [(folder / "b.bin").resolve(), (folder / "a.bin").resolve()]


def test_external_data_files_applies_the_reading_checks(tmp_path):
    model = add_model()
    set_external(model.graph.initializer[0], location="../outside.bin")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="leaves the model's folder") as e:
        external_data_files(write_raw(model, tmp_path / "m" / "model.onnx"))
    one_line(e)


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"

    def interrupted(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(b"x" * 1000, target)
    assert list(tmp_path.iterdir()) == []


def test_write_stopped_by_sigterm_handler_leaves_no_temporary_file(tmp_path, monkeypatch):
    def terminated(*_args: object) -> None:
        raise SystemExit(143)

    monkeypatch.setattr(os, "replace", terminated)
    with pytest.raises(SystemExit):
        write_bytes_atomic(b"x" * 1000, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- item 1: one line, not a traceback
def test_nul_byte_in_external_location_is_refused_in_one_line(tmp_path):
    model = add_model()
    set_external(model.graph.initializer[0], location="w\x00.bin")
    path = write_raw(model, tmp_path / "model.onnx")
    for read in (read_model_proto, external_data_files):
        with pytest.raises(InputError, match="external data") as e:
            read(path)
        one_line(e)


def test_hard_linked_external_data_is_refused_in_one_line(tmp_path):
    path = save_external(add_model(), tmp_path / "ext")
    os.link(tmp_path / "ext" / "w.bin", tmp_path / "elsewhere.bin")
    for read in (read_model_proto, external_data_files):
        with pytest.raises(InputError, match="hard link") as e:
            read(path)
        one_line(e)


def test_any_onnx_error_while_reading_external_data_is_one_line(tmp_path, monkeypatch):
    path = save_external(add_model(), tmp_path / "ext")

    def broken(*_args: object) -> None:
        raise onnx.checker.ValidationError("line one\nline two\n" + "x" * 1000)

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", broken)
    with pytest.raises(InputError, match="line one") as e:
        read_model_proto(path)
    one_line(e)


def test_external_offset_past_the_file_is_one_line(tmp_path):
    model = add_model()
    set_external(model.graph.initializer[0], location="w.bin", offset="4096", length="64")
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as e:
        read_model_proto(write_raw(model, tmp_path / "model.onnx"))
    one_line(e)


# --------------------------------------------------------------------------- item 2: bytes against dims
@pytest.mark.parametrize("nbytes", [60, 68, 0])
def test_initializer_raw_data_of_the_wrong_length_is_refused(tmp_path, nbytes):
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\1" * nbytes)
    path = write_raw(add_model(w), tmp_path / "model.onnx")
    with pytest.raises(InputError, match="'w'.*64") as e:
        load_model(path)
    one_line(e)


def test_typed_data_of_the_wrong_count_is_refused():
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], float_data=[1.0] * 15)
    with pytest.raises(InputError, match="'w'.*16") as e:
        import_model(add_model(w))
    one_line(e)


def test_constant_node_value_of_the_wrong_length_is_refused():
    model = add_model()
    del model.graph.initializer[:]
    bad = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\1" * 60)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value=bad))
    with pytest.raises(InputError, match="'c'.*64") as e:
        import_model(model)
    one_line(e)


@pytest.mark.parametrize("declared", [60, 68])
def test_external_length_against_dims_is_refused(tmp_path, declared):
    model = add_model()
    set_external(model.graph.initializer[0], location="w.bin", length=str(declared))
    (tmp_path / "w.bin").write_bytes(b"\0" * 128)
    with pytest.raises(InputError, match="'w'.*64") as e:
        read_model_proto(write_raw(model, tmp_path / "model.onnx"))
    one_line(e)


def test_external_file_longer_than_the_tensor_is_refused(tmp_path):
    model = add_model()
    set_external(model.graph.initializer[0], location="w.bin")  # no length: the whole file is read
    (tmp_path / "w.bin").write_bytes(b"\0" * 80)
    with pytest.raises(InputError, match="'w'.*64") as e:
        read_model_proto(write_raw(model, tmp_path / "model.onnx"))
    one_line(e)


def test_well_formed_tensors_of_every_common_type_load(tmp_path):
    arrays = {"f16": np.ones((2, 3), np.float16), "i8": np.ones(5, np.int8), "b": np.ones(3, bool),
              "i64": np.ones((0, 4), np.int64), "s": np.float32(2.0), "d": np.ones(2, np.float64)}
    model = conv_bn_relu_conv()
    for name, value in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])
    model.graph.initializer.append(typed)
    import_model(model)
    path = save_external(conv_bn_relu_conv(), tmp_path / "ext")
    load_model(path)


# --------------------------------------------------------------------------- item 3: folding never allocates huge outputs
def evaluated_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The op types of every graph handed to ONNX Runtime from now on (constant folding evaluates that way)."""
    evaluated: list[str] = []
    real_session = onnxruntime.InferenceSession

    def spy(model: bytes, *args: object, **kwargs: object) -> object:
        proto = onnx.ModelProto()
        proto.ParseFromString(model)
        evaluated.extend(n.op_type for n in proto.graph.node)
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return evaluated


def huge_constant_model(feed_reduce: bool = False) -> onnx.ModelProto:
    """y = x + f(ConstantOfShape([4096, 1024, 1024])): 16 GiB of float32 from a 1 kB model."""
    tail = """
        big = ConstantOfShape <value = float[1] {1.0}> (shape)
        s = ReduceSum <keepdims = 0> (big)
        y = Add (x, s)""" if feed_reduce else """
        big = ConstantOfShape <value = float[1] {1.0}> (shape)
        y = Add (x, big)"""
    out = "float[4096,1024,1024] y" if not feed_reduce else "float[1] y"
    return build_model(f"""
    agraph (float[1] x) => ({out}) {{{tail}
    }}""", {"shape": np.array([4096, 1024, 1024], np.int64)})


@pytest.mark.parametrize("feed_reduce", [False, True])
@pytest.mark.parametrize("forget_shapes", [False, True])
def test_huge_constant_of_shape_is_neither_folded_nor_evaluated(monkeypatch, feed_reduce, forget_shapes):
    ir = import_proto(huge_constant_model(feed_reduce))
    if forget_shapes:  # as if shape inference had failed: the folder must still not evaluate it
        for tensor in ir.tensors().values():
            if not ir.is_constant(tensor):
                tensor.shape = None
    evaluated = evaluated_ops(monkeypatch)
    ir.fold_constants()
    assert "ConstantOfShape" not in evaluated
    assert "ConstantOfShape" in [n.op for n in ir.nodes]
    assert max(np.asarray(c.values).nbytes for c in ir.tensors().values() if ir.is_constant(c)) < 1024


def test_fold_size_limit_is_the_larger_of_the_constant_and_the_largest_initializer():
    ir = import_proto(conv_bn_relu_conv())
    assert FOLD_SIZE_LIMIT == 64 * 2**20
    assert fold_size_limit(t for t in ir.tensors().values() if ir.is_constant(t)) == FOLD_SIZE_LIMIT
    big = SimpleNamespace(shape=(1024, 1024, 32), dtype=np.float32)  # 128 MiB, described, never allocated
    assert fold_size_limit([big]) == 128 * 2**20


def test_small_constant_subgraphs_still_fold():
    ir = import_proto(build_model("""
    agraph (float[2,3] x) => (float[2,3] y) {
        c = ConstantOfShape <value = float[1] {2.0}> (shape)
        e = Exp (c)
        y = Mul (x, e)
    }""", {"shape": np.array([2, 3], np.int64)}))
    ir.fold_constants()
    assert [n.op for n in ir.nodes] == ["Mul"]


def computed_shape_model(dims: tuple[int, ...]) -> onnx.ModelProto:
    """y = x + ConstantOfShape(Concat(head, tail)): the shape is known only once the Concat is folded."""
    head, tail = np.array(dims[:1], np.int64), np.array(dims[1:], np.int64)
    return build_model(f"""
    agraph (float[1] x) => (float[{",".join(map(str, dims))}] y) {{
        shape = Concat <axis = 0> (head, tail)
        big = ConstantOfShape <value = float[1] {{1.0}}> (shape)
        y = Add (x, big)
    }}""", {"head": head, "tail": tail})


def test_constant_of_shape_of_a_computed_shape_folds_when_small():
    ir = import_proto(computed_shape_model((2, 3)))
    ir.fold_constants()
    assert [n.op for n in ir.nodes] == ["Add"]


def test_constant_of_shape_of_a_computed_huge_shape_is_not_evaluated(monkeypatch):
    ir = import_proto(computed_shape_model((4096, 1024, 1024)))
    evaluated = evaluated_ops(monkeypatch)
    ir.fold_constants()
    assert "ConstantOfShape" not in evaluated
    assert [n.op for n in ir.nodes] == ["ConstantOfShape", "Add"]

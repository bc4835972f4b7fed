"""The importer and IR boundary (qonnx/core/ir.py) and the quant table (qonnx/core/qtable.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from qonnx.core.ir import import_model, load_model
from qonnx.core.modelio import save_model, write_bytes_atomic
from qonnx.core.qtable import LayerQuant, QuantTable, Role, TensorQuant
from qonnx.errors import InputError, UnsupportedModelError
from qonnx.numerics.quant import QuantScheme
from tests.helpers import conv_bn_relu_conv, feed_for, import_proto, op_counts, run_ort


def test_old_opset_is_upgraded_and_stays_exact():
    model = conv_bn_relu_conv()
    model.opset_import[0].version = 11
    onnx.checker.check_model(model)
    ir = import_proto(model)
    assert ir.opset >= 13
    feed = feed_for(model, batch=1)
    np.testing.assert_allclose(run_ort(ir.to_onnx(), feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-6)


def test_constant_nodes_are_lifted_to_initializers():
    model = conv_bn_relu_conv()
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    ir = import_proto(model)
    assert "Constant" not in op_counts(ir)
    assert ir.is_constant(ir.tensors()["w1"])
    feed = feed_for(model, batch=1)
    np.testing.assert_allclose(run_ort(ir.to_onnx(), feed)[0], run_ort(model, feed)[0], rtol=1e-6, atol=1e-6)


def test_unnamed_and_duplicate_node_names_become_unique():
    model = conv_bn_relu_conv()
    for node in model.graph.node:
        node.name = "" if node.op_type != "Conv" else "same"
    ir = import_proto(model)
    names = [n.name for n in ir.nodes]
    assert all(names) and len(set(names)) == len(names)


def test_already_quantized_models_are_refused_naming_the_ops():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        initializer=[onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError) as info:
        import_model(model)
    assert "already quantized" in str(info.value) and "QuantizeLinear" in str(info.value)


def test_load_model_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "none.onnx")
    with pytest.raises(InputError, match="not a file"):
        load_model(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match="x.onnx"):
        load_model(tmp_path / "x.onnx")


def test_copy_is_independent():
    ir = import_proto(conv_bn_relu_conv())
    ir.quant.set("x", TensorQuant(Role.ACTIVATION, QuantScheme(signed=False, symmetric=False)))
    twin = ir.copy()
    w = twin.tensors()["w1"]
    w.values = np.asarray(w.values) * 0
    twin.quant.get("x").scale = np.float32(1.0)
    assert np.any(np.asarray(ir.tensors()["w1"].values) != 0)
    assert ir.quant.get("x").scale is None


def test_save_model_is_atomic_and_deterministic(tmp_path):
    proto = import_proto(conv_bn_relu_conv()).to_onnx()
    n = save_model(proto, tmp_path / "a.onnx")
    save_model(proto, tmp_path / "b.onnx")
    assert n == (tmp_path / "a.onnx").stat().st_size
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files left
    with pytest.raises(InputError, match="does not exist"):
        write_bytes_atomic(b"x", tmp_path / "missing" / "c.onnx")
    with pytest.raises(InputError, match="directory"):
        write_bytes_atomic(b"x", tmp_path)


def test_to_onnx_keeps_interface_and_sets_producer():
    model = conv_bn_relu_conv()
    proto = import_proto(model).to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["y"]
    assert proto.producer_name == "qonnx"


def test_quant_table_root_rename_and_cycles():
    act = QuantScheme(signed=False, symmetric=False)
    table = QuantTable()
    table.set("a", TensorQuant(Role.ACTIVATION, act))
    table.set("b", TensorQuant(Role.ACTIVATION, act, tied_to="a"))
    table.set("c", TensorQuant(Role.ACTIVATION, act, tied_to="b"))
    table.set("bias", TensorQuant(Role.BIAS, QuantScheme(bits=32, axis=0, narrow=False), bias_of=("a", "w")))
    table.layers["L"] = LayerQuant("L", "Conv", input="a", weight="w", bias="bias", output="c")
    assert table.root("c") == "a"
    table.rename("a", "a2")
    assert table.root("c") == "a2"
    assert table.get("bias").bias_of == ("a2", "w")
    assert table.layers["L"].input == "a2"
    table.get("a2").tied_to = "c"  # a cycle must not hang
    assert table.root("c") in {"a2", "b", "c"}
    assert table.summary() == {"activation:initial": 3, "bias:initial": 1}

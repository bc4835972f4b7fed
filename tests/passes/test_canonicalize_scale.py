"""canonicalize stays linear (or n log n) in graph size (issue 23): checked by counting the graph-wide steps
(tensor-map rebuilds, node comparisons of list removal, re-sorts) on generated graphs of a few thousand
nodes, never by wall time. The timed figures are a benchmark row (bench/run.py --graph-scaling).

Also: `Model.live_naming` hands out exactly the names a fresh scan of the graph would.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qonnx.core import ir as ir_module
from qonnx.core.ir import Model
from qonnx.infra.context import PassContext
from qonnx.passes.canonicalize import Canonicalize
from tests.helpers import import_proto, op_counts


def matmul_chain(layers: int, width: int = 4, identities: bool = False):
    """x[1, width] -> (MatMul -> Add -> Relu [-> Identity]) x layers: 3 (or 4) nodes a layer."""
    g = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((g.standard_normal((width, width)) * 0.3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((g.standard_normal(width) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
        if identities:
            nodes.append(helper.make_node("Identity", [x], [f"i{i}"], name=f"id{i}"))
            x = f"i{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def nhwc_chain(blocks: int, c: int = 4):
    """Keras-style: Transpose(NHWC->NCHW) -> Conv -> Transpose(NCHW->NHWC) -> Mul -> Relu, repeated."""
    g = np.random.default_rng(1)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [numpy_helper.from_array((g.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((g.standard_normal(c) * 0.1).astype(np.float32), f"s{i}")]
        nodes += [helper.make_node("Transpose", [x], [f"t{i}"], perm=[0, 3, 1, 2], name=f"tin{i}"),
                  helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"c{i}"], kernel_shape=[1, 1], name=f"conv{i}"),
                  helper.make_node("Transpose", [f"c{i}"], [f"u{i}"], perm=[0, 2, 3, 1], name=f"tout{i}"),
                  helper.make_node("Mul", [f"u{i}", f"s{i}"], [f"m{i}"], name=f"mul{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, c])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 4, c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class Counter:
    """Wraps a method of a class and counts its calls."""

    def __init__(self, monkeypatch, cls, name: str):
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


def canonicalize(ir: Model):
    return Canonicalize().run(ir, PassContext())


def test_matmul_add_chain_rebuilds_the_tensor_map_a_constant_number_of_times(monkeypatch):
    ir = import_proto(matmul_chain(667))  # 2,001 nodes
    rebuilds = Counter(monkeypatch, type(ir.graph), "tensors")
    compares = Counter(monkeypatch, type(ir.nodes[0]), "__eq__")
    result = canonicalize(ir)
    assert result.stats["matmul_add_to_gemm"] == 667
    assert op_counts(result.model) == {"Gemm": 667, "Relu": 667}
    # Before: one rebuild per new name (2 per fused pair) and a list scan with node comparisons per removal.
    assert rebuilds.calls < 40, rebuilds.calls
    assert compares.calls < 2_000, compares.calls


def test_identity_chain_is_dropped_in_linear_steps(monkeypatch):
    ir = import_proto(matmul_chain(500, identities=True))  # 2,000 nodes, 500 Identity
    compares = Counter(monkeypatch, type(ir.nodes[0]), "__eq__")
    scanned = Counter(monkeypatch, ir_module, "_subgraphs")  # one call per node looked at for subgraphs
    result = canonicalize(ir)
    assert result.stats["identities_dropped"] == 500
    assert "Identity" not in op_counts(result.model)
    assert compares.calls < 2_000, compares.calls
    # used_in_subgraph (asked for every Identity) answers without a scan of every node when no node holds a
    # subgraph: before, 500 questions scanned 2,000 nodes each.
    assert scanned.calls < 10 * 2_000, scanned.calls


def test_transpose_round_trips_are_sunk_without_resorting_per_transpose(monkeypatch):
    ir = import_proto(nhwc_chain(400))  # 2,000 nodes, 800 Transposes
    sorts = Counter(monkeypatch, type(ir.graph), "toposort")
    rebuilds = Counter(monkeypatch, type(ir.graph), "tensors")
    result = canonicalize(ir)
    assert result.stats["transposes_removed"] == 798  # all but the first and the last
    counts = op_counts(result.model)
    assert counts["Transpose"] == 2 and counts["Conv"] == 400
    assert sorts.calls < 20, sorts.calls
    assert rebuilds.calls < 60, rebuilds.calls


# --------------------------------------------------------------------------- live naming: exact names
def fresh_name(model: Model, hint: str) -> str:
    """What unique_name answers outside any session, a scan of the graph's current names, once the detached
    nodes (no inputs, no outputs: removed, as far as names go) have left the list."""
    taken = set(model.tensors()) | {n.name for n in model.nodes if n.inputs or n.outputs}
    name, i = hint, 0
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    return name


def test_live_naming_gives_the_names_of_a_fresh_scan():
    ir = import_proto(matmul_chain(6))
    with ir.live_naming():
        # names freed by removed nodes and their orphaned outputs are reused, as a fresh scan would
        mm, add = ir.nodes[0], ir.nodes[1]
        out = add.outputs[0]
        x, w = mm.inputs
        for hint in ("mm0", "m0", "a0", "add0", "mm0_bias", "x"):
            assert ir.unique_name(hint) == fresh_name(ir, hint)
        ir.detach_node(add)
        ir.detach_node(mm)
        for hint in ("mm0", "m0", "add0", "b0", "w0", "x", "a0"):
            expected = fresh_name(ir, hint)
            assert ir.unique_name(hint) == expected, hint
        bias = ir.make_constant("mm0_bias", np.zeros(4, np.float32))
        assert bias.name == "mm0_bias"  # not attached yet: a fresh scan does not see it either
        gemm = ir.add_node("Gemm", [x, w, bias], [out], name="mm0")
        assert gemm.name == "mm0"
        assert ir.unique_name("mm0_bias") == fresh_name(ir, "mm0_bias") == "mm0_bias_1"
        ir.remove_nodes([mm, add])
        assert ir.unique_name("add0") == fresh_name(ir, "add0")


@pytest.mark.parametrize("seed", range(5))
def test_live_naming_matches_a_fresh_scan_through_random_edits(seed):
    gen = np.random.default_rng(seed)
    ir = import_proto(matmul_chain(8, identities=True))
    hints = ["mm1", "m1", "i2", "id3", "relu0", "r4", "new", "new_1", "x", "w5", "b5", "Identity"]
    with ir.live_naming():
        for _ in range(60):
            action = gen.integers(4)
            live = [n for n in ir.nodes if n.outputs]
            if action == 0 and live:
                node = live[gen.integers(len(live))]
                if node.op == "Identity" and not ir.is_graph_output(node.outputs[0]):
                    ir.bypass(node, remove=bool(gen.integers(2)))
            elif action == 1 and live:
                ir.detach_node(live[gen.integers(len(live))])
            elif action == 2:
                hint = hints[gen.integers(len(hints))]
                ir.add_node("Relu", [ir.make_variable(hint)], [ir.make_variable(hint + "_out")], name=hint)
            hint = hints[gen.integers(len(hints))]
            expected = fresh_name(ir, hint)
            assert ir.unique_name(hint) == expected

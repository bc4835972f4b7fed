"""The part of a model downstream of one weight, run with that weight as an input (sensitivity probes)."""

from __future__ import annotations

import numpy as np
import onnx

from qonnx.runtime.ort import make_session, truncated


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the outer names its subgraphs read (conservatively: all inner inputs)."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in g.node:
                names.extend(_node_reads(inner))
    return names


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    return {k: v for k, v in types.items() if v}


class UnitProbe:
    """Runs the part of the model downstream of one weight, with that weight as a graph input."""

    def __init__(self, proto: onnx.ModelProto, weight: str, target: str, feeds: list[dict[str, np.ndarray]],
                 threads: int | None = None):
        self.weight = weight
        changed, downstream = {weight}, []
        for node in proto.graph.node:
            if changed.intersection(_node_reads(node)):
                downstream.append(node)
                changed.update(o for o in node.output if o)
        self.affects_output = target in changed
        self.feeds = feeds
        if not self.affects_output:
            return
        initializers = {i.name: i for i in proto.graph.initializer}
        needed = list(dict.fromkeys(n for node in downstream for n in _node_reads(node)))
        self.cut = [n for n in needed if n not in changed and n not in initializers]
        self.cut_values = self._cut_values(proto, feeds, threads)
        suffix = onnx.ModelProto()
        suffix.CopyFrom(proto)
        g = suffix.graph
        del g.node[:], g.input[:], g.output[:], g.initializer[:], g.value_info[:]
        g.node.extend(downstream)
        w = initializers[weight]
        g.input.append(onnx.helper.make_tensor_value_info(weight, w.data_type, list(w.dims)))
        for name in self.cut:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(self.cut_values[0][name].dtype)
            g.input.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        g.initializer.extend(initializers[n] for n in needed if n in initializers and n != weight)
        g.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
        self.target = target
        self.session = make_session(suffix.SerializeToString(), threads=threads, spinning=False)

    def _cut_values(self, proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                    threads: int | None) -> list[dict[str, np.ndarray]]:
        graph_inputs = {i.name for i in proto.graph.input}
        inner = [n for n in self.cut if n not in graph_inputs]
        session = None
        if inner:
            prefix = truncated(proto, inner)
            types = _value_types(proto)
            for out in prefix.graph.output:  # truncated() declares float outputs; keep the real types
                out.type.tensor_type.elem_type = types.get(out.name, onnx.TensorProto.FLOAT)
            session = make_session(prefix.SerializeToString(), threads=threads, spinning=False)
        values = []
        for feed in feeds:
            row = dict(zip(inner, session.run(inner, feed))) if session is not None else {}
            row.update({n: feed[n] for n in self.cut if n in graph_inputs})
            values.append(row)
        return values

    def run(self, weight: np.ndarray) -> np.ndarray:
        """The target tensor over all samples (concatenated on the leading axis) with this weight."""
        outs = [self.session.run([self.target], {**cut, self.weight: weight})[0] for cut in self.cut_values]
        return np.concatenate(outs, axis=0)

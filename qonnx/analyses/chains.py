"""Layer chains that cross-layer equalization can scale through (cle, high-bias-absorption).

A chain is a path of Conv/Gemm layers in which every layer output has one consumer
and only positively homogeneous activations (and, on request, Clip(0, b)) sit
between; AIMET cuts it into pairs and, around a depthwise conv, triplets.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from qonnx.core.ir import Model, Node, Tensor

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity"})
BOUNDED = frozenset({"Clip"})  # Clip(0, b): homogeneous once its bound follows the scale per channel
RESHAPES = frozenset({"Flatten", "Reshape"})
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class Layer:
    """A Conv/Gemm whose weight (and bias) CLE may rescale, with its channel axes."""

    node: Node
    kind: str  # "conv", "dw" (depthwise, multiplier 1) or "gemm"
    weight: Tensor
    bias: Tensor | None
    out_axis: int  # weight axis of output channels
    in_axis: int  # weight axis of input channels (== out_axis for depthwise)
    bias_axis: int  # axis of the bias holding the output channel
    channels_in: int
    channels_out: int

    @property
    def name(self) -> str:
        return self.node.name


# ------------------------------------------------------------------ layer discovery
def _usable_constant(model: Model, tensor, subgraphs: bool) -> bool:
    """A constant float tensor read by exactly one node (and by no nested graph)."""
    value = model.constant_value(tensor)
    if value is None or value.dtype.type not in FLOAT_TYPES or len(model.consumers(tensor)) != 1:
        return False
    return not (subgraphs and model.used_in_subgraph(tensor))


def _layer(model: Model, node, subgraphs: bool) -> Layer | None:
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    weight = node.inputs[1]
    if not _usable_constant(model, weight, subgraphs):
        return None
    w = model.constant_value(weight)
    assert w is not None  # _usable_constant checked it
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and not _usable_constant(model, bias, subgraphs):
        return None
    b = model.constant_value(bias) if bias is not None else None
    if node.op == "Conv":
        if w.ndim < 3:
            return None
        group = int(node.attrs.get("group", 1))
        c_out, c_in = w.shape[0], w.shape[1] * group
        if b is not None and b.shape != (c_out,):
            return None
        if group == 1:
            return Layer(node, "conv", weight, bias, 0, 1, 0, c_in, c_out)
        if group == c_in == c_out and w.shape[1] == 1:
            return Layer(node, "dw", weight, bias, 0, 0, 0, c_in, c_out)
        return None  # grouped conv (or depthwise with multiplier > 1): not supported
    # Gemm: Y = alpha A B' + beta C; only A without transpose carries channels on axis 1.
    if int(node.attrs.get("transA", 0)) or w.ndim != 2:
        return None
    trans_b = int(node.attrs.get("transB", 0))
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    c_out, c_in = w.shape[out_axis], w.shape[in_axis]
    if b is not None and b.shape not in ((c_out,), (1, c_out)):
        return None
    return Layer(node, "gemm", weight, bias, out_axis, in_axis, (b.ndim - 1) if b is not None else 0, c_in, c_out)


def _static_shape(tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) for d in shape[1:]):
        return None
    return list(shape)


def _next_layer(model: Model, first: Layer, layers: dict[str, Layer], subgraphs: bool,
                clips: list | None = None) -> Layer | None:
    """The layer fed by `first` through homogeneous activations only, or None where the chain breaks.

    With a `clips` list, Clip(0, b) nodes are passed too and appended to it (their bound must then
    follow the output scale of `first`).
    """
    tensor = first.node.outputs[0]
    reshaped = False
    passed: list = []
    while True:
        if model.is_graph_output(tensor) or (subgraphs and model.used_in_subgraph(tensor)):
            return None
        consumers = model.consumers(tensor)
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
            return None
        if node.name in layers:
            second = layers[node.name]
            if second.channels_in != first.channels_out:
                return None
            if second.kind == "gemm" and first.kind != "gemm" and (not reshaped or tensor.shape is None
                                                                   or len(tensor.shape) != 2):
                return None
            if second.kind != "gemm" and (first.kind == "gemm" or reshaped):
                return None
            if clips is not None:
                clips.extend(passed)
            return second
        if len(node.outputs) != 1:
            return None
        if node.op in HOMOGENEOUS:
            if node.op == "PRelu" and model.constant_value(node.inputs[1]) is None:
                return None
        elif node.op in BOUNDED and clips is not None:
            bounds = model.clip_bounds(node)
            if bounds is None or bounds[0] != 0.0 or not model.is_float(node.outputs[0]):
                return None
            passed.append(node)
        elif node.op == "Min" and clips is not None:  # a per-channel bound left by an earlier CLE
            bound = model.constant_value(node.inputs[1]) if len(node.inputs) == 2 else None
            if bound is None or np.any(bound < 0) or bound.size != first.channels_out:
                return None
            passed.append(node)
        elif node.op == "GlobalAveragePool" and first.kind != "gemm":
            reshaped = True  # a per-channel mean commutes with the scaling; only a Gemm may follow
        elif node.op in RESHAPES and first.kind != "gemm":
            # Conv -> Gemm only when trivial: [N, C, 1, ..., 1] flattened to [N, C].
            before, after = _static_shape(node.inputs[0]), _static_shape(node.outputs[0])
            if before is None or after is None or len(before) < 3 or any(d != 1 for d in before[2:]):
                return None
            if before[1] != first.channels_out or len(after) != 2 or after[1] != first.channels_out:
                return None
            if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
                return None
            reshaped = True
        else:
            return None
        tensor = node.outputs[0]


def find_chains(model: Model, clips: dict[str, list] | None = None) -> list[list[Layer]]:
    """Chains (in graph order) of two or more layers that CLE can scale through.

    With a `clips` dict, chains also pass Clip(0, b) nodes; clips[layer] lists those after a layer.
    """
    subgraphs = model.has_subgraphs()
    layers = {}
    for node in model.nodes:
        layer = _layer(model, node, subgraphs)
        if layer is not None:
            layers[node.name] = layer
    graph = nx.DiGraph()
    for layer in layers.values():
        passed: list | None = [] if clips is not None else None
        nxt = _next_layer(model, layer, layers, subgraphs, passed)
        if nxt is not None:
            graph.add_edge(layer.name, nxt.name)
            if passed:
                assert clips is not None  # passed is a list only when clips is given
                clips[layer.name] = passed
    chains = []
    # Each layer has one data input and its output one consumer: the components are simple paths.
    for component in nx.weakly_connected_components(graph):
        order = list(nx.topological_sort(graph.subgraph(component)))
        chains.append([layers[name] for name in order])
    position = {node.name: i for i, node in enumerate(model.nodes)}
    chains.sort(key=lambda chain: position[chain[0].name])
    return chains


def layer_groups(chain: list[Layer]) -> list[tuple[Layer, ...]]:
    """AIMET's cut of a chain: triplets around a depthwise layer, pairs otherwise."""
    groups: list[tuple[Layer, ...]] = []
    i = 0
    while i < len(chain) - 1:
        if chain[i + 1].kind == "dw" and i + 2 < len(chain):
            groups.append((chain[i], chain[i + 1], chain[i + 2]))
            i += 2
        else:
            groups.append((chain[i], chain[i + 1]))
            i += 1
    return groups


def activation_output(model: Model, first: Layer) -> str:
    """The tensor the activations after `first` leave: what is quantized between it and the next layer,
    before any pooling or reshaping that the chain also passes (Conv -> Relu -> GlobalAveragePool -> Gemm)."""
    tensor = first.node.outputs[0]
    while True:
        consumers = model.consumers(tensor)
        if len(consumers) != 1 or model.is_graph_output(tensor):
            return tensor.name
        node = consumers[0]
        if node.op not in HOMOGENEOUS | BOUNDED | {"Min"} or len(node.outputs) != 1:
            return tensor.name
        tensor = node.outputs[0]

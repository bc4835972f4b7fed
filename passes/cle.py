"""cle: cross-layer equalization (DFQ, Nagel et al. 2019; algorithms.md §2.2-2.4). Exact.

For y = W2 f(W1 x + b1) with f positively homogeneous (Relu, LeakyRelu, PRelu,
identity) and a diagonal S > 0, `W1 <- S^-1 W1, b1 <- S^-1 b1, W2 <- W2 S` keeps
the function. With r1_i = max|W1[i]| (output channel i of layer 1) and
r2_i = max|W2[:, i]| (input channel i of layer 2), `s_i = sqrt(r1_i / r2_i)`
leaves both ranges at sqrt(r1_i r2_i), which is what per-tensor weight
quantization wants.

Layer groups follow AIMET: chains of Conv/Gemm layers in which every layer
output has one consumer and only homogeneous activations sit between, cut into
pairs and, around a depthwise conv (group == C_in == C_out), triplets
Conv -> DW -> Conv scaled to the common range c = (r1 r2 r3)^(1/3). Groups of a
chain share layers, so the pass sweeps over all groups until the largest
|log s| of a sweep is below `tolerance` (DFQ's iteration; AIMET does one sweep).

Clip(0, b) (ReLU6) is not homogeneous, and DFQ's answer, replacing it with Relu,
breaks models that rely on the clip (EfficientNet-Lite0 from TFLite falls to
36% top-1 agreement in float). By default chains pass through it and it is
rewritten as Relu + Min(x, b / s) with a per-channel bound, which is exact; plan
gives the Relu output the Min output's parameters, so the saturating quantizer
already clips at the largest bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import networkx as nx
import numpy as np

from qonnx.errors import PreconditionError
from qonnx.ir import Model
from qonnx.pipeline import Pass, PassResult, option, register

log = logging.getLogger(__name__)

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity"})
BOUNDED = frozenset({"Clip"})  # Clip(0, b): homogeneous once its bound follows the scale per channel
RESHAPES = frozenset({"Flatten", "Reshape"})
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class CleOptions:
    iterations: int = option(20, "most sweeps over all layer groups")
    clips: str = option(
        "exact", "Clip(0, b) between layers (ReLU6): 'exact' scales through it and rewrites it as "
                 "Relu + per-channel Min(b / s), so the float model is unchanged; 'stop' ends the chain there "
                 "(run relu6-to-relu first for DFQ's approximation)", choices=("exact", "stop"))
    tolerance: float = option(1e-4, "stop once a sweep's largest |log s| is below this")


@dataclass
class Layer:
    """A Conv/Gemm whose weight (and bias) CLE may rescale, with its channel axes."""

    node: object
    kind: str  # "conv", "dw" (depthwise, multiplier 1) or "gemm"
    weight: object
    bias: object | None
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


# ------------------------------------------------------------------ scaling (float64 working copies)
def _moved(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def out_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max|w| per output channel."""
    return np.max(np.abs(_moved(w, layer.out_axis)), axis=1)


def in_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max|w| per input channel (all output channels and kernel positions of that channel)."""
    return np.max(np.abs(_moved(w, layer.in_axis)), axis=1)


def _along(axis: int, ndim: int, values: np.ndarray) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


class _State:
    """float64 copies of the weights and biases being equalized, written back once at the end."""

    def __init__(self, model: Model, chains: list[list[Layer]]):
        self.w: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray | None] = {}
        self.out_scale: dict[str, np.ndarray] = {}  # cumulative divisor of each layer's output channels
        for layer in (la for chain in chains for la in chain):
            self.w[layer.name] = model.constant_value(layer.weight).astype(np.float64)
            bias = model.constant_value(layer.bias) if layer.bias is not None else None
            self.b[layer.name] = bias.astype(np.float64) if bias is not None else None
            self.out_scale[layer.name] = np.ones(layer.channels_out)

    def divide_out(self, layer: Layer, s: np.ndarray) -> None:
        w = self.w[layer.name]
        self.w[layer.name] = w / _along(layer.out_axis, w.ndim, s)
        b = self.b[layer.name]
        if b is not None:
            self.b[layer.name] = b / _along(layer.bias_axis, b.ndim, s)
        self.out_scale[layer.name] = self.out_scale[layer.name] * s

    def multiply_in(self, layer: Layer, s: np.ndarray) -> None:
        w = self.w[layer.name]
        self.w[layer.name] = w * _along(layer.in_axis, w.ndim, s)


def _safe_ratio(num: np.ndarray, den: np.ndarray, dead: np.ndarray) -> np.ndarray:
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=~dead)
    return out


def scale_pair(state: _State, first: Layer, second: Layer) -> np.ndarray:
    r1 = out_ranges(first, state.w[first.name])
    r2 = in_ranges(second, state.w[second.name])
    dead = (r1 * r2) == 0
    s = np.sqrt(_safe_ratio(r1, r2, dead))
    state.divide_out(first, s)
    state.multiply_in(second, s)
    return s


def scale_triplet(state: _State, first: Layer, mid: Layer, last: Layer) -> tuple[np.ndarray, np.ndarray]:
    r1 = out_ranges(first, state.w[first.name])
    r2 = out_ranges(mid, state.w[mid.name])  # depthwise: the in- and out-channel slices coincide
    r3 = in_ranges(last, state.w[last.name])
    dead = (r1 * r2 * r3) == 0
    c = np.cbrt(r1 * r2 * r3)
    s12 = _safe_ratio(r1, c, dead)
    s23 = _safe_ratio(c, r3, dead)
    state.divide_out(first, s12)
    state.multiply_in(mid, s12)
    state.divide_out(mid, s23)
    state.multiply_in(last, s23)
    return s12, s23


def _rescale_clip(model: Model, clip, layer: Layer, s: np.ndarray) -> bool:
    """Clip(0, b) after a layer whose output channel i is now divided by s_i: Relu + Min(b / s_i)."""
    if np.all(s == 1.0):
        return False
    if clip.op == "Min":  # already per channel: the bound follows the scale
        bound = model.constant_value(clip.inputs[1])
        clip.inputs[1] = model.make_constant(clip.name + "_bound", (bound / s.reshape(bound.shape)).astype(bound.dtype))
        return True
    _, upper = model.clip_bounds(clip)
    x, out = clip.inputs[0], clip.outputs[0]
    clip.op, clip.attrs, clip.inputs = "Relu", {}, [x]
    if np.isfinite(upper):
        rank = 2 if layer.kind == "gemm" else model.constant_value(layer.weight).ndim
        shape = [1, -1] + [1] * (rank - 2)
        relu_out = model.make_variable(clip.name + "_relu", dtype=out.dtype, shape=out.shape)
        clip.outputs = [relu_out]
        bound = model.make_constant(clip.name + "_bound", (upper / s).reshape(shape).astype(np.float32))
        model.add_node("Min", [relu_out, bound], [out], name=clip.name + "_min")
    return True


def equalize(model: Model, iterations: int = 20, tolerance: float = 1e-4, clips: str = "stop") -> dict:
    """Equalize every layer group in place; returns stats (`groups` 0 or no change: nothing written)."""
    clip_nodes: dict[str, list] | None = {} if clips == "exact" else None
    chains = find_chains(model, clip_nodes)
    groups = [g for chain in chains for g in layer_groups(chain)]
    stats = {"chains": len(chains), "pairs": sum(len(g) == 2 for g in groups),
             "triplets": sum(len(g) == 3 for g in groups), "sweeps": 0, "max_log_scale": 0.0,
             "first_max_log_scale": 0.0, "converged": True, "changed": False, "clips_rescaled": 0}
    if not groups:
        return stats
    state = _State(model, chains)
    worst = 0.0
    for sweep in range(max(1, iterations)):
        worst = 0.0
        for group in groups:
            scales = (scale_pair(state, *group),) if len(group) == 2 else scale_triplet(state, *group)
            for s in scales:
                if s.size:
                    worst = max(worst, float(np.max(np.abs(np.log(s)))))
        stats["sweeps"] = sweep + 1
        if sweep == 0:
            stats["first_max_log_scale"] = worst
            if worst < tolerance:  # already equalized: leave the model byte-identical
                return stats
        if worst < tolerance:
            break
    stats["max_log_scale"] = worst
    stats["converged"] = worst < tolerance
    for layer in (la for chain in chains for la in chain):
        w = model.constant_value(layer.weight)
        layer.weight.values = state.w[layer.name].astype(w.dtype)
        if layer.bias is not None:
            b = model.constant_value(layer.bias)
            layer.bias.values = state.b[layer.name].astype(b.dtype)
        # The layer's output channel i is now divided by s_i: so is its folded BN's N(beta, gamma^2).
        norm = model.folded_norms.get(layer.node.outputs[0].name)
        s = state.out_scale[layer.name]
        if norm is not None and np.shape(norm.gamma) == s.shape:
            norm.gamma = (np.asarray(norm.gamma, np.float64) / s).astype(np.asarray(norm.gamma).dtype)
            norm.beta = (np.asarray(norm.beta, np.float64) / s).astype(np.asarray(norm.beta).dtype)
        for clip in (clip_nodes or {}).get(layer.name, []):
            stats["clips_rescaled"] += _rescale_clip(model, clip, layer, s)
    if stats["clips_rescaled"]:
        model.cleanup()
    stats["changed"] = True
    return stats


@register
class CrossLayerEqualization(Pass):
    name = "cle"
    summary = "cross-layer equalization of Conv/Gemm chains and depthwise triplets (exact)"
    Options = CleOptions
    provides = frozenset({"equalized"})
    forbidden_after = {"calibrated": "CLE rescales weights and activation ranges, so calibrated parameters "
                                     "would be stale: run cle before calibrate"}
    exact = True

    def run(self, model: Model, ctx) -> PassResult:
        calibrated = sorted(name for name, entry in model.quant.tensors.items() if entry.calibrated)
        if calibrated:
            raise PreconditionError(
                f"pass 'cle' cannot run on a calibrated model ({len(calibrated)} tensors have parameters, "
                f"e.g. '{calibrated[0]}'): run cle before calibrate")
        stats = equalize(model, self.options.iterations, self.options.tolerance, self.options.clips)
        changed = stats.pop("changed")
        if changed and not stats["converged"]:
            log.info("cle: stopped after %d sweeps with max |log s| = %.3g", stats["sweeps"], stats["max_log_scale"])
        return PassResult(model, changed, stats)

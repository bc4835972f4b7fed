"""fold-bn: fold BatchNormalization (as a node, or decomposed into per-channel Sub/Mul/Add) into the preceding
Conv/ConvTranspose/Gemm (exact)."""

from __future__ import annotations

import numpy as np

from qonnx.core.ir import FoldedNorm, Model
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext


def _bn_affine(model: Model, bn) -> tuple[np.ndarray, np.ndarray] | None:
    """(multiplier, offset) with BN(y) = y * multiplier + offset, per channel, in float64."""
    values = [model.constant_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in values) or bn.attrs.get("training_mode", 0):
        return None
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in values)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    mult = gamma / np.sqrt(var + eps)
    return mult, beta - mean * mult


def _out_channel_axis(model: Model, layer) -> int | None:
    if layer.op == "Conv":
        return 0
    if layer.op == "ConvTranspose":
        return 1 if int(layer.attrs.get("group", 1)) == 1 else None
    if layer.op == "Gemm":
        if float(layer.attrs.get("alpha", 1.0)) != 1.0 or float(layer.attrs.get("beta", 1.0)) != 1.0:
            return None
        return 0 if int(layer.attrs.get("transB", 0)) else 1
    return None


def _set_bias(model: Model, layer, bias_t, values: np.ndarray) -> None:
    if bias_t is None:
        layer.inputs.append(model.make_constant(layer.name + "_bias", values))
    else:
        bias_t.values = values


def _absorb_output_affine(model: Model, layer, axis: int, bias_t, bias: np.ndarray, mult: np.ndarray,
                          offset: np.ndarray, nodes: list) -> None:
    """y * mult + offset per output channel into the layer's weight and bias (`bias_t` its bias tensor or None,
    `bias` the values, size 1 or channels); the layer then produces the output of `nodes[-1]`, and `nodes` go."""
    weight, w = layer.inputs[1], model.constant_value(layer.inputs[1])
    assert w is not None  # both callers checked that the weight is a constant
    shape = [1] * w.ndim
    shape[axis] = -1
    weight.values = (w.astype(np.float64) * mult.reshape(shape)).astype(w.dtype)
    channels = mult.shape[0]
    _set_bias(model, layer, bias_t,
              (np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) * mult + offset).astype(w.dtype))
    layer_out = layer.outputs[0]
    layer.outputs[0] = nodes[-1].outputs[0]  # the layer now produces the last node's output tensor directly
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()
        model.graph.nodes.remove(node)
    layer_out.inputs.clear()


def _channel_vector(model: Model, tensor, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis (1) only, as a float64 vector of `channels`."""
    value = model.constant_value(tensor)
    if value is None or value.dtype.kind != "f" or value.ndim > rank:
        return None
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return value.reshape(-1)


def _affine_chain(model: Model, layer, channels: int, rank: int):
    """The per-channel Sub/Mul/Add/Div nodes right after a layer, as (nodes, multiplier, offset)."""
    mult, offset = np.ones(channels), np.zeros(channels)
    nodes, current = [], layer.outputs[0]
    while True:
        node = model.sole_consumer(current)
        if node is None or node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
            break
        first = node.inputs[0] is current
        c = _channel_vector(model, node.inputs[1] if first else node.inputs[0], channels, rank)
        if c is None:
            break
        if node.op == "Add":
            offset = offset + c
        elif node.op == "Sub" and first:  # x - c
            offset = offset - c
        elif node.op == "Sub":  # c - x
            mult, offset = -mult, c - offset
        elif node.op == "Mul":
            mult, offset = mult * c, offset * c
        elif first and np.all(c != 0):  # x / c
            mult, offset = mult / c, offset / c
        else:
            break
        nodes.append(node)
        current = node.outputs[0]
    return nodes, mult, offset


def fold_affine_chains(model: Model) -> list[str]:
    """Fold BatchNorm left decomposed as per-channel Sub/Mul/Add (Keras exports) into the layer before it.

    The statistics are gone (only mean and gamma/sigma survive as the Sub and Mul constants), so unlike a
    BatchNormalization node nothing is recorded for the data-free passes.
    """
    folded = []
    for layer in [n for n in model.nodes if n.op in ("Conv", "ConvTranspose", "Gemm")]:
        axis = _out_channel_axis(model, layer)
        weight = layer.inputs[1] if len(layer.inputs) > 1 else None
        w = model.constant_value(weight)
        if axis is None or w is None or len(model.consumers(weight)) != 1 or w.dtype.kind != "f":
            continue
        channels = w.shape[axis] * (int(layer.attrs.get("group", 1)) if layer.op == "ConvTranspose" else 1)
        rank = 2 if layer.op == "Gemm" else w.ndim
        nodes, mult, offset = _affine_chain(model, layer, channels, rank)
        bias_t = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
        b = model.constant_value(bias_t) if bias_t is not None else np.zeros(channels)
        if not nodes or b is None or (bias_t is not None and len(model.consumers(bias_t)) != 1):
            continue
        if b.size not in (1, channels) or (layer.op == "Gemm" and b.shape not in ((channels,), (1, channels))):
            continue
        _absorb_output_affine(model, layer, axis, bias_t, b, mult, offset, nodes)
        folded.append(layer.name)
    if folded:
        model.cleanup()
    return folded


def _inference_batchnorms(model: Model) -> list:
    """BatchNormalization nodes whose training outputs (running mean/var) nobody reads."""
    return [n for n in model.nodes if n.op == "BatchNormalization"
            and not any(model.consumers(t) for t in n.outputs[1:])]


def fold_batchnorms(model: Model) -> list[str]:
    folded = []
    for bn in _inference_batchnorms(model):
        layer = model.producer(bn.inputs[0])
        if layer is None or len(model.consumers(bn.inputs[0])) != 1 or model.is_graph_output(bn.inputs[0]):
            continue
        axis = _out_channel_axis(model, layer)
        weight = layer.inputs[1] if len(layer.inputs) > 1 else None
        w = model.constant_value(weight)
        affine = _bn_affine(model, bn)
        if axis is None or w is None or affine is None or len(model.consumers(weight)) != 1:
            continue
        mult, offset = affine
        gamma, beta = (np.asarray(model.constant_value(t), np.float64) for t in bn.inputs[1:3])
        channels = w.shape[axis] * (int(layer.attrs.get("group", 1)) if layer.op == "ConvTranspose" else 1)
        if mult.shape[0] != channels:
            continue
        bias_t = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
        b = model.constant_value(bias_t) if bias_t is not None else np.zeros(channels)
        if b is None or (bias_t is not None and len(model.consumers(bias_t)) != 1):
            continue
        if layer.op == "Gemm" and b.shape != (channels,):
            continue
        out = bn.outputs[0]
        _absorb_output_affine(model, layer, axis, bias_t, b, mult, offset, [bn])
        # The folded layer's output is distributed as N(beta, gamma^2) per channel.
        model.folded_norms[out.name] = FoldedNorm(gamma=gamma.copy(), beta=beta.copy())
        folded.append(layer.name)
    if folded:
        model.cleanup()
    return folded


def _forward_target(model: Model, bn):
    """The Conv/Gemm a BN feeds alone, when folding the BN into its input side is exact (no padding)."""
    out = bn.outputs[0]
    layer = model.sole_consumer(out)
    if (layer is None or layer.inputs[0] is not out or len(layer.inputs) < 2
            or len(model.consumers(layer.inputs[1])) != 1):
        return None
    if layer.op == "Conv":
        auto_pad = layer.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        # Padding adds zeros after the BN, where the fold would add the BN offset instead.
        if auto_pad not in ("NOTSET", "VALID") or any(int(p) for p in layer.attrs.get("pads", [])):
            return None
        return layer
    if layer.op == "Gemm" and not int(layer.attrs.get("transA", 0)) and \
            float(layer.attrs.get("alpha", 1.0)) == 1.0 and float(layer.attrs.get("beta", 1.0)) == 1.0:
        return layer
    return None


def fold_batchnorms_forward(model: Model) -> list[str]:
    """BN -> Conv/Gemm (a BN on a layer's input): scale the weights' input channels, shift the bias (exact)."""
    folded = []
    for bn in _inference_batchnorms(model):
        layer = _forward_target(model, bn)
        affine = _bn_affine(model, bn)
        w = model.constant_value(layer.inputs[1]) if layer is not None else None
        if layer is None or affine is None or w is None or w.dtype.kind != "f":
            continue
        mult, offset = affine
        bias_t = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
        if bias_t is not None and (model.constant_value(bias_t) is None or len(model.consumers(bias_t)) != 1):
            continue
        w64 = w.astype(np.float64)
        if layer.op == "Conv":
            groups = int(layer.attrs.get("group", 1))
            out_ch, in_per_group = w.shape[0], w.shape[1]
            if mult.shape[0] != in_per_group * groups or out_ch % groups:
                continue
            # Output channel o reads input channels group(o) * in_per_group + j, j < in_per_group.
            index = (np.arange(out_ch) // (out_ch // groups))[:, None] * in_per_group + np.arange(in_per_group)
            scale = mult[index].reshape(out_ch, in_per_group, *([1] * (w.ndim - 2)))
            shift = (w64 * offset[index].reshape(scale.shape)).reshape(out_ch, -1).sum(axis=1)
            new_w = w64 * scale
        else:  # Gemm: y = x W (+ b), or x W^T with transB
            trans_b = int(layer.attrs.get("transB", 0))
            k_axis = 1 if trans_b else 0
            if w.ndim != 2 or mult.shape[0] != w.shape[k_axis]:
                continue
            new_w = w64 * (mult[None, :] if trans_b else mult[:, None])
            shift = (w64 @ offset) if trans_b else (offset @ w64)
        channels = shift.shape[0]
        bias = model.constant_value(bias_t) if bias_t is not None else None  # a constant with bias_t (checked above)
        b = bias.astype(np.float64) if bias is not None else np.zeros(channels)
        if b.size not in (1, channels):
            continue
        layer.inputs[1].values = new_w.astype(w.dtype)
        _set_bias(model, layer, bias_t, (np.broadcast_to(b.reshape(-1), (channels,)) + shift).astype(w.dtype))
        layer.inputs[0] = bn.inputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        model.graph.nodes.remove(bn)
        folded.append(layer.name)
    if folded:
        model.cleanup()
    return folded


class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = ("fold BatchNormalization, and BatchNorm left decomposed as per-channel Sub/Mul/Add/Div, into the "
               "preceding Conv/ConvTranspose/Gemm (backward, exact); a BN with no layer before it into the "
               "Conv/Gemm after it where that is exact (no padding)")
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = fold_batchnorms(model)
        forward = fold_batchnorms_forward(model)  # only BNs with no layer before them are left for this
        chains = fold_affine_chains(model)
        return PassResult(model, bool(folded or forward or chains),
                          {"folded": len(folded), "folded_forward": len(forward), "affine_chains_folded": len(chains)})

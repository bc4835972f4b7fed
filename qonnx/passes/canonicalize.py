"""canonicalize: constant folding, Pad-into-Conv, Identity/Dropout removal."""

from __future__ import annotations

import numpy as np

from qonnx.core.ir import Model, numpy_dtype
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext
from qonnx.passes._transposes import sink_transposes


def _fold_pad_into_conv(model: Model) -> int:
    """Zero-padding Pad nodes feeding only a Conv become the Conv's own pads (TF 'SAME' exports)."""
    folded = 0
    for pad in [n for n in model.nodes if n.op == "Pad"]:
        mode = pad.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        out = pad.outputs[0]
        consumers = model.consumers(out)
        if mode != "constant" or len(consumers) != 1 or consumers[0].op != "Conv" or model.is_graph_output(out):
            continue
        conv = consumers[0]
        if conv.inputs[0] is not out or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        pads = model.constant_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
        has_value = len(pad.inputs) > 2 and pad.inputs[2].name
        value = model.constant_value(pad.inputs[2]) if has_value else None
        has_axes = len(pad.inputs) > 3 and pad.inputs[3].name
        if pads is None or has_axes or (has_value and (value is None or np.any(value != 0))):
            continue
        widths = [int(p) for p in pads.reshape(-1)]
        rank = len(widths) // 2
        if rank < 3 or any(p < 0 for p in widths) or widths[0] or widths[1] or widths[rank] or widths[rank + 1]:
            continue
        spatial = rank - 2
        old = list(conv.attrs.get("pads", [0] * (2 * spatial)))
        begin = [old[i] + widths[2 + i] for i in range(spatial)]
        end = [old[spatial + i] + widths[rank + 2 + i] for i in range(spatial)]
        conv.attrs["pads"] = begin + end
        conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    return folded


def _matmul_add_to_gemm(model: Model) -> int:
    """2-D MatMul(x, W) + Add(b) -> Gemm(x, W, b): ORT then fuses it with an int32 bias (QGemm).

    Linear in the graph: names come from a live naming session (each fused pair frees its names for the
    Gemm, as a fresh scan of the graph would) and the fused pairs leave the node list in one pass at the end.
    """
    with model.live_naming():
        fused = _fuse_matmul_adds(model)
    return fused


def _fuse_matmul_adds(model: Model) -> int:
    fused, removed = 0, []
    for mm in [n for n in model.nodes if n.op == "MatMul"]:
        x, w_t = mm.inputs
        w = model.constant_value(w_t)
        out = mm.outputs[0]
        consumers = model.consumers(out)
        if w is None or w.ndim != 2 or model.rank_of(x) != 2 or len(consumers) != 1:
            continue
        add = consumers[0]
        if add.op != "Add" or model.is_graph_output(out):
            continue
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = model.constant_value(other)
        if b is None or b.shape not in ((w.shape[1],), (1, w.shape[1])) or b.dtype != w.dtype:
            continue
        bias = model.make_constant(mm.name + "_bias", b.reshape(-1))
        gemm_out = add.outputs[0]
        model.detach_node(add)
        model.detach_node(mm)
        removed += [add, mm]
        model.add_node("Gemm", [x, w_t, bias], [gemm_out], name=mm.name)
        fused += 1
    model.remove_nodes(removed)
    return fused


def _scalar(model: Model, tensor) -> int | None:
    value = model.constant_value(tensor)
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _same_dim(source, data, index: int | None) -> bool:
    """Whether dimension `index` of `source` provably equals that of `data` (same tensor or same symbol)."""
    if index is None:
        return False
    if source is data:
        return True
    a, b = source.shape, data.shape
    if a is None or b is None or index >= min(len(a), len(b)):
        return False
    return a[index] == b[index] and (isinstance(a[index], str) or (isinstance(a[index], int) and a[index] > 0))


def _static_reshape_targets(model: Model) -> int:
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)), ..., [-1])) -> Reshape(x, [..0 at i.., -1]).

    `x.view(x.size(0), -1)` exports the batch size as a Shape chain; a 0 in a
    Reshape target copies that dimension from the input, so the chain folds to a
    constant (and ORT sees the same graph as after its own pre-processing).
    """
    folded = 0
    for reshape in [n for n in model.nodes if n.op == "Reshape"]:
        data, target = reshape.inputs[0], reshape.inputs[1]
        concat = model.producer(target)
        if model.is_constant(target) or concat is None or concat.op != "Concat" or reshape.attrs.get("allowzero", 0):
            continue
        values: list[int] = []
        for part in concat.inputs:
            constant = model.constant_value(part)
            if constant is not None:
                values.extend(int(v) for v in constant.reshape(-1))
                continue
            unsqueeze = model.producer(part)
            gather = model.producer(unsqueeze.inputs[0]) if unsqueeze is not None and unsqueeze.op == "Unsqueeze" else None
            shape = model.producer(gather.inputs[0]) if gather is not None and gather.op == "Gather" else None
            index = _scalar(model, gather.inputs[1]) if gather is not None else None
            if (shape is None or shape.op != "Shape" or not _same_dim(shape.inputs[0], data, index)
                    or shape.attrs.get("start") or shape.attrs.get("end") is not None or index != len(values)):
                values = []
                break
            values.append(0)
        if values and values.count(-1) <= 1 and 0 in values:
            reshape.inputs[1] = model.make_constant(reshape.name + "_shape", np.array(values, dtype=np.int64))
            folded += 1
    return folded


def _last_axis_softmax(model: Model) -> int:
    """Reshape(Softmax(Flatten(x, axis=r-1)), Shape(x)) -> Softmax(x, axis=-1).

    Upgrading an opset-11 Softmax to 13 wraps it in Flatten/Reshape, because the old semantics
    coerced the input to 2-D. Over the last axis both semantics agree, so the plain op is exact and
    lets later passes see the logits before the Softmax (PP-OCR's CTC head is such a case).
    """
    rewritten = 0
    for softmax in [n for n in model.nodes if n.op in ("Softmax", "LogSoftmax")]:
        flatten = model.producer(softmax.inputs[0])
        out = softmax.outputs[0]
        consumers = model.consumers(out)
        if flatten is None or flatten.op != "Flatten" or len(consumers) != 1 or model.is_graph_output(out):
            continue
        reshape, x = consumers[0], flatten.inputs[0]
        shape = model.producer(reshape.inputs[1]) if reshape.op == "Reshape" else None
        # Reshaped to Shape(x), the output has x's shape: either one tells the rank.
        rank = model.rank_of(x) if model.rank_of(x) is not None else model.rank_of(reshape.outputs[0])
        if (rank is None or int(flatten.attrs.get("axis", 1)) != rank - 1
                or int(softmax.attrs.get("axis", -1)) not in (-1, 1) or shape is None or shape.op != "Shape"
                or shape.inputs[0] is not x or shape.attrs.get("start") or shape.attrs.get("end") is not None
                or len(model.consumers(flatten.outputs[0])) != 1):
            continue
        softmax.inputs[0] = x
        softmax.attrs["axis"] = -1
        softmax.outputs[0] = reshape.outputs[0]
        reshape.outputs.clear()
        rewritten += 1
    return rewritten


def _is_noop_cast(model: Model, node) -> bool:
    """A Cast to the type its input already has (Keras exports are full of them)."""
    if node.op != "Cast" or "to" not in node.attrs:
        return False
    source = model.dtype_of(node.inputs[0])
    try:
        target = numpy_dtype(int(node.attrs["to"]))
    except (KeyError, TypeError, ValueError):
        return False
    return source is not None and source == target


def _drop_identities(model: Model) -> int:
    """Bypass Identity, no-op Cast and mask-less Dropout nodes; the bypassed nodes leave the list in one pass."""
    dropped = []
    with model.live_naming():
        for node in list(model.nodes):
            if node.op == "Identity" or _is_noop_cast(model, node) or (node.op == "Dropout" and (
                    len(node.outputs) == 1 or not (model.consumers(node.outputs[1]) or model.is_graph_output(node.outputs[1])))):
                if model.used_in_subgraph(node.outputs[0]):
                    continue
                while len(node.outputs) > 1:
                    node.outputs.pop()
                if model.bypass(node, remove=False):
                    dropped.append(node)
        model.remove_nodes(dropped)
    return len(dropped)


class Canonicalize(Pass):
    name = "canonicalize"
    summary = ("fold constant subgraphs (Shape chains too), fold zero Pads into Conv, drop Identity/Dropout/no-op Casts, "
               "2-D MatMul+Add into Gemm, last-axis Softmax out of its opset-11 Flatten/Reshape wrapper, NHWC "
               "Transpose round trips sunk until they cancel")
    provides = frozenset({"canonical"})
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = len(model.nodes)
        model.fold_constants()
        folded_constants = before - len(model.nodes)
        model.infer_shapes()
        dropped = _drop_identities(model)
        transposes = sink_transposes(model)
        pads = _fold_pad_into_conv(model)
        gemms = _matmul_add_to_gemm(model)
        with model.live_naming():
            reshapes = _static_reshape_targets(model)
        softmaxes = _last_axis_softmax(model)
        model.cleanup()
        if pads or dropped or reshapes or softmaxes or transposes:
            model.cleanup()
            model.fold_constants()
        model.infer_shapes()
        modified = bool(folded_constants or pads or dropped or gemms or reshapes or softmaxes or transposes)
        return PassResult(model, modified, {"nodes_folded": folded_constants, "pads_into_conv": pads,
                                            "identities_dropped": dropped, "matmul_add_to_gemm": gemms, "static_reshapes": reshapes,
                                            "last_axis_softmaxes": softmaxes, "transposes_removed": transposes,
                                            "nodes": len(model.nodes)})

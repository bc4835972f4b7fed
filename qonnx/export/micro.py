"""One layer exported alone at each precision and timed in ORT: the latency costs of mixed precision."""

from __future__ import annotations

import numpy as np
import onnx
from tqdm import tqdm

from qonnx.analyses.costs import PRECISIONS, CostTable, Unit, layer_shapes
from qonnx.core.ir import Model
from qonnx.core.qtable import LayerQuant, QuantState, Role, TensorQuant
from qonnx.export.qdq import export_qdq
from qonnx.numerics.quant import INT32_BIAS, UINT8_ACT, scale_zero_point
from qonnx.numerics.weight_ranges import weight_range
from qonnx.runtime.ort import latency_session
from qonnx.runtime.ort import measure_latency as run_interleaved


def micro_model(model: Model, node, unit: Unit, in_shape: tuple[int, ...], precision: str) -> bytes:
    """The layer alone with uint8 input and output (int8 plans) or float ones (weight-only plans).

    With quantized activations the input arrives as uint8 through an explicit DequantizeLinear and
    the output leaves through the exporter's QuantizeLinear/DequantizeLinear, so ORT sees the same
    pattern as inside the exported model: a QLinearConv (int8), DQ -> float op -> Q (float island),
    or whatever it makes of int4 weights. The trailing DequantizeLinear is common to every choice.
    """
    w = model.constant_value(node.inputs[1])
    assert w is not None  # units are planned weights, and plan quantizes constant weights only
    inits = [onnx.numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    bias = model.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None:
        inits.append(onnx.numpy_helper.from_array(bias, "b"))
        inputs.append("b")
    nodes = []
    act_scale = np.float32(0.05)
    if unit.activations_quantized:
        graph_in = onnx.helper.make_tensor_value_info("xq", onnx.TensorProto.UINT8, list(in_shape))
        inits += [onnx.numpy_helper.from_array(np.array(act_scale), "xs"),
                  onnx.numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes.append(onnx.helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"], name="input_dq"))
    else:
        graph_in = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(in_shape))
    nodes.append(onnx.helper.make_node(node.op, inputs, ["y"], name="layer", **dict(node.attrs)))
    graph = onnx.helper.make_graph(nodes, "micro", [graph_in],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", model.opset)])
    micro = Model.from_onnx(proto)
    scheme = unit.scheme_at(precision)
    if scheme is not None:
        rmin, rmax = weight_range(w, scheme, "minmax")
        s_w, z_w = scale_zero_point(rmin, rmax, scheme)
        micro.quant.set("w", TensorQuant(Role.WEIGHT, scheme, s_w, z_w, QuantState.CALIBRATED))
        if unit.activations_quantized and bias is not None:
            s_b = (act_scale * np.asarray(s_w, np.float32)).astype(np.float32).reshape(-1)
            micro.quant.set("b", TensorQuant(Role.BIAS, INT32_BIAS, s_b, np.zeros(s_b.shape, np.int64),
                                             QuantState.CALIBRATED, bias_of=("x", "w")))
        micro.quant.layers["layer"] = LayerQuant("layer", node.op, "x", "w", "b" if bias is not None else None, "y")
    if unit.activations_quantized:
        s_y, z_y = scale_zero_point(-4.0, 4.0, UINT8_ACT)
        micro.quant.set("y", TensorQuant(Role.ACTIVATION, UINT8_ACT, s_y, z_y, QuantState.CALIBRATED))
    if not micro.quant.tensors:
        return proto.SerializeToString()
    return export_qdq(micro).SerializeToString()


def measure_latency_costs(model: Model, ctx, table: CostTable, precisions: tuple[str, ...] = PRECISIONS,
                          runs: int = 20) -> np.ndarray:
    """Median milliseconds of each unit's layers at each precision, one microbenchmark per layer.

    Why a microbenchmark and not per-layer profiling of whole models: profiling needs one exported
    model per precision and a mapping from ORT's fused nodes back to ours, and it measures each layer
    only in the neighbourhood of that one configuration. A layer alone, with the Q/DQ around it that
    the exporter writes, measures exactly the choice being made. The precisions of one layer run
    interleaved (machine noise hits them alike); batch 1, one thread unless the context sets threads.
    What it leaves out: transitions between neighbouring float and integer layers beyond the layer's own
    Q/DQ, and cache effects between layers, so totals are approximations of whole-model latency.
    """
    shapes = table.shapes or layer_shapes(model, ctx)
    nodes = {n.name: n for n in model.nodes}
    threads = ctx.threads if ctx is not None else None
    rng = ctx.rng("latency") if ctx is not None else np.random.default_rng(0)
    latency = np.full((len(table.units), len(PRECISIONS)), np.nan)
    latency[:, [PRECISIONS.index(p) for p in precisions]] = 0.0
    progress = bool(ctx is not None and ctx.progress)
    for i, unit in enumerate(tqdm(table.units, desc="latency", unit="layer", disable=not progress, leave=False)):
        for name in unit.nodes:
            in_shape = shapes[name][0]
            sessions = [latency_session(micro_model(model, nodes[name], unit, in_shape, p), threads=threads or 1)
                        for p in precisions]
            feed_name = sessions[0].get_inputs()[0].name
            if unit.activations_quantized:
                x = rng.integers(0, 256, size=in_shape, dtype=np.uint8)
            else:
                x = rng.standard_normal(in_shape).astype(np.float32)
            timings = run_interleaved(sessions, {feed_name: x}, warmup=3, runs=runs)
            for p, t in zip(precisions, timings):
                latency[i, PRECISIONS.index(p)] += t.median_ms
    table.latency = latency
    return latency

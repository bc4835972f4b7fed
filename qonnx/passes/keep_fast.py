"""keep-fast: keep in float the layers where integer kernels lose, measured in ORT.

On small convolutions the Q/DQ conversions and layout changes around integer
kernels can cost more than the float kernel saves (ORT's own best INT8 PP-OCR
direction classifier is slower than FP32). This pass measures the exported
model against the float one on this machine; only when INT8 is not clearly
faster does it try keeping the smallest layers (by multiply-accumulates on a
calibration sample) in float, in quarters, and keeps the fastest configuration
that is not slower than FP32. Decisions come from timings, so they are recorded
in the quant table and reported; drop the pass for timing-independent output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qonnx.core.ir import Model
from qonnx.export.qdq import export_qdq
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.quantize.calibration import replan_without
from qonnx.runtime.ort import latency_session, make_session, measure_latency, with_outputs

log = logging.getLogger(__name__)


def layer_macs(model: Model, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates of each planned layer on one sample (output size x weights per output)."""
    layers = model.quant.layers
    nodes = {n.name: n for n in model.nodes}
    outputs = [nodes[name].outputs[0].name for name in layers]
    session = make_session(with_outputs(model.to_onnx(), outputs).SerializeToString(), spinning=False)
    shapes = dict(zip(outputs, (o.shape for o in session.run(outputs, feed))))
    macs = {}
    for name, layer in layers.items():
        node = nodes[name]
        out_shape = shapes[node.outputs[0].name]
        weight = model.constant_value(model.tensors()[layer.weight]) if layer.weight else None
        if node.op == "Conv" and weight is not None:
            per_output = int(np.prod(weight.shape[1:]))
        elif weight is not None:
            assert layer.weight is not None  # weight is read only when it is set
            entry = model.quant.get(layer.weight)
            assert entry is not None  # plan gives every layer weight an entry
            axis = entry.scheme.axis
            per_output = int(weight.size // weight.shape[axis if axis is not None else -1])
        else:
            per_output = int(model.rank_of(node.inputs[0]) or 1)
        macs[name] = int(np.prod(out_shape)) * per_output
    return macs


@dataclass(frozen=True)
class KeepFastOptions:
    threads: int = option(1, "ORT intra-op threads for the measurement")
    margin: float = option(0.05, "INT8 must be at least this fraction faster than FP32 to be kept as is")
    seconds: float = option(1.0, "minimum measuring time per configuration")


class KeepFast(Pass):
    name = "keep-fast"
    summary = "measure in ORT and keep float the smallest layers when integer kernels lose to FP32"
    Options = KeepFastOptions
    requires = frozenset({"calibrated", "calibration-data"})
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not model.quant.layers:
            return PassResult(model, False, {"int8_vs_fp32": None})
        feed = ctx.data().first_batch(1)
        float_session = latency_session(model.to_bytes(), threads=self.options.threads)

        def latency(candidate: Model) -> tuple[float, float]:
            quant_session = latency_session(export_qdq(candidate).SerializeToString(), threads=self.options.threads)
            fp, q = measure_latency([float_session, quant_session], feed, runs=30, min_seconds=self.options.seconds)
            return fp.median_ms, q.median_ms

        fp32_ms, int8_ms = latency(model)
        stats = {"fp32_ms": round(fp32_ms, 4), "int8_ms": round(int8_ms, 4)}
        if int8_ms <= fp32_ms * (1 - self.options.margin):
            stats["int8_vs_fp32"] = round(int8_ms / fp32_ms, 3)
            return PassResult(model, False, stats)
        macs = layer_macs(model, feed)
        order = sorted(macs, key=lambda name: (macs[name], name))
        best = (int8_ms / fp32_ms, 0)
        for quarter in (1, 2, 3):
            count = len(order) * quarter // 4
            trial = model.copy()
            replan_without(trial, ctx, {name: "" for name in order[:count]})
            fp, q = latency(trial)
            log.info("keep-fast: %d smallest layers float: %.3f x FP32", count, q / fp)
            if q / fp < best[0] - 0.02:  # a clear gain only: timings are noisy
                best = (q / fp, count)
        if best[0] > 1.0:  # INT8 loses however it is cut: keep the model float
            best = (1.0, len(order))
        count = best[1]
        if count:
            reason = f"integer kernels measured slower than float here (keep-fast, {self.options.threads} thread)"
            replan_without(model, ctx, {name: reason for name in order[:count]})
        stats.update({"kept_float": count, "int8_vs_fp32": round(best[0], 3)})
        return PassResult(model, count > 0, stats)

"""protect: keep in float the layers whose input cannot be quantized well.

Per-tensor uint8 activations lose most where a tensor has a few large values
and a mass of small ones (GELU outputs and LayerNorm outliers in transformers).
The expected SQNR of each layer input's quantization follows from the
calibration histogram at no extra cost; layers below the threshold are taken
out of the plan, with the reason recorded, and the rest is re-calibrated from
the same statistics. A MatMul with a constant weight need not go back to float:
its input can be quantized with a range taken per run (ORT's
DynamicQuantizeMatMul), which is the better trade for such inputs up to a
second, higher threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import ActivationStats, collect_activation_stats
from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role, TensorQuant
from qonnx.errors import PreconditionError
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import QuantScheme, scale_zero_point
from qonnx.numerics.ranges import expected_sqnr_db
from qonnx.numerics.weight_ranges import weight_range
from qonnx.quantize.calibration import replan_without


@dataclass(frozen=True)
class ProtectOptions:
    min_sqnr: float = option(22.0, "protect a layer when its input's expected quantization SQNR is below this (dB)")
    fallback: str = option("dynamic", "what a protected MatMul becomes: dynamic (int8 with its input range taken "
                                      "per run) or float; other layers always stay float",
                           choices=("dynamic", "float"))
    dynamic_sqnr: float = option(26.0, "a MatMul with a constant 2-D weight whose input's expected SQNR is below "
                                      "this (dB), though not below min_sqnr, has its input quantized per run "
                                      "(dynamic) instead of with the calibrated range; 0 turns this off")
    # Why dynamic from 26 dB: on MiniLM the 8 MatMuls between 22 and 26 dB lose more to one calibrated range
    # than to a range per run (mean cosine 0.9901 -> 0.9928), and DynamicQuantizeMatMul runs as fast as the
    # static kernel; its one cost is that it has no integer-only form.


class Protect(Pass):
    name = "protect"
    summary = "keep in float the layers whose input's expected quantization SQNR is below a threshold"
    Options = ProtectOptions
    requires = frozenset({"calibrated", "calibration-data"})
    exact = True
    edits_graph = False
    preserves = frozenset({ActivationStats})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        table, opts = model.quant, self.options
        layer_inputs = sorted({table.root(layer.input) for layer in table.layers.values()})
        stats = collect_activation_stats(model, layer_inputs, ctx)
        nodes = {n.name: n for n in model.nodes}
        protected: dict[str, float] = {}
        per_run: dict[str, float] = {}  # above min_sqnr, but better quantized per run than with one range
        for layer in table.layers.values():
            root = table.root(layer.input)
            entry = table.get(root)
            if entry is None or entry.scale is None or entry.zero_point is None:
                raise PreconditionError(f"pass 'protect': layer input '{root}' has no calibrated quantization "
                                        "parameters (protect needs quantized activations)")
            sqnr = expected_sqnr_db(stats[root], entry.scale, entry.zero_point, entry.scheme)
            if sqnr < opts.min_sqnr:
                protected[layer.node] = sqnr
            elif sqnr < opts.dynamic_sqnr and _dynamic_weight(model, nodes[layer.node]) is not None:
                per_run[layer.node] = sqnr
        if not protected and not per_run:
            return PassResult(model, False, {"protected": 0, "per_run": 0, "dynamic": 0})
        reasons = {node: f"input quantization SQNR {sqnr:.1f} dB < {opts.min_sqnr:g} dB (protect)"
                   for node, sqnr in protected.items()}
        reasons.update({node: f"input quantization SQNR {sqnr:.1f} dB < {opts.dynamic_sqnr:g} dB (protect)"
                        for node, sqnr in per_run.items()})
        replan_without(model, ctx, reasons)
        dynamic = sorted(per_run) + (sorted(protected) if opts.fallback == "dynamic" else [])
        made = _make_dynamic(model, [nodes[name] for name in dynamic])
        stats_out: dict[str, float] = {"protected": len(protected), "per_run": len(per_run), "dynamic": made}
        if protected:
            stats_out["lowest_sqnr_db"] = round(min(protected.values()), 2)
        return PassResult(model, True, stats_out)


def _dynamic_weight(model: Model, node) -> np.ndarray | None:
    """The weight of a MatMul that can run as DynamicQuantizeMatMul (constant, 2-D, used once), else None."""
    if node.op != "MatMul":
        return None
    weight = node.inputs[1]
    w = model.constant_value(weight)
    if w is None or w.ndim != 2 or len(model.consumers(weight)) != 1:
        return None
    return w


def _make_dynamic(model: Model, nodes: list) -> int:
    """The given MatMuls (out of the static plan) get per-run input quantization (DynamicQuantizeMatMul)."""
    table = model.quant
    per_channel = table.plan_options is None or table.plan_options.per_channel
    made = 0
    for node in nodes:
        w = _dynamic_weight(model, node)
        if w is None:
            continue
        node_name = node.name
        scheme = QuantScheme(bits=8, signed=True, symmetric=True, axis=1 if per_channel else None)
        rmin, rmax = weight_range(w, scheme, "minmax")
        scale, zero_point = scale_zero_point(rmin, rmax, scheme)
        table.dynamic[node_name] = TensorQuant(Role.WEIGHT, scheme, scale, zero_point, QuantState.CALIBRATED,
                                               method="minmax")
        table.kept_float[node_name] = table.kept_float[node_name].replace(
            "(protect)", "(protect): input quantized per run instead (dynamic)")
        made += 1
    return made

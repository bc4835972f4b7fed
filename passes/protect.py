"""protect: keep in float the layers whose input cannot be quantized well.

Per-tensor uint8 activations lose most where a tensor has a few large values
and a mass of small ones (GELU outputs and LayerNorm outliers in transformers).
The expected SQNR of each layer input's quantization follows from the
calibration histogram at no extra cost; layers below the threshold are taken
out of the plan, with the reason recorded, and the rest is re-calibrated from
the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.calibrate import STATS_ANALYSIS, Calibrate, CalibrateOptions, collect_activation_stats
from passes.plan import replan_excluding
from qonnx.ir import Model
from qonnx.pipeline import Pass, PassResult, option, register
from qonnx.qtable import QuantState, Role, TensorQuant
from qonnx.quant import QuantScheme, scale_zero_point
from qonnx.ranges import expected_sqnr_db, weight_range


@dataclass(frozen=True)
class ProtectOptions:
    min_sqnr: float = option(22.0, "protect a layer when its input's expected quantization SQNR is below this (dB)")
    fallback: str = option("float", "what a protected MatMul becomes: dynamic (int8 with its input range taken "
                                      "per run) or float; other layers always stay float",
                           choices=("dynamic", "float"))


@register
class Protect(Pass):
    name = "protect"
    summary = "keep in float the layers whose input's expected quantization SQNR is below a threshold"
    Options = ProtectOptions
    requires = frozenset({"calibrated", "calibration-data"})
    exact = True
    edits_graph = False
    preserves = frozenset({STATS_ANALYSIS})

    def run(self, model: Model, ctx) -> PassResult:
        table = model.quant
        layer_inputs = sorted({table.root(layer.input) for layer in table.layers.values()})
        stats = collect_activation_stats(model, layer_inputs, ctx)
        protected: dict[str, float] = {}
        for layer in table.layers.values():
            root = table.root(layer.input)
            entry = table.get(root)
            sqnr = expected_sqnr_db(stats[root], entry.scale, entry.zero_point, entry.scheme)
            if sqnr < self.options.min_sqnr:
                protected[layer.node] = sqnr
        if not protected:
            return PassResult(model, False, {"protected": 0})
        weights = {node: table.layers[node].weight for node in protected}
        replan_without(model, ctx, {
            node: f"input quantization SQNR {sqnr:.1f} dB < {self.options.min_sqnr:g} dB (protect)"
            for node, sqnr in protected.items()})
        dynamic = 0
        if self.options.fallback == "dynamic":
            dynamic = _make_dynamic(model, {n: w for n, w in weights.items() if w is not None})
        return PassResult(model, True, {"protected": len(protected), "dynamic": dynamic,
                                        "lowest_sqnr_db": round(min(protected.values()), 2)})


def _make_dynamic(model: Model, weights: dict[str, str]) -> int:
    """Protected MatMuls with a constant 2-D weight get per-run input quantization (DynamicQuantizeMatMul)."""
    table, tensors = model.quant, model.tensors()
    nodes = {n.name: n for n in model.nodes}
    made = 0
    for node_name, weight_name in sorted(weights.items()):
        node = nodes[node_name]
        w = model.constant_value(tensors[weight_name])
        if node.op != "MatMul" or w is None or w.ndim != 2 or len(model.consumers(tensors[weight_name])) != 1:
            continue
        scheme = QuantScheme(bits=8, signed=True, symmetric=True, axis=1)
        rmin, rmax = weight_range(w, scheme, "minmax")
        scale, zero_point = scale_zero_point(rmin, rmax, scheme)
        table.dynamic[node_name] = TensorQuant(Role.WEIGHT, scheme, scale, zero_point, QuantState.CALIBRATED,
                                               method="minmax")
        table.kept_float[node_name] = table.kept_float[node_name].replace(
            "(protect)", "(protect): input quantized per run instead (dynamic)")
        made += 1
    return made


def replan_without(model: Model, ctx, reasons: dict[str, str]) -> None:
    """Plan again with the given layers excluded and recalibrate from the cached statistics."""
    table = model.quant
    methods = {e.method for e in table.tensors.values() if e.role is Role.ACTIVATION and e.method}
    weight_methods = {e.method for e in table.tensors.values() if e.role is Role.WEIGHT and e.method}
    replan_excluding(model, ctx, reasons)
    auto = {"octav", "minmax"} >= methods and len(methods) > 1
    method = "auto" if auto or not methods else (methods.pop() if len(methods) == 1 else "auto")
    weights = weight_methods.pop() if len(weight_methods) == 1 else "minmax"
    Calibrate(CalibrateOptions(method=method, weights=weights)).run(model, ctx)

"""Calibration: activation ranges from the cached statistics, then weight and bias parameters.

The calibrate pass is this function with its options; protect and keep-fast call it again after
re-planning (from the statistics already gathered), instead of running the calibrate pass themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qonnx.analyses.activation_stats import collect_activation_stats
from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import scale_zero_point
from qonnx.numerics.ranges import RangeOptions, activation_range
from qonnx.quantize.parameters import calibrate_weights, in_tensor_type, set_bias_params
from qonnx.quantize.planning import replan_excluding


def auto_method(model: Model, tensor: Any) -> str:
    """The range method for one activation when method=auto (measured, see BENCHMARKS.md).

    Feature maps of convolutional nets (rank 4) have noise-like tails, where
    OCTAV's MSE-optimal clipping wins; token x channel activations of
    transformers carry a few outlier channels that matter, which clipping
    destroys, so they keep their full min/max range.
    """
    return "octav" if model.rank_of(tensor) == 4 else "minmax"


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "auto"  # activation range method, or auto (per tensor: auto_method)
    weights: str = "minmax"  # weight range method
    percentile: float = 99.999
    samples: int = 0  # calibration samples to use (0 = all)
    batch_size: int = 8


def calibrate(model: Model, ctx: PassContext, settings: CalibrationSettings) -> dict[str, Any]:
    """Activation ranges from statistics (cached or streamed now), weight ranges, int32 bias parameters."""
    table = model.quant
    range_opts = RangeOptions(percentile=settings.percentile)
    acts = table.of_role(Role.ACTIVATION)
    roots = sorted({table.root(n) for n in acts})
    layer_inputs = [layer.input for layer in table.layers.values() if layer.bias]
    # A weight-only plan has no activation to observe: the data is not streamed at all.
    stats = (collect_activation_stats(model, roots, ctx, settings.batch_size, settings.samples, layer_inputs)
             if roots or layer_inputs else {})
    tensors = model.tensors()
    methods = {name: auto_method(model, tensors[name]) if settings.method == "auto" else settings.method
               for name in roots}
    for name in roots:
        entry = table.get(name)
        scheme = entry.scheme if entry is not None else next(iter(acts.values())).scheme
        rmin, rmax = activation_range(stats[name], scheme, methods[name], range_opts)
        scale, zp = scale_zero_point(rmin, rmax, scheme)
        if entry is not None:
            entry.scale, entry.zero_point, entry.method = in_tensor_type(model, tensors[name], scale), zp, methods[name]
            entry.state = QuantState.CALIBRATED
    for name, entry in acts.items():
        root = table.root(name)
        if root != name:
            src = table.get(root)
            if src is None or src.scale is None:  # a root quantized only through its tie
                rmin, rmax = activation_range(stats[root], entry.scheme, methods[root], range_opts)
                scale, entry.zero_point = scale_zero_point(rmin, rmax, entry.scheme)
                entry.scale = in_tensor_type(model, tensors[root], scale)
            else:
                entry.scale, entry.zero_point = src.scale, src.zero_point
            entry.method, entry.state = methods[root], QuantState.CALIBRATED
    calibrate_weights(model, settings.weights, range_opts)
    grown = set_bias_params(model)
    return {"activations": len(acts), "tensors_observed": len(roots),
            "samples": len(ctx.data()) if not settings.samples else settings.samples,
            "bias_scale_guards": grown, "method": settings.method}


def replan_without(model: Model, ctx: PassContext, reasons: dict[str, str]) -> None:
    """Plan again with the given layers excluded and recalibrate with the methods the table used."""
    table = model.quant
    methods = {e.method for e in table.tensors.values() if e.role is Role.ACTIVATION and e.method}
    weight_methods = {e.method for e in table.tensors.values() if e.role is Role.WEIGHT and e.method}
    replan_excluding(model, reasons)
    auto = {"octav", "minmax"} >= methods and len(methods) > 1
    method = "auto" if auto or not methods else (methods.pop() if len(methods) == 1 else "auto")
    weights = weight_methods.pop() if len(weight_methods) == 1 else "minmax"
    calibrate(model, ctx, CalibrationSettings(method=method, weights=weights))

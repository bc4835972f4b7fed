"""calibrate: activation ranges from streamed statistics, weight ranges per channel.

Activation statistics are an analysis (qonnx.analyses.activation_stats, cached in the pass context):
the calibration set is streamed once through ORT with the needed intermediate tensors exposed in
memory, keeping a bounded histogram per tensor. calibrate-weights sets weight ranges only (no data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import ActivationStats, ChannelMeans
from qonnx.core.ir import Model
from qonnx.core.qtable import Role
from qonnx.errors import PreconditionError
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.ranges import ACTIVATION_METHODS
from qonnx.numerics.weight_ranges import WEIGHT_METHODS
from qonnx.quantize.calibration import CalibrationSettings, calibrate
from qonnx.quantize.parameters import calibrate_weights


@dataclass(frozen=True)
class CalibrateOptions:
    method: str = option("auto", "activation range method; auto = octav for image-like (rank-4) tensors, "
                                 "minmax for the rest", choices=("auto", *ACTIVATION_METHODS))
    weights: str = option("minmax", "weight range method (per channel)", choices=WEIGHT_METHODS)
    percentile: float = option(99.999, "percentile for method=percentile")
    samples: int = option(0, "calibration samples to use (0 = all)")
    batch_size: int = option(8, "samples per ORT run while collecting statistics")


class Calibrate(Pass):
    name = "calibrate"
    summary = "set activation ranges from calibration statistics and weight ranges per channel"
    Options = CalibrateOptions
    requires = frozenset({"plan", "calibration-data"})
    provides = frozenset({"calibrated"})
    forbidden_after = {"rounded": "weights are already rounded (AdaRound): calibrate before rounding"}
    preserves = frozenset({ActivationStats, ChannelMeans})  # the float graph is not touched
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        settings = CalibrationSettings(opts.method, opts.weights, opts.percentile, opts.samples, opts.batch_size)
        return PassResult(model, True, calibrate(model, ctx, settings))


@dataclass(frozen=True)
class CalibrateWeightsOptions:
    method: str = option("mse", "weight range method (per channel or block): the scale search", choices=WEIGHT_METHODS)


class CalibrateWeights(Pass):
    name = "calibrate-weights"
    summary = "weight ranges only, no data (weight-only plans: plan{activations=float})"
    Options = CalibrateWeightsOptions
    requires = frozenset({"plan"})
    provides = frozenset({"calibrated"})
    forbidden_after = {"rounded": "weights are already rounded (AdaRound): calibrate before rounding"}
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        acts = model.quant.of_role(Role.ACTIVATION)
        if acts:
            raise PreconditionError(f"pass 'calibrate-weights': the plan quantizes {len(acts)} activations, which "
                                    "need ranges too; use calibrate (with data) or estimate-ranges (data-free), "
                                    "or plan{activations=float} for weight-only quantization")
        before = {n: (None if e.scale is None else np.asarray(e.scale).tobytes())
                  for n, e in model.quant.of_role(Role.WEIGHT).items()}
        calibrate_weights(model, self.options.method)
        after = {n: np.asarray(e.scale).tobytes() for n, e in model.quant.of_role(Role.WEIGHT).items()}
        return PassResult(model, after != before, {"weights": len(after), "method": self.options.method})

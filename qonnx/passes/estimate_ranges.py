"""estimate-ranges: activation ranges with no calibration data (DFQ's data-free mode).

Per-channel Gaussian moments are carried through the float graph from the
folded BatchNorm statistics and an assumed input range (qonnx/analyses/moments.py); each
quantized activation gets the range mean +- `width` standard deviations over its
channels, cut to hard bounds (clips, sigmoids). Layers whose input cannot be
estimated (an op the propagation does not know) stay float, with the reason.

A vision model that kept no BatchNorm statistics (a TFLite export has them folded
away) gives the propagation nothing to anchor deep layers: there, the ranges are
the min/max over seeded synthetic 1/f-noise images in the input range instead
(qonnx/data/synthetic.py). Still no real data is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qonnx.analyses.activation_stats import stream_statistics
from qonnx.analyses.moments import (
    DEFAULT_INPUT_RANGE,
    DEFAULT_WIDTH,
    Moments,
    checked_input_range,
    moments_for,
)
from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role
from qonnx.data.calibration import open_calibration
from qonnx.data.synthetic import image_layout, pink_noise_images
from qonnx.errors import PreconditionError
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import scale_zero_point
from qonnx.numerics.ranges import activation_range
from qonnx.numerics.weight_ranges import WEIGHT_METHODS
from qonnx.quantize.parameters import calibrate_weights, set_bias_params
from qonnx.quantize.planning import replan_excluding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimateRangesOptions:
    input_range: tuple[float, ...] = option(
        DEFAULT_INPUT_RANGE, "range of the model's float inputs, 'low;high' (images normalized to [-1, 1] by default)")
    width: float = option(
        DEFAULT_WIDTH, "activation range = channel mean +- width standard deviations (wide: the independence "
             "assumption underestimates the spread of deep layers without BatchNorm about twofold)")
    weights: str = option("minmax", "weight range method (per channel)", choices=WEIGHT_METHODS)
    source: str = option("auto", "moments = Gaussian moments from the folded BatchNorm statistics; synthetic = "
                                 "min/max over seeded 1/f-noise images in input_range (vision models); auto = "
                                 "synthetic for an image input when the graph kept no BatchNorm statistics, "
                                 "else moments", choices=("auto", "moments", "synthetic"))
    samples: int = option(128, "synthetic: how many images to generate")


def _all_inputs_are_images(model: Model) -> bool:
    inputs = model.graph.inputs
    return bool(inputs) and all(image_layout(t.shape) is not None and model.is_float(t) for t in inputs)


def resolve_source(model: Model, source: str) -> str:
    if source == "synthetic":
        if not _all_inputs_are_images(model):
            raise PreconditionError("estimate-ranges{source=synthetic}: every model input must be an image "
                                    "([N,C,H,W] or [N,H,W,C], C of 1 or 3, known height and width)")
        return source
    if source == "auto":
        return "synthetic" if _all_inputs_are_images(model) and not model.folded_norms else "moments"
    return source


def synthetic_statistics(model: Model, ctx: PassContext, names: list[str], input_range: tuple[float, float],
                         samples: int) -> dict:
    """Statistics of each named tensor over generated images (streamed directly: nothing enters the cache)."""
    feeds = {t.name: pink_noise_images(t.shape, samples, input_range, seed=int(ctx.rng(f"synthetic:{t.name}")
                                                                               .integers(2**31)))
             for t in model.graph.inputs}
    data = open_calibration(feeds, model, max_samples=None)
    return stream_statistics(model, names, data, threads=ctx.threads, progress=ctx.progress)[0]


def _unknown_layers(model: Model, moments: dict[str, Moments]) -> dict[str, str]:
    """Layers that read or write a quantized tensor with no estimate, with the reason."""
    table, reasons = model.quant, {}
    missing = {n for n in table.of_role(Role.ACTIVATION) if table.root(n) not in moments}
    for layer in table.layers.values():
        for name in (layer.input, layer.output):
            if name in missing:
                reasons[layer.node] = f"no data-free range estimate for '{name}'"
    return reasons


class EstimateRanges(Pass):
    name = "estimate-ranges"
    summary = ("data-free activation ranges from BatchNorm statistics carried through the graph, or from "
               "synthetic 1/f-noise images for vision models without them")
    Options = EstimateRangesOptions
    requires = frozenset({"plan"})
    provides = frozenset({"calibrated"})
    forbidden_after = {"rounded": "weights are already rounded (AdaRound): set ranges before rounding"}
    exact = True
    edits_graph = False

    def assumed_input_range(self) -> tuple[float, float]:
        return checked_input_range(self.name, self.options.input_range)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        input_range = checked_input_range(self.name, opts.input_range)
        if opts.samples < 1:
            raise PreconditionError(f"estimate-ranges: samples must be at least 1, got {opts.samples}")
        source = resolve_source(model, opts.source)
        if source == "synthetic":
            return self._synthetic(model, ctx, input_range)
        moments = moments_for(model, ctx, input_range, opts.width)
        table = model.quant
        kept = _unknown_layers(model, moments)
        if kept:  # plan again without them, keeping the user's exclusions and reasons
            replan_excluding(model, kept)
            log.info("estimate-ranges: %d layers stay float (no estimate for their tensors)", len(kept))
        unknown = 0
        for name, entry in table.of_role(Role.ACTIVATION).items():
            est = moments.get(table.root(name))
            if est is None:  # requantized op outside any layer: leave it float by removing the entry
                unknown += 1
                continue
            entry.scale, entry.zero_point = scale_zero_point(est.low, est.high, entry.scheme)
            entry.method, entry.state = "moments", QuantState.CALIBRATED
        for name in [n for n, e in table.of_role(Role.ACTIVATION).items() if e.state is not QuantState.CALIBRATED]:
            del table.tensors[name]
        calibrate_weights(model, opts.weights)
        set_bias_params(model)
        return PassResult(model, True, {"activations": len(table.of_role(Role.ACTIVATION)), "source": "moments",
                                        "layers_kept_float": len(kept), "activations_without_estimate": unknown})

    def _synthetic(self, model: Model, ctx, input_range: tuple[float, float]) -> PassResult:
        table = model.quant
        acts = table.of_role(Role.ACTIVATION)
        roots = sorted({table.root(n) for n in acts})
        stats = synthetic_statistics(model, ctx, roots, input_range, self.options.samples)
        for name, entry in acts.items():
            # min/max: the generated images carry no outliers worth clipping away.
            low, high = activation_range(stats[table.root(name)], entry.scheme, "minmax")
            entry.scale, entry.zero_point = scale_zero_point(low, high, entry.scheme)
            entry.method, entry.state = "synthetic", QuantState.CALIBRATED
        calibrate_weights(model, self.options.weights)
        set_bias_params(model)
        return PassResult(model, True, {"activations": len(acts), "source": "synthetic",
                                        "samples": self.options.samples, "layers_kept_float": 0})

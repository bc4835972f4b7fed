"""bias-correction: remove the output-mean shift that weight rounding causes.

The quantized layer computes W~ x instead of W x; its expected output is off by
(W~ - W) E[x]. Folding that into the bias (b <- b - (W~ - W) E[x]) makes the
integer layer unbiased (Nagel et al. 2019, algorithms.md §3.1). E[x] is the
per-channel mean of the layer's input over the calibration data, so the
correction costs one streamed pass and O(channels) memory.

`mode=analytic` needs no data (DFQ): E[x] comes from the per-channel Gaussian
moments that estimate-ranges carries from the folded BatchNorm statistics
through ReLU / clipped-ReLU expectations (qonnx/analyses/moments.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import channel_means
from qonnx.analyses.moments import DEFAULT_INPUT_RANGE, DEFAULT_WIDTH, PropagatedMoments, moments_for
from qonnx.core.ir import Model
from qonnx.core.layers import channel_response
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import dequantize
from qonnx.quantize.parameters import quantized_weight_codes, set_bias_params


@dataclass(frozen=True)
class BiasCorrectionOptions:
    mode: str = option("empirical", "empirical: input means measured on calibration data; analytic: "
                                    "expected from BatchNorm statistics (data-free)",
                       choices=("empirical", "analytic"))
    samples: int = option(0, "calibration samples used for the input means (0 = all)")
    batch_size: int = option(8, "samples per ORT run")


class BiasCorrection(Pass):
    name = "bias-correction"
    summary = "fold the mean output error of rounded weights into the bias (empirical, per layer)"
    Options = BiasCorrectionOptions
    requires = frozenset({"calibrated", "calibration-data"})
    provides = frozenset({"bias-corrected"})
    warned_after = {"rounded": "bias correction after AdaRound is redundant (AdaRound already reconstructs "
                               "each layer's output, mean included); it runs because the pipeline asks for it"}
    exact = False

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.mode == "analytic":
            self.requires = frozenset({"calibrated"})

    def _means(self, model: Model, ctx: PassContext, names: list[str]) -> dict[str, np.ndarray]:
        if self.options.mode == "empirical":
            return channel_means(model, names, ctx, self.options.batch_size, self.options.samples)
        cached = ctx.analyses.get(PropagatedMoments)
        if cached is not None:
            moments = cached.moments
        else:  # ranges came from data: carry moments from the BN statistics with estimate-ranges' defaults
            moments = moments_for(model, ctx, DEFAULT_INPUT_RANGE, DEFAULT_WIDTH)
        return {n: moments[n].mean for n in names if n in moments}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        table, tensors = model.quant, model.tensors()
        layers = [layer for layer in table.layers.values() if layer.bias and layer.weight]
        nodes = {n.name: n for n in model.nodes}
        means = self._means(model, ctx, sorted({layer.input for layer in layers}))
        corrected, largest = 0, 0.0
        for layer in layers:
            assert layer.weight is not None and layer.bias is not None  # layers were chosen for having both
            w_entry = table.get(layer.weight)
            w = model.constant_value(tensors[layer.weight])
            assert w_entry is not None and w is not None  # plan gives constant layer weights an entry
            assert w_entry.scale is not None and w_entry.zero_point is not None  # set by calibration (required)
            codes = quantized_weight_codes(w_entry, w)  # rounded codes (AdaRound) or nearest rounding
            approx = dequantize(codes, w_entry.scale, w_entry.zero_point, w_entry.scheme.axis)
            mean = means.get(layer.input)
            if mean is None:
                continue
            shift = channel_response(nodes[layer.node], (approx.astype(np.float64) - w), mean)
            if shift is None:
                continue
            bias_t, b_entry = tensors[layer.bias], table.get(layer.bias)
            bias_values = model.constant_value(bias_t)
            assert b_entry is not None and bias_values is not None  # plan gives constant layer biases an entry
            bias = bias_values.astype(np.float64)
            previous = b_entry.correction if b_entry.correction is not None else np.zeros_like(bias)
            if np.allclose(shift, previous, rtol=1e-5, atol=1e-7 * (1 + float(np.max(np.abs(bias))))):
                continue  # already corrected for these weights and scales
            bias_t.values = (bias + previous - shift).astype(bias_values.dtype)
            b_entry.correction = shift
            corrected += 1
            largest = max(largest, float(np.max(np.abs(shift))))
        set_bias_params(model)
        return PassResult(model, corrected > 0, {"layers_corrected": corrected, "largest_shift": largest,
                                                 "mode": self.options.mode})

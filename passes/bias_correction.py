"""bias-correction: remove the output-mean shift that weight rounding causes.

The quantized layer computes W~ x instead of W x; its expected output is off by
(W~ - W) E[x]. Folding that into the bias (b <- b - (W~ - W) E[x]) makes the
integer layer unbiased (Nagel et al. 2019, algorithms.md §3.1). E[x] is the
per-channel mean of the layer's input over the calibration data, so the
correction costs one streamed pass and O(channels) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.calibrate import MEANS_ANALYSIS, collect_activation_stats, set_bias_params
from qonnx.export import quantized_weight_codes
from qonnx.ir import Model
from qonnx.pipeline import Pass, PassResult, option, register
from qonnx.quant import dequantize


def channel_means(model: Model, names: list[str], ctx, batch_size: int = 8, samples: int = 0
                  ) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of layer inputs; reuses calibration's pass over the data when cached."""
    if not names:
        return {}
    cached = ctx.analyses.get(MEANS_ANALYSIS)
    if cached is not None and cached[0] == (tuple(sorted(set(names))), samples):
        return cached[1]
    collect_activation_stats(model, [], ctx, batch_size, samples, names)
    return ctx.analyses[MEANS_ANALYSIS][1]


def output_shift(node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """(W~ - W) E[x] for the layer's weight error `error`, per output channel."""
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        summed = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [O, C/g]
        out_per_group, in_per_group = summed.shape[0] // groups, summed.shape[1]
        if mean.shape[0] != in_per_group * groups:
            return None
        grouped_mean = mean.reshape(groups, in_per_group)[np.arange(summed.shape[0]) // out_per_group]
        return np.sum(summed * grouped_mean, axis=1)
    if node.op == "Gemm":
        return error @ mean if int(node.attrs.get("transB", 0)) else mean @ error
    return None


@dataclass(frozen=True)
class BiasCorrectionOptions:
    samples: int = option(0, "calibration samples used for the input means (0 = all)")
    batch_size: int = option(8, "samples per ORT run")


@register
class BiasCorrection(Pass):
    name = "bias-correction"
    summary = "fold the mean output error of rounded weights into the bias (empirical, per layer)"
    Options = BiasCorrectionOptions
    requires = frozenset({"calibrated", "calibration-data"})
    provides = frozenset({"bias-corrected"})
    forbidden_after = {"rounded": "AdaRound already reconstructs the output mean; bias correction after it is "
                                  "redundant (run it before rounding or not at all)"}
    exact = False

    def run(self, model: Model, ctx) -> PassResult:
        table, tensors = model.quant, model.tensors()
        layers = [layer for layer in table.layers.values() if layer.bias and layer.weight]
        nodes = {n.name: n for n in model.nodes}
        means = channel_means(model, sorted({layer.input for layer in layers}), ctx,
                              self.options.batch_size, self.options.samples)
        corrected, largest = 0, 0.0
        for layer in layers:
            w_entry = table.get(layer.weight)
            w = model.constant_value(tensors[layer.weight])
            codes = quantized_weight_codes(w_entry, w)  # rounded codes (AdaRound) or nearest rounding
            approx = dequantize(codes, w_entry.scale, w_entry.zero_point, w_entry.scheme.axis)
            shift = output_shift(nodes[layer.node], (approx.astype(np.float64) - w), means[layer.input])
            if shift is None:
                continue
            bias_t, b_entry = tensors[layer.bias], table.get(layer.bias)
            bias = model.constant_value(bias_t).astype(np.float64)
            previous = b_entry.correction if b_entry.correction is not None else np.zeros_like(bias)
            if np.allclose(shift, previous, rtol=1e-5, atol=1e-7 * (1 + float(np.max(np.abs(bias))))):
                continue  # already corrected for these weights and scales
            bias_t.values = (bias + previous - shift).astype(model.constant_value(bias_t).dtype)
            b_entry.correction = shift
            corrected += 1
            largest = max(largest, float(np.max(np.abs(shift))))
        set_bias_params(model)
        return PassResult(model, corrected > 0, {"layers_corrected": corrected, "largest_shift": largest})

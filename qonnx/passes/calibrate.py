"""calibrate: activation ranges from streamed statistics, weight ranges per channel.

Activation statistics are an analysis (cached in the pass context): the
calibration set is streamed once through ORT with the needed intermediate
tensors exposed in memory, keeping a bounded histogram per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role
from qonnx.errors import PreconditionError
from qonnx.infra.pipeline import Pass, PassResult, option, register
from qonnx.numerics.quant import scale_zero_point
from qonnx.numerics.ranges import ACTIVATION_METHODS, RangeOptions, activation_range
from qonnx.numerics.stats import TensorHistogram
from qonnx.numerics.weight_ranges import WEIGHT_METHODS, weight_range
from qonnx.runtime.ort import stream_tensors

log = logging.getLogger(__name__)
STATS_ANALYSIS = "activation-stats"
INT32_LIMIT = 2**31 - 1


SAMPLES_PER_BATCH = 1 << 17  # histogram samples per tensor per batch: enough for the range methods


def sample_stride(size: int) -> int:
    """An odd prime stride (no aliasing with power-of-two tensor layouts) giving ~SAMPLES_PER_BATCH samples."""
    want = -(-size // SAMPLES_PER_BATCH)
    if want <= 1:
        return 1
    candidate = want | 1
    while any(candidate % p == 0 for p in range(3, int(candidate**0.5) + 1, 2)):
        candidate += 2
    return candidate


MEANS_ANALYSIS = "channel-means"


def collect_activation_stats(model: Model, names: list[str], ctx, batch_size: int = 8, samples: int = 0,
                             mean_names: list[str] | None = None) -> dict[str, TensorHistogram]:
    """Stream the calibration set through ORT and histogram the named tensors.

    Per-channel means (axis 1) of `mean_names` are gathered in the same pass and
    cached as the channel-means analysis (bias correction needs them).
    """
    from tqdm import tqdm

    mean_names = sorted(set(mean_names or []))
    key = (STATS_ANALYSIS, tuple(sorted(names)), samples)
    cached = ctx.analyses.get(STATS_ANALYSIS)
    if cached is not None and cached[0][2] == samples and set(names) <= set(cached[1]) and not mean_names:
        return {n: cached[1][n] for n in names}
    data = ctx.calibration if not samples else ctx.calibration.head(samples)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    stream = stream_tensors(model.to_onnx(), {*names, *mean_names}, data.batches(batch_size), ctx.options.get("threads"))
    stats = {n: TensorHistogram() for n in names}
    strides: dict[str, int] = {}
    with tqdm(total=len(data), desc="calibrating", unit="sample", disable=not ctx.progress, leave=False) as bar:
        for feed, values in stream:
            for name in names:
                value = values[name]
                if name not in strides:  # fixed per tensor, so batches keep their relative weight
                    strides[name] = sample_stride(value.size)
                stats[name].update(value, sample_stride=strides[name])
            for name in mean_names:
                value = values[name]
                # Sum over every axis but 1 without materialising a transposed copy.
                axes = tuple(i for i in range(value.ndim) if i != 1)
                sums[name] = sums.get(name, 0.0) + value.sum(axis=axes, dtype=np.float64)
                counts[name] = counts.get(name, 0) + value.size // value.shape[1]
            bar.update(len(next(iter(feed.values()))))
    ctx.analyses[STATS_ANALYSIS] = (key, stats)
    if mean_names or not names:
        ctx.analyses[MEANS_ANALYSIS] = ((tuple(mean_names), samples), {n: sums[n] / counts[n] for n in mean_names})
    return stats


def auto_method(model: Model, tensor) -> str:
    """The range method for one activation when method=auto (measured, see BENCHMARKS.md).

    Feature maps of convolutional nets (rank 4) have noise-like tails, where
    OCTAV's MSE-optimal clipping wins; token x channel activations of
    transformers carry a few outlier channels that matter, which clipping
    destroys, so they keep their full min/max range.
    """
    return "octav" if model.rank_of(tensor) == 4 else "minmax"


@dataclass(frozen=True)
class CalibrateOptions:
    method: str = option("auto", "activation range method; auto = octav for image-like (rank-4) tensors, "
                                 "minmax for the rest", choices=("auto", *ACTIVATION_METHODS))
    weights: str = option("minmax", "weight range method (per channel)", choices=WEIGHT_METHODS)
    percentile: float = option(99.999, "percentile for method=percentile")
    samples: int = option(0, "calibration samples to use (0 = all)")
    batch_size: int = option(8, "samples per ORT run while collecting statistics")


def _guard_bias(bias: np.ndarray, s_x: float, s_w: np.ndarray) -> tuple[np.ndarray, int]:
    """Raise weight scales of channels whose int32 bias would overflow (dead channels)."""
    need = np.abs(bias.astype(np.float64)) / (float(s_x) * INT32_LIMIT * 0.5)
    if s_w.ndim == 0:  # per-tensor weights: one scale must serve every channel
        need = np.max(need)
    grow = need > s_w
    return np.where(grow, need, s_w).astype(np.float32), int(np.count_nonzero(grow))


def calibrate_weights(model: Model, method: str, range_opts: RangeOptions | None = None) -> None:
    """Weight ranges (data independent); weights already rounded (AdaRound) keep their scales."""
    tensors = model.tensors()
    for name, entry in model.quant.of_role(Role.WEIGHT).items():
        if entry.state is QuantState.ROUNDED:
            continue
        rmin, rmax = weight_range(model.constant_value(tensors[name]), entry.scheme, method,
                                  range_opts or RangeOptions())
        entry.scale, entry.zero_point = scale_zero_point(rmin, rmax, entry.scheme)
        entry.method, entry.state = method, QuantState.CALIBRATED


def set_bias_params(model: Model) -> int:
    """int32 bias parameters (scale s_x * s_w, zero point 0); returns how many weight scales grew.

    A weight scale grows only where the int32 bias would overflow (dead channels).
    """
    table, tensors, grown = model.quant, model.tensors(), 0
    for name, entry in table.of_role(Role.BIAS).items():
        x_name, w_name = entry.bias_of
        x_entry, w_entry = table.get(x_name), table.get(w_name)
        bias = model.constant_value(tensors[name])
        if w_entry.state is not QuantState.ROUNDED:
            w_entry.scale, n = _guard_bias(bias, float(x_entry.scale), np.asarray(w_entry.scale))
            grown += n
        entry.scale = (np.float32(x_entry.scale) * w_entry.scale).astype(np.float32).reshape(-1)
        entry.zero_point = np.zeros(entry.scale.shape, np.int64)
        entry.state = QuantState.CALIBRATED
    return grown


@register
class Calibrate(Pass):
    name = "calibrate"
    summary = "set activation ranges from calibration statistics and weight ranges per channel"
    Options = CalibrateOptions
    requires = frozenset({"plan", "calibration-data"})
    provides = frozenset({"calibrated"})
    forbidden_after = {"rounded": "weights are already rounded (AdaRound): calibrate before rounding"}
    preserves = frozenset({STATS_ANALYSIS, MEANS_ANALYSIS})  # the float graph is not touched
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx) -> PassResult:
        opts = self.options
        table = model.quant
        range_opts = RangeOptions(percentile=opts.percentile)
        acts = table.of_role(Role.ACTIVATION)
        roots = sorted({table.root(n) for n in acts})
        layer_inputs = [layer.input for layer in table.layers.values() if layer.bias]
        # A weight-only plan has no activation to observe: the data is not streamed at all.
        stats = (collect_activation_stats(model, roots, ctx, opts.batch_size, opts.samples, layer_inputs)
                 if roots or layer_inputs else {})
        tensors = model.tensors()
        methods = {name: auto_method(model, tensors[name]) if opts.method == "auto" else opts.method
                   for name in roots}
        for name in roots:
            entry = table.get(name)
            scheme = entry.scheme if entry is not None else next(iter(acts.values())).scheme
            rmin, rmax = activation_range(stats[name], scheme, methods[name], range_opts)
            scale, zp = scale_zero_point(rmin, rmax, scheme)
            if entry is not None:
                entry.scale, entry.zero_point, entry.method = scale, zp, methods[name]
                entry.state = QuantState.CALIBRATED
        for name, entry in acts.items():
            root = table.root(name)
            if root != name:
                src = table.get(root)
                if src is None or src.scale is None:  # a root quantized only through its tie
                    rmin, rmax = activation_range(stats[root], entry.scheme, methods[root], range_opts)
                    entry.scale, entry.zero_point = scale_zero_point(rmin, rmax, entry.scheme)
                else:
                    entry.scale, entry.zero_point = src.scale, src.zero_point
                entry.method, entry.state = methods[root], QuantState.CALIBRATED
        calibrate_weights(model, opts.weights, range_opts)
        grown = set_bias_params(model)
        return PassResult(model, True, {"activations": len(acts), "tensors_observed": len(roots),
                                        "samples": len(ctx.calibration) if not opts.samples else opts.samples,
                                        "bias_scale_guards": grown, "method": opts.method})


@dataclass(frozen=True)
class CalibrateWeightsOptions:
    method: str = option("mse", "weight range method (per channel or block): the scale search", choices=WEIGHT_METHODS)


@register
class CalibrateWeights(Pass):
    name = "calibrate-weights"
    summary = "weight ranges only, no data (weight-only plans: plan{activations=float})"
    Options = CalibrateWeightsOptions
    requires = frozenset({"plan"})
    provides = frozenset({"calibrated"})
    forbidden_after = {"rounded": "weights are already rounded (AdaRound): calibrate before rounding"}
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx) -> PassResult:
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

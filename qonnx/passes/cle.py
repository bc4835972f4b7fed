"""cle: cross-layer equalization (DFQ, Nagel et al. 2019; algorithms.md §2.2-2.4). Exact.

For y = W2 f(W1 x + b1) with f positively homogeneous (Relu, LeakyRelu, PRelu,
identity) and a diagonal S > 0, `W1 <- S^-1 W1, b1 <- S^-1 b1, W2 <- W2 S` keeps
the function. With r1_i = max|W1[i]| (output channel i of layer 1) and
r2_i = max|W2[:, i]| (input channel i of layer 2), `s_i = sqrt(r1_i / r2_i)`
leaves both ranges at sqrt(r1_i r2_i), which is what per-tensor weight
quantization wants.

Layer groups follow AIMET: chains of Conv/Gemm layers in which every layer
output has one consumer and only homogeneous activations sit between, cut into
pairs and, around a depthwise conv (group == C_in == C_out), triplets
Conv -> DW -> Conv scaled to the common range c = (r1 r2 r3)^(1/3). Groups of a
chain share layers, so the pass sweeps over all groups until the largest
|log s| of a sweep is below `tolerance` (DFQ's iteration; AIMET does one sweep).

Clip(0, b) (ReLU6) is not homogeneous, and DFQ's answer, replacing it with Relu,
breaks models that rely on the clip (EfficientNet-Lite0 from TFLite falls to
36% top-1 agreement in float). By default chains pass through it and it is
rewritten as Relu + Min(x, b / s) with a per-channel bound, which is exact; plan
gives the Relu output the Min output's parameters, so the saturating quantizer
already clips at the largest bound.

`objective=noise` replaces the range equalization by scales that minimise the
modelled per-tensor quantization noise of both weights and the activation between
them (qonnx/numerics/cle_noise.py), from per-channel statistics of one pass over the
calibration data; the rewrite stays exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qonnx.analyses.chains import Layer, activation_output, find_chains, layer_groups
from qonnx.analyses.moments import checked_input_range, propagate_moments
from qonnx.core.ir import Model
from qonnx.errors import PreconditionError
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.cle_noise import ChannelStats, collect_channel_stats, noise_scales, stats_from_moments
from qonnx.runtime.ort import stream_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleOptions:
    iterations: int = option(20, "most sweeps over all layer groups")
    clips: str = option(
        "exact", "Clip(0, b) between layers (ReLU6): 'exact' scales through it and rewrites it as "
                 "Relu + per-channel Min(b / s), so the float model is unchanged; 'stop' ends the chain there "
                 "(run relu6-to-relu first for DFQ's approximation)", choices=("exact", "stop"))
    tolerance: float = option(1e-4, "stop once a sweep's largest |log s| is below this")
    objective: str = option(
        "ranges", "ranges: equalize weight ranges (DFQ; no data); noise: choose each pair's scales to minimise "
                  "the expected per-tensor int8 quantization noise of both weights and the activation between "
                  "them (calibration data; depthwise triplets are treated as two pairs)",
        choices=("ranges", "noise"))
    statistics: str = option(
        "data", "objective=noise: where the per-channel statistics come from; data: one pass over the "
                "calibration set; moments: Gaussian moments from the folded BatchNorm statistics carried "
                "through the graph (no data; pairs reading a tensor with no estimate get range CLE)",
        choices=("data", "moments"))
    input_range: tuple[float, ...] = option(
        (-1.0, 1.0), "statistics=moments: range of the model's float inputs, 'low;high'")
    width: float = option(8.0, "statistics=moments: a channel's peak is its mean + width standard deviations")
    samples: int = option(0, "objective=noise: calibration samples for the activation statistics (0 = all)")
    batch_size: int = option(8, "objective=noise: samples per ORT run")


# ------------------------------------------------------------------ scaling (float64 working copies)
def _moved(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def out_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max|w| per output channel."""
    return np.max(np.abs(_moved(w, layer.out_axis)), axis=1)


def in_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max|w| per input channel (all output channels and kernel positions of that channel)."""
    return np.max(np.abs(_moved(w, layer.in_axis)), axis=1)


def _weight(model: Model, layer: Layer) -> np.ndarray:
    """The layer's weight values (find_chains takes only layers with a constant weight)."""
    w = model.constant_value(layer.weight)
    assert w is not None
    return w


def _along(axis: int, ndim: int, values: np.ndarray) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


class _State:
    """float64 copies of the weights and biases being equalized, written back once at the end."""

    def __init__(self, model: Model, chains: list[list[Layer]]):
        self.w: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray | None] = {}
        self.out_scale: dict[str, np.ndarray] = {}  # cumulative divisor of each layer's output channels
        for layer in (la for chain in chains for la in chain):
            self.w[layer.name] = _weight(model, layer).astype(np.float64)
            bias = model.constant_value(layer.bias) if layer.bias is not None else None
            self.b[layer.name] = bias.astype(np.float64) if bias is not None else None
            self.out_scale[layer.name] = np.ones(layer.channels_out)

    def divide_out(self, layer: Layer, s: np.ndarray) -> None:
        w = self.w[layer.name]
        self.w[layer.name] = w / _along(layer.out_axis, w.ndim, s)
        b = self.b[layer.name]
        if b is not None:
            self.b[layer.name] = b / _along(layer.bias_axis, b.ndim, s)
        self.out_scale[layer.name] = self.out_scale[layer.name] * s

    def multiply_in(self, layer: Layer, s: np.ndarray) -> None:
        w = self.w[layer.name]
        self.w[layer.name] = w * _along(layer.in_axis, w.ndim, s)


def _safe_ratio(num: np.ndarray, den: np.ndarray, dead: np.ndarray) -> np.ndarray:
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=~dead)
    return out


def scale_pair(state: _State, first: Layer, second: Layer) -> np.ndarray:
    r1 = out_ranges(first, state.w[first.name])
    r2 = in_ranges(second, state.w[second.name])
    dead = (r1 * r2) == 0
    s = np.sqrt(_safe_ratio(r1, r2, dead))
    state.divide_out(first, s)
    state.multiply_in(second, s)
    return s


def scale_triplet(state: _State, first: Layer, mid: Layer, last: Layer) -> tuple[np.ndarray, np.ndarray]:
    r1 = out_ranges(first, state.w[first.name])
    r2 = out_ranges(mid, state.w[mid.name])  # depthwise: the in- and out-channel slices coincide
    r3 = in_ranges(last, state.w[last.name])
    dead = (r1 * r2 * r3) == 0
    c = np.cbrt(r1 * r2 * r3)
    s12 = _safe_ratio(r1, c, dead)
    s23 = _safe_ratio(c, r3, dead)
    state.divide_out(first, s12)
    state.multiply_in(mid, s12)
    state.divide_out(mid, s23)
    state.multiply_in(last, s23)
    return s12, s23


def _rescale_clip(model: Model, clip, layer: Layer, s: np.ndarray) -> bool:
    """Clip(0, b) after a layer whose output channel i is now divided by s_i: Relu + Min(b / s_i)."""
    if np.all(s == 1.0):
        return False
    if clip.op == "Min":  # already per channel: the bound follows the scale
        bound = model.constant_value(clip.inputs[1])
        assert bound is not None  # find_chains passes only a Min with a constant bound
        clip.inputs[1] = model.make_constant(clip.name + "_bound", (bound / s.reshape(bound.shape)).astype(bound.dtype))
        return True
    bounds = model.clip_bounds(clip)
    assert bounds is not None  # find_chains passes only a Clip with constant bounds
    _, upper = bounds
    x, out = clip.inputs[0], clip.outputs[0]
    clip.op, clip.attrs, clip.inputs = "Relu", {}, [x]
    if np.isfinite(upper):
        rank = 2 if layer.kind == "gemm" else _weight(model, layer).ndim
        shape = [1, -1] + [1] * (rank - 2)
        relu_out = model.make_variable(clip.name + "_relu", dtype=out.dtype, shape=out.shape)
        clip.outputs = [relu_out]
        bound = model.make_constant(clip.name + "_bound", (upper / s).reshape(shape).astype(np.float32))
        model.add_node("Min", [relu_out, bound], [out], name=clip.name + "_min")
    return True


def _upper_bound(model: Model, clips: list) -> np.ndarray | np.float64 | None:
    """The per-channel upper bound that the Clip(0, b) / Min nodes after a layer put on its output."""
    bound = None
    for clip in clips:
        b: np.ndarray | np.float64  # per channel (Min) or one bound for all (Clip)
        if clip.op == "Min":
            values = model.constant_value(clip.inputs[1])
            assert values is not None  # find_chains passes only a Min with a constant bound
            b = values.astype(np.float64).reshape(-1)
        else:
            bounds = model.clip_bounds(clip)
            assert bounds is not None  # find_chains passes only a Clip with constant bounds
            b = np.float64(bounds[1])
        bound = b if bound is None else np.minimum(bound, b)
    return None if bound is None or not np.all(np.isfinite(bound)) else bound


def _noise_pair(state: _State, first: Layer, second: Layer, stats: dict[str, ChannelStats],
                previous: Layer | None, bound: np.ndarray | np.float64 | None, activation: str) -> np.ndarray:
    """cle{objective=noise}: the scales minimising the pair's modelled quantization noise (qonnx/numerics/cle_noise.py).

    Where a Clip(0, b) sits between the layers, a channel's activation range is b, not the largest value
    calibration saw: EfficientNet-Lite0 has channels that are active on a few images only, and a scale
    that trusts their quiet calibration range clips them on new data (the chosen scales then also
    depend on which calibration images were used). `activation` names the quantized tensor after the
    activations, which is `second`'s input unless pooling sits between (its peak is the larger one).
    """
    w1, w2 = state.w[first.name], state.w[second.name]
    between = stats[second.node.inputs[0].name].scaled(state.out_scale[first.name])
    before_pool = stats[activation].scaled(state.out_scale[first.name])
    source = stats[first.node.inputs[0].name]
    if previous is not None:
        source = source.scaled(state.out_scale[previous.name])
    taps = int(np.prod(w1.shape[2:])) if first.kind != "gemm" else 1
    alpha = taps * (source.mean_sq if first.kind == "dw" else np.sum(source.mean_sq))
    beta = np.sum(_moved(w2, second.in_axis) ** 2, axis=1)
    n2 = w2.size / second.channels_in
    qa = 255.0 if between.nonnegative and before_pool.nonnegative else 127.5
    peak = np.maximum(between.max_abs, before_pool.max_abs)
    if bound is not None:
        # The range a channel may reach on new data, however quiet it was in calibration; and the most it
        # can reach where the peak is a Gaussian tail estimate (statistics=moments) rather than data.
        peak = np.broadcast_to(bound / state.out_scale[first.name], peak.shape).astype(np.float64)
    s, _, _ = noise_scales(out_ranges(first, w1), in_ranges(second, w2), peak, alpha, beta,
                           between.mean_sq, n2, qa)
    state.divide_out(first, s)
    state.multiply_in(second, s)
    return s


def _has_statistics(pair: tuple[Layer, Layer], channel_stats: dict, activations: dict[str, str]) -> bool:
    """Statistics for every tensor the pair's noise model reads, one value per channel (an estimate of a
    tensor whose channel count was unknown has one value for all)."""
    first, second = pair
    wanted = {first.node.inputs[0].name: first.channels_in, second.node.inputs[0].name: first.channels_out,
              activations[first.name]: first.channels_out}
    return all(n in channel_stats and channel_stats[n].max_abs.size == c for n, c in wanted.items())


def statistics_needed(model: Model, chains: list[list[Layer]]) -> list[str]:
    """Tensors whose per-channel statistics cle{objective=noise} reads: every chained layer's input and
    the activation output after every layer but the last of a chain."""
    inputs = {layer.node.inputs[0].name for chain in chains for layer in chain}
    return sorted(inputs | {activation_output(model, layer) for chain in chains for layer in chain[:-1]})


def equalize(model: Model, iterations: int = 20, tolerance: float = 1e-4, clips: str = "stop",
             statistics=None) -> dict:
    """Equalize every layer group in place; returns stats (`groups` 0 or no change: nothing written).

    With `statistics` (a function from tensor names to their ChannelStats), the scales minimise the
    modelled quantization noise of weights and activations instead of equalizing weight ranges.
    """
    clip_nodes: dict[str, list] | None = {} if clips == "exact" else None
    chains = find_chains(model, clip_nodes)
    range_groups = [g for chain in chains for g in layer_groups(chain)]
    # (group, scaled by the noise objective?): a depthwise triplet's two pairs each with its own activation,
    # and range equalization for a group with no estimate for a tensor it reads (moments)
    if statistics is None:
        groups = [(g, False) for g in range_groups]
    else:
        previous = {b.name: a for chain in chains for a, b in zip(chain, chain[1:])}
        channel_stats = statistics(statistics_needed(model, chains)) if range_groups else {}
        activations = {a.name: activation_output(model, a) for chain in chains for a in chain[:-1]}
        bounds = {name: _upper_bound(model, clips) for name, clips in (clip_nodes or {}).items()}
        groups = []
        for group in range_groups:
            pairs = list(zip(group, group[1:]))
            if all(_has_statistics(pair, channel_stats, activations) for pair in pairs):
                groups += [(pair, True) for pair in pairs]
            else:
                groups.append((group, False))
    stats = {"chains": len(chains), "pairs": sum(len(g) == 2 for g, _ in groups),
             "triplets": sum(len(g) == 3 for g, _ in groups), "sweeps": 0, "max_log_scale": 0.0,
             "first_max_log_scale": 0.0, "converged": True, "changed": False, "clips_rescaled": 0}
    if statistics is not None:
        stats["groups_on_ranges"] = sum(not noisy for _, noisy in groups)
    if not groups:
        return stats
    state = _State(model, chains)
    worst = 0.0
    for sweep in range(max(1, iterations)):
        worst = 0.0
        for group, noisy in groups:
            scales: tuple[np.ndarray, ...]
            if noisy:
                first, second = group  # the noise objective scales pairs only
                scales = (_noise_pair(state, first, second, channel_stats, previous.get(first.name),
                                      bounds.get(first.name), activations[first.name]),)
            else:
                scales = (scale_pair(state, *group),) if len(group) == 2 else scale_triplet(state, *group)
            for s in scales:
                if s.size:
                    worst = max(worst, float(np.max(np.abs(np.log(s)))))
        stats["sweeps"] = sweep + 1
        if sweep == 0:
            stats["first_max_log_scale"] = worst
            if worst < tolerance:  # already equalized: leave the model byte-identical
                return stats
        if worst < tolerance:
            break
    stats["max_log_scale"] = worst
    stats["converged"] = worst < tolerance
    for layer in (la for chain in chains for la in chain):
        w = _weight(model, layer)
        layer.weight.values = state.w[layer.name].astype(w.dtype)
        if layer.bias is not None:
            b, equalized = model.constant_value(layer.bias), state.b[layer.name]
            assert b is not None and equalized is not None  # chain biases are constants, copied by _State
            layer.bias.values = equalized.astype(b.dtype)
        # The layer's output channel i is now divided by s_i: so is its folded BN's N(beta, gamma^2).
        norm = model.folded_norms.get(layer.node.outputs[0].name)
        s = state.out_scale[layer.name]
        if norm is not None and np.shape(norm.gamma) == s.shape:
            norm.gamma = (np.asarray(norm.gamma, np.float64) / s).astype(np.asarray(norm.gamma).dtype)
            norm.beta = (np.asarray(norm.beta, np.float64) / s).astype(np.asarray(norm.beta).dtype)
        for clip in (clip_nodes or {}).get(layer.name, []):
            stats["clips_rescaled"] += _rescale_clip(model, clip, layer, s)
    if stats["clips_rescaled"]:
        model.cleanup()
    stats["changed"] = True
    return stats


class CrossLayerEqualization(Pass):
    name = "cle"
    summary = "cross-layer equalization of Conv/Gemm chains and depthwise triplets (exact)"
    Options = CleOptions
    provides = frozenset({"equalized"})
    forbidden_after = {"calibrated": "CLE rescales weights and activation ranges, so calibrated parameters "
                                     "would be stale: run cle before calibrate"}
    exact = True

    def __init__(self, options=None):
        super().__init__(options)
        opts = self.options
        if opts.statistics == "moments" and opts.objective != "noise":
            raise PreconditionError("cle: statistics=moments only applies to objective=noise")
        checked_input_range(self.name, opts.input_range)
        if opts.objective == "noise" and opts.statistics == "data":
            self.requires = frozenset({"calibration-data"})

    def assumed_input_range(self) -> tuple[float, float] | None:
        if self.options.objective == "noise" and self.options.statistics == "moments":
            return checked_input_range(self.name, self.options.input_range)
        return None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        calibrated = sorted(name for name, entry in model.quant.tensors.items() if entry.calibrated)
        if calibrated:
            raise PreconditionError(
                f"pass 'cle' cannot run on a calibrated model ({len(calibrated)} tensors have parameters, "
                f"e.g. '{calibrated[0]}'): run cle before calibrate")
        opts = self.options
        statistics = None
        input_range = self.assumed_input_range()  # set exactly when the statistics come from BN moments
        if input_range is not None:

            def statistics(names: list[str]) -> dict[str, ChannelStats]:
                moments = propagate_moments(model, input_range, opts.width)
                return {n: stats_from_moments(moments[n], opts.width) for n in names if n in moments}
        elif opts.objective == "noise":
            def statistics(names: list[str]) -> dict[str, ChannelStats]:
                data = ctx.data().head(opts.samples) if opts.samples else ctx.data()  # required in __init__
                return collect_channel_stats(stream_tensors(model.to_onnx(), names, data.batches(opts.batch_size),
                                                            ctx.threads))
        stats = equalize(model, opts.iterations, opts.tolerance, opts.clips, statistics)
        changed = stats.pop("changed")
        if changed and not stats["converged"]:
            log.info("cle: stopped after %d sweeps with max |log s| = %.3g", stats["sweeps"], stats["max_log_scale"])
        return PassResult(model, changed, stats)

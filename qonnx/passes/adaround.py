"""adaround: learned weight rounding (Nagel et al. 2020) on the calibrated grid, layer by layer.

Each layer's loss is the moment form of qonnx/rounding/layer_moments.py: one streamed pass over the calibration
samples gives G = E[x^ x^T] and E = E[(x^ - x) x^T], after which every optimizer step costs one
[O, I] x [I, I] product however much data there is. Reconstruction is asymmetric: x^ comes from the
exported model with the earlier layers already hard-rounded and activations quantized (what the deployed
graph computes), x and the target W x from the float model. The loss is taken before the layer's
activation: ReLU/ReLU6/Clip are 1-Lipschitz, so it bounds the post-activation error (algorithms.md §4.2).
Layers with no ancestor relation among them (q/k/v projections) share one pass over the data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from qonnx.core.ir import Model, Node
from qonnx.core.qtable import LayerQuant, QuantState
from qonnx.export.qdq import export_qdq
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import expand_blocked
from qonnx.rounding.adaround import (
    DEFAULT_ITERATIONS,
    SEARCH_MODES,
    ConvSpec,
    LayerMoments,
    adaround_weights,
    blocks_to_conv_weight,
    blocks_to_matmul_weight,
    conv_weight_blocks,
    matmul_weight_blocks,
    step_seconds,
)
from qonnx.runtime.ort import stream_tensors

log = logging.getLogger(__name__)
MIN_SAMPLES = 16  # images per layer at least, however many rows each gives


@dataclass(frozen=True)
class AdaRoundOptions:
    iterations: int = option(DEFAULT_ITERATIONS, "optimizer steps per layer (the schedule is fitted into the "
                                                 "time budget when they do not fit)")
    time_budget: float = option(420.0, "seconds for the whole pass (0 = no limit): the optimizer gets what the "
                                       "data passes leave; data passes are never cut, so a budget below their "
                                       "time is overrun")
    samples: int = option(0, "calibration samples for the layer moments (0 = all): with few rows per input "
                             "feature the rounding fits the calibration set, not the task")
    rows_per_input: int = option(256, "a layer stops collecting once its moments hold this many rows per "
                                      "input feature (high-resolution layers need only a few images)")
    batch_size: int = option(8, "samples per ORT run while collecting layer inputs")
    reg_weight: float = option(0.01, "lambda: weight of the rounding regularizer")
    lr: float = option(1e-3, "Adam learning rate for 10 000 steps; shorter schedules keep lr x steps")
    warm_start: float = option(0.2, "fraction of the steps without the regularizer")
    search: str = option("updown", "after hardening, a local search on the layer loss from the AdaRound and the "
                                   "nearest codes, keeping the better per row: updown (each weight stays "
                                   "rounded up or down), grid (any code; moves one step per round, so it can take "
                                   "minutes on large int8 layers: over 7 on Lite0's 1000x1280 classifier), off",
                    choices=SEARCH_MODES)


@dataclass
class _Layer:
    quant: LayerQuant
    node: Node
    weight: np.ndarray  # the float weight, graph layout
    blocks: np.ndarray  # [g, O_g, I_g]
    scale: np.ndarray  # broadcastable to the blocks
    step_seconds: float = 0.0  # one optimizer step, timed on a synthetic problem of the blocks' shape


def _weight_is_kn(node) -> bool:
    """MatMul and Gemm(transB=0) store W as [K, N] (y = x @ W); Gemm(transB=1) as [N, K] = [O, I]."""
    return node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transB", 0)))


def _prepare(model: Model, quant: LayerQuant, node: Node) -> _Layer | None:
    assert quant.weight is not None  # only layers with a weight are prepared
    entry = model.quant.get(quant.weight)
    assert entry is not None  # plan gives every layer weight an entry
    w = model.constant_value(node.inputs[1])
    scheme = entry.scheme
    if w is None or entry.state is not QuantState.CALIBRATED or not scheme.signed or not scheme.symmetric:
        return None
    scale = np.asarray(entry.scale, np.float64)
    if scheme.block_size:  # blocked: one scale per weight element, laid out like the weight blocks below
        assert scheme.axis is not None  # QuantScheme refuses a block size without an axis
        scale = expand_blocked(scale, w.shape, scheme.axis, scheme.block_size)
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        blocks = conv_weight_blocks(w, group)
        if scale.ndim == w.ndim:  # blocked: per element, in the blocks' layout
            scale = conv_weight_blocks(scale, group)
        elif scale.ndim:
            scale = scale.reshape(group, w.shape[0] // group, 1)
    elif node.op in ("MatMul", "Gemm"):
        kn = _weight_is_kn(node)
        blocks = matmul_weight_blocks(w) if kn else w[None]
        if scale.ndim == 2:
            scale = matmul_weight_blocks(scale) if kn else scale[None]
    else:
        return None
    return _Layer(quant, node, w, blocks, scale)


def _moments(layer: _Layer) -> LayerMoments:
    node = layer.node
    if node.op == "Conv":
        return LayerMoments.for_conv(layer.weight, ConvSpec.from_attrs(layer.weight.shape, node.attrs))
    return LayerMoments.for_linear(layer.blocks[0])


def _waves(model: Model, layers: list[_Layer]) -> list[list[_Layer]]:
    """Layers grouped by how many other layers lie upstream of their input: a wave's inputs depend only on
    layers of earlier waves, so one pass over the data serves the whole wave."""
    by_output = {t.name: layer for layer in layers for t in layer.node.outputs}
    depth: dict[str, int] = {}  # tensor name -> number of layers on the longest path to it
    for node in model.toposort():
        d = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if node.outputs and node.outputs[0].name in by_output:
            d += 1
        for t in node.outputs:
            depth[t.name] = d
    waves: dict[int, list[_Layer]] = {}
    for layer in layers:
        waves.setdefault(depth.get(layer.node.inputs[0].name, 0), []).append(layer)
    return [waves[k] for k in sorted(waves)]


def _quantized_input_names(proto, wave: list[_Layer]) -> dict[str, str]:
    """Layer node name -> the tensor its exported node reads as input (the dequantized activation)."""
    inputs = {n.name: n.input[0] for n in proto.graph.node}
    return {layer.quant.node: inputs.get(layer.quant.node, layer.quant.input) for layer in wave}


class AdaRound(Pass):
    name = "adaround"
    summary = "learn each weight's rounding (up or down) to minimise the layer's output error (AdaRound)"
    Options = AdaRoundOptions
    requires = frozenset({"calibrated", "calibration-data"})
    provides = frozenset({"rounded"})
    exact = False
    edits_graph = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from tqdm import tqdm

        opts = self.options
        start = time.perf_counter()
        nodes = {n.name: n for n in model.nodes}
        layers = [prepared for q in model.quant.layers.values() if q.weight and q.node in nodes
                  if (prepared := _prepare(model, q, nodes[q.node])) is not None]
        if not layers:
            return PassResult(model, False, {"layers": 0})
        data = ctx.data().head(opts.samples) if opts.samples else ctx.data()
        float_proto = model.to_onnx()
        waves = _waves(model, layers)
        if opts.time_budget:
            # The budget buys every layer the same number of steps: shared by multiply-adds it starved the small
            # layers, whose steps are mostly fixed overhead (1 000 steps each, hardened up to half undecided).
            timed: dict[tuple[int, ...], float] = {}
            for layer in layers:
                shape = layer.blocks.shape
                if shape not in timed:
                    timed[shape] = step_seconds(shape)
                layer.step_seconds = timed[shape]
        step_seconds_left = sum(layer.step_seconds for layer in layers)
        collect_seconds, gains, search_gains, stopped = 0.0, [], [], 0
        for index, wave in enumerate(waves):
            t0 = time.perf_counter()
            quant_proto = export_qdq(model, pack_int4=False)
            q_names = _quantized_input_names(quant_proto, wave)
            f_names = sorted({layer.quant.input for layer in wave})
            moments = {layer.quant.node: _moments(layer) for layer in wave}
            f_stream = stream_tensors(float_proto, f_names, data.batches(opts.batch_size), ctx.threads)
            q_stream = stream_tensors(quant_proto, q_names.values(), data.batches(opts.batch_size),
                                      ctx.threads)
            seen = 0
            for (feed, f_values), (_, q_values) in zip(f_stream, q_stream, strict=True):
                full = 0
                for layer in wave:
                    m = moments[layer.quant.node]
                    if seen >= MIN_SAMPLES and m.count >= opts.rows_per_input * layer.blocks.shape[2]:
                        full += 1
                        continue
                    m.add(q_values[q_names[layer.quant.node]], f_values[layer.quant.input])
                seen += len(next(iter(feed.values())))
                if full == len(wave):
                    break
            collect_seconds += time.perf_counter() - t0
            for layer in wave:
                budget = None
                if opts.time_budget:
                    # What is left, less the data passes still to come (at the mean cost so far), shared by the
                    # remaining layers in proportion to the time of their optimizer steps.
                    waves_left = len(waves) - index - 1
                    left = opts.time_budget - (time.perf_counter() - start) - collect_seconds / (index + 1) * waves_left
                    budget = max(0.05, left * layer.step_seconds / step_seconds_left)
                step_seconds_left -= layer.step_seconds
                assert layer.quant.weight is not None  # only layers with a weight are prepared
                entry = model.quant.get(layer.quant.weight)
                assert entry is not None  # _prepare read it
                with tqdm(total=opts.iterations, desc=f"adaround {layer.quant.node}", unit="step", leave=False,
                          disable=not ctx.progress, mininterval=0.5) as bar:

                    def advance(step: int, bar: tqdm = bar) -> None:
                        bar.update(step - bar.n)

                    codes, stats = adaround_weights(
                        layer.blocks, layer.scale, moments[layer.quant.node], entry.scheme.qmin, entry.scheme.qmax,
                        iterations=opts.iterations, reg_weight=opts.reg_weight, lr=opts.lr,
                        warm_start=opts.warm_start, time_budget_s=budget, lr_reference_steps=DEFAULT_ITERATIONS,
                        search=opts.search,
                        progress=advance)
                entry.codes = _to_graph_layout(codes, layer)
                entry.method = (entry.method + "+adaround") if entry.method else "adaround"
                entry.state = QuantState.ROUNDED
                stopped += int(stats.planned_iterations < opts.iterations)
                if stats.loss_nearest > 0:
                    gains.append(stats.loss_adaround / stats.loss_nearest)
                if stats.loss_hardened > 0:
                    search_gains.append(stats.loss_adaround / stats.loss_hardened)
        return PassResult(model, True, {
            "layers": len(layers),
            "waves": len(waves),
            "median_loss_vs_nearest": round(float(np.median(gains)), 4) if gains else None,
            "median_loss_vs_hardened": round(float(np.median(search_gains)), 4) if search_gains else None,
            "shortened_schedules": stopped,
            "data_seconds": round(collect_seconds, 1),
            "seconds": round(time.perf_counter() - start, 1),
        })


def _to_graph_layout(codes: np.ndarray, layer: _Layer) -> np.ndarray:
    node = layer.node
    if node.op == "Conv":
        graph = blocks_to_conv_weight(codes, layer.weight.shape)
    elif _weight_is_kn(node):
        graph = blocks_to_matmul_weight(codes)
    else:
        graph = codes[0]
    return graph.astype(np.int64)

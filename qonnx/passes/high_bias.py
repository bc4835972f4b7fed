"""high-bias-absorption: move the always-on part of a layer's output into the next layer's bias.

DFQ (Nagel et al. 2019, algorithms.md §2.2): after CLE a channel can carry a large
bias that widens the activation range for nothing. With the folded BN saying the
pre-activation of channel i is N(beta_i, gamma_i^2), c_i = max(0, beta_i - 3|gamma_i|)
is exceeded 99.87% of the time, so for y = W2 relu(W1 x + b1) + b2:
  b1 <- b1 - c,   b2 <- b2 + (W2 summed over its kernel) c
(with no activation in between, c = beta). A per-channel Min bound left by CLE
moves down by c too. Where the pre-activation falls below c, or at the zero-padded
border of the next conv, the float model changes slightly: the pass is approximate.
"""

from __future__ import annotations

import numpy as np

from qonnx.analyses.chains import Layer, find_chains
from qonnx.core.ir import Model, Node
from qonnx.core.layers import channel_response
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext

SHIFT_TRANSPARENT = frozenset({"GlobalAveragePool", "Flatten", "Reshape", "Identity"})


def _path(model: Model, first: Layer, second: Layer) -> list[Node] | None:
    """The nodes strictly between two chained layers."""
    nodes: list[Node] = []
    tensor = first.node.outputs[0]
    while True:
        consumer = model.consumers(tensor)[0]
        if consumer is second.node:
            return nodes
        nodes.append(consumer)
        tensor = consumer.outputs[0]
        if len(nodes) > 8:
            return None


def _absorbable(model: Model, nodes: list[Node]) -> tuple[bool, Node | None] | None:
    """(has relu, Min node) when a constant shift passes through the path; None otherwise."""
    relu, bound = False, None
    for node in nodes:
        if node.op == "Relu" and not relu and bound is None:
            relu = True
        elif node.op == "Min" and relu and bound is None and model.constant_value(node.inputs[1]) is not None:
            bound = node
        elif node.op not in SHIFT_TRANSPARENT:
            return None
    return relu, bound


def absorb_high_biases(model: Model) -> dict:
    absorbed, channels = 0, 0
    for chain in find_chains(model, {}):
        for first, second in zip(chain, chain[1:]):
            norm = model.folded_norms.get(first.node.outputs[0].name)
            if norm is None or first.bias is None or second.bias is None:
                continue
            nodes = _path(model, first, second)
            shape = _absorbable(model, nodes) if nodes is not None else None
            if shape is None:
                continue
            relu, bound = shape
            gamma, beta = np.asarray(norm.gamma, np.float64), np.asarray(norm.beta, np.float64)
            c = np.maximum(0.0, beta - 3 * np.abs(gamma)) if relu else beta.copy()
            if not np.any(c > 0 if relu else c != 0):
                continue
            w2 = model.constant_value(second.weight)
            assert w2 is not None  # find_chains takes only layers with a constant weight
            shift = channel_response(second.node, w2.astype(np.float64), c)
            if shift is None:
                continue
            b1, b2 = model.constant_value(first.bias), model.constant_value(second.bias)
            assert b1 is not None and b2 is not None  # both exist (checked above); chain biases are constants
            first.bias.values = (b1.astype(np.float64) - c.reshape(b1.shape)).astype(b1.dtype)
            second.bias.values = (b2.astype(np.float64) + shift.reshape(b2.shape)).astype(b2.dtype)
            if bound is not None:
                upper = model.constant_value(bound.inputs[1])
                assert upper is not None  # _absorbable checked that the Min bound is constant
                bound.inputs[1] = model.make_constant(bound.name + "_bound",
                                                      (upper - c.reshape(upper.shape)).astype(upper.dtype))
            norm.beta = (beta - c).astype(np.asarray(norm.beta).dtype)
            absorbed += 1
            channels += int(np.count_nonzero(c))
    if absorbed:
        model.cleanup()
    return {"pairs": absorbed, "channels": channels}


class HighBiasAbsorption(Pass):
    name = "high-bias-absorption"
    summary = "move the always-on part of BN-followed layer outputs into the next layer's bias (DFQ)"
    provides = frozenset({"bias-absorbed"})
    forbidden_after = {"calibrated": "absorption changes activation ranges: run it before calibrate"}
    exact = False  # exact only where the pre-activation exceeds c and away from padded borders

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = absorb_high_biases(model)
        return PassResult(model, stats["pairs"] > 0, stats)

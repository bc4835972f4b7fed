"""smooth: move activation outliers into the weights before a MatMul (SmoothQuant, Xiao et al. 2023).

x W = (x / s)(diag(s) W) for any per-channel s > 0, so dividing the input's
channels by s_j = max|x_j|^a / max|W_j|^(1-a) and multiplying the weight rows
by s_j leaves the float function unchanged while flattening the few outlier
channels that make a per-tensor activation range too coarse (GELU outputs in
transformers). The division is an explicit Mul in front of the layer, so the
preceding operator may be anything; it applies only to MatMuls whose input
would quantize below `min_sqnr` with a min/max uint8 range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import sample_stride
from qonnx.core.ir import Model
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import QuantScheme, scale_zero_point
from qonnx.numerics.ranges import expected_sqnr_db
from qonnx.numerics.stats import TensorHistogram
from qonnx.runtime.ort import stream_tensors

SUFFIX = "_Smooth"
ACTIVATION = QuantScheme(bits=8, signed=False, symmetric=False)


def _candidates(model: Model) -> list:
    found = []
    for node in model.nodes:
        if node.op != "MatMul" or node.name.endswith(SUFFIX):
            continue
        x, w_t = node.inputs
        w = model.constant_value(w_t)
        producer = model.producer(x)
        if (w is None or w.ndim != 2 or w.dtype != np.float32 or len(model.consumers(w_t)) != 1
                or not model.is_float(x) or (producer is not None and producer.name.endswith(SUFFIX))):
            continue
        found.append(node)
    return found


def _sqnr_db(stats: TensorHistogram) -> float:
    """Expected SQNR of the input with a min/max uint8 range."""
    return expected_sqnr_db(stats, *scale_zero_point(stats.min, stats.max, ACTIVATION), ACTIVATION)


@dataclass(frozen=True)
class SmoothOptions:
    alpha: float = option(0.8, "migration strength a in s = max|x|^a / max|W|^(1-a)")
    min_sqnr: float = option(22.0, "smooth a MatMul whose input quantizes below this SQNR (dB) with min/max uint8")
    samples: int = option(64, "calibration samples used for the per-channel maxima")


class Smooth(Pass):
    name = "smooth"
    summary = "divide outlier input channels of MatMuls by s and multiply the weight rows by s (SmoothQuant)"
    Options = SmoothOptions
    requires = frozenset({"calibration-data"})
    forbidden_after = {"plan": "smooth changes the graph: run it before plan"}
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        nodes = _candidates(model)
        if not nodes:
            return PassResult(model, False, {"smoothed": 0})
        names = sorted({n.inputs[0].name for n in nodes})
        amax: dict[str, np.ndarray] = {}
        hists = {n: TensorHistogram() for n in names}
        batches = ctx.data().head(self.options.samples).batches(8)
        for _, values in stream_tensors(model.to_onnx(), names, batches, ctx.threads):
            for name in names:
                x = values[name]
                channel_max = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
                amax[name] = np.maximum(amax.get(name, 0.0), channel_max)
                hists[name].update(x, sample_stride=sample_stride(x.size))
        smoothed, worst = 0, float("inf")
        for node in nodes:
            x, w_t = node.inputs
            sqnr = _sqnr_db(hists[x.name])
            w = model.constant_value(w_t)
            assert w is not None  # _candidates takes only MatMuls with a constant weight
            if sqnr >= self.options.min_sqnr or amax[x.name].shape[0] != w.shape[0]:
                continue
            a = self.options.alpha
            s = amax[x.name] ** a / np.maximum(np.abs(w).max(axis=1), 1e-12) ** (1 - a)
            s = np.where(amax[x.name] > 0, np.clip(s, 1e-5, 1e5), 1.0)
            w_t.values = (w.astype(np.float64) * s[:, None]).astype(w.dtype)
            inverse = model.make_constant(node.name + "_smooth_scale", (1.0 / s).astype(np.float32))
            out = model.make_variable(x.name + "_smoothed", dtype=np.float32, shape=x.shape)
            model.add_node("Mul", [x, inverse], [out], name=node.name + SUFFIX)
            node.inputs[0] = out
            smoothed += 1
            worst = min(worst, sqnr)
        if smoothed:
            model.toposort()
        return PassResult(model, smoothed > 0, {"smoothed": smoothed,
                                                "lowest_input_sqnr_db": round(worst, 2) if smoothed else None})

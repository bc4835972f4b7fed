"""relu6-to-relu: Clip(0, 6) after a Conv/Gemm becomes Relu, so that CLE can scale through it.

Clip(0, 6) is not positively homogeneous (`clip(s x) != s clip(x)` once s x > 6), so
cross-layer equalization would stop at every ReLU6 of a MobileNet. DFQ and AIMET
replace ReLU6 with ReLU before scaling (algorithms.md §2.2): the float model
changes a little (DFQ: MobileNetV2 71.72 -> 71.70). The pass is therefore not
exact; the caller measures the effect on the float model (the pass only counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.core.ir import Model
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext

LAYER_OPS = frozenset({"Conv", "Gemm"})


@dataclass(frozen=True)
class Relu6Options:
    upper: float | None = option(6.0, "replace only Clip(0, upper); none: any upper bound")


def replace_relu6(model: Model, upper: float | None = 6.0) -> list[str]:
    """Turn Clip(0, upper) nodes that directly follow a Conv/Gemm into Relu; returns their names."""
    replaced = []
    for clip in [n for n in model.nodes if n.op == "Clip"]:
        x = clip.inputs[0]
        producer = model.producer(x)
        if producer is None or producer.op not in LAYER_OPS:
            continue
        if not model.is_float(x) and model.dtype_of(x) is not None:
            continue
        bounds = model.clip_bounds(clip)
        if bounds is None:
            continue
        lo, hi = bounds
        if lo != 0.0:  # only min == 0 exactly: Relu is then the same below the top
            continue
        if upper is not None and np.isfinite(hi) and hi != upper:  # no max at all is a Relu too
            continue
        clip.op = "Relu"
        clip.attrs = {}
        clip.inputs = [x]
        replaced.append(clip.name)
    if replaced:
        model.cleanup()  # drops bound constants no longer used
    return replaced


class Relu6ToRelu(Pass):
    name = "relu6-to-relu"
    summary = "replace Clip(0, 6) after Conv/Gemm with Relu so that CLE can scale through it (approximate)"
    Options = Relu6Options
    forbidden_after = {"calibrated": "activation ranges were calibrated with the clip in place: "
                                     "run relu6-to-relu before calibrate"}
    exact = False  # the float model changes wherever activations exceeded the upper bound

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        replaced = replace_relu6(model, self.options.upper)
        return PassResult(model, bool(replaced), {"replaced": len(replaced)})

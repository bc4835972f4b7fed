"""plan: decide which nodes run as integer kernels and how each tensor is quantized (qonnx.quantize.planning)."""

from __future__ import annotations

from qonnx.core.ir import Model
from qonnx.core.qtable import Role
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext
from qonnx.quantize.planning import PlanOptions, apply_plan, fingerprint


class Plan(Pass):
    name = "plan"
    summary = "choose the integer layers and a quantization scheme for every tensor (no parameters yet)"
    Options = PlanOptions
    provides = frozenset({"plan"})
    exact = True
    edits_graph = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = fingerprint(model)
        apply_plan(model, self.options)
        stats = {
            "layers": len(model.quant.layers),
            "activations": len(model.quant.of_role(Role.ACTIVATION)),
            "weights": len(model.quant.of_role(Role.WEIGHT)),
            "kept_float": len(model.quant.kept_float),
        }
        return PassResult(model, fingerprint(model) != before, stats)

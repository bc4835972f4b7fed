"""The fusion read-back: which layers ORT's optimized graph runs as integer kernels, and which stay float.

An exported model is checked by reading back ORT's optimized graph: a Conv that ORT did not fuse is a
bug to report, not a silent slowdown.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

from qonnx.runtime.ort import optimized_graph

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "MatMulNBits",
})
FLOAT_KERNELS = {"Conv": "Conv", "FusedConv": "Conv", "NhwcFusedConv": "Conv", "Gemm": "Gemm",
                 "FusedGemm": "Gemm", "MatMul": "MatMul", "FusedMatMul": "MatMul"}


@dataclass
class FusionReport:
    integer_ops: Counter = field(default_factory=Counter)
    float_layers: list[tuple[str, str]] = field(default_factory=list)  # (op, node name)
    qdq_left: int = 0

    @property
    def integer_count(self) -> int:
        return sum(self.integer_ops.values())

    def describe(self) -> str:
        ops = ", ".join(f"{v} {k}" for k, v in sorted(self.integer_ops.items())) or "none"
        text = f"integer kernels in ORT: {ops}"
        if self.float_layers:
            text += f"; float layers: {len(self.float_layers)}"
        return text


def fusion_report(proto: onnx.ModelProto) -> FusionReport:
    """Read ORT's optimized graph and count integer kernels and layers left in float."""
    optimized = optimized_graph(proto)
    report = FusionReport()
    initializers = {i.name for i in optimized.graph.initializer}
    produced_by_dq = {o for n in optimized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in optimized.graph.node:
        if node.op_type in INTEGER_KERNELS:
            report.integer_ops[node.op_type] += 1
        elif node.op_type in FLOAT_KERNELS:
            weight = node.input[1] if len(node.input) > 1 else ""
            if weight in initializers or weight in produced_by_dq:
                report.float_layers.append((FLOAT_KERNELS[node.op_type], node.name))
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            report.qdq_left += 1
    return report

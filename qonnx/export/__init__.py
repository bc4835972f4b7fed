"""IR + quant table -> ONNX: the exporters, one per format, all `export(model) -> onnx.ModelProto`.

A new format is one module plus one EXPORTERS entry; the API and the CLI's `--format` take their choices
from this dict. Also here: lowering (shared by qop and int-only), low-bit weights, dyadic rescales, the
integer reference, and single-layer models for latency microbenchmarks.
"""

from __future__ import annotations

from typing import Protocol

import onnx

from qonnx.core.ir import Model
from qonnx.export.int_only import export_int_only
from qonnx.export.qdq import export_qdq
from qonnx.export.qop import export_qop


class Exporter(Protocol):
    def __call__(self, model: Model) -> onnx.ModelProto: ...


EXPORTERS: dict[str, Exporter] = {
    "qdq": export_qdq,  # QuantizeLinear/DequantizeLinear around float ops, in the shapes ORT fuses
    "qop": export_qop,  # QLinearConv/QLinearMatMul/QGemm/... operators
    "int-only": export_int_only,  # integer ops with dyadic requantization between input Q and output DQ
}

__all__ = ["EXPORTERS", "Exporter", "export_int_only", "export_qdq", "export_qop"]

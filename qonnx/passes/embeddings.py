"""embeddings: store large lookup tables as int8 with one scale per row.

A word-embedding table can hold most of a transformer's bytes (MiniLM: 47 of
its 90 MB) and no layer reads it as a weight, so `plan` leaves it float. A
Gather only copies rows, so the rows can be stored as int8 and scaled back
after the lookup: the exporter writes Gather(int8 table) -> Cast ->
Mul(Gather(row scales)), a quarter of the bytes and a few hundred
multiplications per looked-up row. One symmetric scale per row, not per
tensor: rows differ in norm (frequent tokens have small ones), and a per-tensor
step would flatten the small rows. The integer-only format keeps the tables
float (its Gathers copy float rows; the int8 rows would need a float scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import ActivationStats, ChannelMeans
from qonnx.analyses.moments import PropagatedMoments
from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role, TensorQuant
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.quant import QuantScheme, scale_zero_point
from qonnx.numerics.weight_ranges import weight_range

ROW_INT8 = QuantScheme(bits=8, signed=True, symmetric=True, axis=0)


def lookup_tables(model: Model, min_elements: int) -> dict[str, str]:
    """Gather node name -> its table's name, for Gathers of rows of a constant float32 matrix.

    Left float: tables also read by another op (quantizing the lookup would keep a float copy for
    it), tables with NaN/Inf (no scale fits), and constant indices (constant folding's business).
    """
    found = {}
    for node in model.nodes:
        if node.op != "Gather":
            continue
        table, indices = node.inputs
        values = model.constant_value(table)
        if (values is None or values.ndim != 2 or int(node.attrs.get("axis", 0)) % 2 != 0
                or values.dtype != np.float32 or values.size < max(min_elements, 1)
                or model.is_constant(indices) or len(model.consumers(table)) != 1
                or not np.isfinite(values).all()):
            continue
        found[node.name] = table.name
    return found


@dataclass(frozen=True)
class EmbeddingsOptions:
    min_elements: int = option(65536, "tables with fewer elements stay float (a small table saves few bytes)")


class Embeddings(Pass):
    name = "embeddings"
    summary = "int8 lookup tables, one scale per row, for Gathers from large constant matrices"
    Options = EmbeddingsOptions
    edits_graph = False
    preserves = frozenset({ActivationStats, ChannelMeans, PropagatedMoments})  # the float graph is untouched

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        tables = lookup_tables(model, self.options.min_elements)
        tensors = model.tensors()
        # np.asarray is the identity here: every lookup entry gets its scale (an array) from this pass.
        before = {name: np.asarray(entry.scale).tobytes() for name, entry in model.quant.gathers.items()}
        model.quant.gathers.clear()
        elements = 0
        for node_name, table in sorted(tables.items()):
            values = model.constant_value(tensors[table])
            assert values is not None  # lookup_tables takes only constant tables
            elements += values.size
            rmin, rmax = weight_range(values, ROW_INT8, "minmax")
            scale, zero_point = scale_zero_point(rmin, rmax, ROW_INT8)
            model.quant.gathers[node_name] = TensorQuant(Role.WEIGHT, ROW_INT8, scale, zero_point,
                                                         QuantState.CALIBRATED, method="minmax")
        after = {name: np.asarray(entry.scale).tobytes() for name, entry in model.quant.gathers.items()}
        return PassResult(model, after != before, {"tables": len(tables), "elements": elements})

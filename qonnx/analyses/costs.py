"""What each precision choice of a weight costs: bytes, bit operations and measured ORT latency.

The decision unit of mixed precision is one planned weight tensor with the layers (nodes) that use it:
a weight shared by several layers has one precision by construction (that is the tie HAWQ imposes on
shared weights). Choices are PRECISIONS: int4 or int8 weights on the plan's grid, or the layer left float.

- size: the bytes of the weight's exported initializers: codes (int4 packed two per byte), scales
  (float32) and zero points; MatMulNBits' padded blocks for 4-bit weight-only MatMuls; 4 bytes per
  element when float. Biases, activation parameters and the graph are the same for every choice.
- bops: multiply-accumulates per sample x weight bits x activation bits (32 for float operands).
  MACs come from the layer's shapes on one calibration sample (static shapes without data).
- latency: a microbenchmark per layer and choice, in ORT on this machine (qonnx.export.micro).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.ops import nbits_applies
from qonnx.core.qtable import LayerQuant, Role, TensorQuant
from qonnx.errors import PreconditionError
from qonnx.infra.context import Analysis, PassContext
from qonnx.numerics.quant import QuantScheme
from qonnx.runtime.ort import stream_tensors

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "float")
WEIGHT_BITS = {"int4": 4, "int8": 8, "float": 32}
COSTS_ANALYSIS = "mixed-precision-costs"


@dataclass(frozen=True)
class Unit:
    """One planned weight and the layers that read it: the unit that takes one precision."""

    weight: str
    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    shape: tuple[int, ...]
    scheme: QuantScheme  # the plan's scheme; the bits are what mixed precision chooses
    activations_quantized: bool  # the layers' inputs are uint8 (False in weight-only plans)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def scheme_at(self, precision: str) -> QuantScheme | None:
        bits = WEIGHT_BITS[precision]
        return None if precision == "float" else dataclasses.replace(self.scheme, bits=bits)


def find_units(model: Model) -> list[Unit]:
    """The planned weights in topological order of their first layer (activation MatMuls are not units)."""
    table = model.quant
    order = {n.name: i for i, n in enumerate(model.toposort())}
    by_weight: dict[str, list[LayerQuant]] = {}
    for layer in sorted(table.layers.values(), key=lambda q: order.get(q.node, len(order))):
        entry = table.get(layer.weight) if layer.weight else None
        if entry is not None and entry.role is Role.WEIGHT:
            assert layer.weight is not None  # the entry was found under it
            by_weight.setdefault(layer.weight, []).append(layer)
    tensors = model.tensors()
    units = []
    for weight, layers in by_weight.items():
        values, entry = model.constant_value(tensors[weight]), table.get(weight)
        assert values is not None and entry is not None  # plan quantizes constant weights; found above
        units.append(Unit(weight, tuple(q.node for q in layers), tuple(q.op for q in layers),
                          tuple(int(d) for d in values.shape), entry.scheme,
                          any(table.get(q.input) is not None for q in layers)))
    return units


# ------------------------------------------------------------------------------------------ sizes
def _scale_count(shape: tuple[int, ...], scheme: QuantScheme) -> int:
    if scheme.axis is None:
        return 1
    axis = scheme.axis % len(shape)
    if scheme.block_size:
        dims = list(shape)
        dims[axis] = -(-dims[axis] // scheme.block_size)
        return int(np.prod(dims, dtype=np.int64))
    return int(shape[axis])


def weight_bytes(unit: Unit, precision: str, nbits: bool = False) -> int:
    """Bytes of the unit's exported weight initializers at `precision` (nbits: exported as MatMulNBits)."""
    if precision == "float":
        return 4 * unit.params
    scheme = unit.scheme_at(precision)
    assert scheme is not None  # only the float precision has no scheme
    if nbits and scheme.bits == 4:
        assert scheme.block_size is not None  # MatMulNBits runs blocked weights only (nbits_applies)
        k, n = (unit.shape[1], unit.shape[0]) if scheme.axis == 1 else unit.shape
        blocks = -(-k // scheme.block_size)
        return n * blocks * scheme.block_size // 2 + 4 * n * blocks
    scales = _scale_count(unit.shape, scheme)
    if scheme.bits == 4:
        return -(-unit.params // 2) + 4 * scales + -(-scales // 2)
    return unit.params * scheme.bits // 8 + 4 * scales + scales * scheme.bits // 8


def _runs_as_nbits(model: Model, unit: Unit) -> bool:
    scheme = unit.scheme_at("int4")
    assert scheme is not None  # only the float precision has no scheme
    if len(unit.nodes) != 1:
        return False
    node = next(n for n in model.nodes if n.name == unit.nodes[0])
    return nbits_applies(model, node, TensorQuant(Role.WEIGHT, scheme))


# ------------------------------------------------------------------------------------------ shapes
def layer_shapes(model: Model, ctx: PassContext | None) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every planned layer for one sample (leading axis = 1).

    Measured on the first calibration sample when there is data (dynamic sizes resolved as the data
    has them), else taken from shape inference with unknown dimensions as 1.
    """
    nodes = {n.name: n for n in model.nodes}
    layers = [nodes[q.node] for q in model.quant.layers.values() if q.node in nodes]
    names = sorted({t.name for n in layers for t in (n.inputs[0], n.outputs[0])})
    shapes: dict[str, tuple[int, ...]] = {}
    if ctx is not None and ctx.calibration is not None:
        feed = ctx.calibration.first_batch(1)
        batch = int(next(iter(feed.values())).shape[0]) if next(iter(feed.values())).ndim else 1
        for _, values in stream_tensors(model.to_onnx(), names, [feed], ctx.threads):
            shapes = {n: _per_sample(v.shape, batch) for n, v in values.items()}
    else:
        for n in layers:
            for t in (n.inputs[0], n.outputs[0]):
                dims = tuple(d if isinstance(d, int) and d > 0 else 1 for d in (t.shape or ()))
                shapes[t.name] = (1, *dims[1:]) if dims else (1,)
    return {n.name: (shapes[n.inputs[0].name], shapes[n.outputs[0].name]) for n in layers}


def _per_sample(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    if len(shape) >= 2 and shape[0] == batch:
        return (1, *shape[1:])
    return tuple(shape)


def layer_macs(op: str, weight_shape: tuple[int, ...], out_shape: tuple[int, ...], trans_b: bool = False) -> int:
    """Multiply-accumulates of one sample: output elements x inputs per output."""
    outputs = int(np.prod(out_shape, dtype=np.int64))
    if op == "Conv":
        per_output = int(np.prod(weight_shape[1:], dtype=np.int64))
    elif op == "Gemm":
        per_output = weight_shape[1] if trans_b else weight_shape[0]
    elif op == "MatMul":
        per_output = weight_shape[-2]
    else:
        raise ValueError(f"no MAC count for op {op}")
    return outputs * int(per_output)


# ------------------------------------------------------------------------------------------ table
@dataclass
class CostTable(Analysis):
    """Per unit and precision costs, with the unit order of `units` (cached for the mixed-precision pass)."""

    units: list[Unit]
    macs: np.ndarray  # [U] per sample
    size: np.ndarray  # [U, P] bytes
    bops: np.ndarray  # [U, P]
    latency: np.ndarray | None = None  # [U, P] milliseconds (None until measured)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # node -> in, out
    notes: list[str] = field(default_factory=list)

    def matrix(self, name: str, precisions: tuple[str, ...]) -> np.ndarray:
        values = getattr(self, name)
        if values is None:
            raise PreconditionError(f"no '{name}' costs were computed")
        return values[:, [PRECISIONS.index(p) for p in precisions]]


def compute_costs(model: Model, ctx: PassContext, units: list[Unit] | None = None) -> CostTable:
    """Size and BOPs for every unit and precision (latency: qonnx.export.micro.measure_latency_costs)."""
    units = find_units(model) if units is None else units
    shapes = layer_shapes(model, ctx)
    nodes = {n.name: n for n in model.nodes}
    macs = np.zeros(len(units), np.int64)
    size = np.zeros((len(units), len(PRECISIONS)))
    bops = np.zeros((len(units), len(PRECISIONS)))
    for i, unit in enumerate(units):
        for name, op in zip(unit.nodes, unit.ops):
            trans_b = bool(int(nodes[name].attrs.get("transB", 0))) if op == "Gemm" else False
            macs[i] += layer_macs(op, unit.shape, shapes[name][1], trans_b)
        nbits = _runs_as_nbits(model, unit)
        for k, precision in enumerate(PRECISIONS):
            size[i, k] = weight_bytes(unit, precision, nbits)
            act_bits = 8 if unit.activations_quantized and precision != "float" else 32
            bops[i, k] = float(macs[i]) * WEIGHT_BITS[precision] * act_bits
    return CostTable(units, macs, size, bops, shapes=shapes)

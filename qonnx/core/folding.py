"""Constant folding's size guard: which foldable nodes may be evaluated, decided before evaluation.

No graphsurgeon here (core/ir.py is its only importer): the guard reads nodes and tensors through their
attributes (`op`, `inputs`, `outputs`, `attrs`, `name`; `shape`, `dtype`, `values`) and is handed the IR's
test for a constant tensor.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

FOLD_SIZE_LIMIT = 64 * 2**20
"""Bytes a single folded output may have (64 MiB), unless the model's own largest constant is larger.

Constant folding evaluates constant subgraphs with ONNX Runtime and stores the results in the model. A
tiny file can describe a huge result (`ConstantOfShape([4096, 1024, 1024])` is 16 GiB of float32, `Expand`,
`Tile` and `Range` alike): folding it would allocate it in memory and then write it into the output. A
result larger than every weight the model already holds is never a weight transform worth precomputing, so
such a subgraph stays in the graph, computed at run time as the model's author wrote it. The limit applies
before evaluation: sizes are derived from the constant inputs (see `FoldGuard`), so nothing above it is
ever allocated.
"""


def _itemsize(dtype: Any) -> int:
    """Bytes per element of a graphsurgeon dtype; 8 (the largest real type) when unknown."""
    try:
        size = np.dtype(dtype).itemsize
    except TypeError:
        return 8
    return size if 0 < size <= 16 else 8


def _static_shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def fold_size_limit(constants: Iterable[Any]) -> int:
    """The largest output constant folding may produce: `FOLD_SIZE_LIMIT`, or the model's largest constant
    (of `constants`, read for shape and dtype only: lazily loaded values stay on disk)."""
    largest = 0
    for tensor in constants:
        shape = _static_shape(tensor.shape) or ()
        largest = max(largest, math.prod(shape) * _itemsize(tensor.dtype))
    return max(FOLD_SIZE_LIMIT, largest)


_Info = tuple[tuple[int, ...] | None, int | None]  # (shape if known, element count if known)
# Ops whose output has the shape the inputs broadcast to (one input: its own shape).
_BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "PRelu", "Clip", "Relu", "LeakyRelu",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Not", "Erf", "Elu", "Selu", "Softplus", "Sin", "Cos", "IsNaN", "IsInf", "Cast",
    "CastLike", "Softmax", "LogSoftmax", "Identity", "CumSum",
})
# Ops whose output has at most as many elements as their first input.
_NO_LARGER_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "ArgMax", "ArgMin",
    "QuantizeLinear", "DequantizeLinear", "Dropout", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "Compress",
})
# Ops whose output size depends on the values of their inputs: derived from them, never from a declared shape.
_VALUE_SIZED_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "OneHot", "Resize", "Upsample"})
_SMALL_CONSTANT = 4096  # elements: the largest shape-like constant read to derive an output size
FOLD_ROUNDS = 8  # folding rounds at most, while nodes left unfolded for want of their input values shrink


class FoldGuard:
    """graphsurgeon's `should_exclude_node` for constant folding: True for a node whose output would pass
    the size limit or whose size cannot be bounded before evaluation.

    graphsurgeon asks about each foldable node in topological order; the sizes derived so far are kept by
    tensor name, so a chain (ConstantOfShape -> ReduceSum) is bounded from its constant inputs, whatever
    shapes the file declares. Excluding a node also keeps its consumers from being folded (or evaluated).
    """

    def __init__(self, limit: int, is_constant: Callable[[Any], bool]) -> None:
        self.limit = limit
        self.is_constant = is_constant  # the IR's test for a tensor with values (graphsurgeon's Constant)
        self.derived: dict[str, _Info] = {}
        self.unsized: set[str] = set()  # nodes left out because their size is not known before evaluation

    def __call__(self, node: Any) -> bool:
        estimates = self._estimate(node)
        exclude = False
        for index, out in enumerate(node.outputs):
            shape, elements = estimates[index] if estimates is not None else (None, None)
            declared = _static_shape(out.shape)
            if elements is None and node.op not in _VALUE_SIZED_OPS and declared is not None:
                shape, elements = declared, math.prod(declared)
            if shape is None and declared is not None and elements == math.prod(declared):
                shape = declared
            self.derived[out.name] = (shape, elements)
            if elements is None or elements * _itemsize(out.dtype) > self.limit:
                exclude = True
        unsized = any(self.derived[out.name][1] is None for out in node.outputs)
        if unsized:
            self.unsized.add(node.name)
        else:
            self.unsized.discard(node.name)
        if exclude:
            log.debug("not folding %s (%s): its output %s", node.name, node.op,
                      "has no size before evaluation" if unsized else f"passes {self.limit} bytes")
        return exclude

    def _info(self, tensor: Any) -> _Info:
        if self.is_constant(tensor):
            shape = _static_shape(tensor.shape)
            return shape, math.prod(shape) if shape is not None else None
        if tensor.name in self.derived:
            return self.derived[tensor.name]
        shape = _static_shape(tensor.shape)
        return shape, math.prod(shape) if shape is not None else None

    def _value(self, tensor: Any) -> np.ndarray | None:
        if not self.is_constant(tensor):
            return None
        shape = _static_shape(tensor.shape)
        if shape is None or math.prod(shape) > _SMALL_CONSTANT:
            return None
        return np.asarray(tensor.values)

    def _estimate(self, node: Any) -> list[_Info] | None:  # noqa: C901 - one branch per op family
        """(shape, elements) of each output derived from the inputs; None when the op has no rule here."""
        inputs = [t for t in node.inputs if not t.is_empty()]
        infos = [self._info(t) for t in inputs]
        op, n_out = node.op, len(node.outputs)
        try:
            if op in _BROADCAST_OPS:
                shapes = [s for s, _ in infos]
                if all(s is not None for s in shapes):
                    shape = tuple(np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
                    return [(shape, math.prod(shape))] * n_out
                if len(infos) == 1:
                    return [infos[0]] * n_out
                return None
            if op in _NO_LARGER_OPS:
                return [(None, infos[0][1])] * n_out if infos else None
            if op in ("Shape", "Size"):
                rank = len(infos[0][0]) if infos and infos[0][0] is not None else None
                return [((rank,) if rank is not None else None, rank)] if op == "Shape" else [((), 1)]
            if op == "Concat":
                counts = [e for _, e in infos if e is not None]
                return [(None, sum(counts))] if len(counts) == len(infos) else None
            if op == "Gather":
                (data, _), (indices, _) = infos[0], infos[1]
                if data is None or indices is None or not data:
                    return None
                axis = int(node.attrs.get("axis", 0)) % len(data)
                shape = data[:axis] + indices + data[axis + 1:]
                return [(shape, math.prod(shape))]
            return self._estimate_value_sized(node, inputs, infos)
        except (ValueError, TypeError, IndexError, OverflowError, ZeroDivisionError):
            return None

    def _estimate_value_sized(self, node: Any, inputs: list[Any], infos: list[_Info]) -> list[_Info] | None:
        op = node.op
        if op not in _VALUE_SIZED_OPS:
            return None
        values = [self._value(t) for t in inputs]
        shape: tuple[int, ...] | None = None
        if op == "ConstantOfShape" and values and values[0] is not None:
            shape = tuple(int(v) for v in values[0].reshape(-1))
        elif op == "Expand" and infos[0][0] is not None and values[1] is not None:
            shape = tuple(np.broadcast_shapes(infos[0][0], tuple(int(v) for v in values[1].reshape(-1))))
        elif op == "Tile" and infos[0][0] is not None and values[1] is not None:
            shape = tuple(d * int(r) for d, r in zip(infos[0][0], values[1].reshape(-1), strict=True))
        elif op == "Range" and all(v is not None for v in values[:3]):
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in values[:3])
            shape = (max(math.ceil((limit - start) / delta), 0),)
        elif op == "Pad" and infos[0][0] is not None and len(values) > 1 and values[1] is not None and len(inputs) < 4:
            pads, rank = [int(p) for p in values[1].reshape(-1)], len(infos[0][0])
            shape = tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(infos[0][0]))
        elif op == "OneHot" and infos[0][1] is not None and values[1] is not None:
            depth = int(np.asarray(values[1]).reshape(-1)[0])
            return [(None, infos[0][1] * max(depth, 0))]
        elif op in ("Resize", "Upsample") and infos[0][0] is not None and "axes" not in node.attrs:
            in_shape = infos[0][0]
            sizes = node.inputs[3] if op == "Resize" and len(node.inputs) > 3 else None
            scales = node.inputs[2] if op == "Resize" and len(node.inputs) > 2 else node.inputs[1]
            if sizes is not None and not sizes.is_empty():
                value = self._value(sizes)
                shape = tuple(int(v) for v in value.reshape(-1)) if value is not None else None
            elif not scales.is_empty() and (value := self._value(scales)) is not None:
                shape = tuple(math.floor(d * float(s)) for d, s in zip(in_shape, value.reshape(-1), strict=True))
        if shape is None or any(d < 0 for d in shape):
            return None
        return [(shape, math.prod(shape))]

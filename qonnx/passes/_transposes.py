"""Transpose sinking for canonicalize: layout round trips of NHWC exporters are removed, exactly.

tf2onnx/Keras exports wrap every Conv as Transpose(NHWC->NCHW) -> Conv -> Transpose(NCHW->NHWC) and run
everything between Convs (decomposed BatchNorm Sub/Mul/Add, ReLU6, Pad, residual Add) in NHWC. A Transpose
moved below an elementwise op (its constant operand permuted to match), below a constant Pad (its pads
permuted) or below an Add of two equally transposed tensors computes the same values; once it meets its
inverse both disappear. What is left is the plain NCHW chain Conv -> Sub/Mul/Add -> Clip -> Conv that
fold-bn, cle and the exporters recognise.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from qonnx.core.ir import Model

UNARY = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Neg", "Abs",
                   "Elu", "Selu", "Softplus", "Exp", "Sqrt", "Erf", "Identity"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Min", "Max", "Pow"})


def _perm(model: Model, node) -> list[int] | None:
    rank = model.rank_of(node.inputs[0])
    perm = node.attrs.get("perm")
    if perm is None:
        return list(range(rank))[::-1] if rank is not None else None
    return [int(p) for p in perm]


def _move_below(model: Model, transposes: list, op, new_inputs: list) -> None:
    """op(T(a), ...) -> T(op(a, ...)): op reads `new_inputs`, the first Transpose now follows op."""
    first = transposes[0]
    out = op.outputs[0]
    middle = model.make_variable(op.name + "_pre_transpose", dtype=out.dtype)
    op.inputs = new_inputs
    op.outputs = [middle]
    first.inputs = [middle]
    first.outputs = [out]
    for extra in transposes[1:]:  # a second transposed operand (binary op): its Transpose is now unused
        extra.outputs.clear()


def _permuted_constant(value: np.ndarray, perm: list[int]) -> np.ndarray:
    """c broadcast in the transposed layout -> the same c in the layout before the Transpose."""
    rank = len(perm)
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    return np.transpose(full, np.argsort(perm))


def _step(model: Model, out, perm: list[int]):
    """How a Transpose with output `out` moves past what reads it: (kind, consumer, extra) or None if it cannot.

    "cancel": `out` reaches the inverse Transpose (others reading it get their own copy of the Transpose).
    """
    if model.is_graph_output(out) or model.used_in_subgraph(out):
        return None
    consumers = model.consumers(out)
    inverses = [c for c in consumers if _is_inverse(model, c, perm)]
    if inverses:
        return "cancel", None, inverses
    consumer = model.sole_consumer(out)
    if consumer is None or consumer.op == "Transpose":
        return None
    if consumer.op in UNARY and consumer.inputs[0] is out and all(
            model.is_constant(t) or not t.name for t in consumer.inputs[1:]):
        return "unary", consumer, None
    if consumer.op in BINARY and len(consumer.inputs) == 2 and consumer.inputs[0] is not consumer.inputs[1]:
        other = consumer.inputs[1] if consumer.inputs[0] is out else consumer.inputs[0]
        constant = model.constant_value(other)
        if constant is not None and constant.ndim <= len(perm):
            return "constant", consumer, other
        twin = model.producer(other)
        if (twin is not None and twin.op == "Transpose" and _perm(model, twin) == perm
                and model.sole_consumer(other) is consumer):
            return "twin", consumer, twin
        return None
    if consumer.op == "Pad" and consumer.inputs[0] is out:
        pads = model.constant_value(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
        has_axes = len(consumer.inputs) > 3 and consumer.inputs[3].name
        if pads is not None and not has_axes and pads.size == 2 * len(perm):
            return "pad", consumer, pads
    return None


def _is_inverse(model: Model, node, perm: list[int]) -> bool:
    if node.op != "Transpose" or model.is_graph_output(node.outputs[0]):
        return False
    inner = _perm(model, node)
    return inner is not None and [perm[i] for i in inner] == list(range(len(perm)))


def _walk(model: Model, transpose, perm: list[int]) -> tuple[bool, object | None]:
    """Whether sinking this Transpose ends in its inverse (else moving it would only shuffle the graph), and
    when it does not, the Transpose that stopped the walk (sinking that one may clear the way)."""
    out = transpose.outputs[0]
    for _ in range(len(model.nodes)):
        step = _step(model, out, perm)
        if step is None:
            consumer = model.sole_consumer(out) if out.outputs else None
            return False, consumer if consumer is not None and consumer.op == "Transpose" else None
        if step[0] == "cancel":
            return True, None
        out = step[1].outputs[0]  # past the consumer, the Transpose would sit on the consumer's output
    return False, None


def _sink_one(model: Model, transpose, perm: list[int], killed: list, inverses: list) -> bool:
    """One move of `transpose` past what reads it; nodes it makes dead (outputs cleared) go to `killed`, the
    inverses it cancels with to `inverses` too."""
    step = _step(model, transpose.outputs[0], perm)
    if step is None:
        return False
    kind, consumer, extra = step
    source = transpose.inputs[0]
    if kind == "cancel":
        out = transpose.outputs[0]
        for inverse in extra:
            model.replace_uses(inverse.outputs[0], source)
            inverse.outputs.clear()
            killed.append(inverse)
            inverses.append(inverse)
        for i, other in enumerate([c for c in model.consumers(out) if c not in extra]):
            copy = model.make_variable(f"{out.name}_copy{i}", dtype=out.dtype)
            model.add_node("Transpose", [source], [copy], attrs={"perm": list(perm)},
                           name=f"{transpose.name}_copy{i}")
            other.inputs = [copy if t is out else t for t in other.inputs]
        transpose.outputs.clear()
        killed.append(transpose)
    elif kind == "unary":
        _move_below(model, [transpose], consumer, [source, *consumer.inputs[1:]])
    elif kind == "constant":
        value = model.constant_value(extra)
        assert value is not None  # _step takes this kind only for a constant operand
        permuted = model.make_constant(consumer.name + "_permuted", _permuted_constant(value, perm))
        first = consumer.inputs[0] is transpose.outputs[0]
        _move_below(model, [transpose], consumer, [source, permuted] if first else [permuted, source])
    elif kind == "twin":
        first = consumer.inputs[0] is transpose.outputs[0]
        other = extra.inputs[0]
        _move_below(model, [transpose, extra], consumer, [source, other] if first else [other, source])
        killed.append(extra)
    else:  # pad
        rank = len(perm)
        begin, end = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
        for i, axis in enumerate(perm):
            begin[axis], end[axis] = extra[i], extra[rank + i]
        new_pads = model.make_constant(consumer.name + "_pads", np.concatenate([begin, end]))
        _move_below(model, [transpose], consumer, [source, new_pads, *consumer.inputs[2:]])
    return True


def sink_transposes(model: Model) -> int:
    """Move Transposes below layout-agnostic ops where they meet their inverse; returns Transposes removed.

    Transposes are taken in topological order, each sunk as far as it goes before the next is looked at;
    one whose walk stopped at another Transpose is looked at again as soon as that one has moved. The order
    is kept in a heap rather than re-sorting the graph per Transpose, and the nodes a move makes dead leave
    at once, so a round costs O(n log n); another round runs only when one moved something.
    """
    before = sum(n.op == "Transpose" for n in model.nodes)
    for _ in range(len(model.nodes) + 1):  # a round moves something or ends the loop: this bounds them
        with model.live_naming():
            moved = _sink_round(model)
        if not moved:
            break
        model.cleanup()
    return before - sum(n.op == "Transpose" for n in model.nodes)


def _sink_round(model: Model) -> bool:
    """One pass over the Transposes in topological order; returns whether any moved."""
    order = model.toposort()
    rank = {id(n): float(i) for i, n in enumerate(order)}
    tiebreak = itertools.count()
    heap = [(rank[id(n)], next(tiebreak), n) for n in order if n.op == "Transpose" and n.outputs]
    heapq.heapify(heap)
    waiting: dict[int, list] = {}  # id of a Transpose -> (key, Transpose) of the walks it stopped
    moved, dead = False, []
    while heap:
        key, _, transpose = heapq.heappop(heap)
        perm = _perm(model, transpose) if transpose.outputs else None
        if perm is None:
            continue
        reaches, blocker = _walk(model, transpose, perm)
        if not reaches:
            if blocker is not None:
                waiting.setdefault(id(blocker), []).append((key, transpose))
            continue
        killed: list = []
        inverses: list = []
        first_new = len(model.nodes)
        while transpose.outputs and _sink_one(model, transpose, perm, killed, inverses):
            pass
        moved = True
        # Copies of the Transpose for other readers of the cancelled pair sit where the pair met.
        at = min((rank.get(id(n), key) for n in inverses), default=key) - 0.5
        for node in model.nodes[first_new:]:
            rank[id(node)] = at
            heapq.heappush(heap, (at, next(tiebreak), node))
        for gone in (transpose, *killed):
            for entry_key, waiter in waiting.pop(id(gone), []):
                heapq.heappush(heap, (entry_key, next(tiebreak), waiter))
        for node in killed:  # as if removed (names free again); they leave the list in one pass below
            model.detach_node(node)
        dead += killed
    model.remove_nodes(dead)
    return moved

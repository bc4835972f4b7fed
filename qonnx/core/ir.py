"""The one IR boundary: load/save ONNX, and the graph API every pass uses.

Only this module imports onnx_graphsurgeon (enforced by ruff's banned-api). The
graph objects (nodes and tensors) are graphsurgeon's; passes reach them through
`Model` so that protobuf lists and name suffixes never leak into pass code.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qonnx._version import __version__
from qonnx.core import modelio
from qonnx.core.folding import FOLD_ROUNDS, FoldGuard, fold_size_limit
from qonnx.core.names import LiveNames
from qonnx.core.qtable import QuantTable
from qonnx.errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)
# graphsurgeon reports through its own logger on stdout; only errors matter to us.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

Node = gs.Node
Tensor = gs.Tensor
Variable = gs.Variable
Constant = gs.Constant

MIN_OPSET = 13

# Ops whose presence means the model is already quantized: quantizing it again
# would stack grids, so the importer refuses and says which ops it found.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
        "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul", "MatMulNBits", "QLinearConcat", "QLinearGlobalAveragePool",
        "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLSTM",
    }
)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass
class FoldedNorm:
    """The per-channel affine (gamma, beta) of a BatchNorm folded into a layer.

    Kept because high-bias absorption and analytic bias correction need the
    pre-activation distribution N(beta, gamma^2) after folding.
    """

    gamma: np.ndarray
    beta: np.ndarray


@dataclass
class Model:
    """A float ONNX graph plus the quantization decisions taken about it."""

    graph: gs.Graph
    opset: int
    ir_version: int = onnx.IR_VERSION
    producer_name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    quant: QuantTable = field(default_factory=QuantTable)
    folded_norms: dict[str, FoldedNorm] = field(default_factory=dict)  # layer output name -> BN
    source_path: Path | None = None
    _taken: set[str] | None = field(default=None, repr=False, compare=False)
    _live: LiveNames | None = field(default=None, repr=False, compare=False)
    # (graph, whether a node of it may hold a subgraph): spares a scan of every node per query
    _subgraph_flag: tuple[gs.Graph, bool] | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- conversion
    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, source_path: Path | None = None) -> Model:
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
        graph = gs.import_onnx(proto)
        return cls(
            graph=graph,
            opset=opset,
            ir_version=proto.ir_version,
            producer_name=proto.producer_name,
            metadata={p.key: p.value for p in proto.metadata_props},
            source_path=source_path,
        )

    def to_onnx(self, *, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        self.graph.opset = self.opset
        proto = gs.export_onnx(self.graph, do_type_check=False)
        domains = {o.domain: o.version for o in proto.opset_import}
        domains[""] = self.opset
        domains.pop("ai.onnx", None)
        for node in self._all_nodes(proto.graph):
            if node.domain not in ("", "ai.onnx") and node.domain not in domains:
                domains[node.domain] = 1
        for domain, version in (extra_opsets or {}).items():
            domains[domain] = max(version, domains.get(domain, 0))
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(domains.items()))
        # IR version: keep the input's unless the opset needs a newer one.
        proto.ir_version = max(self.ir_version, modelio.min_ir_version(self.opset))
        proto.producer_name = "qonnx"
        proto.producer_version = __version__
        del proto.metadata_props[:]
        for key, value in sorted(self.metadata.items()):
            proto.metadata_props.add(key=key, value=value)
        return proto

    @staticmethod
    def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from Model._all_nodes(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from Model._all_nodes(g)

    def to_bytes(self) -> bytes:
        return self.to_onnx().SerializeToString(deterministic=True)

    def copy(self) -> Model:
        """An independent copy (weights are copied too: passes may edit arrays)."""
        return Model.from_onnx(modelio.reparse(self.to_onnx()), self.source_path)._with_state_of(self)

    def _with_state_of(self, other: Model) -> Model:
        self.opset, self.ir_version, self.producer_name = other.opset, other.ir_version, other.producer_name
        self.metadata = dict(other.metadata)
        self.quant = copy.deepcopy(other.quant)
        self.folded_norms = copy.deepcopy(other.folded_norms)
        return self

    # ---------------------------------------------------------------- queries
    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    @property
    def inputs(self) -> list[gs.Variable]:
        return self.graph.inputs

    @property
    def outputs(self) -> list[gs.Variable]:
        return self.graph.outputs

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def toposort(self) -> list[gs.Node]:
        self.graph.toposort(recurse_subgraphs=False)
        return self.graph.nodes

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    @staticmethod
    def is_constant(tensor: gs.Tensor | None) -> bool:
        return isinstance(tensor, gs.Constant)

    @staticmethod
    def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def rank_of(self, tensor: gs.Tensor) -> int | None:
        """The tensor's rank, also when shape inference left it unknown behind a dynamic Reshape."""
        if tensor.shape is not None:
            return len(tensor.shape)
        producer = self.producer(tensor)
        if producer is not None and producer.op == "Flatten":
            return 2
        if producer is not None and producer.op == "Reshape":
            shape_input = producer.inputs[1]
            dims = shape_input.shape if not isinstance(shape_input, gs.Constant) else shape_input.values.shape
            if dims is not None and len(dims) == 1 and isinstance(dims[0], int):
                return int(dims[0])
        return None

    def clip_bounds(self, node: gs.Node) -> tuple[float, float] | None:
        """(min, max) a Relu or Clip enforces (+-inf where a bound is absent); None if a bound is not constant."""
        if node.op == "Relu":
            return 0.0, float("inf")
        bounds = []
        for index, attr, absent in ((1, "min", -np.inf), (2, "max", np.inf)):
            if len(node.inputs) > index and node.inputs[index].name:
                value = self.constant_value(node.inputs[index])
                if value is None or value.size != 1:
                    return None
                bounds.append(float(value.reshape(-1)[0]))
            else:  # opset < 11 keeps the bounds as attributes
                bounds.append(float(node.attrs.get(attr, absent)))
        return bounds[0], bounds[1]

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t.name == tensor.name for t in self.graph.outputs)

    def _may_have_subgraphs(self) -> bool:
        """False when no node holds a subgraph, O(1) after one scan of a graph: such nodes enter only through
        import, `add_node` and constant folding (flattened If branches), which update or drop the flag."""
        if self._subgraph_flag is None or self._subgraph_flag[0] is not self.graph:
            self._subgraph_flag = (self.graph, any(_subgraphs(n) for n in self.graph.nodes))
        return self._subgraph_flag[1]

    def used_in_subgraph(self, tensor: gs.Tensor) -> bool:
        """True when a nested If/Loop body reads this outer-scope tensor."""
        if not self._may_have_subgraphs():
            return False
        for node in self.graph.nodes:
            for sub in _subgraphs(node):
                if tensor.name in _outer_names(sub):
                    return True
        return False

    def sole_consumer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The one node reading `tensor`, when nothing else does (no second consumer, graph output or
        subgraph read): the condition for rewriting a producer/consumer pair in place."""
        consumers = tensor.outputs
        if len(consumers) != 1 or self.is_graph_output(tensor) or self.used_in_subgraph(tensor):
            return None
        return consumers[0]

    def has_subgraphs(self) -> bool:
        return self._may_have_subgraphs() and any(_subgraphs(n) for n in self.graph.nodes)

    def subgraph_ops(self) -> dict[str, int]:
        """Op counts inside If/Loop/Scan bodies (left in float: they are passed through)."""
        counts: dict[str, int] = {}
        stack = [g for n in self.graph.nodes for g in _subgraphs(n)]
        while stack:
            graph = stack.pop()
            for node in graph.nodes:
                counts[node.op] = counts.get(node.op, 0) + 1
                stack.extend(_subgraphs(node))
        return counts

    @staticmethod
    def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values).dtype
        dt = tensor.dtype
        if dt is None:
            return None
        try:
            return np.dtype(dt)
        except TypeError:
            return None

    def is_float(self, tensor: gs.Tensor) -> bool:
        dt = self.dtype_of(tensor)
        return dt is not None and dt == np.float32

    # ---------------------------------------------------------------- edits
    def unique_name(self, hint: str) -> str:
        """`hint`, or `hint_1`, `hint_2`, ...: the first name no tensor or node of the graph has (O(graph) per
        call outside a session, O(1) inside `naming_session` or `live_naming`)."""
        taken: Any = self._taken if self._taken is not None else self._live
        if taken is None:
            taken = self.tensors().keys() | {n.name for n in self.graph.nodes}
        name, i = hint, 0
        while name in taken:
            i += 1
            name = f"{hint}_{i}"
        if self._taken is not None:
            self._taken.add(name)
        return name

    @contextlib.contextmanager
    def naming_session(self) -> Iterator[None]:
        """Within the block, names come from one snapshot of the graph's names plus those handed out since
        (unique_name is otherwise O(graph) per call): for bulk rewrites that create names only through
        this Model."""
        self._taken = set(self.tensors()) | {n.name for n in self.graph.nodes}
        try:
            yield
        finally:
            self._taken = None

    @contextlib.contextmanager
    def live_naming(self) -> Iterator[None]:
        """Within the block, `unique_name` gives in O(1) the names it gives outside a session (names freed by
        an edit are reused), for rewrites that add and remove nodes and tensors through this Model (see
        `LiveNames`); nodes dropped by other means keep their names taken until the block ends."""
        self._live = LiveNames(self.graph)
        try:
            yield
        finally:
            self._live = None

    def make_constant(self, hint: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values)
        # ascontiguousarray would turn a 0-d array into 1-d: per-tensor Q/DQ parameters must stay scalars.
        return self._noted(gs.Constant(self.unique_name(hint),
                                       values if values.flags.c_contiguous else values.copy(order="C")))

    def _noted(self, *tensors: Any) -> Any:
        """The (last) tensor, recorded in the live name index when one is open."""
        if self._live is not None:
            for tensor in tensors:
                self._live.add_tensor(tensor)
        return tensors[-1]

    @staticmethod
    def omitted_input() -> gs.Variable:
        """The empty-named tensor that skips an optional node input."""
        return gs.Variable.empty()

    def make_variable(self, hint: str, dtype: Any = None, shape: Any = None) -> gs.Variable:
        return self._noted(gs.Variable(self.unique_name(hint), dtype=dtype, shape=shape))

    def add_node(
        self,
        op: str,
        inputs: list[gs.Tensor],
        outputs: list[gs.Tensor],
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
        domain: str | None = None,
    ) -> gs.Node:
        node = gs.Node(
            op=op, name=self.unique_name(name or op), attrs=attrs or {}, inputs=inputs, outputs=outputs,
            domain=domain,
        )
        self.graph.nodes.append(node)
        if self._live is not None:
            self._live.add_node(node)
        if _subgraphs(node) and self._subgraph_flag is not None:
            self._subgraph_flag = (self._subgraph_flag[0], True)
        return node

    def remove_nodes(self, nodes: Iterable[gs.Node]) -> None:
        """Detach the nodes and drop them from the graph in one pass (`graph.nodes.remove` scans the list with
        graphsurgeon's slow node comparison per node: quadratic in a loop)."""
        doomed = {id(n): n for n in nodes}
        for node in doomed.values():
            self.detach_node(node)
        self.graph.nodes[:] = [n for n in self.graph.nodes if id(n) not in doomed]

    def detach_node(self, node: gs.Node) -> None:
        """Disconnect a node (no inputs, no outputs) and free its name; it stays in the graph's list until
        `remove_nodes` or `cleanup` drops it, so a loop can detach many and remove them in one pass."""
        node.inputs.clear()
        node.outputs.clear()
        if self._live is not None:
            self._live.remove_node(node)

    def bypass(self, node: gs.Node, keep: gs.Tensor | None = None, *, remove: bool = True) -> bool:
        """Remove a single-input pass-through node, rewiring its consumers to its input; returns whether it did.

        When the node's output is a graph output, the input is renamed instead so that the model keeps its
        interface. `remove=False` only detaches it, for one `remove_nodes` (or `cleanup`) of many later.
        """
        src = keep if keep is not None else node.inputs[0]
        out = node.outputs[0]
        if self.is_graph_output(out):
            if self.is_graph_output(src) or src in self.graph.inputs or isinstance(src, gs.Constant):
                return False  # cannot remove without changing the interface
            name = out.name
            out.name = self.unique_name(name + "_removed")
            src.name = name
            self._noted(out, src)
            src.dtype, src.shape = out.dtype or src.dtype, out.shape or src.shape
            self.graph.outputs = [src if t is out else t for t in self.graph.outputs]
        for consumer in list(out.outputs):
            consumer.inputs = [src if t is out else t for t in consumer.inputs]
        if remove:
            self.remove_nodes([node])
        else:
            self.detach_node(node)
        return True

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new
        self.graph.outputs = [new if t is old else t for t in self.graph.outputs]

    def cleanup(self) -> None:
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort(recurse_subgraphs=False)

    def fold_constants(self) -> None:
        """Fold constant subgraphs (Shape chains included) with ORT, in memory; outputs above
        `fold_size_limit` are neither folded nor evaluated."""
        limit = fold_size_limit(t for t in self.graph.tensors().values() if isinstance(t, gs.Constant))
        for _ in range(FOLD_ROUNDS):
            guard = FoldGuard(limit, lambda t: isinstance(t, gs.Constant))
            before = len(self.graph.nodes)
            self.graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=True, recurse_subgraphs=False,
                                      size_threshold=limit, should_exclude_node=guard)
            self._subgraph_flag = None  # folding flattens If nodes whose condition is constant: their bodies join
            self.cleanup()
            if not guard.unsized or len(self.graph.nodes) >= before:  # else sized from this round's values
                break

    def infer_shapes(self) -> None:
        """Refresh dtypes/shapes of every tensor through ONNX shape inference."""
        proto = self.to_onnx()
        del proto.graph.value_info[:]  # stale symbols (from before constant folding) would stick
        try:
            proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception as e:  # custom domains etc.: keep what we know
            log.debug("shape inference failed: %s", e)
            return
        fresh = gs.import_onnx(proto)
        known = {t.name: t for t in fresh.tensors().values() if isinstance(t, gs.Variable)}
        for name, tensor in self.graph.tensors().items():
            ref = known.get(name)
            if isinstance(tensor, gs.Variable) and ref is not None:
                if ref.dtype is not None:
                    tensor.dtype = ref.dtype
                if ref.shape is not None:
                    tensor.shape = ref.shape


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def _outer_names(graph: gs.Graph) -> set[str]:
    local = {t.name for n in graph.nodes for t in n.outputs} | {t.name for t in graph.inputs}
    names = set()
    for node in graph.nodes:
        names |= {t.name for t in node.inputs if t.name not in local}
        for sub in _subgraphs(node):
            names |= _outer_names(sub) - local
    return names


# -------------------------------------------------------------------- loading
def import_model(proto: onnx.ModelProto, source_path: Path | None = None) -> Model:
    """Check, upgrade, shape-infer and convert a model proto into the IR."""
    name = str(source_path) if source_path else "model"
    modelio.check_tensor_sizes(proto)
    found = sorted({n.op_type for n in Model._all_nodes(proto.graph) if n.op_type in QUANTIZED_OPS})
    if found:
        raise UnsupportedModelError(
            f"{name} is already quantized (it contains {', '.join(found)}); give qonnx the float model"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InputError(f"{name} fails the ONNX checker: {modelio.one_line(first, 200)}") from e
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModelError(f"{name} has no default-domain opset import")
    if opset < MIN_OPSET:
        log.info("upgrading opset %d -> %d", opset, MIN_OPSET)
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
        except Exception as e:
            raise UnsupportedModelError(
                f"{name} uses opset {opset} and could not be upgraded to {MIN_OPSET}: {modelio.one_line(e)}") from e
    modelio.name_nodes(proto.graph)
    lifted = modelio.lift_constant_nodes(proto)
    if lifted:
        log.info("lifted %d Constant nodes to initializers", lifted)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:
        log.warning("shape inference failed, continuing without full shapes: %s", e)
    return Model.from_onnx(proto, source_path)


def check_model(model: Model) -> None:
    """Run the ONNX checker on the model as it would be exported (raises onnx's ValidationError)."""
    onnx.checker.check_model(model.to_onnx())


def numpy_dtype(onnx_type: int) -> np.dtype:
    """The numpy dtype of an ONNX tensor element type (e.g. a Cast's `to`)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def load_model(path: str | os.PathLike[str]) -> Model:
    """Read, check and import an ONNX file as IR (see `import_model`)."""
    return import_model(modelio.read_model_proto(path), Path(path))

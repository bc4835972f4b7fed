"""The live name index behind `Model.live_naming`: `unique_name` in O(1), with the names a fresh scan gives.

No graphsurgeon import (core/ir.py is its only importer): nodes and tensors are read through their
attributes (`name`, `inputs`, `outputs`, `is_empty()`), the graph through `nodes`, `inputs`, `outputs` and
`tensors()`.
"""

from __future__ import annotations

from typing import Any


class LiveNames:
    """The names `unique_name` must avoid, kept current through the Model's edits (see `Model.live_naming`).

    Node names are counted as nodes join and leave the list. Tensors are remembered by name and counted as
    taken only while attached: produced or read by a node (removed nodes are detached) or a graph
    input/output, exactly the tensors `graph.tensors()` would list.
    """

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.node_names: dict[str, int] = {}
        self.gone: dict[int, Any] = {}
        for node in graph.nodes:
            self.add_node(node)
        self.tensors: dict[str, list[Any]] = {}
        for tensor in graph.tensors().values():
            self.add_tensor(tensor)

    def add_node(self, node: Any) -> None:
        self.node_names[node.name] = self.node_names.get(node.name, 0) + 1

    def remove_node(self, node: Any) -> None:
        if id(node) not in self.gone and self.node_names.get(node.name, 0) > 0:
            self.node_names[node.name] -= 1
            self.gone[id(node)] = node  # the node is kept referenced: its id is not reused

    def add_tensor(self, tensor: Any) -> None:
        known = self.tensors.setdefault(tensor.name, [])
        if not any(t is tensor for t in known):
            known.append(tensor)

    def _attached(self, tensor: Any) -> bool:
        return bool(tensor.inputs or tensor.outputs) or any(
            t is tensor for t in (*self.graph.inputs, *self.graph.outputs))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if self.node_names.get(name, 0) > 0:
            return True
        return any(t.name == name and not t.is_empty() and self._attached(t) for t in self.tensors.get(name, ()))

"""The quant table: quantization decisions kept as data beside the float graph.

Passes read and write it; only the exporter turns it into Q/DQ nodes. Entries are
keyed by the exact tensor name (unique in a graph), never by derived names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from qonnx.numerics.quant import QuantScheme


class QuantState(str, Enum):
    INITIAL = "initial"  # scheme chosen, no parameters yet
    CALIBRATED = "calibrated"  # scale and zero point set
    ROUNDED = "rounded"  # weight integers fixed (AdaRound): the scale must not change any more
    EXPORTED = "exported"


class Role(str, Enum):
    ACTIVATION = "activation"
    WEIGHT = "weight"
    BIAS = "bias"


@dataclass
class TensorQuant:
    """How one tensor is quantized and, once calibrated, with which parameters."""

    role: Role
    scheme: QuantScheme
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    state: QuantState = QuantState.INITIAL
    # Activations that must share parameters with another tensor (the input of a
    # Reshape/MaxPool/... so that ORT can run the op in int8) name it here.
    tied_to: str | None = None
    method: str = ""
    # Integer codes fixed by a rounding pass (AdaRound); exported verbatim.
    codes: np.ndarray | None = None
    # For a bias: the activation and weight whose scales multiply into its scale.
    bias_of: tuple[str, str] | None = None
    # For a bias: the shift bias correction subtracted (kept so a re-run replaces it, never stacks).
    correction: np.ndarray | None = None

    @property
    def calibrated(self) -> bool:
        return self.scale is not None and self.zero_point is not None


@dataclass
class LayerQuant:
    """A compute node (Conv/Gemm/MatMul) chosen to run as an integer kernel."""

    node: str
    op: str
    input: str
    weight: str | None = None  # None for activation x activation MatMul
    bias: str | None = None
    output: str | None = None  # the quantized tensor after the layer (after an absorbed Relu/Clip)


@dataclass
class QuantTable:
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    # Nodes deliberately left in float, with the reason (reported to the user).
    kept_float: dict[str, str] = field(default_factory=dict)
    plan_options: Any = None  # the options the current plan was made with (re-planning keeps them)
    # MatMuls whose input is quantized per run (DynamicQuantizeLinear) because no static range
    # fits it: node name -> its weight's (calibrated) entry.
    dynamic: dict[str, TensorQuant] = field(default_factory=dict)
    # Gathers whose constant table is stored as int8 rows (the `embeddings` pass): node name -> the
    # table's entry. Not plan's decision, so re-planning (clear) keeps it.
    gathers: dict[str, TensorQuant] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)

    def get(self, name: str) -> TensorQuant | None:
        return self.tensors.get(name)

    def set(self, name: str, entry: TensorQuant) -> None:
        self.tensors[name] = entry

    def of_role(self, role: Role) -> dict[str, TensorQuant]:
        return {k: v for k, v in self.tensors.items() if v.role is role}

    def root(self, name: str) -> str:
        """Follow parameter ties to the tensor whose statistics decide the parameters."""
        seen = set()
        while (entry := self.tensors.get(name)) is not None and entry.tied_to and name not in seen:
            seen.add(name)
            name = entry.tied_to
        return name

    def rename(self, old: str, new: str) -> None:
        if old in self.tensors:
            self.tensors[new] = self.tensors.pop(old)
        for entry in self.tensors.values():
            if entry.tied_to == old:
                entry.tied_to = new
            if entry.bias_of and old in entry.bias_of:
                entry.bias_of = tuple(new if n == old else n for n in entry.bias_of)  # type: ignore[assignment]
        for layer in self.layers.values():
            for attr in ("input", "weight", "bias", "output"):
                if getattr(layer, attr) == old:
                    setattr(layer, attr, new)

    def node_entries(self) -> list[tuple[str, str]]:
        """(node name, the op it must be) for the entries keyed by node: per-run MatMuls, int8 lookups."""
        return [*((name, "MatMul") for name in self.dynamic), *((name, "Gather") for name in self.gathers)]

    def clear(self) -> None:
        """Forget plan's decisions (and what followed from them); lookup tables stay."""
        self.tensors.clear()
        self.layers.clear()
        self.kept_float.clear()
        self.dynamic.clear()

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            key = f"{entry.role.value}:{entry.state.value}"
            counts[key] = counts.get(key, 0) + 1
        return counts

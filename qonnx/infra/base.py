"""Pass, its typed options and its result.

A pass is a small class: a registered `name`, a one-line `summary`, typed frozen `Options`, what it
requires and provides (capabilities checked before anything runs), which analyses it preserves, whether
it is numerically exact, and one method `run(model, ctx) -> PassResult`. No state is carried on `self`
between runs, and a pass never runs another pass: shared logic lives in qonnx.quantize and qonnx.analyses.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qonnx.core.ir import Model
from qonnx.infra.context import Analysis, PassContext


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A typed pass option with help text (and optional allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """An option value as pipeline text (parsed back by the pipeline parser)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ";".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class Pass(ABC):
    """A transformation of the IR. Subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # Capabilities: "calibration-data" comes from the context, the rest from earlier passes.
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    # A capability that, once provided earlier, makes this pass invalid (with the reason).
    forbidden_after: ClassVar[dict[str, str]] = {}
    # A capability that, once provided earlier, makes this pass questionable: validation warns (with why).
    warned_after: ClassVar[dict[str, str]] = {}
    preserves: frozenset[type[Analysis]] = frozenset()  # analyses left valid when the pass modifies the model
    exact: ClassVar[bool] = True  # float outputs must not change (checked by the numeric verifier)
    edits_graph: ClassVar[bool] = True  # False for passes that only write the quant table

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def assumed_input_range(self) -> tuple[float, ...] | None:
        """The range of the model's float inputs this pass assumes (data-free passes), else None."""
        return None

    @abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult: ...

    def spec(self, full: bool = False) -> str:
        """This pass as pipeline text; `full` lists every option, else only non-defaults."""
        items = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if full or value != f.default:
                items.append(f"{f.name}={format_value(value)}")
        return self.name + ("{" + ",".join(items) + "}" if items else "")

    def __repr__(self) -> str:
        return self.spec()


def apply_pass(p: Pass, model: Model, ctx: PassContext) -> PassResult:
    """Run one pass and drop the analyses it did not preserve if it modified the model."""
    result = p.run(model, ctx)
    if result.modified:
        ctx.analyses.keep_only(p.preserves)
    return result

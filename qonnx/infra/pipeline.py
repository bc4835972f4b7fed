"""Passes, the pass registry, text pipelines and presets.

A pipeline is printable text that round-trips:
    fold-bn,cle{iterations=20},calibrate{method=octav}
Options are typed frozen dataclasses: the parser, the CLI help and the docs all
come from their fields.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qonnx.errors import PipelineParseError, PreconditionError

if typing.TYPE_CHECKING:
    from qonnx.core.ir import Model
    from qonnx.infra.manager import PassContext


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


class Pass(ABC):
    """A transformation of the IR. Subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # Capabilities: "calibration-data" comes from the context, the rest from earlier passes.
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    # A capability that, once provided earlier, makes this pass invalid (with the reason).
    forbidden_after: ClassVar[dict[str, str]] = {}
    # A capability that, once provided earlier, makes this pass questionable: validation warns (with why).
    warned_after: ClassVar[dict[str, str]] = {}
    preserves: ClassVar[frozenset[str]] = frozenset()  # analyses left valid
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
                items.append(f"{f.name}={_format_value(value)}")
        return self.name + ("{" + ",".join(items) + "}" if items else "")

    def __repr__(self) -> str:
        return self.spec()


log = logging.getLogger(__name__)
_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    import qonnx.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


# ------------------------------------------------------------------ presets
PRESETS: dict[str, tuple[str, str]] = {
    "w8a8": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate,protect,keep-fast,bias-correction",
        "INT8: per-channel int8 weights, uint8 activations; MatMuls whose input quantizes badly take their "
        "range per run, other such layers and those slower in int8 stay float; int8 embedding tables; bias "
        "correction",
    ),
    "w8a8-minmax": (
        "canonicalize,fold-bn,plan,embeddings,calibrate{method=minmax},bias-correction",
        "INT8 with plain min/max activation ranges (fastest calibration)",
    ),
    "w8a8-pertensor": (
        "canonicalize,fold-bn,cle{objective=noise},smooth,plan{per_channel=false},embeddings,calibrate,protect,"
        "bias-correction",
        "INT8 with one weight scale per tensor (accelerators without per-channel support): cross-layer "
        "equalization with scales that balance weight and activation noise, and bias correction, recover what "
        "per-tensor rounding loses",
    ),
    "dfq": (
        "canonicalize,fold-bn,plan,estimate-ranges,bias-correction{mode=analytic}",
        "data-free INT8 (no calibration data): activation ranges and bias correction from BatchNorm "
        "statistics carried through the graph (vision models without them: ranges from synthetic images)",
    ),
    "dfq-pertensor": (
        "canonicalize,fold-bn,cle{objective=noise,statistics=moments},high-bias-absorption,plan{per_channel=false},"
        "estimate-ranges,bias-correction{mode=analytic}",
        "data-free INT8 with per-tensor weights: DFQ's recipe (high-bias absorption, BN-statistics ranges, analytic "
        "bias correction) with CLE scales that minimise weight and activation noise, from BN statistics",
    ),
    "w8a8-adaround": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate{weights=mse},protect,keep-fast,adaround",
        "w8a8 with AdaRound instead of bias correction: each weight's rounding learned on calibration data",
    ),
    "w4a8": (
        "canonicalize,fold-bn,plan{weight_bits=4,keep_8bit=first;last;depthwise},calibrate{weights=mse},adaround",
        "int4 weights (MSE scale search, AdaRound), uint8 activations; the first and last layers and depthwise "
        "convs keep int8 weights. Stored as int4 (opset 21): about half the size of w8a8",
    ),
    "w4a16": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=float,block_size=32},embeddings,"
        "calibrate{weights=mse},adaround",
        "weight-only int4 in blocks of 32 along K (MSE scale search, AdaRound), float activations; MatMul/Gemm "
        "run as ORT's MatMulNBits; int8 embedding tables",
    ),
    "w4a16-rtn": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=float,block_size=32},embeddings,calibrate-weights{method=mse}",
        "w4a16 without data: round-to-nearest int4 weights",
    ),
    "w4a8-qat": (
        "canonicalize,fold-bn,plan{weight_bits=4,keep_8bit=first;last;depthwise},calibrate{weights=mse},"
        "adaround{time_budget=330},qat{batch_size=8,lr=5e-5,time_budget=480,threads=2}",
        "w4a8 fine-tuned: AdaRound's rounding as the start, then label-free distillation from the float model on "
        "the calibration inputs (LSQ step sizes); about 14 minutes (needs torch: pip install qonnx-opt[qat])",
    ),
    "w4a4-qat": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=uint4},calibrate{weights=mse},qat{lr=0.001,freeze=0.1}",
        "int4 weights and 16-level activations, quantization-aware fine-tuning with iterative freezing (needs torch)",
    ),
    "w8a8-static": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate,protect,bias-correction",
        "w8a8 without the latency measurement: output independent of machine timings",
    ),
}


# ------------------------------------------------------------------ options
def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ";".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _field_type(options_cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(options_cls)
    return hints[f.name]


def _coerce(pass_name: str, key: str, raw: str, typ: Any, choices: tuple[Any, ...] | None) -> Any:
    def fail(expected: str) -> PipelineParseError:
        return PipelineParseError(f"pass '{pass_name}': option '{key}' expects {expected}, got '{raw}'")

    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("none", ""):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple:
        inner = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        items = [p for p in inner.split(";") if p != ""]
        return tuple(_coerce(pass_name, key, p, args[0], None) for p in items)
    if typ is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            value: Any = True
        elif raw.lower() in ("false", "0", "no", "off"):
            value = False
        else:
            raise fail("true or false")
    elif typ is int:
        try:
            value = int(raw)
        except ValueError:
            raise fail("an integer") from None
    elif typ is float:
        try:
            value = float(raw)
        except ValueError:
            raise fail("a number") from None
    else:
        value = raw
    if choices and value not in choices:
        raise PipelineParseError(
            f"pass '{pass_name}': option '{key}' must be one of {', '.join(map(str, choices))}, got '{raw}'"
        )
    return value


def make_options(pass_cls: type[Pass], raw: dict[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Options)}
    values = {}
    for key, text in raw.items():
        name = key.replace("-", "_")
        if name in values:
            raise PipelineParseError(f"pass '{pass_cls.name}': option '{name}' given twice")
        if name not in fields:
            valid = ", ".join(fields) or "none"
            raise PipelineParseError(f"pass '{pass_cls.name}' has no option '{key}' (options: {valid})")
        f = fields[name]
        values[name] = _coerce(pass_cls.name, key, text, _field_type(pass_cls.Options, f), f.metadata.get("choices"))
    return pass_cls.Options(**values)


# ------------------------------------------------------------------ parsing
_ITEM = re.compile(r"\s*([A-Za-z][\w-]*)\s*(\{([^{}]*)\})?\s*(,|$)")


def _parse_items(text: str) -> list[tuple[str, dict[str, str]]]:
    items, pos = [], 0
    text = text.strip()
    if not text:
        raise PipelineParseError("empty pipeline")
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineParseError(f"cannot parse pipeline at column {pos + 1}: '{text[pos:pos + 30]}'")
        raw_opts: dict[str, str] = {}
        if m.group(3) is not None and m.group(3).strip():
            for part in _split_options(m.group(3)):
                if "=" not in part:
                    raise PipelineParseError(f"pass '{m.group(1)}': option '{part}' needs the form key=value")
                key, value = part.split("=", 1)
                if key.strip() in raw_opts:
                    raise PipelineParseError(f"pass '{m.group(1)}': option '{key.strip()}' given twice")
                raw_opts[key.strip()] = value.strip()
        items.append((m.group(1), raw_opts))
        pos = m.end()
        if m.group(4) == "," and pos >= len(text):
            raise PipelineParseError("pipeline ends with a comma")
    return items


def _split_options(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


class Pipeline:
    """An ordered list of configured passes; `str()` gives text that parses back to it."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Parse pipeline text; a preset name (optionally with overrides) expands to its pipeline."""
        reg = registry()
        built: list[Pass] = []
        for name, raw in _parse_items(text):
            if name in PRESETS and name not in reg:
                if raw:
                    raise PipelineParseError(f"preset '{name}' takes no options; write its passes out instead")
                built.extend(cls.parse(PRESETS[name][0]).passes)
                continue
            if name not in reg:
                raise PipelineParseError(f"unknown pass '{name}' (known passes: {', '.join(reg)})")
            pass_cls = reg[name]
            built.append(pass_cls(make_options(pass_cls, raw)))
        return cls(built)

    def __str__(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def canonical(self) -> str:
        return ",".join(p.spec(full=True) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def validate(self, available: frozenset[str]) -> list[str]:
        """Check requirements and ordering rules before anything runs; returns (and logs) the warnings."""
        have = set(available)
        warnings = []
        assumed = {(p.name, index + 1): tuple(r) for index, p in enumerate(self.passes)
                   if (r := p.assumed_input_range()) is not None}
        if len(set(assumed.values())) > 1:
            listed = ", ".join(f"'{name}' (position {pos}) input_range={list(r)}" for (name, pos), r in assumed.items())
            raise PreconditionError(f"passes assume different input ranges: {listed}; give them the same input_range")
        for index, p in enumerate(self.passes):
            for capability, reason in p.warned_after.items():
                if capability in have:
                    warnings.append(f"pass '{p.name}' (position {index + 1}): {reason}")
                    log.warning("%s", warnings[-1])
            for capability, reason in p.forbidden_after.items():
                if capability in have:
                    raise PreconditionError(f"pass '{p.name}' (position {index + 1}) cannot run here: {reason}")
            missing = sorted(p.requires - have)
            if missing:
                hint = {
                    "calibration-data": "give calibration data (--calib-data) or use a data-free pipeline",
                }
                details = "; ".join(hint.get(m, f"add a pass that provides '{m}' before it") for m in missing)
                raise PreconditionError(
                    f"pass '{p.name}' (position {index + 1}) needs {', '.join(missing)}: {details}"
                )
            have |= p.provides
        return warnings


def resolve(preset: str | None, passes: str | None) -> Pipeline:
    if preset and passes:
        raise PipelineParseError("give either a preset or a pass pipeline, not both")
    text = passes or preset or "w8a8"
    if preset and preset not in PRESETS:
        raise PipelineParseError(f"unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
    return Pipeline.parse(text)

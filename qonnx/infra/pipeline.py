"""Text pipelines: parsing, the Pipeline (itself a pass, so pipelines nest) and validation.

A pipeline is printable text that round-trips:
    fold-bn,cle{iterations=20},calibrate{method=octav}
Options are typed frozen dataclasses: the parser, the CLI help and the docs all
come from their fields. The parser is given the registry of passes and the presets;
this module knows no concrete pass.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from qonnx.core.ir import Model
from qonnx.errors import PipelineParseError, PreconditionError
from qonnx.infra.base import Pass, PassResult, apply_pass
from qonnx.infra.context import PassContext

log = logging.getLogger(__name__)


def make_registry(passes: Iterable[type[Pass]]) -> dict[str, type[Pass]]:
    """Pass name -> class, sorted by name; a name given twice is a programming error."""
    registry: dict[str, type[Pass]] = {}
    for cls in passes:
        if cls.name in registry and registry[cls.name] is not cls:
            raise ValueError(f"pass name '{cls.name}' registered twice")
        registry[cls.name] = cls
    return dict(sorted(registry.items()))


# ------------------------------------------------------------------ options
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


class Pipeline(Pass):
    """An ordered list of configured passes; `str()` gives text that parses back to it.

    A pipeline is a pass: run as a member of another pipeline (or alone) it runs its passes in order,
    dropping after each the analyses that pass did not preserve. Instruments are the manager's.
    """

    name = "pipeline"
    summary = "run passes in order"

    def __init__(self, passes: Iterable[Pass]):
        super().__init__()
        self.passes = list(passes)
        members = self.flat()
        # What the whole keeps valid: what every member preserves.
        self.preserves = frozenset.intersection(*(p.preserves for p in members)) if members else frozenset()

    @classmethod
    def parse(cls, text: str, registry: Mapping[str, type[Pass]], presets: Mapping[str, str] | None = None
              ) -> Pipeline:
        """Parse pipeline text with the given passes; a preset name expands to its pipeline text."""
        presets = presets or {}
        built: list[Pass] = []
        for name, raw in _parse_items(text):
            if name in presets and name not in registry:
                if raw:
                    raise PipelineParseError(f"preset '{name}' takes no options; write its passes out instead")
                built.extend(cls.parse(presets[name], registry, presets).passes)
                continue
            if name not in registry:
                raise PipelineParseError(f"unknown pass '{name}' (known passes: {', '.join(registry)})")
            pass_cls = registry[name]
            built.append(pass_cls(make_options(pass_cls, raw)))
        return cls(built)

    def flat(self) -> list[Pass]:
        """The passes with nested pipelines expanded, in running order."""
        return [q for p in self.passes for q in (p.flat() if isinstance(p, Pipeline) else [p])]

    def spec(self, full: bool = False) -> str:
        return ",".join(p.spec(full) for p in self.passes)

    def __str__(self) -> str:
        return self.spec()

    def canonical(self) -> str:
        return self.spec(full=True)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        modified, steps = False, []
        for p in self.passes:
            result = apply_pass(p, model, ctx)
            model, modified = result.model, modified or result.modified
            steps.append({"pass": p.spec(), "modified": result.modified, **result.stats})
        return PassResult(model, modified, {"passes": steps})

    def validate(self, available: frozenset[str]) -> list[str]:
        """Check requirements and ordering rules before anything runs; returns (and logs) the warnings."""
        have = set(available)
        warnings = []
        assumed = {(p.name, index + 1): tuple(r) for index, p in enumerate(self.flat())
                   if (r := p.assumed_input_range()) is not None}
        if len(set(assumed.values())) > 1:
            listed = ", ".join(f"'{name}' (position {pos}) input_range={list(r)}" for (name, pos), r in assumed.items())
            raise PreconditionError(f"passes assume different input ranges: {listed}; give them the same input_range")
        for index, p in enumerate(self.flat()):
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

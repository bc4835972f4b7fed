"""Instruments the pass manager calls around each pass: verifiers and the reproducer.

The structural verifier runs the ONNX checker and the quant-table invariants after every pass; the
numeric verifier checks that exact passes leave the float outputs unchanged; the reproducer saves the
model as it was before a failing pass together with the rest of the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qonnx.core.ir import Model, check_model
from qonnx.core.modelio import save_model, write_bytes_atomic
from qonnx.errors import VerificationError
from qonnx.infra.base import Pass
from qonnx.infra.context import PassContext
from qonnx.runtime.compare import compare_float_models, refuse_unrunnable_types, verify_rtol


@dataclass
class PassRecord:
    name: str
    spec: str
    modified: bool
    seconds: float
    stats: dict[str, Any]


class Instrument(Protocol):
    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, before: Model | None, after: Model, record: PassRecord,
                   ctx: PassContext) -> None: ...


class StructuralVerifier:
    """ONNX checker plus quant-table invariants, after every pass."""

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, before: Model | None, after: Model, record: PassRecord,
                   ctx: PassContext) -> None:
        try:
            check_model(after)
        except Exception as e:
            raise VerificationError(f"after pass '{p.name}': the graph fails the ONNX checker: {e}") from e
        tensors = after.tensors()
        for name, entry in after.quant.tensors.items():
            if name not in tensors:
                raise VerificationError(f"after pass '{p.name}': quant table names missing tensor '{name}'")
            if entry.tied_to and entry.tied_to not in tensors:
                raise VerificationError(f"after pass '{p.name}': '{name}' is tied to missing tensor '{entry.tied_to}'")
            if entry.scale is not None and not np.all(np.isfinite(entry.scale) & (entry.scale > 0)):
                raise VerificationError(f"after pass '{p.name}': tensor '{name}' has a non-positive or non-finite scale")
        ops = {n.name: n.op for n in after.nodes}
        for node_name, op in after.quant.node_entries():
            if ops.get(node_name) != op:
                raise VerificationError(f"after pass '{p.name}': quant table names {op} '{node_name}', "
                                        "which is not in the graph")


class NumericVerifier:
    """Exact passes must leave the float outputs unchanged (to a relative tolerance).

    The tolerance is that of the model's coarsest float type (qonnx.runtime.compare.VERIFY_RTOL: 1e-4 for
    float32, 2e-3 for float16, 1.6e-2 for bfloat16) unless `rtol` fixes one. A model ORT's CPU EP cannot run
    (bfloat16) is refused before the first pass: it could be neither verified nor calibrated.
    """

    def __init__(self, rtol: float | None = None):
        self.rtol = rtol

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        refuse_unrunnable_types(model)

    def after_pass(self, p: Pass, before: Model | None, after: Model, record: PassRecord,
                   ctx: PassContext) -> None:
        if not (p.exact and p.edits_graph and record.modified and before is not None):
            return
        worst = compare_float_models(before, after, ctx.calibration, ctx.seed)
        record.stats["max_rel_change"] = worst
        rtol = self.rtol if self.rtol is not None else verify_rtol(before)
        if worst > rtol:
            raise VerificationError(
                f"exact pass '{p.name}' changed the float outputs by {worst:.3g} (relative), above {rtol:g}"
            )


class Reproducer:
    """On failure, save the model as it was before the failing pass and the remaining pipeline."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def save(self, p: Pass, before: Model, remaining: str, error: BaseException) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_model(before.to_onnx(), self.directory / "before.onnx")
        text = f"{remaining}\n# failed in pass '{p.name}': {error}\n"
        write_bytes_atomic(text.encode(), self.directory / "pipeline.txt")
        return self.directory

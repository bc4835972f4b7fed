"""The pass manager: runs a pipeline with instruments between passes.

Instruments see each pass before and after it runs: the structural verifier,
the numeric verifier for exact passes, and the reproducer that saves the model
as it was before a failing pass together with the rest of the pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.modelio import save_model, write_bytes_atomic
from qonnx.errors import InputError, PassError, QonnxError, VerificationError
from qonnx.infra.pipeline import Pass, Pipeline

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What passes may use besides the model: data, seed, cached analyses."""

    calibration: Any = None  # a qonnx.data.calibration.CalibrationSet
    seed: int = 0
    progress: bool = False
    analyses: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # global settings, e.g. threads

    def available(self) -> frozenset[str]:
        return frozenset({"calibration-data"} if self.calibration is not None else set())

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from the run seed and a per-use salt (stable across runs)."""
        import zlib

        return np.random.default_rng([self.seed, zlib.crc32(salt.encode())])


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
        import onnx

        try:
            onnx.checker.check_model(after.to_onnx())
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
    """Exact passes must leave the float outputs unchanged (to a relative tolerance)."""

    def __init__(self, rtol: float = 1e-4):
        self.rtol = rtol

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, before: Model | None, after: Model, record: PassRecord,
                   ctx: PassContext) -> None:
        if not (p.exact and p.edits_graph and record.modified and before is not None):
            return
        from qonnx.runtime.compare import compare_float_models

        worst = compare_float_models(before, after, ctx)
        record.stats["max_rel_change"] = worst
        if worst > self.rtol:
            raise VerificationError(
                f"exact pass '{p.name}' changed the float outputs by {worst:.3g} (relative), above {self.rtol:g}"
            )


class Reproducer:
    """On failure, save the model as it was before the failing pass and the remaining pipeline."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def save(self, p: Pass, before: Model, remaining: str, error: BaseException) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_model(before.to_onnx(), self.directory / "before.onnx")
        text = f"{remaining}\n# failed in pass '{p.name}': {error}\n"
        write_bytes_atomic(text.encode(), self.directory / "pipeline.txt")
        return self.directory


class PassManager:
    def __init__(self, pipeline: Pipeline, instruments: list[Instrument] | None = None,
                 reproducer: Reproducer | None = None):
        self.pipeline = pipeline
        self.instruments = list(instruments or [])
        self.reproducer = reproducer

    def _needs_snapshot(self, p: Pass) -> bool:
        return self.reproducer is not None or (
            p.exact and p.edits_graph and any(isinstance(i, NumericVerifier) for i in self.instruments)
        )

    def run(self, model: Model, ctx: PassContext) -> tuple[Model, list[PassRecord]]:
        self.pipeline.validate(ctx.available())
        records: list[PassRecord] = []
        passes = list(self.pipeline)
        for index, p in enumerate(passes):
            before = model.copy() if self._needs_snapshot(p) else None
            for inst in self.instruments:
                inst.before_pass(p, model, ctx)
            log.info("running pass %s", p.spec())
            t0 = time.perf_counter()
            try:
                result = p.run(model, ctx)
                record = PassRecord(p.name, p.spec(), result.modified, time.perf_counter() - t0, dict(result.stats))
                model = result.model
                if result.modified:
                    for key in list(ctx.analyses):
                        if key not in p.preserves:
                            del ctx.analyses[key]
                for inst in self.instruments:
                    inst.after_pass(p, before, model, record, ctx)
            except BaseException as e:
                # Bad user input is not a pass bug: no reproducer for it.
                if (self.reproducer is not None and before is not None
                        and not isinstance(e, (KeyboardInterrupt, InputError))):
                    remaining = ",".join(q.spec(full=True) for q in passes[index:])
                    where = self.reproducer.save(p, before, remaining, e)
                    log.error("saved a reproducer in %s", where)
                if isinstance(e, QonnxError):
                    raise
                if isinstance(e, Exception):
                    raise PassError(p.name, f"{type(e).__name__}: {e}") from e
                raise
            log.info("pass %s: modified=%s in %.2fs %s", p.name, record.modified, record.seconds, record.stats)
            records.append(record)
        return model, records

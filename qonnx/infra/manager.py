"""The pass manager: validates a pipeline, then runs it with instruments between passes."""

from __future__ import annotations

import logging
import time

from qonnx.core.ir import Model
from qonnx.errors import InputError, PassError, QonnxError
from qonnx.infra.base import Pass, apply_pass
from qonnx.infra.context import PassContext
from qonnx.infra.instruments import Instrument, NumericVerifier, PassRecord, Reproducer
from qonnx.infra.pipeline import Pipeline

log = logging.getLogger(__name__)


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
                result = apply_pass(p, model, ctx)
                record = PassRecord(p.name, p.spec(), result.modified, time.perf_counter() - t0, dict(result.stats))
                model = result.model
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

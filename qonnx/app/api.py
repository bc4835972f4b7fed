"""The Python API: `qonnx.optimize(model, calibration, pipeline=...)`."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qonnx._version import __version__
from qonnx.app.paths import Target, check_run
from qonnx.core.ir import Model, import_model, load_model
from qonnx.core.modelio import save_model
from qonnx.data.calibration import CalibrationSet, open_calibration
from qonnx.errors import ExportError, InputError
from qonnx.export import EXPORTERS, Exporter
from qonnx.infra.context import PassContext
from qonnx.infra.instruments import Instrument, NumericVerifier, PassRecord, Reproducer, StructuralVerifier
from qonnx.infra.manager import PassManager
from qonnx.infra.pipeline import Pipeline
from qonnx.numerics.metrics import Fidelity
from qonnx.passes import parse_pipeline
from qonnx.runtime.compare import sample_feed
from qonnx.runtime.fusion import FusionReport, fusion_report
from qonnx.runtime.ort import make_session

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    ir: Model
    pipeline: Pipeline
    records: list[PassRecord]
    fusion: FusionReport | None = None
    fidelity: dict[str, Any] | None = None
    size_before: int = 0
    size_after: int = 0
    notes: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString(deterministic=True)

    def save(self, path: str | os.PathLike[str]) -> int:
        return save_model(self.model, path)


def _as_model(model: str | os.PathLike[str] | onnx.ModelProto | Model) -> Model:
    if isinstance(model, Model):
        return model.copy()
    if isinstance(model, onnx.ModelProto):
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)
        return import_model(fresh)
    return load_model(model)


def _exporter(export_format: str) -> Exporter:
    if export_format not in EXPORTERS:
        raise InputError(f"unknown export format '{export_format}' (one of: {', '.join(EXPORTERS)})")
    return EXPORTERS[export_format]


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_CPP_FRAME = re.compile(r"\S+\.(?:h|cc|cpp):\d+ [^()]*\([^()]*\) (?:const )?")  # "file.h:46 void f(args) "


def ort_reason(error: BaseException, limit: int = 200) -> str:
    """ORT's message in one line: its first line, without the error-code prefix and C++ frames, truncated."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = _CPP_FRAME.sub("", _ORT_PREFIX.sub("", lines[0])).strip() if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(None, feed)[0]


def check_ort_runs(model: bytes, feed: dict[str, np.ndarray], threads: int | None = None,
                   generated: bool = False) -> None:
    """Refuse (InputError, one line) a float model ONNX Runtime cannot load or run on `feed` (one sample).

    `generated`: the feed is seeded noise (no calibration data), which the message says.
    """
    try:
        session = make_session(model, threads, quiet=True)
    except Exception as e:  # ORT's errors are plain Exception subclasses
        raise InputError(f"ONNX Runtime cannot load the input model: {ort_reason(e)}") from e
    try:
        _run(session, feed)
    except Exception as e:
        on = " on generated inputs" if generated else ""
        raise InputError(f"ONNX Runtime cannot run the input model{on}: {ort_reason(e)}") from e


def evaluate_fidelity(reference: bytes, candidate: bytes, data: CalibrationSet, batch_size: int = 8,
                      threads: int | None = None) -> dict[str, Any]:
    sessions = []
    for model, error, which in ((reference, InputError, "input"), (candidate, ExportError, "quantized")):
        try:
            sessions.append(make_session(model, threads, quiet=True))
        except Exception as e:
            raise error(f"ONNX Runtime cannot load the {which} model: {ort_reason(e)}") from e
    fidelity = Fidelity()
    for feed in data.batches(batch_size):
        outputs = []
        for session, error, which in ((sessions[0], InputError, "input"), (sessions[1], ExportError, "quantized")):
            try:
                outputs.append(_run(session, feed))
            except Exception as e:
                raise error(f"ONNX Runtime cannot run the {which} model: {ort_reason(e)}") from e
        fidelity.update(outputs[0], outputs[1])
    return fidelity.as_dict()


def optimize(
    model: str | os.PathLike[str] | onnx.ModelProto | Model,
    calibration: Any = None,
    *,
    pipeline: str | Pipeline = "w8a8",
    seed: int = 0,
    holdout: int | None = None,
    preprocess: str | None = None,
    progress: bool = False,
    verify: bool = True,
    check_fusion: bool = True,
    reproducer_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    export_format: str = "qdq",
) -> OptimizeResult:
    """Run a pipeline on a float model and export the quantized model (QDQ by default).

    `export_format` is a key of qonnx.export.EXPORTERS: "qdq" (QuantizeLinear/DequantizeLinear
    around float ops), "qop" (QLinear* operators) or "int-only" (integer ops with
    dyadic requantization between the input quantize and the output dequantize).

    `calibration` is an .npz path, a folder (per-sample .npy/.npz or images with
    `preprocess`), a dict of arrays, or an iterable of feed dicts. `holdout`
    samples from its tail are kept out of calibration and used to report
    fidelity to the float model (default: 10%, at most 64).

    Before any pass, ONNX Runtime runs the float model once (on the first calibration sample, or on seeded
    inputs without calibration data): a model it cannot load or run is refused with InputError, and no
    reproducer is written (that is for qonnx's own failures). A `reproducer_dir` is checked first against the
    files the run reads (qonnx.app.paths).
    """
    exporter = _exporter(export_format)
    if reproducer_dir:
        check_run(model, calibration, [Target(Path(reproducer_dir), "reproducer folder", folder=True)])
    ir = _as_model(model)
    source_bytes = ir.to_bytes()
    pipe = pipeline if isinstance(pipeline, Pipeline) else parse_pipeline(pipeline)
    calib = heldout = None
    feed = None
    if calibration is not None:
        full = open_calibration(calibration, ir, preprocess)
        feed = full.first_batch(1)  # fail on wrong names/shapes/dtypes now, not inside a pass
        n_hold = holdout if holdout is not None else min(64, len(full) // 10)
        calib, heldout = full.split(n_hold)
    ctx = PassContext(calibration=calib, seed=seed, threads=threads, progress=progress)
    pipe.validate(ctx.available())
    # A model ORT cannot run is the input's problem, not a pass's: refuse it before any pass (no reproducer).
    if feed is None:
        check_ort_runs(source_bytes, sample_feed(ir, None, seed, batch=1), threads, generated=True)
    else:
        check_ort_runs(source_bytes, feed, threads)
    instruments: list[Instrument] = [StructuralVerifier(), NumericVerifier()] if verify else []
    reproducer = Reproducer(reproducer_dir) if reproducer_dir else None
    ir, records = PassManager(pipe, instruments, reproducer).run(ir, ctx)
    ir.metadata.update({
        "qonnx.version": __version__,
        "qonnx.pipeline": pipe.canonical(),
        "qonnx.seed": str(seed),
    })
    quantized = bool(ir.quant.tensors or ir.quant.dynamic or ir.quant.gathers)
    proto = exporter(ir) if quantized else ir.to_onnx()
    onnx.checker.check_model(proto)
    result = OptimizeResult(model=proto, ir=ir, pipeline=pipe, records=records, size_before=len(source_bytes))
    result.size_after = len(result.to_bytes())
    inner = ir.subgraph_ops()
    inner_layers = sum(inner.get(op, 0) for op in ("Conv", "Gemm", "MatMul", "LSTM", "GRU"))
    if inner_layers:
        result.notes.append(f"{inner_layers} compute layers inside If/Loop subgraphs stay float (passed through)")
    if not ir.quant.layers and not ir.quant.dynamic and not ir.quant.gathers:
        result.notes.append(_nothing_quantized_note(ir.quant.kept_float))
    if check_fusion and quantized:
        result.fusion = fusion_report(proto)
        for op, name in result.fusion.float_layers:
            reason = ir.quant.kept_float.get(name, "ORT did not fuse it into an integer kernel")
            result.notes.append(f"{op} '{name}' runs in float: {reason}")
    if heldout is not None:
        result.fidelity = evaluate_fidelity(source_bytes, result.to_bytes(), heldout, threads=threads)
    return result


def _nothing_quantized_note(kept_float: dict[str, str]) -> str:
    if not kept_float:
        return "no layer of the main graph could be quantized: the output equals the float model"
    reasons = Counter(kept_float.values())
    why = "; ".join(f"{n} layer{'s' if n > 1 else ''}: {reason}" for reason, n in reasons.most_common())
    return f"every layer was kept float, so the output equals the float model ({why})"


def quantize_file(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], calibration: Any = None,
                  *, report_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> OptimizeResult:
    """`optimize` from a file to a file, refusing to overwrite the input.

    Before any work, the output, `report_path` (a file the caller writes afterwards, e.g. a JSON report; this
    function does not write it) and the reproducer folder are checked against every file the run reads: see
    qonnx.app.paths.
    """
    src, dst = Path(input_path), Path(output_path)
    writes = [Target(dst, "output")]
    if report_path is not None:
        writes.append(Target(Path(report_path), "report"))
    if kwargs.get("reproducer_dir"):
        writes.append(Target(Path(kwargs["reproducer_dir"]), "reproducer folder", folder=True))
    check_run(src, calibration, writes)
    result = optimize(src, calibration, **kwargs)
    result.save(dst)
    return result

"""`qonnx bench`: latency, size and fidelity of models in ONNX Runtime, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qonnx.core.ir import load_model
from qonnx.core.modelio import read_model_proto
from qonnx.data.calibration import open_calibration
from qonnx.errors import InputError
from qonnx.numerics.metrics import Fidelity
from qonnx.runtime.compare import sample_feed
from qonnx.runtime.ort import latency_session, make_session, measure_latency


def run_bench(models: list[Path], data: Path | None = None, labels: Path | None = None,
              threads: list[int] | None = None, runs: int = 50, batch_size: int = 8) -> list[dict[str, Any]]:
    """One row per model; the first model is the reference for fidelity and latency ratios."""
    threads = threads or [1]
    if any(t < 1 for t in threads):
        raise InputError("thread counts must be positive")
    reference = load_model(models[0])
    for other in models[1:]:
        read_model_proto(other)  # a clear error for a file that is not a model
    rows: list[dict[str, Any]] = [{"model": str(p), "size_bytes": p.stat().st_size} for p in models]
    evaluation = open_calibration(data, reference, max_samples=None) if data is not None else None
    truth = np.load(labels, allow_pickle=False) if labels is not None else None

    if evaluation is not None:
        sessions = [make_session(str(p)) for p in models]
        fidelity = [Fidelity() for _ in models]
        correct = [0 for _ in models]
        seen = 0
        for feed in evaluation.batches(batch_size):
            outs = [s.run(None, feed)[0] for s in sessions]
            n = len(outs[0])
            for i, out in enumerate(outs):
                fidelity[i].update(outs[0], out)
                if truth is not None:
                    correct[i] += int(np.sum(np.argmax(out.reshape(n, -1), 1) == truth[seen:seen + n]))
            seen += n
        for i, row in enumerate(rows):
            row["fidelity"] = fidelity[i].as_dict() if i else None
            if truth is not None:
                row["accuracy"] = round(correct[i] / seen, 4)
        feed = evaluation.first_batch(1)
    else:
        feed = sample_feed(reference, None, batch=1)

    for t in threads:
        sessions = [latency_session(str(p), threads=t) for p in models]
        latencies = measure_latency(sessions, feed, runs=runs)
        for row, lat in zip(rows, latencies):
            row[f"latency_ms_t{t}"] = round(lat.median_ms, 3)
            row[f"spread_t{t}"] = round(lat.spread, 3)
            row[f"latency_ratio_t{t}"] = round(lat.median_ms / latencies[0].median_ms, 3)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    thread_keys = sorted(k for k in rows[0] if k.startswith("latency_ms_t"))
    header = ["model", "size"] + [f"{k[8:]} (x ref)" for k in thread_keys] + ["top1 agr", "KL", "SQNR dB"]
    has_acc = "accuracy" in rows[0]
    if has_acc:
        header.append("accuracy")
    lines = [header]
    for row in rows:
        fid = row.get("fidelity") or {}
        cells = [Path(row["model"]).name, f"{row['size_bytes'] / 1e6:.2f} MB"]
        for k in thread_keys:
            ratio = row[k.replace("ms", "ratio")]
            cells.append(f"{row[k]:.2f} ({ratio:.2f})")
        cells += [str(fid.get("top1_agreement", "-")), str(fid.get("kl", "-")), str(fid.get("sqnr_db", "-"))]
        if has_acc:
            cells.append(str(row["accuracy"]))
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)

"""Quantize a prepared real model with qonnx and compare it with FP32 (accuracy, latency, size)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds `models`

import qonnx  # noqa: E402
from models._common import cache_dir  # noqa: E402
from models.tasks import TASKS  # noqa: E402
from qonnx.data.calibration import open_calibration  # noqa: E402
from qonnx.runtime.ort import bound_heap_growth, latency_session, measure_latency, quiet_ort_logging  # noqa: E402


def main(task_name: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    quiet_ort_logging()
    bound_heap_growth()  # what the qonnx command does at start-up
    task = TASKS[task_name]
    folder = cache_dir() / task_name
    fp32, out = folder / "model.onnx", folder / "model.qonnx-w8a8.onnx"
    t0 = time.perf_counter()
    result = qonnx.quantize_file(fp32, out, folder / "calib.npz", pipeline="w8a8", progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    print(f"qonnx w8a8: {result.pipeline} in {seconds:.1f} s; {result.fusion.describe()}")
    for note in result.notes:
        print(f"  note: {note}")
    metrics = {name: task.evaluate(path, folder) for name, path in (("fp32", fp32), ("qonnx-w8a8", out))}
    feed = open_calibration(folder / "eval.npz", result.ir).first_batch(1)
    latency = {}
    for threads in (1, 2):
        sessions = [latency_session(str(p), threads=threads) for p in (fp32, out)]
        latency[threads] = measure_latency(sessions, feed, runs=100)
    keys = [task.primary_metric] + sorted(k for k in metrics["fp32"] if k != task.primary_metric)
    header = f"{'model':12s} {'size MB':>8s} {'t1 ms':>8s} {'t2 ms':>8s} " + " ".join(f"{k:>14s}" for k in keys)
    print(f"\n{task_name}: {task.description}\n{header}")
    for i, name in enumerate(metrics):
        size = (fp32 if i == 0 else out).stat().st_size / 1e6
        cells = " ".join(f"{metrics[name].get(k, float('nan')):14.4f}" for k in keys)
        print(f"{name:12s} {size:8.2f} {latency[1][i].median_ms:8.2f} {latency[2][i].median_ms:8.2f} {cells}")
    ratio1 = latency[1][1].median_ms / latency[1][0].median_ms
    ratio2 = latency[2][1].median_ms / latency[2][0].median_ms
    print(f"\nlatency vs FP32: {ratio1:.2f}x at 1 thread, {ratio2:.2f}x at 2 threads (medians, interleaved runs)")
    print(f"wrote {out}")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "efficientnet_lite0")

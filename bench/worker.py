"""One quantization job in its own process: `python bench/worker.py SPEC.json`.

The parent (`bench/run.py`) reads this process's peak RSS from `os.wait4`, so each job's memory is
measured alone. The spec is JSON: `kind` (ort-preprocess | ort-static | ort-dynamic | qonnx),
`model`, `output`, `calib`, `config`, `result` (where this process writes its JSON result).
Times are taken around the quantization call itself (imports excluded; saving included).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.worker")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def run_qonnx(spec: dict[str, Any]) -> dict[str, Any]:
    import qonnx

    cfg = spec["config"]
    result = qonnx.optimize(spec["model"], spec["calib"], pipeline=cfg.get("pipeline", "w8a8"),
                            seed=cfg.get("seed", 0), holdout=cfg.get("holdout", 0),
                            export_format=cfg.get("export_format", "qdq"))
    result.save(spec["output"])
    return {
        "pipeline": result.pipeline.canonical(),
        "pass_seconds": {r.spec: round(r.seconds, 3) for r in result.records},
        "fusion": result.fusion.describe() if result.fusion else None,
        "float_layers": [list(x) for x in result.fusion.float_layers] if result.fusion else [],
        "notes": list(result.notes),
    }


def run_ort(spec: dict[str, Any]) -> dict[str, Any]:
    import ort_baselines as ob  # bench/ is this script's directory, hence on sys.path

    src, dst = Path(spec["model"]), Path(spec["output"])
    if spec["kind"] == "ort-preprocess":
        return ob.preprocess(src, dst)
    if spec["kind"] == "ort-static":
        return ob.quantize_static_file(src, dst, Path(spec["calib"]), spec["config"], spec.get("batch_size", 8))
    if spec["kind"] == "ort-dynamic":
        return ob.quantize_dynamic_file(src, dst, spec["config"])
    raise ValueError(f"unknown job kind {spec['kind']!r}")


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    job = run_qonnx if spec["kind"] == "qonnx" else run_ort
    if spec["kind"] == "qonnx":
        import qonnx  # noqa: F401  (imports before the clock and the baseline RSS)
        from qonnx.runtime.ort import bound_heap_growth, quiet_ort_logging

        quiet_ort_logging()
        bound_heap_growth()  # what the qonnx command does at start-up
    else:
        import ort_baselines  # noqa: F401
    baseline = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    info = job(spec)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "rss_after_imports_mb": baseline, "vm_hwm_mb": _rss_mb("VmHWM"), **info}
    Path(spec["result"]).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

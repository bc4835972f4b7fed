"""Benchmark qonnx against ONNX Runtime's quantizer on the real-model tasks; writes BENCHMARKS.md.

    python bench/run.py [--tasks a,b] [--quick] [--graph-scaling] [--out BENCHMARKS.md] [--json bench/results.json]

For each task, in one run: FP32, ORT default static quantization, the best of three ORT
per-channel QDQ configurations, (MiniLM) ORT dynamic quantization, and qonnx `w8a8`. Each
quantization runs in its own process (bench/worker.py) so its time and peak RSS are its own;
metrics come from the task's evaluator; latency is measured with all models of a task
interleaved in the same call. Outputs go to bench/out/<task>/ (gitignored). `--graph-scaling` also times
`w8a8-static` on generated graphs of 1k/3k/10k nodes (bench/graph_scaling.py; `--tasks ""` for only that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # `models` is a top-level package of the repo, not installed

import ort_baselines as ob  # noqa: E402  (bench/ is this script's directory)
import report  # noqa: E402
from graph_scaling import graph_scaling  # noqa: E402
from jobs import memory_cap_mb, run_job  # noqa: E402
from variants import DEFAULT_TASKS, PER_TENSOR_ORT_TASKS, SCALING_TASK, VARIANTS  # noqa: E402

from models._common import load_npz, sha256_file  # noqa: E402


@dataclass(frozen=True)
class Settings:
    quick: bool
    calib_samples: int | None  # None: the task's whole calib.npz
    eval_samples: int | None  # None: the task's whole eval set
    warmup: int
    runs: int
    threads: tuple[int, ...]
    scaling_sizes: tuple[int, int]
    seed: int = 0
    graph_sizes: tuple[int, ...] = (1000, 3000, 10000)  # nodes of the generated graphs (--graph-scaling)
    # Rounds go on past `runs` until this much time has passed (at most 10x runs): 100 rounds of a
    # 25-microsecond model are a few milliseconds, too short for a steady median.
    latency_seconds: float = 0.0

    @classmethod
    def make(cls, quick: bool, runs: int | None) -> Settings:
        if quick:
            return cls(True, 8, 32, 2, runs or 10, (1, 2), (16, 64))
        return cls(False, None, None, 10, runs or 100, (1, 2), (100, 1000), latency_seconds=3.0)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_tasks(wait_s: float = 1200.0) -> Any:
    """`models.tasks.TASKS`, waiting for the module while another engineer finishes it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            from models import tasks

            return tasks
        except Exception as e:  # noqa: BLE001 - any import failure means "not ready yet"
            if time.monotonic() > deadline:
                raise
            say(f"models.tasks not importable yet ({type(e).__name__}: {e}); retrying in 60 s")
            time.sleep(60)


def subset_npz(src: Path, dst: Path, n: int) -> Path:
    np.savez(dst, **{k: v[:n] for k, v in load_npz(src).items()})
    return dst


# ---------------------------------------------------------------------------------------------
# Quantization jobs
# ---------------------------------------------------------------------------------------------
def loads_in_ort(path: Path) -> str | None:
    """None when ORT can build a session for the model, else why not."""
    from qonnx.runtime.ort import make_session

    try:
        make_session(str(path), threads=1)
        return None
    except Exception as e:  # noqa: BLE001
        detail = str(e).replace(f"Load model from {path} failed:", "")
        return f"ORT cannot load the quantized model: {type(e).__name__}: {detail}"[:1000]


def ort_capped(kind: str, name: str, out: Path, model: Path, calib: Path | None, config: dict[str, Any],
               samples: int, cap: float) -> dict[str, Any]:
    """One ORT job; a static one that passes the memory cap runs again with ORT's strided calibration."""
    res = run_job(kind, name, out, model=model, output=out / f"{name}.onnx", calib=calib, config=config,
                  mem_cap_mb=cap)
    if kind == "ort-static" and res.get("over_memory_cap"):
        say(f"  {name}: over the {cap / 1000:.1f} GB cap; retrying with ORT's CalibStridedMinMax")
        first = res
        res = run_job(kind, name, out, model=model, output=out / f"{name}.onnx", calib=calib,
                      config=ob.with_stride(config, samples), mem_cap_mb=cap)
        res["unbounded_attempt"] = {k: first.get(k) for k in ("error", "wall_s", "peak_mb")}
    if res.get("ok"):
        problem = loads_in_ort(out / f"{name}.onnx")
        if problem:
            res.update(ok=False, error=problem)
    return res


def ort_job(kind: str, name: str, out: Path, original: Path, pre: dict[str, Any], calib: Path | None,
            config: dict[str, Any], samples: int, cap: float) -> dict[str, Any]:
    """An ORT row: quantize the pre-processed model; if that fails (or gives a model ORT cannot load),
    quantize the original model instead, as a user would. Time and memory include the pre-processing
    when its output is what got quantized; failed attempts are kept under `failed_attempts`."""
    sources = ([("pre-processed", Path(pre["output"]))] if pre.get("preprocessed") else []) + [("original", original)]
    failed: list[dict[str, Any]] = []
    for source, model in sources:
        res = ort_capped(kind, name, out, model, calib, config, samples, cap)
        res["source"] = source
        if source == "pre-processed":
            res["quantize_s"] = res.get("seconds")
            res["seconds"] = (res.get("seconds") or 0.0) + pre["seconds"]
            res["peak_mb"] = max(res.get("peak_mb") or 0.0, pre["peak_mb"])
        if res.get("ok"):
            break
        if source != sources[-1][0]:
            say(f"  {name} on the {source} model failed ({res.get('error')}); trying the original model")
        failed.append({k: res.get(k) for k in ("source", "error", "seconds", "peak_mb")})
    res["failed_attempts"] = failed[:-1] if not res.get("ok") else failed
    res["preprocess"] = {k: pre.get(k) for k in ("seconds", "peak_mb", "preprocessed", "skip_symbolic_shape",
                                                 "preprocess_errors")}
    return res


def quantize_all(name: str, tdir: Path, out: Path, calib: Path, st: Settings, cap: float) -> dict[str, dict]:
    """All quantized variants of one task: label -> job result (with `path`)."""
    samples = len(next(iter(load_npz(calib).values())))
    original = tdir / "model.onnx"
    say("  ORT quant_pre_process")
    pre = run_job("ort-preprocess", "ort-preprocess", out, model=original, output=out / "fp32.pre.onnx")
    pre["output"] = str(out / "fp32.pre.onnx")
    if not pre.get("ok"):
        say(f"  ORT pre-processing job failed ({pre.get('error')}); ORT rows quantize the original model")
        pre["preprocessed"] = False
    jobs: dict[str, dict] = {}
    say("  ORT default quantize_static")
    jobs["ort-default"] = ort_job("ort-static", "ort-default", out, original, pre, calib, ob.DEFAULT_CONFIG,
                                  samples, cap)
    for method in ob.BEST_METHODS:
        label = f"ort-best-{method.lower()}"
        say(f"  ORT per-channel QDQ, {method}")
        jobs[label] = ort_job("ort-static", label, out, original, pre, calib, ob.best_config(method), samples, cap)
    if name == "minilm":
        say("  ORT quantize_dynamic")
        jobs["ort-dynamic"] = ort_job("ort-dynamic", "ort-dynamic", out, original, pre, None, ob.DYNAMIC_CONFIG,
                                      samples, cap)
    if name in PER_TENSOR_ORT_TASKS:
        for method in ob.BEST_METHODS:
            label = f"ort-pertensor-{method.lower()}"
            say(f"  ORT per-tensor QDQ, {method}")
            config = {**ob.best_config(method), "per_channel": False}
            jobs[label] = ort_job("ort-static", label, out, original, pre, calib, config, samples, cap)
    for label, v in VARIANTS.get(name, {}).items():
        say(f"  qonnx {v.pipeline} ({v.export_format})")
        pipeline = v.pipeline.replace("@task/", f"{tdir}/")  # the worker runs in another folder
        if "@task/train.npz" in v.pipeline:
            load_tasks().TASKS[name].prepare_train(tdir)
        jobs[label] = run_job("qonnx", label, out, model=tdir / "model.onnx", output=out / f"{label}.onnx",
                              calib=calib if v.uses_data else None,
                              config={"pipeline": pipeline, "seed": st.seed, "holdout": 0,
                                      "export_format": v.export_format}, mem_cap_mb=cap)
    for label, tag in (("qonnx-w8a8", "first"), ("qonnx-w8a8.rerun", "determinism rerun")):
        say(f"  qonnx w8a8 ({tag})")
        jobs[label] = run_job("qonnx", label, out, model=tdir / "model.onnx", output=out / f"{label}.onnx",
                              calib=calib, config={"pipeline": "w8a8", "seed": st.seed, "holdout": 0},
                              mem_cap_mb=cap)
    for label, res in jobs.items():
        res["path"] = str(out / f"{label}.onnx")
    return jobs


# ---------------------------------------------------------------------------------------------
# Evaluation and latency (in this process; quantization is over by then)
# ---------------------------------------------------------------------------------------------
def evaluate(task: Any, path: Path, tdir: Path, st: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        metrics = task.evaluate(path, tdir, max_samples=st.eval_samples)
    except Exception as e:  # noqa: BLE001 - a model ORT cannot run is a result, not a crash
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "eval_s": round(time.perf_counter() - t0, 2)}


def ort_kernels(path: Path) -> dict[str, Any]:
    """Integer kernels and float layers in ORT's optimized graph (qonnx's fusion report, any model)."""
    import onnx

    from qonnx.runtime.fusion import fusion_report

    try:
        rep = fusion_report(onnx.load(str(path)))
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"describe": rep.describe(), "integer_ops": dict(rep.integer_ops), "float_layers": len(rep.float_layers),
            "qdq_left": rep.qdq_left}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def latency(rows: list[dict[str, Any]], tdir: Path, st: Settings) -> dict[str, Any]:
    """Median latency of every row at each thread count, rows interleaved; ratios from the same call.

    Returns the machine's load average before and after, since other work on it shows up here.
    """
    from qonnx.runtime.ort import latency_session, measure_latency

    feed = {k: v[:1] for k, v in load_npz(tdir / "eval.npz").items()}
    live = [r for r in rows if "error" not in r]
    base = next(r for r in live if r["label"] == "fp32")
    best = next((r for r in live if r.get("is_ort_best")), None)
    load = {"loadavg_before": loadavg()}
    for t in st.threads:
        sessions = [latency_session(r["path"], threads=t) for r in live]
        results = measure_latency(sessions, feed, warmup=st.warmup, runs=st.runs, min_seconds=st.latency_seconds)
        by_label = {r["label"]: lat for r, lat in zip(live, results, strict=True)}
        for r, lat in zip(live, results, strict=True):
            r.setdefault("latency", {})[f"t{t}"] = {
                "median_ms": lat.median_ms, "p10_ms": lat.p10_ms, "p90_ms": lat.p90_ms, "runs": lat.runs,
                "x_fp32": lat.median_ms / by_label[base["label"]].median_ms,
                "x_ort_best": lat.median_ms / by_label[best["label"]].median_ms if best else None,
            }
    load["loadavg_after"] = loadavg()
    return load


# ---------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------
def is_variant(name: str, label: str) -> bool:
    """Rows scored on the metric only (the latency table compares the main rows)."""
    variant = VARIANTS.get(name, {}).get(label)
    return label.startswith("ort-pertensor-") or (variant is not None and not variant.timed)


def bench_task(tasks_mod: Any, name: str, out_root: Path, st: Settings, cap: float) -> dict[str, Any]:
    task = tasks_mod.TASKS[name]
    tdir = tasks_mod.task_dir(name)
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    if not all((tdir / f).exists() for f in ("model.onnx", "calib.npz", "eval.npz")):
        say(f"  {tdir} is not prepared: running the task's prepare()")
        task.prepare(tdir)
    calib = tdir / "calib.npz"
    if st.calib_samples:
        calib = subset_npz(calib, out / "calib.subset.npz", st.calib_samples)
    calib_n = len(next(iter(load_npz(calib).values())))

    jobs = quantize_all(name, tdir, out, calib, st, cap)
    rerun = jobs.pop("qonnx-w8a8.rerun")
    first = jobs["qonnx-w8a8"]
    determinism = {"ok": bool(first.get("ok") and rerun.get("ok")),
                   "rerun": {k: rerun.get(k) for k in ("seconds", "peak_mb", "error")}}
    if determinism["ok"]:
        determinism.update(sha256_first=sha256_file(Path(first["path"])), sha256_second=sha256_file(Path(rerun["path"])))
        determinism["identical"] = determinism["sha256_first"] == determinism["sha256_second"]

    fp32_path = tdir / "model.onnx"
    rows: list[dict[str, Any]] = [{"label": "fp32", "path": str(fp32_path), "quant": None}]
    rows += [{"label": label, "path": res["path"], "quant": res, "variant": is_variant(name, label)}
             for label, res in jobs.items()]
    for row in rows:
        say(f"  evaluating {row['label']}")
        quant = row["quant"]
        if quant is not None and not quant.get("ok"):
            row["error"] = f"quantization failed: {quant.get('error')}"
            continue
        row.update(evaluate(task, Path(row["path"]), tdir, st))
        if "error" in row:
            continue
        row["size_mb"] = Path(row["path"]).stat().st_size / 1e6
        if row["label"] != "fp32":
            row["ort_kernels"] = ort_kernels(Path(row["path"]))

    candidates = [r for r in rows if r["label"].startswith("ort-best-") and "error" not in r]
    if candidates:  # ties go to the first method in BEST_METHODS order
        max(candidates, key=lambda r: r["metrics"][task.primary_metric])["is_ort_best"] = True
    say(f"  latency at threads {st.threads}, {st.runs} interleaved runs")
    table_rows = [r for r in rows if (not r["label"].startswith("ort-best-") or r.get("is_ort_best"))
                  and not r.get("variant")]
    load = latency(table_rows, tdir, st)
    return {
        "task": name, "description": task.description, "primary_metric": task.primary_metric,
        "calibration_samples": calib_n, "eval_samples": next((r["metrics"].get("samples") for r in rows
                                                              if "metrics" in r), None),
        "rows": rows, "determinism": determinism, "latency_load": load,
    }


# ---------------------------------------------------------------------------------------------
# Memory scaling of qonnx calibration
# ---------------------------------------------------------------------------------------------
def augmented_calib(src: Path, dst: Path, n: int, seed: int) -> Path:
    """`n` samples: the originals first, then seeded horizontal flips and rolls of them (NCHW images)."""
    x = load_npz(src)["input"]
    rng = np.random.default_rng(seed)
    out = np.empty((n, *x.shape[1:]), dtype=x.dtype)
    for i in range(n):
        img = x[i % len(x)]
        if i >= len(x):
            if rng.random() < 0.5:
                img = img[..., ::-1]
            img = np.roll(img, (int(rng.integers(-16, 17)), int(rng.integers(-16, 17))), axis=(-2, -1))
        out[i] = img
    np.savez(dst, input=out)
    return dst


def memory_scaling(tasks_mod: Any, out_root: Path, st: Settings, cap: float) -> dict[str, Any]:
    tdir = tasks_mod.task_dir(SCALING_TASK)
    out = out_root / SCALING_TASK / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in st.scaling_sizes:
        say(f"  qonnx w8a8 with {n} calibration samples")
        calib = augmented_calib(tdir / "calib.npz", out / f"calib_{n}.npz", n, st.seed)
        res = run_job("qonnx", f"qonnx-{n}", out, model=tdir / "model.onnx", output=out / f"qonnx-{n}.onnx",
                      calib=calib, config={"pipeline": "w8a8", "seed": st.seed, "holdout": 0}, mem_cap_mb=cap)
        runs.append({"samples": n, "npz_mb": calib.stat().st_size / 1e6, **{k: res.get(k) for k in (
            "ok", "error", "peak_mb", "seconds", "rss_after_imports_mb", "pass_seconds")}})
        calib.unlink()  # hundreds of MB, rebuilt deterministically on the next run
    return {"task": SCALING_TASK, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Machine and CLI
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime

    import qonnx

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), 0)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "cpu": model, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
        "memory_gb": round(mem / 1e6, 1), "python": platform.python_version(), "numpy": np.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "qonnx": qonnx.__version__,
        "git_head": git.stdout.strip() or None, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "ort_static_defaults": ob.static_defaults(),
    }


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 calibration / 32 eval samples, 10 runs")
    ap.add_argument("--runs", type=int, help="latency runs per model and thread count (default 100; quick 10)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the memory-scaling check")
    ap.add_argument("--graph-scaling", action="store_true",
                    help="also time w8a8-static on generated MatMul/Add/Relu graphs of 1k/3k/10k nodes")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=BENCH / "results.json")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite --out from an earlier run's JSON (no benchmarking)")
    args = ap.parse_args(argv)
    if args.render:
        args.out.write_text(report.render(json.loads(args.render.read_text())))
        say(f"wrote {args.out} from {args.render}")
        return 0

    st = Settings.make(args.quick, args.runs)
    out_root = BENCH / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    tasks_mod = load_tasks()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in tasks_mod.TASKS]
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(tasks_mod.TASKS)}")
    cap = memory_cap_mb()
    results: dict[str, Any] = {"machine": machine_info(), "settings": asdict(st), "memory_cap_mb": cap,
                               "tasks": {}, "scaling": None, "graph_scaling": None,
                               "json_path": _display(args.json)}
    say(f"benchmark of {', '.join(names)} ({'quick' if st.quick else 'full'}); per-job memory cap {cap:.0f} MB")

    def flush() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        args.out.write_text(report.render(results))

    for name in names:
        say(f"{name}")
        t0 = time.perf_counter()
        try:
            results["tasks"][name] = bench_task(tasks_mod, name, out_root, st, cap)
        except Exception as e:  # noqa: BLE001 - one broken task must not lose the others' results
            say(f"  {name} failed: {type(e).__name__}: {e}")
            results["tasks"][name] = {"task": name, "error": f"{type(e).__name__}: {e}"}
        say(f"  {name} done in {time.perf_counter() - t0:.0f} s")
        flush()
    if not args.no_scaling and SCALING_TASK in tasks_mod.TASKS:
        say(f"memory scaling on {SCALING_TASK}")
        results["scaling"] = memory_scaling(tasks_mod, out_root, st, cap)
    if args.graph_scaling:
        say(f"graph-size scaling: w8a8-static on generated graphs of {', '.join(map(str, st.graph_sizes))} nodes")
        results["graph_scaling"] = graph_scaling(out_root, st.graph_sizes, st.seed, cap)
        for run in results["graph_scaling"]["runs"]:
            say(f"  {run['nodes']} nodes: " + (f"{run['seconds']:.1f} s" if run.get("ok") else f"failed: {run['error']}"))
    flush()
    say(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

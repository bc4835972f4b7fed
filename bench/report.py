"""Render the benchmark results (the JSON that bench/run.py writes) as BENCHMARKS.md."""

from __future__ import annotations

import re
from typing import Any

HIDDEN_METRICS = {"samples", "imagenet_labelled"}
ROW_NAMES = {
    "fp32": "FP32",
    "ort-default": "ORT default",
    "ort-dynamic": "ORT dynamic (reference)",
    "qonnx-w8a8": "qonnx w8a8",
    "qonnx-pertensor-plain": "qonnx per-tensor weights, no CLE/BC",
    "qonnx-pertensor-cle-ranges": "qonnx per-tensor, DFQ's range CLE + BC",
    "qonnx-w8a8-pertensor": "qonnx w8a8-pertensor (noise CLE + BC)",
    "qonnx-dfq": "qonnx dfq (no data)",
    "qonnx-dfq-pertensor": "qonnx dfq-pertensor (no data, noise CLE from BN moments)",
    "qonnx-dfq-pertensor-cle-ranges": "qonnx dfq-pertensor with DFQ's range CLE (no data)",
    "qonnx-w4a8": "qonnx w4a8 (int4 weights, AdaRound)",
    "qonnx-w4-nearest": "qonnx int4 weights, round-to-nearest (w4a8 without AdaRound)",
    "qonnx-w4a8-block32": "qonnx w4a8 with one int4 scale per 32 input channels (AdaRound)",
    "qonnx-w4a8-qat": "qonnx w4a8 + QAT, label-free distillation on 2,048 unlabelled crops (15-minute budget)",
    "qonnx-w4a16": "qonnx w4a16 (int4 weight-only, MatMulNBits)",
    "qonnx-qop": "qonnx w8a8, QOperator format",
    "qonnx-int-only": "qonnx w8a8-static, integer-only format",
    "qonnx-w8a8-static": "qonnx w8a8-static",
    "qonnx-mp-uniform-int4": "qonnx uniform int4 weights (nearest)",
    "qonnx-mp-ilp": "qonnx mixed int4/int8, ILP at size 0.5",
    "qonnx-mp-greedy": "qonnx mixed int4/int8, greedy at size 0.5",
    "qonnx-mp-random": "qonnx mixed int4/int8, random at size 0.5",
    **{f"qonnx-w{bits}-rtn{suffix}": f"qonnx {bits}-bit weights, nearest{text} (min/max ranges)"
       for bits in (6, 4) for suffix, text in (("", ""), ("-bc", " + bias correction"))},
}


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"


def _short(text: str | None, limit: int = 200) -> str:
    text = re.sub(r"Load model from \S+ failed:", "", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row_name(row: dict[str, Any]) -> str:
    label = row["label"]
    for prefix, kind in (("ort-best-", "ORT best"), ("ort-pertensor-", "ORT per-tensor")):
        if label.startswith(prefix):
            return f"{kind} ({row['quant']['config'].get('calibrate_method', '?')})"
    return ROW_NAMES.get(label, label)


def _latency_cell(row: dict[str, Any], t: int) -> str:
    lat = (row.get("latency") or {}).get(f"t{t}")
    if not lat:
        return "–"
    best = f"{lat['x_ort_best']:.2f}" if lat.get("x_ort_best") is not None else "–"
    ms = lat["median_ms"]
    return f"{ms:.{3 if ms < 1 else 2}f} (×{lat['x_fp32']:.2f}, ×{best})"


def _secondary(row: dict[str, Any], primary: str) -> str:
    metrics = row.get("metrics") or {}
    return ", ".join(f"{k} {_num(v)}" for k, v in metrics.items() if k != primary and k not in HIDDEN_METRICS)


def _quant_cells(row: dict[str, Any]) -> tuple[str, str]:
    q = row.get("quant")
    if not q:
        return "–", "–"
    return f"{q['seconds']:.1f}", f"{q['peak_mb']:.0f}"


def task_section(res: dict[str, Any], threads: list[int]) -> list[str]:
    name = res["task"]
    if "error" in res:
        return [f"### {name}", "", f"**Failed:** `{res['error']}`", ""]
    primary = res["primary_metric"]
    lines = [
        f"### {name}",
        "",
        f"{res['description']}. Calibration: {res['calibration_samples']} samples; evaluation: "
        f"{int(res['eval_samples']) if res['eval_samples'] is not None else '?'} samples; primary metric `{primary}` (higher is better).",
        "",
    ]
    head = ["model", primary, "other metrics", "size MB"]
    head += [f"latency t{t} ms (×FP32, ×ORT-best)" for t in threads] + ["quant s", "peak MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    table = [r for r in res["rows"] if (not r["label"].startswith("ort-best-") or r.get("is_ort_best"))
             and not r.get("variant")]
    for row in table:
        if "error" in row:
            cells = [_row_name(row), f"failed: {_short(row['error'])}"] + ["–"] * (len(head) - 2)
        else:
            cells = [_row_name(row), _num(row["metrics"].get(primary)), _secondary(row, primary),
                     f"{row['size_mb']:.2f}", *(_latency_cell(row, t) for t in threads), *_quant_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _variant_table(res)
    lines += _task_notes(res)
    return lines


def _variant_table(res: dict[str, Any]) -> list[str]:
    """Further pipelines (per-tensor weights, data-free) scored on the task metric only."""
    primary = res["primary_metric"]
    rows = [r for r in res["rows"] if r.get("variant")]
    if not rows:
        return []
    lines = ["Further variants, metric only (same calibration and evaluation sets):", "",
             f"| model | {primary} | other metrics | size MB | quant s |", "|---|---|---|---|---|"]
    for row in rows:
        name = _row_name(row)
        if "error" in row:
            lines.append(f"| {name} | failed: {_short(row['error'])} | – | – | – |")
            continue
        lines.append(f"| {name} | {_num(row['metrics'].get(primary))} | {_secondary(row, primary)} | "
                     f"{row['size_mb']:.2f} | {_quant_cells(row)[0]} |")
    return lines + [""]


def _task_notes(res: dict[str, Any]) -> list[str]:
    primary = res["primary_metric"]
    notes = []
    cands = [r for r in res["rows"] if r["label"].startswith("ort-best-")]
    if cands:
        parts = []
        for r in cands:
            method = r["quant"]["config"].get("calibrate_method", "?")
            q = r["quant"]
            if "metrics" not in r:
                parts.append(f"{method} failed ({_short(r.get('error'))})")
                continue
            where = ", original model" if q.get("source") == "original" and q.get("failed_attempts") else ""
            parts.append(f"{method} {_num(r['metrics'].get(primary))} ({q.get('seconds') or 0:.1f} s, "
                         f"{q.get('peak_mb') or 0:.0f} MB{where})")
        notes.append(f"- ORT per-channel QDQ candidates ({primary}): " + "; ".join(parts) + ".")
    fallbacks: dict[str, list[str]] = {}  # error -> rows that fell back to the original model because of it
    for r in res["rows"]:
        q = r.get("quant") or {}
        if not r["label"].startswith("ort-"):
            continue
        if q.get("unbounded_attempt"):
            stride = q["config"].get("extra_options", {}).get("CalibStridedMinMax")
            notes.append(f"- {_row_name(r)}: the default (all-at-once) calibration was "
                         f"{q['unbounded_attempt']['error']}; the row uses ORT's `CalibStridedMinMax={stride}`.")
        for attempt in q.get("failed_attempts") or []:
            if "error" in r:
                notes.append(f"- {_row_name(r)} failed on the pre-processed model too ({_short(attempt['error'])}).")
            else:
                fallbacks.setdefault(_short(attempt["error"], 260), []).append(_row_name(r))
        pre = q.get("preprocess") or {}
        if r["label"] == "ort-default" and pre.get("preprocess_errors"):
            errs = "; ".join(_short(e) for e in pre["preprocess_errors"])
            if pre.get("preprocessed"):
                notes.append(f"- ORT `quant_pre_process` failed in symbolic shape inference ({errs}); the ORT rows "
                             "start from `quant_pre_process(..., skip_symbolic_shape=True)`.")
            else:
                notes.append(f"- ORT `quant_pre_process` failed ({errs}); the ORT rows quantize the original model.")
    for error, names in fallbacks.items():
        notes.append(f"- {', '.join(names)}: quantizing the pre-processed model failed ({error}), so the original "
                     "model was quantized instead (time and memory of that attempt only).")
    qrow = next((r for r in res["rows"] if r["label"] == "qonnx-w8a8"), None)
    if qrow and qrow.get("quant", {}).get("ok"):
        q = qrow["quant"]
        notes.append(f"- qonnx pipeline (the `w8a8` preset as it stood during the run): `{q.get('pipeline')}`.")
        notes.append(f"- qonnx fusion report: {q.get('fusion') or 'none (nothing was quantized)'}.")
        for note in q.get("notes") or []:
            notes.append(f"  - {note}")
        passes = ", ".join(f"{k.split('{')[0]} {v:.1f} s" for k, v in (q.get("pass_seconds") or {}).items())
        notes.append(f"- qonnx pass times: {passes}.")
    load = res.get("latency_load")
    if load:
        notes.append(f"- Load average (1/5/15 min) around the latency measurement: {load['loadavg_before']} before, "
                     f"{load['loadavg_after']} after.")
    kern = [f"{_row_name(r)}: {r['ort_kernels'].get('describe', r['ort_kernels'].get('error'))}"
            for r in res["rows"] if r.get("ort_kernels") and r["label"] != "qonnx-w8a8"
            and (not r["label"].startswith("ort-best-") or r.get("is_ort_best"))]
    if kern:
        notes.append("- ORT's optimized graphs of the baselines: " + "; ".join(kern) + ".")
    return notes + [""]


def scaling_section(sc: dict[str, Any] | None) -> list[str]:
    if not sc:
        return []
    lines = [
        "## Memory scaling of qonnx calibration",
        "",
        f"`{sc['task']}`, `qonnx.optimize(..., pipeline=\"w8a8\", holdout=0)` in a fresh process on n calibration "
        "samples (the first n of calib.npz; beyond its 256, seeded horizontal flips and ±16-pixel rolls of them, "
        "written to bench/out and deleted afterwards).",
        "",
        "| samples | npz MB | peak RSS MB | time s | calibrate s |",
        "|---|---|---|---|---|",
    ]
    for r in sc["runs"]:
        if not r.get("ok"):
            lines.append(f"| {r['samples']} | {r['npz_mb']:.0f} | failed: {r.get('error')} | – | – |")
            continue
        cal = (r.get("pass_seconds") or {})
        cal_s = next((v for k, v in cal.items() if k.startswith("calibrate")), None)
        lines.append(f"| {r['samples']} | {r['npz_mb']:.0f} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | "
                     f"{_num(cal_s, 1)} |")
    ok = [r for r in sc["runs"] if r.get("ok")]
    if len(ok) == 2:
        a, b = ok
        lines += ["", f"{b['samples'] / a['samples']:.0f}× the samples: peak RSS ×{b['peak_mb'] / a['peak_mb']:.2f} "
                  f"({b['peak_mb'] - a['peak_mb']:+.0f} MB), time ×{b['seconds'] / a['seconds']:.2f}."]
    return lines + [""]


def graph_scaling_section(gs: dict[str, Any] | None) -> list[str]:
    """Time against graph size (bench/graph_scaling.py): linear passes keep seconds per node flat."""
    if not gs:
        return []
    lines = [
        "## Graph-size scaling of qonnx",
        "",
        f"`{gs['pipeline']}` on generated chains of MatMul -> Add(bias) -> Relu (batch 1, {gs['width']} features, "
        f"{gs['calibration_samples']} calibration rows), each size in a fresh process; time includes the export "
        "and the save.",
        "",
        "| nodes | time s | ms per node | canonicalize s | all passes s | export, checks, save s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in gs["runs"]:
        if not r.get("ok"):
            lines.append(f"| {r['nodes']} | failed: {_short(r.get('error'))} | – | – | – | – | – |")
            continue
        passes = r.get("pass_seconds") or {}
        in_passes = sum(passes.values())
        lines.append(f"| {r['nodes']} | {r['seconds']:.1f} | {1000 * r['seconds'] / r['nodes']:.2f} | "
                     f"{_num(passes.get('canonicalize'), 2)} | {in_passes:.2f} | {r['seconds'] - in_passes:.1f} | "
                     f"{r['peak_mb']:.0f} |")
    return lines + [""]


def determinism_section(tasks: dict[str, Any]) -> list[str]:
    lines = ["## Determinism", "",
             "qonnx w8a8 run twice per task, in two fresh processes, same model, calibration data and seed (0).", "",
             "| task | identical | sha256 (first run) | sha256 (second run) |", "|---|---|---|---|"]
    for name, res in tasks.items():
        d = res.get("determinism")
        if not d:
            continue
        if not d.get("ok"):
            lines.append(f"| {name} | run failed | – | – |")
            continue
        lines.append(f"| {name} | {'yes' if d['identical'] else '**no**'} | `{d['sha256_first'][:16]}…` | "
                     f"`{d['sha256_second'][:16]}…` |")
    return lines + [""]


def _rounds_floor(st: dict[str, Any]) -> str:
    seconds = st.get("latency_seconds") or 0
    if not seconds:
        return ""
    return f" (more, up to {10 * st['runs']}, until {seconds:g} s have passed: small models get more rounds)"


def method_section(results: dict[str, Any]) -> list[str]:
    m, st = results["machine"], results["settings"]
    defaults = ", ".join(f"{k}={v}" for k, v in m["ort_static_defaults"].items())
    runs = st["runs"]
    return [
        "## Method",
        "",
        "All numbers of a task come from one run of `python bench/run.py`"
        + (" **--quick** (a smoke test: subsets of calibration and evaluation data, few latency runs)" if st["quick"]
           else "") + ".",
        "",
        "Rows:",
        "- **FP32**: the task's `model.onnx` as is.",
        "- **ORT default**: `quantize_static(model, out, reader)` with every other argument at its default "
        f"(in ORT {m['onnxruntime']}: {defaults}). ORT's quantization docs recommend running "
        "`quant_pre_process` (symbolic shape inference, ORT graph optimisation, ONNX shape inference) before "
        "quantizing, and `quantize_static` warns when it was not run, so every ORT row quantizes the output of "
        "`quant_pre_process(model, pre)` with its default arguments; its time and memory are included in the "
        "ORT rows (time: pre-process + quantize; peak: the larger of the two processes). Where pre-processing "
        "fails, or the model quantized from its output does not load in ORT, the row quantizes the original "
        "model instead, as a user would (the notes say where).",
        "- **ORT best**: `quantize_static` with `quant_format=QDQ, per_channel=True, activation_type=QUInt8, "
        "weight_type=QInt8` and `calibrate_method` in {MinMax, Entropy, Percentile}; the table shows the one with "
        "the best primary metric on the evaluation set (ties go to the first in that order), the notes list all "
        "three (the JSON has every metric of each).",
        "- **ORT dynamic** (MiniLM only, reference): `quantize_dynamic(pre, out, per_channel=True)`.",
        "- **qonnx w8a8**: `qonnx.optimize(model, calib.npz, pipeline=\"w8a8\", holdout=0)` then `.save()` "
        "(its default verification and fusion check included in its time).",
        "",
        "Every quantizer sees the same `calib.npz` (ORT through a `CalibrationDataReader` yielding batches of 8 "
        "samples; qonnx reads the file itself, also in batches of 8). Metrics come from the task's own "
        "`evaluate(model_path, task_dir)` on its evaluation set (sizes in each section). Each quantization runs "
        "in its own Python process (`bench/worker.py`): **quant s** is the wall time of the quantization call "
        "and the save (imports excluded); **peak MB** is that process's peak RSS (`VmHWM`, which includes "
        "~60–75 MB of Python, numpy, onnx and ORT; `ru_maxrss` is not used because Linux carries it across "
        "fork+exec, so it would include this benchmark process's own RSS). MB = 10^6 bytes. A job whose RSS passes "
        f"{results['memory_cap_mb'] / 1000:.1f} GB (60% of available memory at start) is killed to protect the "
        "shared machine and, for ORT, retried with ORT's own `CalibStridedMinMax` extra option (calibrate 32 "
        "samples at a time and merge); the notes say when that happened.",
        "",
        f"Latency: ONNX Runtime {m['onnxruntime']} CPU execution provider, `qonnx.runtime.ort.latency_session` (all "
        "graph optimisations, sequential execution, intra-op threads = t, inter-op 1, idle workers sleep instead "
        "of spinning), batch 1 (the first evaluation "
        f"sample), {st['warmup']} warm-up runs per model, then {runs} rounds{_rounds_floor(st)} in which every "
        "model of the task runs once, in a seeded shuffled order per round (interleaved, so machine noise hits all "
        "alike; shuffled, so no model always runs after the same neighbour, whose weights it finds in the caches; "
        "with ORT's default spinning the idle workers of the other models would take the cores from the one being "
        "timed); the cell is the median. The ratios "
        "×FP32 and ×ORT-best divide medians measured in that same call. p10/p90 are in the JSON. The machine "
        "was shared with other work while this ran (load averages around each measurement are in the notes); at "
        "t2 every core is in use, so t2 medians are the noisier ones.",
        "",
    ]


def machine_section(m: dict[str, Any]) -> list[str]:
    return [
        "## Machine",
        "",
        f"- CPU: {m['cpu']} ({m['cores']} logical cores, {m['affinity']} usable; "
        f"{', '.join(m['isa']) or 'no AVX2/AVX-512'}), {m['memory_gb']} GB RAM",
        f"- Python {m['python']}, numpy {m['numpy']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, "
        f"qonnx {m['qonnx']} (git {m['git_head']}; the working tree may hold uncommitted changes)",
        f"- Date: {m['date']}",
        "",
    ]


def render(results: dict[str, Any]) -> str:
    threads = list(results["settings"]["threads"])
    lines = ["# Benchmarks", "", "Generated by `python bench/run.py` (do not edit by hand); raw numbers in "
             f"`{results.get('json_path', 'bench/results.json')}`.", ""]
    lines += machine_section(results["machine"]) + method_section(results)
    if results.get("notes"):  # added when results of separate runs are merged (bench/run.py --render)
        lines += ["Notes on this file:", "", *(f"- {note}" for note in results["notes"]), ""]
    lines += ["## Results", ""]
    for res in results["tasks"].values():
        lines += task_section(res, threads)
    lines += scaling_section(results.get("scaling"))
    lines += graph_scaling_section(results.get("graph_scaling"))
    lines += determinism_section(results["tasks"])
    return "\n".join(lines).rstrip() + "\n"

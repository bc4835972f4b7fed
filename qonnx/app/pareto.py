"""Size sweep of mixed precision: budget -> predicted sensitivity and measured fidelity, a table and a plot.

The sweep runs the pipeline's passes before `mixed-precision` once, then, for each size fraction,
mixed-precision (with that budget) and the passes after it, exports the model and measures its fidelity
to the float model on held-out calibration samples. Sensitivities and costs are computed once (the
first point) and reused by every point.

The plot is written with Pillow, already a dependency (image calibration data), so no plotting library
is needed: two panels sharing the x axis (weight bytes), predicted total sensitivity on a log scale and
the measured output divergence (KL, or 1/SQNR for non-classifiers).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from qonnx.analyses.costs import PRECISIONS, CostTable
from qonnx.analyses.sensitivity import SensitivityReport
from qonnx.app.api import evaluate_fidelity
from qonnx.core.ir import load_model
from qonnx.data.calibration import open_calibration
from qonnx.errors import InputError
from qonnx.export.qdq import export_qdq
from qonnx.infra.context import PassContext
from qonnx.infra.instruments import StructuralVerifier
from qonnx.infra.manager import PassManager
from qonnx.infra.pipeline import Pipeline
from qonnx.passes import MixedPrecision, parse_pipeline

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "canonicalize,fold-bn,plan,mixed-precision,calibrate{weights=mse}"
DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def layer_table(report: SensitivityReport, costs: CostTable, precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per unit: sensitivities, trace statistics and costs."""
    by_weight = {layer.weight: layer for layer in report.layers}
    rows = []
    for i, unit in enumerate(costs.units):
        s = by_weight[unit.weight]
        row: dict[str, Any] = {"weight": unit.weight, "nodes": ";".join(unit.nodes), "ops": ";".join(unit.ops),
                               "params": unit.params, "macs": int(costs.macs[i])}
        for p in precisions:
            row[f"omega_{p}"] = s.omega[p]
        for p in precisions:
            row[f"bytes_{p}"] = int(costs.size[i, PRECISIONS.index(p)])
        if s.trace_per_param is not None:
            row.update(trace_per_param=s.trace_per_param, trace_stderr=s.trace_stderr, step_ratio=s.step_ratio)
        rows.append(row)
    return rows


def pareto_sweep(model: str | Path, calibration: Any, *, pipeline: str = DEFAULT_PIPELINE,
                 fractions: tuple[float, ...] = DEFAULT_FRACTIONS, objective: str | None = None,
                 holdout: int = 32, seed: int = 0, preprocess: str | None = None, progress: bool = False,
                 cache_file: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Sweep the size budget of the pipeline's mixed-precision pass; returns the layers and the points."""
    ir = load_model(model)
    float_bytes = ir.to_bytes()
    calib, heldout = open_calibration(calibration, ir, preprocess).split(holdout)
    if heldout is None:
        raise InputError(f"{calibration}: too few samples to hold {holdout} out for the fidelity measurement")
    pipe = parse_pipeline(pipeline)
    where = [i for i, p in enumerate(pipe) if isinstance(p, MixedPrecision)]
    if len(where) != 1:
        raise InputError(f"the sweep needs exactly one mixed-precision pass in the pipeline, got {len(where)}: {pipe}")
    mp = pipe.passes[where[0]]
    base_opts = dataclasses.replace(mp.options, size="0", bops="", latency="", relative_to="int4-int8",
                                    cache=str(cache_file) if cache_file else mp.options.cache,
                                    **({"objective": objective} if objective else {}))
    ctx = PassContext(calibration=calib, seed=seed, threads=threads, progress=progress)
    prefix, tail = Pipeline(pipe.passes[:where[0]]), Pipeline(pipe.passes[where[0] + 1:])
    pipe.validate(ctx.available())
    base, _ = PassManager(prefix, [StructuralVerifier()]).run(ir, ctx)
    report: SensitivityReport | None = None
    costs: CostTable | None = None
    points = []
    for fraction in fractions:
        for analysis in (report, costs):  # sensitivities and costs of the first point serve every point
            if analysis is not None:
                ctx.analyses.put(analysis)
        opts = dataclasses.replace(base_opts, size=repr(float(fraction)))
        candidate = base.copy()
        stats = MixedPrecision(opts).run(candidate, ctx).stats
        report, costs = ctx.analyses.get(SensitivityReport), ctx.analyses.get(CostTable)
        assert report is not None and costs is not None  # the mixed-precision pass computed both
        candidate = tail.run(candidate, ctx).model
        weights = [u.weight for u in costs.units]
        exported = export_qdq(candidate).SerializeToString(deterministic=True)
        fidelity = evaluate_fidelity(float_bytes, exported, heldout, threads=threads)
        point = {"fraction": float(fraction), "model_bytes": len(exported), "fidelity": fidelity,
                 "choice": {u: f"int{entry.scheme.bits}" if (entry := candidate.quant.get(u)) else "float"
                            for u in weights}}
        point.update({k: v for k, v in stats.items() if k not in ("sensitivity_source",)})
        points.append(point)
        log.info("sweep size=%.3f: %s", fraction, {k: point[k] for k in ("size_total", "predicted_omega")})
    assert report is not None and costs is not None, "no sweep points"
    return {"model": str(model), "pipeline": str(pipe), "objective": base_opts.objective, "budget": "size",
            "relative_to": "int4-int8", "heldout_samples": len(heldout), "loss": report.loss,
            "target": report.target, "sensitivity_seconds": report.seconds,
            "layers": layer_table(report, costs, ("int4", "int8")), "points": points}


# ------------------------------------------------------------------------------------------ plot
def _fidelity_series(points: list[dict[str, Any]]) -> tuple[list[float], str]:
    if all("kl" in p["fidelity"] for p in points):
        return [p["fidelity"]["kl"] for p in points], "measured KL (held out)"
    return [10 ** (-p["fidelity"]["sqnr_db"] / 10) for p in points], "measured 1/SQNR (held out)"


def plot_pareto(sweep: dict[str, Any], path: str | Path, width: int = 1000, height: int = 420) -> None:
    """Two panels against the weight bytes: predicted total sensitivity and measured divergence (log y)."""
    points = sweep["points"]
    x = [p["size_total"] for p in points]
    measured, label = _fidelity_series(points)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    half = width // 2
    _panel(draw, (0, 0, half, height), x, [p["predicted_omega"] for p in points],
           f"predicted sum of omega ({sweep['objective']})", (31, 119, 180))
    _panel(draw, (half, 0, width, height), x, measured, label, (214, 39, 40))
    image.save(path, format="PNG")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return list(np.linspace(lo, hi, count))


def _panel(draw, box: tuple[int, int, int, int], x: list[float], y: list[float], title: str,
           color: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 80, top + 40, right - 20, bottom - 50  # plot area
    draw.text((x0, top + 12), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    positive = [v for v in y if v > 0]
    floor = min(positive) if positive else 1e-12
    ly = [float(np.log10(max(v, floor))) for v in y]
    ylo, yhi = (min(ly), max(ly)) if ly else (0.0, 1.0)
    if yhi - ylo < 1e-9:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    xlo, xhi = min(x), max(x)
    if xhi - xlo <= 0:
        xlo, xhi = xlo - 1, xhi + 1

    def px(v: float) -> float:
        return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)

    def py(v: float) -> float:
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _ticks(xlo, xhi):
        draw.line((px(t), y1, px(t), y1 + 4), fill="black")
        draw.text((px(t) - 18, y1 + 8), _short(t), fill="black")
    draw.text(((x0 + x1) / 2 - 40, y1 + 28), "weight bytes", fill="black")
    for t in _ticks(ylo, yhi):
        draw.line((x0 - 4, py(t), x0, py(t)), fill="black")
        draw.line((x0, py(t), x1, py(t)), fill=(230, 230, 230))
        draw.text((left + 8, py(t) - 6), f"{10 ** t:.2g}", fill="black")
    pts = sorted(zip((px(v) for v in x), (py(v) for v in ly)))
    if len(pts) > 1:
        draw.line(pts, fill=color, width=2)
    for u, v in pts:
        draw.ellipse((u - 4, v - 4, u + 4, v + 4), fill=color)


def _short(v: float) -> str:
    for unit, factor in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= factor:
            return f"{v / factor:.3g}{unit}"
    return f"{v:.3g}"

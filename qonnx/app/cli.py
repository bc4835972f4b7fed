"""The `qonnx` command line: optimize, bench, passes."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from qonnx.errors import QonnxError
from qonnx.export import EXPORTERS

_MAX_LINE = 299  # every error is one line under 300 characters


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(error: Exception) -> NoReturn:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = f"error: {message}"
    click.echo(line if len(line) <= _MAX_LINE else line[:_MAX_LINE - 3] + "...", err=True)
    sys.exit(2)


_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


class _Interrupts:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, so `finally` blocks and temporary-file cleanup run
    on either; the signal is remembered, so a run whose interrupt some code swallowed still fails."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.exiting = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        if not self.exiting:
            raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._handle) for s in _EXIT_CODES}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self) -> NoReturn:
        self.exiting = True
        signum = signal.Signals(self.received or signal.SIGINT)
        click.echo(f"error: interrupted by {signum.name}", err=True)
        sys.exit(_EXIT_CODES[signum])


class _Main(click.Group):
    """The `qonnx` group: an interrupted command prints one line and exits 130 (SIGINT) or 143 (SIGTERM)."""

    def invoke(self, ctx: click.Context) -> Any:
        with _Interrupts() as interrupts:
            try:
                result = super().invoke(ctx)
            except KeyboardInterrupt:
                interrupts.exit()
            except SystemExit:
                if interrupts.received:
                    interrupts.exit()
                raise
            if interrupts.received:
                interrupts.exit()
            return result


def _check_writes(models: list[Path], data: Path | None, writes: list[Any]) -> None:
    """qonnx.app.paths' rule for a command that reads `models` and `data` (function-local import: CLI startup)."""
    from qonnx.app.paths import check_outputs, run_reads

    reads = [r for i, m in enumerate(models) for r in run_reads(m, data if i == 0 else None)]
    check_outputs(reads, writes)


def _write_report(payload: Any, path: Path, **dumps: Any) -> None:
    from qonnx.core.modelio import write_bytes_atomic

    write_bytes_atomic(json.dumps(payload, indent=2, **dumps).encode(), path)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qonnx-opt", prog_name="qonnx")
def main() -> None:
    """qonnx: post-training quantization of ONNX models for ONNX Runtime."""
    from qonnx.runtime.ort import bound_heap_growth, quiet_ort_logging

    # Process-wide settings belong to the application, not to library imports.
    quiet_ort_logging()
    bound_heap_growth()


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write the quantized model (never a file qonnx reads).")
@click.option("--calib-data", type=click.Path(path_type=Path),
              help=".npz (keys = input names), a folder of per-sample .npy/.npz, or an image folder.")
@click.option("--preprocess", help="Image folder preprocessing, e.g. 'resize=256,crop=224,mean=127,std=128'.")
@click.option("--preset", help="A named pipeline (see `qonnx passes`); default w8a8.")
@click.option("--passes", "passes_text", help="A pipeline text, e.g. 'canonicalize,fold-bn,plan,calibrate{method=mse}'.")
@click.option("--data-free", is_flag=True, help="Quantize with no calibration data (preset dfq; ranges from "
              "BatchNorm statistics). Set the input range with --passes '...estimate-ranges{input_range=[lo;hi]}' "
              "(and the same on cle{statistics=moments} for dfq-pertensor's pipeline).")
@click.option("--format", "fmt", type=click.Choice(list(EXPORTERS)), default="qdq", show_default=True,
              help="qdq: Q/DQ around float ops; qop: QLinear* operators; int-only: integer ops with dyadic "
                   "requantization (check it with `qonnx inspect --integer-check`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=int, default=None, help="Calibration samples held out for the fidelity check.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("-v", "--verbose", count=True, help="-v for pass logs, -vv for debug.")
def optimize(model: Path, output: Path, calib_data: Path | None, preprocess: str | None, preset: str | None,
             passes_text: str | None, data_free: bool, fmt: str, seed: int, holdout: int | None,
             json_out: Path | None, verbose: int) -> None:
    """Quantize MODEL and write the result to -o."""
    _setup_logging(verbose)
    from qonnx.app.api import quantize_file
    from qonnx.errors import InputError
    from qonnx.passes import resolve

    try:
        if data_free and (calib_data is not None or preset):
            raise InputError("--data-free uses no calibration data and its own preset (dfq): "
                             "drop --calib-data/--preset, or use --preset without --data-free")
        pipeline = resolve("dfq" if data_free and not passes_text else preset, passes_text)
        result = quantize_file(model, output, calib_data, report_path=json_out, pipeline=pipeline, seed=seed,
                               holdout=holdout, preprocess=preprocess, progress=sys.stderr.isatty(),
                               reproducer_dir=output.parent / (output.name + ".reproducer"), export_format=fmt)
        layers = len(result.ir.quant.layers)
        fused = result.fusion.integer_count if result.fusion else 0
        if json_out:
            report = {
                "pipeline": str(result.pipeline), "layers": layers, "integer_kernels": fused,
                "size_before": result.size_before, "size_after": result.size_after, "fidelity": result.fidelity,
                "passes": [dataclasses.asdict(r) for r in result.records], "notes": result.notes,
            }
            try:
                _write_report(report, json_out, default=str)
            except QonnxError as e:
                raise QonnxError(f"{e} (the model was written to {output})") from e
    except QonnxError as e:
        _fail(e)
    click.echo(f"pipeline: {result.pipeline}")
    click.echo(f"quantized layers: {layers}; {result.fusion.describe() if result.fusion else 'no quantization'}")
    click.echo(f"size: {_size(result.size_before)} -> {_size(result.size_after)}")
    if result.fidelity:
        click.echo("fidelity on held-out samples: " + ", ".join(f"{k}={v}" for k, v in result.fidelity.items()))
    click.echo("time per pass: " + ", ".join(f"{r.name} {r.seconds:.2f}s" for r in result.records))
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write the fine-tuned quantized model.")
@click.option("--calib-data", required=True, type=click.Path(path_type=Path),
              help="Calibration inputs (ranges, and the distillation data when there is no --train-data).")
@click.option("--preset", help="A pipeline preset ending in qat (default w4a8-qat).")
@click.option("--passes", "passes_text", help="A pipeline text; a qat pass is appended if it has none.")
@click.option("--train-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz of model inputs plus an optional 'labels' array (else: label-free distillation).")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Learning rate of the weights (Adam, cosine decay).")
@click.option("--lr-scale", type=float, help="Learning rate of the LSQ step sizes.")
@click.option("--time-budget", type=float, help="Seconds for the qat pass (0 = no limit).")
@click.option("--loss", type=click.Choice(["auto", "ce", "kl", "mse"]))
@click.option("--dampen", type=float, help="Final oscillation-dampening weight (0 = off).")
@click.option("--freeze", type=float, help="Initial freezing threshold (0 = off).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint file (resumed if present).")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path), help="Folder for the oscillation report.")
@click.option("--format", "fmt", type=click.Choice(list(EXPORTERS)), default="qdq", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
def finetune(model: Path, output: Path, calib_data: Path, preset: str | None, passes_text: str | None,
             train_data: Path | None, steps: int | None, batch_size: int | None, lr: float | None,
             lr_scale: float | None, time_budget: float | None, loss: str | None, dampen: float | None,
             freeze: float | None, checkpoint: Path | None, report: Path | None, fmt: str, seed: int,
             verbose: int) -> None:
    """Quantization-aware fine-tuning of MODEL (needs the qat extra: pip install qonnx-opt[qat])."""
    _setup_logging(verbose)
    from qonnx.app.api import quantize_file
    from qonnx.infra.pipeline import Pipeline
    from qonnx.passes import REGISTRY, resolve

    overrides = {k: v for k, v in {
        "train_data": None if train_data is None else str(train_data), "steps": steps, "batch_size": batch_size,
        "lr": lr, "lr_scale": lr_scale, "time_budget": time_budget, "loss": loss, "dampen": dampen,
        "freeze": freeze, "checkpoint": None if checkpoint is None else str(checkpoint),
        "report": None if report is None else str(report)}.items() if v is not None}
    try:
        pipeline = resolve(preset or (None if passes_text else "w4a8-qat"), passes_text)
        if not any(p.name == "qat" for p in pipeline):
            pipeline = Pipeline([*pipeline, REGISTRY["qat"]()])
        for p in pipeline:
            if p.name == "qat":
                p.options = dataclasses.replace(p.options, **overrides)
        result = quantize_file(model, output, calib_data, pipeline=pipeline, seed=seed, progress=sys.stderr.isatty(),
                               export_format=fmt)
    except QonnxError as e:
        _fail(e)
        return
    stats = next((r.stats for r in result.records if r.name == "qat"), {})
    click.echo(f"pipeline: {result.pipeline}")
    click.echo("qat: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    if result.fidelity:
        click.echo("fidelity on held-out samples: " + ", ".join(f"{k}={v}" for k, v in result.fidelity.items()))
    click.echo(f"wrote {output}")


@main.command("passes")
def list_passes() -> None:
    """List passes, their options and the presets."""
    from qonnx.passes import PRESETS, REGISTRY

    for name, cls in REGISTRY.items():
        click.echo(f"{name}: {cls.summary}")
        for f in dataclasses.fields(cls.Options):
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
            click.echo(f"    {f.name}={f.default!r}: {f.metadata.get('help', '')}{extra}")
    click.echo("\npresets:")
    for name, (text, doc) in PRESETS.items():
        click.echo(f"  {name}: {doc}\n      {text}")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="Evaluation inputs (.npz or folder).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy of integer labels (one per sample) to report accuracy.")
@click.option("--threads", default="1", show_default=True, help="Thread counts, e.g. '1,2'.")
@click.option("--runs", type=int, default=50, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", count=True)
def bench(models: tuple[Path, ...], data: Path | None, labels: Path | None, threads: str, runs: int,
          json_out: Path | None, verbose: int) -> None:
    """Compare latency, size and fidelity of MODELS (the first is the reference)."""
    _setup_logging(verbose)
    from qonnx.app.bench import format_table, run_bench
    from qonnx.app.paths import Target

    try:
        if json_out:
            _check_writes([*models, *([labels] if labels else [])], data, [Target(json_out, "report")])
        thread_counts = [int(t) for t in threads.split(",") if t.strip()]
        rows = run_bench(list(models), data=data, labels=labels, threads=thread_counts, runs=runs)
        click.echo(format_table(rows))
        if json_out:
            _write_report(rows, json_out)
    except (QonnxError, ValueError) as e:
        _fail(e)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib-data", required=True, type=click.Path(path_type=Path),
              help="Calibration data; its held-out tail measures the errors.")
@click.option("--preprocess", help="Image folder preprocessing spec.")
@click.option("--preset", help="A named pipeline; default w8a8.")
@click.option("--passes", "passes_text", help="A pipeline text.")
@click.option("--holdout", type=int, default=32, show_default=True, help="Samples used to measure errors.")
@click.option("--top", type=int, default=20, show_default=True, help="Rows to print.")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", count=True)
def attribute(model: Path, calib_data: Path, preprocess: str | None, preset: str | None, passes_text: str | None,
              holdout: int, top: int, json_out: Path | None, verbose: int) -> None:
    """Per-tensor error attribution: each quantized tensor's own SQNR and the output error it causes alone."""
    _setup_logging(verbose)
    from qonnx.app.api import optimize
    from qonnx.app.attribution import attribute_errors, format_attribution
    from qonnx.app.paths import Target
    from qonnx.data.calibration import open_calibration
    from qonnx.passes import resolve

    try:
        if json_out:
            _check_writes([model], calib_data, [Target(json_out, "report")])
        result = optimize(model, calib_data, pipeline=resolve(preset, passes_text), holdout=holdout,
                          preprocess=preprocess, check_fusion=False, progress=sys.stderr.isatty())
        _, heldout = open_calibration(calib_data, result.ir, preprocess).split(holdout)
        if heldout is None:
            raise QonnxError("not enough calibration samples to hold some out")
        rows = attribute_errors(result.ir, heldout, progress=sys.stderr.isatty())
        click.echo(f"whole model: {result.fidelity}")
        click.echo(format_attribution(rows, top))
        if json_out:
            _write_report([r.as_dict() for r in rows], json_out)
    except QonnxError as e:
        _fail(e)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--integer-check", is_flag=True, help="Compare ORT's outputs with the numpy integer reference "
              "(int-only models): fraction of exactly equal elements and the largest difference in LSBs.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="Inputs (.npz or folder) for the check.")
@click.option("--samples", type=int, default=16, show_default=True, help="Samples to check (0 = all).")
@click.option("--json", "json_out", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", count=True)
def inspect(model: Path, integer_check: bool, data: Path | None, samples: int, json_out: Path | None,
            verbose: int) -> None:
    """Show MODEL's operators and the kernels ORT runs; optionally check it against the integer reference."""
    _setup_logging(verbose)
    from collections import Counter

    from qonnx.app.paths import Target
    from qonnx.core.modelio import read_model_proto
    from qonnx.errors import InputError

    try:
        if json_out:
            _check_writes([model], data, [Target(json_out, "report")])
        proto = read_model_proto(model)
        ops = Counter(n.op_type for n in proto.graph.node)
        click.echo("operators: " + ", ".join(f"{v} {k}" for k, v in sorted(ops.items())))
        from qonnx.runtime.fusion import fusion_report

        click.echo(fusion_report(proto).describe())
        report = None
        if integer_check:
            if data is None:
                raise InputError("--integer-check needs --data (the inputs to run)")
            from qonnx.core.ir import Model
            from qonnx.data.calibration import open_calibration
            from qonnx.export.intref import integer_check as run_check

            inputs = open_calibration(data, Model.from_onnx(proto), max_samples=None)
            if samples:
                inputs = inputs.head(samples)
            report = run_check(proto, inputs.batches(1))
            click.echo(report.describe())
        if json_out:
            payload = {"operators": dict(sorted(ops.items())), "integer_check": report.as_dict() if report else None}
            _write_report(payload, json_out)
    except QonnxError as e:
        _fail(e)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib-data", required=True, type=click.Path(path_type=Path),
              help="Calibration data; its held-out tail measures the fidelity of each sweep point.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for sensitivity.json (reused by later runs), layers.csv, pareto.json and pareto.png.")
@click.option("--preprocess", help="Image folder preprocessing spec.")
@click.option("--passes", "passes_text", help="Pipeline with one mixed-precision pass whose size budget is swept "
              "(default: canonicalize,fold-bn,plan,mixed-precision,calibrate{weights=mse}).")
@click.option("--objective", type=click.Choice(["measured", "hessian"]), help="Sensitivity estimator "
              "(overrides the pipeline's).")
@click.option("--points", type=int, default=9, show_default=True,
              help="Size budgets from all-int4 (0) to all-int8 (1), evenly spaced.")
@click.option("--holdout", type=int, default=32, show_default=True, help="Samples used to measure fidelity.")
@click.option("--top", type=int, default=20, show_default=True, help="Layers to print (most sensitive first).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
def sensitivity(model: Path, calib_data: Path, out_dir: Path, preprocess: str | None, passes_text: str | None,
                objective: str | None, points: int, holdout: int, top: int, seed: int, verbose: int) -> None:
    """Per-layer sensitivity to int4/int8 weights and a size sweep of mixed precision (table, JSON, PNG)."""
    _setup_logging(verbose)
    import csv
    import io

    from qonnx.app.pareto import DEFAULT_PIPELINE, pareto_sweep, plot_pareto
    from qonnx.app.paths import Target
    from qonnx.core.modelio import write_bytes_atomic

    try:
        if points < 2:
            raise QonnxError("--points needs at least 2 (the all-int4 and all-int8 ends)")
        if out_dir.exists():  # else none of its files exists, so none can be a file qonnx reads
            _check_writes([model], calib_data, [Target(out_dir / name, f"--out file '{name}'") for name in
                                                ("sensitivity.json", "layers.csv", "pareto.json", "pareto.png")])
        out_dir.mkdir(parents=True, exist_ok=True)
        fractions = tuple(float(f) for f in (i / (points - 1) for i in range(points)))
        sweep = pareto_sweep(model, calib_data, pipeline=passes_text or DEFAULT_PIPELINE, fractions=fractions,
                             objective=objective, holdout=holdout, seed=seed, preprocess=preprocess,
                             progress=sys.stderr.isatty(), cache_file=out_dir / "sensitivity.json")
        layers = sweep["layers"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(layers[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(layers)
        write_bytes_atomic(buffer.getvalue().encode(), out_dir / "layers.csv")
        write_bytes_atomic(json.dumps(sweep, indent=1, default=str).encode(), out_dir / "pareto.json")
        plot_pareto(sweep, out_dir / "pareto.png")
    except (QonnxError, OSError) as e:
        _fail(e)
    click.echo(f"sensitivity ({sweep['objective']}, {sweep['loss']} of '{sweep['target']}') of {len(layers)} "
               f"layers in {sweep['sensitivity_seconds']:.1f}s; most sensitive at int4:")
    click.echo(f"{'weight':48s} {'params':>9s} {'omega int4':>11s} {'omega int8':>11s}")
    for row in sorted(layers, key=lambda r: -r["omega_int4"])[:top]:
        click.echo(f"{row['weight'][-48:]:48s} {row['params']:9d} {row['omega_int4']:11.3g} {row['omega_int8']:11.3g}")
    click.echo(f"\n{'size':>5s} {'weight bytes':>13s} {'int4':>5s} {'int8':>5s} {'predicted':>10s} "
               f"{'KL':>9s} {'SQNR dB':>8s} {'top1 agr':>8s}")
    for p in sweep["points"]:
        f = p["fidelity"]
        click.echo(f"{p['fraction']:5.3f} {int(p['size_total']):13d} {p.get('int4', 0):5d} {p.get('int8', 0):5d} "
                   f"{p['predicted_omega']:10.3g} {f.get('kl', float('nan')):9.3g} {f['sqnr_db']:8.2f} "
                   f"{f.get('top1_agreement', float('nan')):8.3f}")
    click.echo(f"wrote {out_dir}/layers.csv, pareto.json, pareto.png (sensitivities: sensitivity.json)")


if __name__ == "__main__":
    main()

"""qat: quantization-aware fine-tuning on the calibrated quant table (LSQ or OCTAV+MAD, oscillation dampening and
iterative freezing, BN re-estimation), with learned weights, codes and step sizes written back into the IR.

torch is imported only when the pass runs (qonnx/qat/); without it the pass fails with the install hint.
Training signal: `train_data` (an .npz of model inputs plus an optional `labels` array) or, without it, the
calibration inputs with the float model as the teacher (label-free distillation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from qonnx.core.ir import Model
from qonnx.errors import InputError
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import PassContext
from qonnx.qat.options import QatOptions, TrainConfig

log = logging.getLogger(__name__)


def load_train_data(path: str, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model inputs (and an optional 'labels' array) of an .npz: no pickles, one sample count for all arrays.

    Read whole with np.load rather than streamed like calibration data: training samples them at random.
    """
    file = Path(path)
    if not file.exists():
        raise InputError(f"pass 'qat': train_data '{path}' does not exist")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise InputError(f"pass 'qat': train_data '{path}' holds pickled Python objects; qonnx never "
                             "unpickles data (save plain numeric arrays)") from e
        raise InputError(f"pass 'qat': train_data '{path}' is not a readable .npz: {e}") from e
    except OSError as e:
        raise InputError(f"pass 'qat': train_data '{path}' is not a readable .npz: {e}") from e
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise InputError(f"pass 'qat': train_data '{path}' lacks model input(s) {missing} (has {sorted(arrays)})")
    counts = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items() if k in input_names or k == "labels"}
    if len(set(counts.values())) > 1:
        raise InputError(f"pass 'qat': train_data '{path}': arrays disagree on the number of samples "
                         f"(leading axis): {counts}")
    return {n: arrays[n] for n in input_names}, arrays.get("labels")


def _calibration_arrays(ctx, samples: int) -> dict[str, np.ndarray]:
    data = ctx.calibration.head(samples) if samples else ctx.calibration
    parts: dict[str, list[np.ndarray]] = {}
    for feed in data.batches(64):
        for k, v in feed.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


class Qat(Pass):
    name = "qat"
    summary = "quantization-aware fine-tuning: learn weights and step sizes through fake quantizers (needs torch)"
    Options = QatOptions
    requires = frozenset({"calibrated", "calibration-data"})
    provides = frozenset({"rounded"})
    exact = False
    edits_graph = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from qonnx.qat import require_torch

        opts = self.options
        opts.check()
        torch = require_torch()
        from qonnx.qat.report import write_report
        from qonnx.qat.train import Trainer

        start = time.perf_counter()
        input_names = [t.name for t in model.inputs if not model.is_constant(t)]
        if opts.train_data:
            inputs, labels = load_train_data(opts.train_data, input_names)
        else:
            inputs, labels = _calibration_arrays(ctx, opts.samples), None
        budget = max(0.0, opts.time_budget - (time.perf_counter() - start)) if opts.time_budget else 0.0
        config = TrainConfig(**{**asdict(opts), "seed": ctx.seed, "time_budget": budget})
        threads = opts.threads or ctx.threads or 1
        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        torch.manual_seed(ctx.seed)
        try:
            result = Trainer(model, inputs, labels, config, progress=ctx.progress).run()
        finally:
            torch.set_num_threads(previous)
        if opts.report:
            write_report(result.report, opts.report)
        stats = {**result.stats, "samples": len(next(iter(inputs.values()))), "labels": labels is not None,
                 "seconds": round(time.perf_counter() - start, 1)}
        log.info("qat: %s", stats)
        return PassResult(model, True, stats)

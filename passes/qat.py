"""qat: quantization-aware fine-tuning on the calibrated quant table (LSQ or OCTAV+MAD, oscillation dampening and
iterative freezing, BN re-estimation), with learned weights, codes and step sizes written back into the IR.

torch is imported only when the pass runs (qonnx/qat/); without it the pass fails with the install hint.
Training signal: `train_data` (an .npz of model inputs plus an optional `labels` array) or, without it, the
calibration inputs with the float model as the teacher (label-free distillation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qonnx.errors import InputError, PreconditionError
from qonnx.ir import Model
from qonnx.pipeline import Pass, PassResult, option, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QatOptions:
    steps: int = option(1000, "optimizer steps (the cosine schedules are fitted into time_budget when they do not fit)")
    batch_size: int = option(32, "samples per step")
    lr: float = option(1e-4, "Adam learning rate of the weights (cosine decay to 0)")
    lr_scale: float = option(1e-5, "Adam learning rate of the LSQ step sizes")
    time_budget: float = option(0.0, "seconds for the whole pass (0 = no limit); a shortened schedule makes the "
                                     "result depend on the machine's speed")
    train_data: str = option("", ".npz of model inputs (and an optional 'labels' array) to train on; empty: the "
                                 "calibration inputs, distilled from the float model")
    samples: int = option(0, "calibration samples to train on when there is no train_data (0 = all)")
    loss: str = option("auto", "ce on labels, kl on logits (distillation), mse on outputs; auto: ce with labels, "
                               "else kl for [N, classes] outputs and mse otherwise", choices=("auto", "ce", "kl", "mse"))
    weight_quantizer: str = option("lsq", "lsq: learned step sizes; octav: MSE-optimal clip recomputed every step "
                                          "with magnitude-aware gradients", choices=("lsq", "octav"))
    scale_init: str = option("calibrated", "initial weight step: the calibrated one, or LSQ's 2 mean|w|/sqrt(Q_P)",
                             choices=("calibrated", "lsq"))
    learn_activation_scales: bool = option(True, "learn activation step sizes (LSQ); false keeps the calibrated ones")
    dampen: float = option(0.0, "final weight of the oscillation dampening loss (reference 0.1; 0 = off), "
                                "cosine-annealed from 0 after anneal_start")
    freeze: float = option(0.0, "initial oscillation-frequency threshold of iterative freezing (reference 0.1; "
                                "0 = off), cosine-decayed to freeze_final after anneal_start")
    freeze_final: float = option(0.02, "final freezing threshold (keep it at least 2x momentum)")
    momentum: float = option(0.01, "EMA momentum of the oscillation frequency and of the frozen integers")
    anneal_start: float = option(0.25, "fraction of the steps before dampening and freezing start")
    max_bits: int = option(4, "track oscillations (and dampen/freeze) in weights of at most this many bits")
    bn_batches: int = option(50, "batches to re-estimate BatchNorm statistics after training (BN not folded)")
    bias_correction: bool = option(False, "BN folded: shift each layer's bias by its channel-mean error against "
                                          "the float model after training")
    checkpoint: str = option("", "checkpoint file: written every checkpoint_every steps, resumed from if present")
    checkpoint_every: int = option(200, "steps between checkpoints")
    report: str = option("", "folder for the oscillation report (oscillations.json, oscillations.png)")
    log_every: int = option(50, "steps between rows of the oscillation report")
    threads: int = option(0, "torch threads (0 = the run's thread setting, else 1: one thread is deterministic "
                             "across machines and never loses to OpenMP spinning on a busy core)")
    octav_iterations: int = option(2, "weight_quantizer=octav: fixed-point iterations per step (warm-started)")

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.lr_scale < 0 or self.time_budget < 0:
            raise PreconditionError("pass 'qat': need steps >= 1, batch_size >= 1, lr > 0, lr_scale >= 0 and "
                                    "time_budget >= 0")
        if self.dampen < 0 or self.freeze < 0 or self.freeze_final < 0 or not 0 < self.momentum <= 1:
            raise PreconditionError("pass 'qat': dampen, freeze and freeze_final must be >= 0, momentum in (0, 1]")
        if not 0 <= self.anneal_start < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise PreconditionError("pass 'qat': need 0 <= anneal_start < 1, checkpoint_every >= 1, log_every >= 1")
        if self.freeze and self.freeze_final > self.freeze:
            raise PreconditionError("pass 'qat': freeze_final must not exceed freeze (the threshold decays)")


def load_train_data(path: str, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    file = Path(path)
    if not file.exists():
        raise InputError(f"pass 'qat': train_data '{path}' does not exist")
    try:
        with np.load(file) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as e:
        raise InputError(f"pass 'qat': train_data '{path}' is not a readable .npz: {e}") from e
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise InputError(f"pass 'qat': train_data '{path}' lacks model input(s) {missing} (has {sorted(arrays)})")
    return {n: arrays[n] for n in input_names}, arrays.get("labels")


def _calibration_arrays(ctx, samples: int) -> dict[str, np.ndarray]:
    data = ctx.calibration.head(samples) if samples else ctx.calibration
    parts: dict[str, list[np.ndarray]] = {}
    for feed in data.batches(64):
        for k, v in feed.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


@register
class Qat(Pass):
    name = "qat"
    summary = "quantization-aware fine-tuning: learn weights and step sizes through fake quantizers (needs torch)"
    Options = QatOptions
    requires = frozenset({"calibrated", "calibration-data"})
    provides = frozenset({"rounded"})
    exact = False
    edits_graph = True

    def run(self, model: Model, ctx) -> PassResult:
        from qonnx.qat import require_torch

        opts = self.options
        opts.check()
        torch = require_torch()
        from qonnx.qat.report import write_report
        from qonnx.qat.train import TrainConfig, Trainer

        start = time.perf_counter()
        input_names = [t.name for t in model.inputs if not model.is_constant(t)]
        if opts.train_data:
            inputs, labels = load_train_data(opts.train_data, input_names)
        else:
            inputs, labels = _calibration_arrays(ctx, opts.samples), None
        fields = {k: v for k, v in asdict(opts).items() if k in TrainConfig.__dataclass_fields__}
        budget = max(0.0, opts.time_budget - (time.perf_counter() - start)) if opts.time_budget else 0.0
        config = TrainConfig(**{**fields, "seed": ctx.seed, "time_budget": budget})
        threads = opts.threads or ctx.options.get("threads") or 1
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

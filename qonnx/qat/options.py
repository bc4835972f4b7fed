"""Options of the qat pass, torch-free so that the pass registers (and `qonnx passes` lists it) without torch.

`TrainConfig` is the same set plus what the pass adds for the trainer (the run's seed, the budget left after
loading the data, a stop step for resume tests), so each default lives in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qonnx.errors import PreconditionError
from qonnx.infra.base import option


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


@dataclass(frozen=True)
class TrainConfig(QatOptions):
    seed: int = 0
    stop_at: int = 0  # stop after this step with the checkpoint written (resume tests); 0 = never

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed (the budget, data location and bookkeeping may change)."""
        skip = {"time_budget", "checkpoint", "checkpoint_every", "stop_at", "threads", "train_data", "samples",
                "report"}
        return repr(sorted((k, v) for k, v in dataclasses.asdict(self).items() if k not in skip))

"""The QAT training loop: losses, deterministic batches, schedules, time budget, checkpoint/resume, and the
post-training corrections (BatchNorm re-estimation, or per-channel bias correction where BN was folded).

Determinism: batch b of step t is a pure function of (seed, t) (one seeded permutation per epoch), the learning
rates and the annealing schedules are closed forms of (t, total), and nothing else draws random numbers, so a run
resumed from a checkpoint continues exactly as the uninterrupted one would have. A time budget that shortens the
schedule makes the result depend on the machine's speed; the number of steps run is reported.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qonnx.core.ir import Model
from qonnx.errors import InputError, PreconditionError
from qonnx.qat.model import Student, write_back
from qonnx.qat.options import TrainConfig
from qonnx.qat.oscillations import dampening_weight, freeze_threshold
from qonnx.runtime.ort import make_session, run_batches

log = logging.getLogger(__name__)
LOSSES = ("auto", "ce", "kl", "mse")
_PROBE_STEPS = 10


@dataclass
class TrainResult:
    stats: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    finished: bool = True


def _batch_indices(seed: int, step: int, batch: int, count: int, cache: dict) -> np.ndarray:
    out = np.empty(batch, np.int64)
    for i, pos in enumerate(range(step * batch, (step + 1) * batch)):
        epoch = pos // count
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch, 7]).permutation(count)
        out[i] = cache[epoch][pos % count]
    return out


def _resolve_loss(config: TrainConfig, labels: np.ndarray | None, teacher: torch.Tensor) -> str:
    if config.loss != "auto":
        if config.loss == "ce" and labels is None:
            raise PreconditionError("pass 'qat': loss=ce needs labels (train_data with a 'labels' array)")
        return config.loss
    if labels is not None:
        return "ce"
    return "kl" if teacher.dim() == 2 and teacher.shape[1] > 1 else "mse"


def _is_probabilities(t: torch.Tensor) -> bool:
    return bool((t >= 0).all() and (t <= 1).all() and torch.allclose(t.sum(1), torch.ones(len(t)), atol=1e-3))


def _loss(kind: str, out: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None,
          probs: bool) -> torch.Tensor:
    if kind == "ce":
        assert labels is not None  # _resolve_loss picks "ce" only with labels
        return F.cross_entropy(out, labels)
    if kind == "kl":
        log_s = torch.log(out.clamp_min(1e-8)) if probs else F.log_softmax(out, 1)
        log_t = torch.log(target.clamp_min(1e-8)) if probs else F.log_softmax(target, 1)
        return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return F.mse_loss(out, target)


def _teacher_outputs(model: Model, names: list[str], inputs: list[np.ndarray], batch: int,
                     threads: int) -> torch.Tensor:
    """The float model's first output on every training sample, run in ORT: several times faster than the
    torch interpreter on CPU (EfficientNet-Lite0: ~10 vs ~60 ms an image), and the targets need no gradient."""
    session = make_session(model.to_bytes(), threads=threads, spinning=False)
    first = model.outputs[0].name
    feeds = ({n: a[start:start + batch] for n, a in zip(names, inputs, strict=True)}
             for start in range(0, len(inputs[0]), batch))
    return torch.from_numpy(np.concatenate([out[first] for out in run_batches(session, feeds, [first])]))


def _layer_output(captured: dict[str, torch.Tensor | None], name: str) -> torch.Tensor:
    """A layer output from GraphModule.capture_run: a node computes it, so the run always sets it."""
    value = captured[name]
    assert value is not None, f"capture run did not compute layer output '{name}'"
    return value


def _channel_means(v: torch.Tensor) -> torch.Tensor:
    return v.transpose(0, 1).reshape(v.shape[1], -1).double().mean(1)


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, model: Model, inputs: dict[str, np.ndarray], labels: np.ndarray | None, config: TrainConfig,
                 progress: bool = False):
        self.model, self.config, self.progress = model, config, progress
        self.student = Student(model, config.weight_quantizer, config.learn_activation_scales, config.max_bits,
                               config.momentum, config.scale_init, config.octav_iterations)
        names = self.student.module.input_names
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"pass 'qat': training data lacks model input(s) {missing}")
        self.inputs = [np.ascontiguousarray(inputs[n]) for n in names]
        self.count = len(self.inputs[0])
        if labels is not None and len(labels) != self.count:
            raise InputError(f"pass 'qat': {len(labels)} labels for {self.count} samples")
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels).astype(np.int64))

    def run(self) -> TrainResult:
        config, student = self.config, self.student
        start_time = time.perf_counter()
        target = _teacher_outputs(self.model, student.module.input_names, self.inputs, 64, torch.get_num_threads())
        kind = _resolve_loss(config, None if self.labels is None else self.labels.numpy(), target)
        probs = kind == "kl" and _is_probabilities(target)
        params, scales = student.weight_parameters(), student.scale_parameters()
        opt_w = torch.optim.Adam(params, lr=config.lr)
        opt_s = torch.optim.Adam(scales, lr=config.lr_scale) if scales else None
        total, step, report_log = config.steps, 0, []
        path = Path(config.checkpoint) if config.checkpoint else None
        if path is not None and path.exists():
            state = torch.load(path, weights_only=True)  # tensors and plain data only: no pickled code
            if state.get("fingerprint") != config.fingerprint() or state.get("samples") != self.count:
                raise PreconditionError(f"pass 'qat': checkpoint '{path}' was written with other options or data; "
                                        "delete it or give another checkpoint path")
            student.load_state_dict(state["student"])
            opt_w.load_state_dict(state["opt_w"])
            if opt_s is not None:
                opt_s.load_state_dict(state["opt_s"])
            step, total, report_log = state["step"], state["total"], state["report"]
            log.info("qat: resumed from '%s' at step %d of %d", path, step, total)
        cache: dict = {}
        tracked = student.tracked()
        module = student.module.train()
        from tqdm import tqdm

        losses: list[float] = []
        loop_start, first_step = time.perf_counter(), step
        probed = not config.time_budget
        with tqdm(total=total, initial=step, desc="qat", unit="step", leave=False, disable=not self.progress,
                  mininterval=0.5) as bar:
            while step < total:
                idx = _batch_indices(config.seed, step, config.batch_size, self.count, cache)
                feed = [torch.from_numpy(a[idx]) for a in self.inputs]
                out = module(*feed)[0]
                loss = _loss(kind, out, target[idx], None if self.labels is None else self.labels[idx], probs)
                damp = dampening_weight(step, total, config.dampen, config.anneal_start) if config.dampen else 0.0
                if damp > 0 and tracked:
                    loss = loss + damp * sum(q.dampening(module.parameter(n)) for n, q in tracked.items())
                rate = 0.5 * (1 + math.cos(math.pi * step / total))
                for group in opt_w.param_groups:
                    group["lr"] = config.lr * rate
                opt_w.zero_grad(set_to_none=True)
                if opt_s is not None:
                    opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_w.step()
                if opt_s is not None:
                    opt_s.step()
                self._after_step(step, total, tracked)
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if tracked and (step % config.log_every == 0 or step == total):
                    report_log.append(self._log_row(step, tracked))
                if path is not None and (step % config.checkpoint_every == 0 or step == config.stop_at):
                    _save_checkpoint(path, {"fingerprint": config.fingerprint(), "samples": self.count, "step": step,
                                            "total": total, "student": student.state_dict(),
                                            "opt_w": opt_w.state_dict(),
                                            "opt_s": opt_s.state_dict() if opt_s is not None else None,
                                            "report": report_log})
                if config.stop_at and step >= config.stop_at and step < total:
                    return TrainResult({"steps": step}, {}, finished=False)
                if not probed and step - first_step >= _PROBE_STEPS:
                    probed = True
                    total = self._fit_budget(step, total, first_step, loop_start, start_time)
                    bar.total = total
        module.eval()
        finish = self._finish(target)
        stats = {"steps": step, "planned_steps": config.steps, "loss": kind,
                 "loss_first": round(float(np.mean(losses[:10])), 6) if losses else None,
                 "loss_last": round(float(np.mean(losses[-10:])), 6) if losses else None,
                 "train_seconds": round(time.perf_counter() - loop_start, 1), **finish}
        stats.update(write_back(self.model, student))
        if tracked:
            trackers = [q.tracker for q in tracked.values() if q.tracker is not None]  # all of them: tracked() filters
            stats["frozen_fraction"] = round(sum(float(t.frozen.sum()) for t in trackers)
                                             / max(1, sum(t.frozen.numel() for t in trackers)), 5)
        report = {"momentum": config.momentum, "dampen": config.dampen, "freeze": config.freeze,
                  "freeze_final": config.freeze_final, "steps": step, "log": report_log}
        return TrainResult(stats, report)

    def _fit_budget(self, step: int, total: int, first: int, loop_start: float, start_time: float) -> int:
        """Shrink the schedule (cosine lr and annealing included) so that the steps left fit the budget."""
        now = time.perf_counter()
        per_step = (now - loop_start) / max(1, step - first)
        # What _finish runs, in forward passes of about half a training step each: BN re-estimation over up to
        # bn_batches batches, or else bias correction over as many, with the float model beside.
        batches = min(self.config.bn_batches, -(-self.count // self.config.batch_size))
        forwards: float
        if self.student.module.batch_norm_steps():
            forwards = batches
        elif self.config.bias_correction:  # the float model once, then the student up to each corrected layer
            forwards = batches * (1 + 0.5 * len(self._corrected_layers()))
        else:
            forwards = 0
        finish = per_step * 0.5 * forwards
        left = self.config.time_budget - (now - start_time) - finish
        fit = step + max(1, int(left / per_step))
        if fit < total:
            log.info("qat: %d steps do not fit %.0f s (%.3g s/step); schedule shortened to %d",
                     total, self.config.time_budget, per_step, fit)
            return fit
        return total

    @torch.no_grad()
    def _after_step(self, step: int, total: int, tracked: dict) -> None:
        module, config = self.student.module, self.config
        for name, q in self.student.weights.items():
            q.update_octav(module.parameter(name).detach())
        threshold = freeze_threshold(step, total, config.freeze, config.freeze_final, config.anneal_start) \
            if config.freeze else 0.0
        for name, q in tracked.items():
            q.tracker.update(q.codes(module.parameter(name).detach()))
            q.tracker.freeze(threshold)

    @staticmethod
    def _log_row(step: int, tracked: dict) -> dict:
        layers, osc_total, frozen_total, n_total = {}, 0.0, 0.0, 0
        for name, q in tracked.items():
            n = q.tracker.frozen.numel()
            osc, frozen = q.tracker.take_window()
            layers[name] = {"oscillating": round(osc, 6), "frozen": round(frozen, 6)}
            osc_total, frozen_total, n_total = osc_total + osc * n, frozen_total + frozen * n, n_total + n
        return {"step": step, "layers": layers, "mean_oscillating": round(osc_total / max(1, n_total), 6),
                "mean_frozen": round(frozen_total / max(1, n_total), 6)}

    @torch.no_grad()
    def _finish(self, target: torch.Tensor) -> dict[str, Any]:
        module, config = self.student.module, self.config
        out: dict[str, Any] = {}
        bn = module.batch_norm_steps()
        batches = [self.inputs_batch(i) for i in range(min(config.bn_batches, -(-self.count // config.batch_size)))]
        if bn and config.bn_batches:
            # Nagel et al.: statistics collected under oscillating weights are stale; average per-batch ones.
            module.bn_collect = {}
            for feed in batches:
                module(*feed)
            collected, module.bn_collect = module.bn_collect, None
            module.bn_stats = {name: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
                               for name, v in collected.items()}
            out["bn_reestimated"] = len(collected)
        elif config.bias_correction:
            out["bias_corrected"] = self._bias_correction(batches)
        return out

    def inputs_batch(self, i: int) -> list[torch.Tensor]:
        lo = i * self.config.batch_size
        return [torch.from_numpy(a[lo:lo + self.config.batch_size]) for a in self.inputs]

    def _bias_correction(self, batches: list) -> int:
        """Folded BN: shift each quantized layer's bias by its output channel-mean error against the float model
        (empirical bias correction of the quantized model), the per-channel analogue of BN re-estimation.

        Sequential, in graph order: a layer's error is measured with every earlier layer already corrected, so a
        correction is never applied twice (correcting all layers from one measurement over-corrects deep nets)."""
        module = self.student.module
        layers = self._corrected_layers()
        if not layers:
            return 0
        teacher = module.__class__(self.model).eval()
        outputs = [o for _, o in layers]
        target: dict[str, torch.Tensor | float] = {o: 0.0 for o in outputs}
        for feed in batches:
            captured = teacher.capture_run(feed, outputs)
            for o in outputs:
                target[o] = target[o] + _channel_means(_layer_output(captured, o))
        for bias, out in layers:
            mean = sum(_channel_means(_layer_output(module.capture_run(feed, [out], stop_early=True), out))
                       for feed in batches)
            param, grid = module.parameter(bias), module.weight_hook(bias)
            effective = grid(param) if grid is not None else param  # the bias as the layer adds it (int32 grid)
            shift = (mean - target[out]) / len(batches)
            # A tensor: with no batches the division above has already raised ZeroDivisionError.
            assert isinstance(shift, torch.Tensor)
            param.copy_(effective - shift.float())
        return len(layers)

    def _corrected_layers(self) -> list[tuple[str, str]]:
        """(bias parameter, layer output) of the layers bias correction shifts, in graph order."""
        module = self.student.module
        steps = {step.name: (i, step.outputs[0]) for i, step in enumerate(module.steps) if step.outputs}
        layers = sorted((*steps[lq.node], lq.bias) for lq in self.model.quant.layers.values()
                        if lq.bias and lq.bias in module.param_keys and lq.node in steps)
        return [(bias, out) for _, out, bias in layers if out]

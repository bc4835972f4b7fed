"""AdaRound (Nagel et al. 2020): learned rounding on the moment-form loss of qonnx/rounding/layer_moments.py.

Soft quantization on a fixed grid (integer range [qmin, qmax], scale s > 0, zero point z):
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1
    q(V) = clip(floor(W/s) + z + h(V), qmin, qmax),          W~ = s (q - z)
V starts at V0 = -log((zeta - gamma) / (r - gamma) - 1) with r = frac(W/s), so h(V0) = r and W~(V0) = W.
A weight whose floor(W/s) + z lies outside [qmin, qmax - 1] sits on the grid clip for every h in [0, 1]:
its code is fixed, its gradient is zero and it is left out of the regularizer ("frozen").

Objective L = L_rec + lambda * f_reg, f_reg = sum over the free weights of (1 - |2h - 1|^beta), lambda = 0.01;
f_reg is off for the first 20% of the iterations (warm start), then beta decays by a cosine from 20 to 2.
Adam (torch defaults) on V, with the chain rule
    dL/dV = (s dL_rec/dW~ + lambda df_reg/dh) h'(V),   h'(V) = (zeta - gamma) sigmoid(V)(1 - sigmoid(V))
where h' is taken as 0 when h is clipped to 0 or 1 or the weight is frozen. At the end h = 1[V >= 0],
and a local search on the exact loss (qonnx/rounding/search.py) repairs what hardening undecided weights cost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qonnx.rounding.layer_blocks import (  # noqa: F401  (re-exported: the layer side of AdaRound's API)
    ConvSpec,
    _as_blocks,
    _check_grid,
    _qparams,
    blocks_to_conv_weight,
    blocks_to_matmul_weight,
    conv_weight_blocks,
    im2col,
    matmul_weight_blocks,
    nearest_codes,
)
from qonnx.rounding.layer_moments import LayerMoments, reconstruction_grad, reconstruction_loss  # noqa: F401
from qonnx.rounding.search import best_rows, refine_codes

log = logging.getLogger(__name__)

ZETA = 1.1
GAMMA = -0.1
DEFAULT_ITERATIONS = 10_000
# With a time budget: steps timed before the schedule is first fitted to it, the fraction of the budget after
# which it is fitted again (from the steps since the last fit: once the regularizer is on, a step costs
# 1.2-1.4x a warm-start step, so a schedule fitted to the first steps alone is cut before beta reaches its
# end), and steps' worth of time kept for the final hardening and loss evaluation.
_PROBE_STEPS = 20
_REFIT_EVERY = 0.1
_FINISH_STEPS = 5
SEARCH_MODES = ("updown", "grid", "off")  # the local search after hardening: see adaround_weights

__all__ = [
    "AdaRoundStats",
    "ConvSpec",
    "LayerMoments",
    "RoundingProblem",
    "adaround_weights",
    "beta_schedule",
    "blocks_to_conv_weight",
    "blocks_to_matmul_weight",
    "conv_weight_blocks",
    "im2col",
    "matmul_weight_blocks",
    "nearest_codes",
    "reconstruction_grad",
    "reconstruction_loss",
    "step_seconds",
]


def beta_schedule(step: int, iterations: int, beta: tuple[float, float], warm_start: float) -> float | None:
    """beta at `step` (0-based), or None during the warm start (regularizer off), as AIMET computes it."""
    warm_end = warm_start * iterations
    if step < warm_end:
        return None
    start, end = beta
    rel = (step - warm_end) / (iterations - warm_end)
    return end + 0.5 * (start - end) * (1.0 + math.cos(rel * math.pi))


@dataclass
class RoundingProblem:
    """One layer's AdaRound objective on blocks [g, O_g, I_g], with the optimizer's arrays in `dtype`.

    Soft weights are written as W~ - W = s * clip(h, lo, hi) + off with off = s (floor(W/s) + z - z) - W
    = -s frac(W/s) (computed in float64) and [lo, hi] = [qmin, qmax] - base, so that float32 never has to
    resolve h against a large integer (base + h would lose h's low bits at |base| ~ 100).
    """

    weight: np.ndarray  # float64 blocks
    scale: np.ndarray  # float64, broadcastable to the blocks
    zero_point: np.ndarray
    base: np.ndarray  # floor(W/s) + z, float64
    qmin: int
    qmax: int
    moments: LayerMoments
    dtype: np.dtype
    free: np.ndarray  # bool: weights not pinned by the grid clip
    s: np.ndarray  # scale in dtype
    off: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    gram: np.ndarray  # G in dtype
    we: np.ndarray  # W E in dtype (zeros when symmetric)

    @classmethod
    def build(
        cls,
        weight: np.ndarray,
        scale: Any,
        moments: LayerMoments,
        qmin: int,
        qmax: int,
        zero_point: Any = None,
        dtype: type | np.dtype = np.float32,
    ) -> RoundingProblem:
        qmin, qmax = _check_grid(qmin, qmax)
        wb, _ = _as_blocks(weight, "weight")
        moments.check_blocks(wb, "weight")
        wb = wb.astype(np.float64)
        if not np.all(np.isfinite(wb)):
            raise ValueError("weight has non-finite values")
        s, z = _qparams(wb, scale, zero_point, qmin, qmax)
        dt = np.dtype(dtype)
        base = np.floor(wb / s) + z
        free = (base >= qmin) & (base <= qmax - 1)
        cross = moments.cross
        we = np.zeros_like(wb) if cross is None else np.matmul(wb, cross)
        return cls(
            weight=wb,
            scale=s,
            zero_point=z,
            base=base,
            qmin=qmin,
            qmax=qmax,
            moments=moments,
            dtype=dt,
            free=free,
            s=s.astype(dt),
            off=(s * (base - z) - wb).astype(dt),
            lo=(qmin - base).astype(dt),
            hi=(qmax - base).astype(dt),
            gram=moments.gram.astype(dt),
            we=we.astype(dt),
        )

    def init_v(self) -> np.ndarray:
        """V0 with h(V0) = frac(W/s) (float64 maths, then cast)."""
        r = self.weight / self.scale - np.floor(self.weight / self.scale)
        v0 = -np.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)
        return v0.astype(self.dtype)

    @staticmethod
    def h(v: np.ndarray) -> np.ndarray:
        return np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_weight(self, v: np.ndarray) -> np.ndarray:
        """W~(V) in float64 blocks."""
        h = self.h(np.asarray(v, np.float64))
        return self.weight + self.scale * np.clip(h, self.qmin - self.base, self.qmax - self.base) + (
            self.scale * (self.base - self.zero_point) - self.weight
        )

    def codes(self, h: np.ndarray) -> np.ndarray:
        """Integer codes clip(base + h, qmin, qmax) for a hard h in {0, 1}."""
        return np.clip(self.base + h, self.qmin, self.qmax).astype(np.int32)

    def hard_codes(self, v: np.ndarray) -> np.ndarray:
        return self.codes((np.asarray(v) >= 0).astype(np.float64))

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return self.scale * (codes - self.zero_point)

    def loss_grad(
        self, v: np.ndarray, beta: float | None, reg_weight: float, want_loss: bool = True
    ) -> tuple[float, np.ndarray]:
        """(L_rec + reg_weight * f_reg, dL/dV) at V (beta None: regularizer off). One matmul per block."""
        sig = _sigmoid(v)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(h_raw, 0.0, 1.0)
        dw = self.s * np.clip(h, self.lo, self.hi) + self.off
        dwg = np.matmul(dw, self.gram)
        g_w = dwg + self.we
        g_w *= 2.0
        g_h = self.s * g_w
        loss = 0.0
        if want_loss:
            loss = float(np.sum(dw * dwg, dtype=np.float64) + 2.0 * np.sum(dw * self.we, dtype=np.float64))
            loss += self.moments.const_term(self.weight)
        if beta is not None and reg_weight:
            t = 2.0 * h - 1.0
            a = np.abs(t)
            g_h -= (2.0 * beta * reg_weight) * np.sign(t) * a ** (beta - 1.0)
            if want_loss:
                loss += reg_weight * float(np.sum((1.0 - a ** beta)[self.free], dtype=np.float64))
        # h' is zero where h is clipped to 0/1 and for frozen weights (grid clip active for every h).
        active = (h_raw > 0.0) & (h_raw < 1.0) & self.free
        g_v = g_h * ((ZETA - GAMMA) * sig * (1.0 - sig))
        g_v *= active
        return loss, g_v


MAX_LR_SCALE = 50.0


def _scaled_lr(lr: float, steps: int, reference_steps: int | None) -> float:
    if not reference_steps or steps >= reference_steps:
        return lr
    return lr * min(MAX_LR_SCALE, reference_steps / max(1, steps))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |V|, one transcendental per element.
    return 0.5 + 0.5 * np.tanh(0.5 * v)


class _Adam:
    """torch.optim.Adam (no weight decay) updating V in place."""

    def __init__(self, v: np.ndarray, betas: tuple[float, float], eps: float):
        self.m1 = np.zeros_like(v)
        self.m2 = np.zeros_like(v)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0

    def step(self, v: np.ndarray, grad: np.ndarray, lr: float) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        self.m1 *= b1
        self.m1 += (1.0 - b1) * grad
        self.m2 *= b2
        self.m2 += (1.0 - b2) * np.square(grad)
        denom = np.sqrt(self.m2)
        denom /= math.sqrt(1.0 - b2**t)
        denom += self.eps
        v -= (lr / (1.0 - b1**t)) * self.m1 / denom


def step_seconds(blocks_shape: tuple[int, int, int], dtype: type | np.dtype = np.float32, repeats: int = 5) -> float:
    """Median seconds of one optimizer step (regularizer on) for weight blocks of this shape, on a synthetic
    problem: what a time budget buys a layer, measured rather than guessed from its multiply-adds (a small
    layer's step is mostly fixed overhead)."""
    g, o, i = blocks_shape
    gen = np.random.default_rng(0)
    weight = gen.standard_normal((g, o, i)) * 0.1
    x = gen.standard_normal((g, 2 * i, i))
    moments = LayerMoments.from_arrays(np.matmul(x.transpose(0, 2, 1), x) / (2 * i))
    prob = RoundingProblem.build(weight, np.full((g, o, 1), 0.02), moments, -8, 7, dtype=dtype)
    v = prob.init_v()
    adam = _Adam(v, (0.9, 0.999), 1e-8)
    times = []
    for _ in range(2 + repeats):  # two warm-up steps
        t0 = time.perf_counter()
        _, grad = prob.loss_grad(v, 10.0, 0.01, want_loss=False)
        adam.step(v, grad, 1e-3)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


@dataclass(frozen=True)
class AdaRoundStats:
    """Outcome of one adaround_weights call (losses are L_rec in float64, i.e. mean ||dy_row||^2)."""

    iterations: int  # optimizer steps run
    planned_iterations: int  # the schedule length in the end (less than asked if the time budget shrank it)
    stopped_early: bool  # the time budget cut the run short
    loss_adaround: float  # L_rec of the returned hard codes
    loss_hardened: float  # L_rec of the annealed codes as hardened, before the local search
    search_moves: int  # codes the local search moved (from both starts)
    loss_nearest: float  # L_rec of round-to-nearest codes
    loss_float: float  # L_rec of the unquantized weight: tr(W H W^T), 0 when symmetric
    soft_fraction: float  # fraction of free weights whose h was not exactly 0 or 1 before hardening
    frozen: int  # weights pinned by the grid clip (their code is fixed)
    seconds: float


def adaround_weights(
    weight: np.ndarray,
    scale: Any,
    moments: LayerMoments,
    qmin: int,
    qmax: int,
    *,
    zero_point: Any = None,
    iterations: int = DEFAULT_ITERATIONS,
    reg_weight: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warm_start: float = 0.2,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    dtype: type | np.dtype = np.float32,
    time_budget_s: float | None = None,
    progress: Callable[[int], None] | None = None,
    lr_reference_steps: int | None = None,
    search: str = "updown",
) -> tuple[np.ndarray, AdaRoundStats]:
    """AdaRound one layer: int32 codes in the layout of `weight` ([O, I] or blocks [g, O_g, I_g]).

    `scale` / `zero_point`: scalar (per tensor), length O (per output channel) or broadcastable to the blocks;
    the dequantized weight is scale * (codes - zero_point). Deterministic: full-batch moments, no sampling.
    `time_budget_s`: after a few steps, and again every tenth of the budget, the schedule (warm start and beta
    decay) is fitted to what is left of the budget at the pace of the latest steps (never beyond
    `iterations`); the run still stops at the budget, then hardens.
    `progress(step)` is called with the number of completed steps after each step.
    `lr_reference_steps`: `lr` is meant for a schedule of that many steps; a shorter one (asked for, or fitted
    to the budget) keeps lr x steps constant (at most MAX_LR_SCALE x lr). Measured on an EfficientNet-Lite0
    layer (112 x 672, 4 bits): 500 steps at 2e-2 end within 1% of the loss of 10 000 steps at 1e-3, while
    2000 steps at 1e-3 leave 45% of the weights undecided when they are hardened.
    `search`: the hardened codes, and round-to-nearest, are each taken to a local optimum of L_rec by
    qonnx.rounding_search ('updown': each code stays floor or ceil of W/s, AdaRound's choice; 'grid': any code
    in [qmin, qmax]; 'off': none), and every row keeps the better; so no row ends worse than nearest.
    """
    start = time.perf_counter()
    if iterations < 0 or not 0.0 <= warm_start <= 1.0 or lr <= 0 or reg_weight < 0:
        raise ValueError("need iterations >= 0, 0 <= warm_start <= 1, lr > 0 and reg_weight >= 0")
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, not {search!r}")
    _, flat = _as_blocks(weight, "weight")
    prob = RoundingProblem.build(weight, scale, moments, qmin, qmax, zero_point=zero_point, dtype=dtype)
    v = prob.init_v()
    adam = _Adam(v, betas, eps)
    total = int(iterations)
    done = 0
    stopped = False
    step_lr = _scaled_lr(lr, total, lr_reference_steps)
    fit_at, fit_done = time.perf_counter(), 0  # when and after how many steps the schedule was last fitted (0: never)
    next_fit = 0.0 if time_budget_s is None else _REFIT_EVERY * time_budget_s  # seconds into the run
    log.debug("adaround: blocks %s, %d iterations, %d frozen", prob.weight.shape, total, int((~prob.free).sum()))
    while done < total:
        step_beta = beta_schedule(done, total, beta, warm_start)
        _, g = prob.loss_grad(v, step_beta, reg_weight, want_loss=False)
        adam.step(v, g, step_lr)
        done = adam.t
        if progress is not None:
            progress(done)
        if time_budget_s is not None:
            now = time.perf_counter()
            if now - start >= time_budget_s:
                stopped = done < total
                break
            if (not fit_done and done >= _PROBE_STEPS) or now - start >= next_fit:
                # Fit the rest of the schedule (warm start and beta decay) into what is left of the budget, at
                # the pace of the steps since the last fit, rather than cutting it: a cut run would harden h
                # before the regularizer has pushed it to 0/1. Refitted every tenth of the budget, as steps
                # get dearer once the regularizer is on.
                per_step = (now - fit_at) / (done - fit_done)
                left = time_budget_s - (now - start) - _FINISH_STEPS * per_step
                fit = min(int(iterations), done + max(1, int(left / per_step)))
                if fit != total:
                    log.debug("adaround: schedule fitted to %.1f s at %.3g s/step: %d -> %d steps",
                              time_budget_s, per_step, total, fit)
                    total = fit
                    step_lr = _scaled_lr(lr, total, lr_reference_steps)
                fit_at, fit_done = now, done
                next_fit = (now - start) + _REFIT_EVERY * time_budget_s
        if log.isEnabledFor(logging.DEBUG) and done % 1000 == 0:
            loss, _ = prob.loss_grad(v, step_beta, reg_weight, want_loss=True)
            log.debug("adaround step %d/%d: loss %.6g, beta %s", done, total, loss, step_beta)
    h = prob.h(v.astype(np.float64))[prob.free]
    soft_fraction = float(np.mean((h > 0.0) & (h < 1.0))) if h.size else 0.0
    hardened = prob.hard_codes(v)
    near = nearest_codes(prob.weight, prob.scale, prob.qmin, prob.qmax, prob.zero_point)
    codes, moves = _local_search(prob, hardened, near, search)
    stats = AdaRoundStats(
        iterations=done,
        planned_iterations=total,
        stopped_early=stopped,
        loss_adaround=reconstruction_loss(prob.dequantize(codes), prob.weight, moments),
        loss_hardened=reconstruction_loss(prob.dequantize(hardened), prob.weight, moments),
        search_moves=moves,
        loss_nearest=reconstruction_loss(prob.dequantize(near), prob.weight, moments),
        loss_float=moments.const_term(prob.weight),
        soft_fraction=soft_fraction,
        frozen=int((~prob.free).sum()),
        seconds=time.perf_counter() - start,
    )
    log.info(
        "adaround %s: %d steps in %.2f s, L_rec %.6g (hardened %.6g, nearest %.6g, float %.6g), soft %.3g",
        prob.weight.shape, done, stats.seconds, stats.loss_adaround, stats.loss_hardened, stats.loss_nearest,
        stats.loss_float, soft_fraction,
    )
    return (codes[0] if flat else codes), stats


def _local_search(prob: RoundingProblem, hardened: np.ndarray, near: np.ndarray, search: str) -> tuple[np.ndarray, int]:
    """(codes, moves): the better per row of the hardened and the nearest codes, each taken to a local optimum."""
    if search == "off":
        return hardened, 0
    if search == "grid":
        low, high = np.full_like(prob.base, prob.qmin), np.full_like(prob.base, prob.qmax)
    else:  # floor or ceil of W/s, clipped to the grid (both ends equal for a frozen weight)
        low, high = np.clip(prob.base, prob.qmin, prob.qmax), np.clip(prob.base + 1, prob.qmin, prob.qmax)
    found, moves = [], 0
    for start in (hardened, near):
        codes, stats = refine_codes(start, prob.weight, prob.scale, prob.zero_point, prob.moments, low, high)
        found.append(codes)
        moves += stats.single_moves + 2 * stats.pair_moves
    return best_rows(found, prob.weight, prob.scale, prob.zero_point, prob.moments), moves

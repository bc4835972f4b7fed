"""Forward-only Hutchinson estimate of a Hessian trace, for HAWQ sensitivities (algorithms.md §6.1).

Hutchinson: for v with i.i.d. Rademacher (+-1) entries, E[v^T H v] = Tr(H) and
Var[v^T H v] = 2 (||H||_F^2 - sum_i H_ii^2), so the mean of m probes has standard error
sqrt(that / m), which we report as std(samples) / sqrt(m).

Without autograd, v^T H v comes from a central second difference of the loss along v:

    L(eps v) + L(-eps v) - 2 L(0) = eps^2 v^T H v + O(eps^4 d^4L)

(odd orders, the gradient included, cancel). For L = KL(p_ref || p_{w+delta}) both L(0) = 0 and the
gradient vanish at the reference point, so a probe costs two loss evaluations and the Hessian is the
Fisher / Gauss-Newton matrix (PSD). `subtract_base=True` handles a general L by evaluating L(0) once.

Per-element steps (e.g. half a per-channel quantization step): delta = eps * v elementwise, and the
difference measures v^T D H D v with D = diag(eps), whose expectation is sum_i eps_i^2 H_ii. We divide by
mean(eps^2), so a scalar (or constant) eps estimates Tr(H) and a varying one estimates the weighted trace
sum_i w_i H_ii with w_i = eps_i^2 / mean(eps^2) (weights averaging 1). Multiplying the estimate by
mean(eps^2) gives E[delta^T H delta], i.e. twice the expected second-order loss increase under +-eps noise.

Step check: the truncation error is relative O(eps^2), so re-evaluating some probes with eps/2 and
taking ratio = (estimate at eps) / (estimate at eps/2) on the *same* probes (probe noise cancels) gives
~1 in the quadratic regime; a ratio far from 1 means eps is too large (or, with float32 forward passes,
too small: rounding noise grows like 1/eps^2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

log = logging.getLogger(__name__)

LossFn = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class TraceEstimate:
    """Result of `hutchinson_trace`.

    samples[j] = [L(delta_j) + L(-delta_j) - 2 L(0)] / mean(eps^2), delta_j = eps * v_j; mean estimates
    Tr(H) (weighted by eps_i^2 / mean(eps^2) for a per-element eps).
    """

    mean: float
    stderr: float  # std(samples, ddof=1) / sqrt(m); NaN for a single probe
    samples: np.ndarray  # [m]
    step_ratio: float  # estimate at eps / estimate at eps/2 on the first `check_probes` probes; NaN if none
    check_probes: int
    base_loss: float  # L(0) when subtract_base, else 0.0 (assumed)
    loss_range: tuple[float, float]  # min and max of L(+-delta) over the main probes
    evaluations: int  # loss_fn calls made

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.mean) if self.mean != 0 else float("inf")


def rademacher(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A float64 vector of i.i.d. +-1 entries."""
    return rng.integers(0, 2, size=dim).astype(np.float64) * 2.0 - 1.0


def _steps(eps: float | np.ndarray, dim: int) -> np.ndarray:
    steps = np.asarray(eps, dtype=np.float64)
    if steps.ndim == 0:
        steps = np.full(dim, float(steps))
    elif steps.size == dim:
        steps = steps.reshape(dim)
    else:
        raise ValueError(f"eps must be a scalar or have {dim} elements, got shape {steps.shape}")
    if not np.all(np.isfinite(steps)) or np.any(steps < 0) or not np.any(steps > 0):
        raise ValueError("eps must be finite, non-negative and not all zero")
    return steps


def _second_difference(loss_fn: LossFn, delta: np.ndarray, base: float) -> tuple[float, float, float]:
    """(L(delta) + L(-delta) - 2 base, L(delta), L(-delta))."""
    plus, minus = float(loss_fn(delta)), float(loss_fn(-delta))
    return plus + minus - 2.0 * base, plus, minus


def hutchinson_trace(
    loss_fn: LossFn,
    dim: int,
    eps: float | np.ndarray,
    probes: int = 32,
    rng: np.random.Generator | int | None = None,
    *,
    subtract_base: bool = False,
    check_probes: int = 4,
) -> TraceEstimate:
    """Estimate Tr(H) of `loss_fn` at delta = 0 from forward evaluations only.

    loss_fn(delta) returns L(w + delta) for a flat float64 delta of length `dim`. Without
    `subtract_base`, L(0) = 0 is assumed (KL to the reference model); with it, L(0) is evaluated once
    and subtracted twice per probe. `eps` is a scalar step or one step per element (see module docstring).
    The first `check_probes` probes (at most `probes`) are re-evaluated at eps/2 for `step_ratio`, which
    costs 2 * check_probes extra evaluations. Total cost: 2 * probes + 2 * check_probes (+1) calls.
    """
    if dim < 1 or probes < 1 or check_probes < 0:
        raise ValueError(f"need dim >= 1, probes >= 1, check_probes >= 0; got {dim}, {probes}, {check_probes}")
    steps = _steps(eps, dim)
    norm = float(np.mean(steps**2))
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    base = float(loss_fn(np.zeros(dim))) if subtract_base else 0.0
    evaluations = int(subtract_base)

    vs = [rademacher(gen, dim) for _ in range(probes)]
    diffs, losses = np.empty(probes), []
    for j, v in enumerate(vs):
        diffs[j], plus, minus = _second_difference(loss_fn, steps * v, base)
        losses += [plus, minus]
    evaluations += 2 * probes
    samples = diffs / norm

    n_check = min(check_probes, probes)
    step_ratio = float("nan")
    if n_check:
        # Same probes at half the step: 4x the division undoes the eps^2 scaling.
        half = np.array([_second_difference(loss_fn, 0.5 * steps * v, base)[0] for v in vs[:n_check]])
        evaluations += 2 * n_check
        denominator = float(np.sum(half)) * 4.0
        step_ratio = float(np.sum(diffs[:n_check]) / denominator) if denominator != 0 else float("nan")
        if not abs(step_ratio - 1.0) < 0.1:
            log.warning("Hutchinson step check: estimate(eps)/estimate(eps/2) = %.4g; eps may be too large or "
                        "too small", step_ratio)

    mean = float(samples.mean())
    stderr = float(samples.std(ddof=1) / np.sqrt(probes)) if probes > 1 else float("nan")
    log.debug("Hutchinson trace %.6g +- %.2g (%d probes, step ratio %.4f)", mean, stderr, probes, step_ratio)
    return TraceEstimate(
        mean=mean,
        stderr=stderr,
        samples=samples,
        step_ratio=step_ratio,
        check_probes=n_check,
        base_loss=base,
        loss_range=(float(min(losses)), float(max(losses))),
        evaluations=evaluations,
    )


def kl_divergence(logits_ref: np.ndarray, logits: np.ndarray, axis: int = -1) -> float:
    """mean over rows of KL(softmax(logits_ref) || softmax(logits)), in float64 via log-softmax.

    `axis` holds the classes; every other axis is averaged over (a 1-D input is one row). The result is
    not clipped at 0: rounding can make it -1e-17, and clipping would bias second differences.
    """
    ref = np.asarray(logits_ref, dtype=np.float64)
    cur = np.asarray(logits, dtype=np.float64)
    if ref.shape != cur.shape:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {cur.shape}")
    log_p = log_softmax(ref, axis=axis)
    log_q = log_softmax(cur, axis=axis)
    per_row = np.sum(np.exp(log_p) * (log_p - log_q), axis=axis)
    return float(np.mean(per_row))

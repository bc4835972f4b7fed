"""OCTAV (Sakr et al. 2022) clipping fixed points, vectorised, on histograms or raw rows.

Symmetric (one clip s on |x|, q steps between 0 and s, k = 1/(12 q^2)): the MSE is
    J(s) = k s^2 N(0 < |X| <= s) + sum_{|X| > s} (|X| - s)^2
and dJ/ds = 0 (dropping the boundary term) gives algorithms.md §5.1's recursion
    s <- sum_{|X|>s} |X| / (k N(0<|X|<=s) + N(|X|>s)).

Two-sided (asymmetric grid [-b, a], q steps between -b and a, step (a+b)/q):
    J(a, b) = k (a+b)^2 P + sum_{X>a} (X-a)^2 + sum_{X<-b} (-X-b)^2,   P = N(0 != X in [-b, a])
Both partial derivatives vanish where, with the indicator sets of the current iterate,
    [N+ + kP,  kP    ] [a]   [S+]      N+ = N(X > a),  S+ = sum_{X>a} X
    [kP,       N- + kP] [b] = [S-]      N- = N(X < -b), S- = sum_{X<-b} -X
which we solve in closed form each step: the 2-D analogue of OCTAV's recursion. It
reduces to the one-sided OCTAV (post-ReLU, q = 255) when a side is empty (b = 0),
and each side is projected onto [0, observed extent] because the range must
contain 0 and clipping beyond the data is never useful.

Both take `tails(s) -> (count above s, sum of magnitudes above s)` callables, so
the same iteration serves histograms (calibration) and raw weight rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

Tails = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class HistSide:
    """One side of a histogram as magnitudes: counts[j] of values with magnitude in bin [j w, (j+1) w).

    Values are modelled as uniform within each bin, which makes the tail
    functions continuous in s (so the fixed point converges smoothly) and
    exact to O(w^2) for smooth densities.
    """

    def __init__(self, counts: np.ndarray, width: float) -> None:
        self.counts = np.asarray(counts, dtype=np.float64)
        self.width = float(width)
        centres = (np.arange(self.counts.size) + 0.5) * self.width
        # suffix[j] = total over bins j..end; a trailing 0 makes index n valid.
        self._suffix_n = np.append(np.cumsum(self.counts[::-1])[::-1], 0.0)
        self._suffix_s = np.append(np.cumsum((self.counts * centres)[::-1])[::-1], 0.0)

    @property
    def total(self) -> float:
        return float(self._suffix_n[0])

    def tails(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count, sum of magnitudes) above threshold(s) s >= 0, bins split linearly."""
        s = np.maximum(np.asarray(s, dtype=np.float64), 0.0)
        n = self.counts.size
        j = np.clip(np.floor(s / self.width), 0, n - 1).astype(np.int64)
        hi = (j + 1) * self.width
        frac = np.clip((hi - s) / self.width, 0.0, 1.0)
        part = self.counts[j] * frac
        count = self._suffix_n[j + 1] + part
        total = self._suffix_s[j + 1] + part * 0.5 * (hi + np.maximum(s, j * self.width))
        return count, total


def raw_tails(magnitudes: np.ndarray) -> Tails:
    """Exact tails per row of a 2-D array of non-negative magnitudes (one threshold per row)."""

    def tails(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        above = magnitudes > np.asarray(s)[:, None]
        return above.sum(axis=1).astype(np.float64), np.where(above, magnitudes, 0.0).sum(
            axis=1, dtype=np.float64
        )

    return tails


def octav_symmetric(
    tails: Tails,
    nonzero: ArrayLike,
    s0: ArrayLike,
    s_max: ArrayLike,
    k: float,
    iterations: int,
    rtol: float = 1e-6,
) -> np.ndarray:
    """Fixed point of the symmetric OCTAV recursion, elementwise over independent problems.

    nonzero: number of non-zero values per problem; s_max: largest magnitude (the clip never exceeds it).
    """
    nonzero = np.asarray(nonzero, dtype=np.float64)
    s_max = np.asarray(s_max, dtype=np.float64)
    s = np.minimum(np.asarray(s0, dtype=np.float64), s_max)
    for it in range(iterations):
        n_out, m_out = tails(s)
        denom = k * (nonzero - n_out) + n_out
        # Nothing above s (s at the top of the data): the clip is already as tight as the data allow.
        s_new = np.where((n_out > 0) & (denom > 0), m_out / np.where(denom > 0, denom, 1.0), s)
        s_new = np.minimum(s_new, s_max)
        done = np.abs(s_new - s) <= rtol * np.abs(s)
        s = s_new
        if np.all(done):
            log.debug("OCTAV converged after %d iterations", it + 1)
            break
    return s


def octav_two_sided(
    tails_pos: Tails,
    tails_neg: Tails,
    nonzero: ArrayLike,
    a0: ArrayLike,
    b0: ArrayLike,
    a_max: ArrayLike,
    b_max: ArrayLike,
    k: float,
    iterations: int,
    rtol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided OCTAV for an asymmetric grid [-b, a] (see the module docstring), elementwise."""
    nonzero = np.asarray(nonzero, dtype=np.float64)
    a_max = np.maximum(np.asarray(a_max, dtype=np.float64), 0.0)
    b_max = np.maximum(np.asarray(b_max, dtype=np.float64), 0.0)
    a = np.clip(np.asarray(a0, dtype=np.float64), 0.0, a_max)
    b = np.clip(np.asarray(b0, dtype=np.float64), 0.0, b_max)
    for it in range(iterations):
        n_pos, s_pos = tails_pos(a)
        n_neg, s_neg = tails_neg(b)
        kp = k * np.maximum(nonzero - n_pos - n_neg, 0.0)
        det = n_pos * n_neg + kp * (n_pos + n_neg)
        safe = np.where(det > 0, det, 1.0)
        a_new = (s_pos * (n_neg + kp) - kp * s_neg) / safe
        b_new = ((n_pos + kp) * s_neg - kp * s_pos) / safe
        # Project onto a, b >= 0: with one side pinned at 0 the other is the one-sided OCTAV step.
        one_a = s_pos / np.where(n_pos + kp > 0, n_pos + kp, 1.0)
        one_b = s_neg / np.where(n_neg + kp > 0, n_neg + kp, 1.0)
        a_new, b_new = np.where(b_new < 0, one_a, a_new), np.where(b_new < 0, 0.0, b_new)
        a_new, b_new = np.where(a_new < 0, 0.0, a_new), np.where(a_new < 0, one_b, b_new)
        # Nothing clipped on either side: no information to move, keep the iterate.
        stuck = det <= 0
        a_new = np.clip(np.where(stuck, a, a_new), 0.0, a_max)
        b_new = np.clip(np.where(stuck, b, b_new), 0.0, b_max)
        done = (np.abs(a_new - a) <= rtol * np.maximum(a, b)) & (np.abs(b_new - b) <= rtol * np.maximum(a, b))
        a, b = a_new, b_new
        if np.all(done):
            log.debug("two-sided OCTAV converged after %d iterations", it + 1)
            break
    return a, b

"""Noise-aware scales for cross-layer equalization (cle{objective=noise}).

DFQ's CLE equalizes the weight ranges of a pair y = W2 f(W1 x) and leaves the
activation h = f(W1 x) between them to fend for itself: its channel i is divided
by s_i, and a channel whose small weights are scaled up takes its activation up
too, widening the per-tensor activation range that every other channel shares.
On EfficientNet-Lite0 that costs more than the weights gain.

Here s is chosen to minimise the expected quantization noise at the pair's output
(uniform rounding noise, independent errors; original units, up to a factor 1/12):

  N(s) = sum_i s_i^2 beta_i (R1^2 alpha_i / qw^2 + A^2 / qa^2)  +  R2^2 / qw^2  sum_i n2_i e_i / s_i^2

with R1 = max_i r1_i / s_i (layer-1 per-tensor weight range), A = max_i a_i / s_i
(activation range), R2 = max_i r2_i s_i (layer-2 weight range); alpha_i the input
energy behind output channel i of layer 1, beta_i = sum W2[:, i]^2, e_i = E[h_i^2]
and n2_i the number of layer-2 weights reading channel i. N is unchanged by a
common factor on s, so with R2 fixed to 1 the optimum for given (R1, A) is
closed-form per channel and clipped to the constraints; a grid over (R1, A)
finds the best. The current scales are always a candidate, so no step makes a
pair's modelled noise worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QW = 127.0  # int8 symmetric weights

_COARSE = np.linspace(0.0, 10.0, 41)
_FINE = np.linspace(-0.25, 0.25, 21)


@dataclass
class ChannelStats:
    """Per-channel (axis 1) statistics of one tensor over the calibration data."""

    max_abs: np.ndarray
    mean_sq: np.ndarray
    nonnegative: bool

    def scaled(self, divisor: np.ndarray) -> ChannelStats:
        return ChannelStats(self.max_abs / divisor, self.mean_sq / divisor**2, self.nonnegative)


def collect_channel_stats(stream) -> dict[str, ChannelStats]:
    """Accumulate ChannelStats from an iterator of (feed, {name: value}) batches (bounded memory)."""
    peak: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    lowest: dict[str, float] = {}
    for _, values in stream:
        for name, value in values.items():
            axes = tuple(i for i in range(value.ndim) if i != 1)
            v = value.astype(np.float64)
            m = np.max(np.abs(v), axis=axes)
            peak[name] = np.maximum(peak[name], m) if name in peak else m
            sums[name] = sums.get(name, 0.0) + np.sum(v * v, axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]
            lowest[name] = min(lowest.get(name, np.inf), float(v.min()))
    return {n: ChannelStats(peak[n], sums[n] / counts[n], lowest[n] >= 0.0) for n in peak}


def stats_from_moments(moments, width: float) -> ChannelStats:
    """ChannelStats of a tensor with no data: a channel's peak is its mean +- `width` standard
    deviations (inside the tensor's hard bounds), its energy the Gaussian E[h^2] = var + mean^2."""
    std = np.sqrt(np.maximum(moments.var, 0.0))
    low = np.clip(moments.mean - width * std, *moments.bound)
    high = np.clip(moments.mean + width * std, *moments.bound)
    return ChannelStats(np.maximum(np.abs(low), np.abs(high)), moments.var + moments.mean**2,
                        bool(moments.bound[0] >= 0.0 or np.all(low >= 0.0)))


def pair_noise(s: np.ndarray, r1, r2, a, alpha, beta, energy, n2, qa: float) -> np.ndarray:
    """N(s) for scale vectors s of shape [..., C] (broadcast over leading axes)."""
    r1_max = np.max(r1 / s, axis=-1, keepdims=True)
    a_max = np.max(a / s, axis=-1, keepdims=True)
    r2_max = np.max(r2 * s, axis=-1, keepdims=True)
    first = np.sum(s**2 * beta * (r1_max**2 * alpha / QW**2 + a_max**2 / qa**2), axis=-1)
    second = r2_max[..., 0] ** 2 / QW**2 * np.sum(n2 * energy / s**2, axis=-1)
    return first + second


def _candidates(u: np.ndarray, v: np.ndarray, r1, r2, a, alpha, beta, energy, n2, qa: float) -> np.ndarray:
    """Closed-form per-channel optimum for each (R1, A) = (R1min e^u, Amin e^v), with R2 = 1."""
    r1_floor = max(float(np.max(r1 * r2)), 1e-30)
    a_floor = float(np.max(a * r2))
    uu, vv = np.meshgrid(u, v, indexing="ij")
    r1_cap = (r1_floor * np.exp(uu)).reshape(-1, 1)
    a_cap = (a_floor * np.exp(vv)).reshape(-1, 1) if a_floor > 0 else np.full((uu.size, 1), np.inf)
    a_term = (a_cap**2 * (QW / qa) ** 2) if a_floor > 0 else 0.0
    optimum = (n2 * energy / (beta * (r1_cap**2 * alpha + a_term))) ** 0.25
    low = np.maximum(r1 / r1_cap, np.where(np.isfinite(a_cap), a / a_cap, 0.0))
    return np.clip(optimum, low, 1.0 / r2)


def _best_cells(u_grid, v_grid, args, qa: float, keep: int) -> list[tuple[float, float, float, np.ndarray]]:
    """The `keep` lowest-noise (noise, u, v, s) of a grid over (u, v)."""
    # args is the 7-item list built in noise_scales; mypy assumes a *list of unknown length could fill every
    # parameter, so it rejects the positional qa after it (python/mypy#16677).
    cands = _candidates(u_grid, v_grid, *args, qa)  # type: ignore[call-arg]
    noise = pair_noise(cands, *args, qa)  # type: ignore[call-arg]
    return [(float(noise[k]), float(u_grid[k // len(v_grid)]), float(v_grid[k % len(v_grid)]), cands[k])
            for k in np.argsort(noise, kind="stable")[:keep]]


def _search(args, qa: float) -> np.ndarray:
    """A coarse grid over (log R1, log A), then grids ten and a hundred times finer around its best
    cells: the landscape has several basins, and refining only the best coarse cell can miss the
    optimum by a few percent."""
    cells = _best_cells(_COARSE, _COARSE, args, qa, keep=4)
    for step, keep in ((1.0, 4), (0.1, 1)):
        cells = sorted((cell for _, u, v, _ in cells[:keep]
                        for cell in _best_cells(np.maximum(u + step * _FINE, 0.0),
                                                np.maximum(v + step * _FINE, 0.0), args, qa, keep)),
                       key=lambda cell: cell[0])
    return cells[0][3]


def noise_scales(r1, r2, a, alpha, beta, energy, n2, qa: float, min_gain: float = 1e-4
                 ) -> tuple[np.ndarray, float, float]:
    """(s, noise before, noise after): the update dividing layer 1's output channels (and multiplying
    layer 2's input channels). Channels that carry nothing (zero weights or a silent activation) are
    kept inside the ranges the live channels set."""
    c = r1.shape[0]
    live = (r2 > 0) & (beta > 0) & (energy > 0) & ((r1 > 0) | (a > 0))
    ones = np.ones(c)
    before = float(pair_noise(ones, r1, r2, a, alpha, beta, energy, n2, qa))
    if not live.any() or before <= 0.0:
        return ones, before, before
    args = [x[live] if np.ndim(x) else x for x in (r1, r2, a, alpha, beta, energy, n2)]
    best_s = _search(args, qa)
    s = np.ones(c)
    s[live] = best_s / np.exp(np.mean(np.log(best_s)))  # the common factor is free: keep the scales near 1
    dead = ~live
    if dead.any():
        r1_max, a_max, r2_max = np.max(r1[live] / s[live]), np.max(a[live] / s[live]), np.max(r2[live] * s[live])
        zeros = np.zeros(int(dead.sum()))
        low = np.maximum(np.divide(r1[dead], r1_max, out=zeros.copy(), where=r1_max > 0),
                         np.divide(a[dead], a_max, out=zeros.copy(), where=a_max > 0))
        high = np.divide(r2_max, r2[dead], out=np.full(dead.sum(), np.inf), where=r2[dead] > 0)
        s[dead] = np.where(low <= high, np.clip(1.0, low, high), np.sqrt(low * high))
        s[dead] = np.where((s[dead] > 0) & np.isfinite(s[dead]), s[dead], 1.0)
    after = float(pair_noise(s, r1, r2, a, alpha, beta, energy, n2, qa))
    if not np.isfinite(after) or after >= before * (1.0 - min_gain):
        return ones, before, before
    return s, before, after

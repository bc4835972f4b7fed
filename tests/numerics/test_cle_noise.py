"""The noise model behind cle{objective=noise} (qonnx/numerics/cle_noise.py): scales against brute
force, degenerate channels, per-channel statistics from data and from moments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qonnx.numerics.cle_noise import collect_channel_stats, noise_scales, pair_noise


def random_pair(seed: int, c: int, dead: int = 0):
    g = np.random.default_rng(seed)
    r1, r2 = g.lognormal(0, 1.5, c), g.lognormal(0, 1.5, c)
    a = r1 * g.lognormal(0, 1.0, c)  # activations loosely follow the layer-1 weights
    alpha, beta = g.lognormal(0, 0.5, c), r2**2 * g.uniform(2, 8, c)
    energy, n2 = (a / 3) ** 2, 36.0
    if dead:
        r2[:dead], beta[:dead] = 0.0, 0.0  # channels layer 2 ignores
    return r1, r2, a, alpha, beta, energy, n2


# --------------------------------------------------------------------------- numerics of the scale choice
@pytest.mark.parametrize("seed", range(4))
def test_scales_reach_the_brute_force_minimum_on_three_channels(seed):
    args = random_pair(seed, 3)
    s, before, after = noise_scales(*args, qa=255.0)
    # N is unchanged by a common factor: fix s_0 = 1 and search the other two on a fine log grid.
    grid = np.exp(np.linspace(-6, 6, 481))
    cands = np.array([(1.0, x, y) for x, y in itertools.product(grid, grid)])
    brute = float(np.min(pair_noise(cands, *args, qa=255.0)))
    assert after <= before
    assert after <= brute * 1.01, (after, brute)
    assert np.isclose(pair_noise(s, *args, qa=255.0), after)


@pytest.mark.parametrize("seed", range(10))
def test_imbalanced_pairs_get_less_noise_and_dead_channels_stay_inside_the_live_ranges(seed):
    args = random_pair(100 + seed, 64, dead=seed % 3)
    r1, r2, a = args[:3]
    s, before, after = noise_scales(*args, qa=127.5)
    assert np.all(s > 0) and np.all(np.isfinite(s))
    assert after < 0.9 * before  # channel ranges spread over e^±3: there is much to gain
    assert np.isclose(pair_noise(s, *args, qa=127.5), after)
    dead, live = r2 == 0, r2 > 0
    if dead.any():
        for ranges in (r1 / s, a / s):
            assert np.max(ranges[dead]) <= np.max(ranges[live]) * (1 + 1e-9)


def test_degenerate_channels_never_produce_non_finite_scales():
    # Live channels with all-zero layer-1 weights (bias only) and a dead channel that has weights.
    r1, r2, a = np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), np.array([3.0, 1.0, 0.5])
    beta, energy = np.array([1.0, 4.0, 0.0]), np.array([4.0, 0.5, 0.1])
    s, before, after = noise_scales(r1, r2, a, np.ones(3), beta, energy, 9.0, qa=255.0)
    assert np.all(np.isfinite(s)) and np.all(s > 0) and np.isfinite(after) and after <= before


def test_modelled_noise_ignores_a_common_factor():
    args = random_pair(7, 16)
    s = np.random.default_rng(1).lognormal(0, 1, 16)
    assert np.isclose(pair_noise(s, *args, qa=255.0), pair_noise(37.0 * s, *args, qa=255.0))


def test_an_already_optimal_pair_keeps_scale_one():
    args = random_pair(9, 32)
    s, _, _ = noise_scales(*args, qa=255.0)
    r1, r2, a, alpha, beta, energy, n2 = args
    moved = (r1 / s, r2 * s, a / s, alpha, beta * s**2, energy / s**2, n2)
    again, before, after = noise_scales(*moved, qa=255.0)
    assert np.all(again == 1.0) and before == after


def test_channel_stats_are_streamed_per_channel():
    g = np.random.default_rng(3)
    batches = [g.normal(size=(4, 5, 6, 6)) for _ in range(3)]
    stats = collect_channel_stats(({}, {"t": b}) for b in batches)["t"]
    everything = np.concatenate(batches)
    assert np.allclose(stats.max_abs, np.abs(everything).max(axis=(0, 2, 3)))
    assert np.allclose(stats.mean_sq, (everything**2).mean(axis=(0, 2, 3)))
    assert stats.nonnegative is False
    relu = collect_channel_stats([({}, {"t": np.maximum(everything, 0)})])["t"]
    assert relu.nonnegative is True




# --------------------------------------------------------------------------- data-free statistics (moments)
def test_channel_stats_from_moments():
    from qonnx.analyses.moments import Moments
    from qonnx.numerics.cle_noise import stats_from_moments

    free = stats_from_moments(Moments(np.array([1.0, -2.0, 0.0]), np.array([4.0, 1.0, 0.0]), 0, 0), width=3.0)
    np.testing.assert_allclose(free.max_abs, [7.0, 5.0, 0.0])  # |mean| + 3 std
    np.testing.assert_allclose(free.mean_sq, [5.0, 5.0, 0.0])  # var + mean^2
    assert free.nonnegative is False
    clipped = stats_from_moments(Moments(np.array([1.0, 5.0]), np.array([4.0, 4.0]), 0, 6, bound=(0.0, 6.0)),
                                 width=3.0)
    np.testing.assert_allclose(clipped.max_abs, [6.0, 6.0])  # the clip bound caps mean + 3 std
    assert clipped.nonnegative is True

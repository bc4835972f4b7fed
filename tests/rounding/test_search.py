"""The local search that finishes AdaRound: exact move gains, local optimality, bounds, pairs, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.rounding.adaround import LayerMoments, adaround_weights, nearest_codes, reconstruction_loss
from qonnx.rounding.layer_moments import row_losses
from qonnx.rounding.search import best_rows, refine_codes


def _layer(seed: int, o: int = 6, i: int = 10, asymmetric: bool = True, mixing: float = 0.8):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((3000, i)) @ (np.eye(i) + mixing * gen.standard_normal((i, i)))
    x_hat = x + 0.1 * gen.standard_normal(x.shape) if asymmetric else x
    w = gen.standard_normal((o, i)) * 0.3
    moments = LayerMoments.for_linear(w)
    moments.add(x_hat, x)
    scale = np.abs(w).max(1) / 7
    return w[None], scale[None, :, None], moments


def _loss(codes, w, scale, moments) -> float:
    return reconstruction_loss(scale * codes, w, moments)


def _updown_bounds(w, scale):
    base = np.floor(w / scale)
    return np.clip(base, -7, 7), np.clip(base + 1, -7, 7)


@pytest.mark.parametrize("seed", range(4))
def test_search_ends_at_a_local_optimum_no_worse_than_its_start(seed):
    w, scale, moments = _layer(seed)
    low, high = _updown_bounds(w, scale)
    start = nearest_codes(w, scale, -7, 7)
    codes, stats = refine_codes(start, w, scale, 0.0, moments, low, high)
    best = _loss(codes, w, scale, moments)
    assert best <= _loss(start, w, scale, moments)
    assert np.all((codes >= low) & (codes <= high))
    assert stats.single_moves > 0  # badly conditioned inputs: nearest is not a local optimum
    # No single +-1 move within the bounds lowers the loss (checked on the loss itself, not the search's gains).
    for idx in np.ndindex(codes.shape):
        for step in (-1, 1):
            moved = codes.copy()
            moved[idx] += step
            if low[idx] <= moved[idx] <= high[idx]:
                assert _loss(moved, w, scale, moments) >= best - 1e-12 * abs(best)


def test_row_losses_add_up_to_the_layer_loss():
    w, scale, moments = _layer(7)
    codes = nearest_codes(w, scale, -7, 7)
    total = row_losses(scale * codes, w, moments).sum() + moments.const_term(w)
    assert total == pytest.approx(_loss(codes, w, scale, moments), rel=1e-10)


def test_a_pair_move_finds_what_no_single_move_can():
    # Negatively correlated inputs: moving either code alone costs, moving both gains (0.072 -> 0.032).
    w = np.array([[[0.6, 0.6]]])
    moments = LayerMoments.from_arrays(np.array([[1.0, -0.9], [-0.9, 1.0]]))
    start = np.zeros((1, 1, 2), np.int32)
    low, high = np.zeros_like(w), np.ones_like(w)
    codes, stats = refine_codes(start, w, 1.0, 0.0, moments, low, high)
    assert codes.tolist() == [[[1, 1]]] and (stats.single_moves, stats.pair_moves) == (0, 1)
    assert _loss(codes, w, 1.0, moments) == pytest.approx(0.032)
    alone, stats = refine_codes(start, w, 1.0, 0.0, moments, low, high, pair_candidates=1)
    assert alone.tolist() == [[[0, 0]]] and stats.pair_moves == 0


def test_search_respects_per_weight_bounds_and_frozen_codes():
    w, scale, moments = _layer(3)
    start = nearest_codes(w, scale, -7, 7)
    low = np.maximum(start - 2, -7)
    high = np.minimum(start + 2, 7)
    low[..., :3] = high[..., :3] = start[..., :3]  # pinned
    codes, _ = refine_codes(start, w, scale, 0.0, moments, low, high)
    assert np.array_equal(codes[..., :3], start[..., :3])
    assert np.all((codes >= low) & (codes <= high))
    with pytest.raises(ValueError, match="outside"):
        refine_codes(start, w, scale, 0.0, moments, low, np.minimum(high, start - 1))


def test_best_rows_takes_the_lower_loss_row_by_row():
    w, scale, moments = _layer(5)
    a = nearest_codes(w, scale, -7, 7)
    b = np.clip(a + 1, -7, 7)
    mixed = best_rows([a, b], w, scale, 0.0, moments)
    la, lb = row_losses(scale * a, w, moments), row_losses(scale * b, w, moments)
    assert np.array_equal(row_losses(scale * mixed, w, moments), np.minimum(la, lb))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_adaround_search_is_never_worse_than_hardening_or_nearest(asymmetric):
    w, scale, moments = _layer(11, o=8, i=12, asymmetric=asymmetric, mixing=1.0)
    off, off_stats = adaround_weights(w, scale, moments, -7, 7, iterations=300, search="off")
    up, up_stats = adaround_weights(w, scale, moments, -7, 7, iterations=300)
    grid, grid_stats = adaround_weights(w, scale, moments, -7, 7, iterations=300, search="grid")
    assert off_stats.search_moves == 0 and off_stats.loss_adaround == off_stats.loss_hardened
    assert up_stats.loss_hardened == off_stats.loss_adaround  # same annealing; the search only follows it
    assert up_stats.loss_adaround < up_stats.loss_hardened and up_stats.search_moves > 0
    assert grid_stats.loss_adaround <= up_stats.loss_adaround
    # Row by row no worse than round-to-nearest.
    near = nearest_codes(w, scale, -7, 7)
    assert np.all(row_losses(scale * up, w, moments) <= row_losses(scale * near, w, moments) + 1e-12)
    base = np.floor(w / scale)
    assert np.all((up >= base) & (up <= base + 1))  # updown: AdaRound's own choices
    assert np.all((grid >= -7) & (grid <= 7))
    again, _ = adaround_weights(w, scale, moments, -7, 7, iterations=300)
    assert np.array_equal(again, up)


def test_unknown_search_mode_is_refused():
    w, scale, moments = _layer(2)
    with pytest.raises(ValueError, match="search must be one of"):
        adaround_weights(w, scale, moments, -7, 7, iterations=1, search="exhaustive")

"""TensorHistogram: exact, order-independent, mergeable, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.numerics.stats import TensorHistogram


def _data(seed: int = 0) -> list[np.ndarray]:
    """Batches whose scale grows (forcing several doublings of T), with awkward values:
    exact powers of two (bin edges at every T), exact zeros and tiny negatives."""
    rng = np.random.default_rng(seed)
    batches = [
        rng.standard_normal(3000).astype(np.float32) * 1e-3,
        np.array([0.0, 0.0, -1e-30, 1e-30, 1.0, -1.0, 0.5, -0.25, 2.0, -4.0], np.float32),
        np.maximum(rng.standard_normal(5000), 0).astype(np.float32) * 3,
        rng.laplace(0.0, 5.0, 4000).astype(np.float32),
        np.zeros(100, np.float32),
        (rng.standard_normal((7, 11)) * 40).astype(np.float32),
    ]
    return batches


def _one_pass(batches: list[np.ndarray], bins: int = 256) -> TensorHistogram:
    h = TensorHistogram(bins)
    for b in batches:
        h.update(b)
    return h


def _assert_same(a: TensorHistogram, b: TensorHistogram) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.edges, b.edges)
    assert (a.count, a.zeros, a.min, a.max) == (b.count, b.zeros, b.min, b.max)
    for name in ("sum", "sumsq", "abs_sum", "mean", "std"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12, abs=1e-12)


def test_counts_equal_numpy_histogram() -> None:
    batches = _data()
    h = _one_pass(batches)
    x = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    assert h.count == x.size and h.zeros == int(np.sum(x == 0))
    assert h.min == x.min() and h.max == x.max()
    assert h.half_range > np.abs(x).max() >= h.half_range / 2  # smallest power of two above max|x|
    np.testing.assert_array_equal(h.counts, np.histogram(x, bins=h.edges)[0])
    assert h.mean == pytest.approx(x.mean(), rel=1e-9)
    assert h.std == pytest.approx(x.std(), rel=1e-9)
    assert h.sumsq == pytest.approx(np.dot(x, x), rel=1e-12)
    assert h.abs_sum == pytest.approx(np.abs(x).sum(), rel=1e-12)
    assert h.centres.size == h.counts.size == h.edges.size - 1 == 512
    np.testing.assert_allclose(h.centres, (h.edges[:-1] + h.edges[1:]) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_and_split_independence(seed: int) -> None:
    batches = _data()
    reference = _one_pass(batches)
    rng = np.random.default_rng(seed)
    # Another order.
    order = rng.permutation(len(batches))
    _assert_same(reference, _one_pass([batches[i] for i in order]))
    # Another split: all values shuffled and cut at random points.
    x = rng.permutation(np.concatenate([b.ravel() for b in batches]))
    cuts = np.sort(rng.choice(np.arange(1, x.size), 20, replace=False))
    _assert_same(reference, _one_pass(np.split(x, cuts)))


def test_merge_equals_single_pass() -> None:
    batches = _data()
    reference = _one_pass(batches)
    left, right = _one_pass(batches[3:]), _one_pass(batches[:3])  # right has the smaller T
    _assert_same(reference, left.merge(right))
    _assert_same(reference, _one_pass(batches[:3]).merge(_one_pass(batches[3:])))
    _assert_same(reference, reference.merge(TensorHistogram(256)))  # merging nothing is a no-op


def test_memory_is_bounded() -> None:
    h = TensorHistogram(128)
    rng = np.random.default_rng(0)

    def footprint() -> list[tuple[str, int]]:
        return sorted((k, v.nbytes) for k, v in vars(h).items() if isinstance(v, np.ndarray))

    h.update(rng.standard_normal(10))
    before = footprint()
    for i in range(2000):
        h.update(rng.standard_normal(50) * (1 + i))  # keeps growing T
    assert footprint() == before
    assert h.counts.shape == (256,)
    assert h.count == 10 + 2000 * 50


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    h = TensorHistogram(64).update(np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        h.update(np.array([1.0, bad, 2.0]))
    assert h.count == 4  # the failed batch left no trace


def test_all_zero_tensor() -> None:
    h = TensorHistogram(64).update(np.zeros((3, 5)))
    assert h.count == h.zeros == 15 and h.min == h.max == 0.0
    assert h.counts[64] == 15 and h.counts.sum() == 15
    assert h.is_nonnegative and h.std == 0.0
    h.update(np.array([0.75, -0.1]))
    assert h.half_range == 1.0 and h.counts.sum() == 17 and h.zeros == 15


def test_properties_and_validation() -> None:
    h = TensorHistogram(64).update(np.array([0.5, 1.5, 3.0]))
    assert h.is_nonnegative and not TensorHistogram(64).update(np.array([-1e-9, 1.0])).is_nonnegative
    assert not TensorHistogram().is_nonnegative  # nothing seen yet
    with pytest.raises(ValueError, match="power of two"):
        TensorHistogram(100)
    with pytest.raises(ValueError, match="bins per side"):
        TensorHistogram(64).merge(TensorHistogram(128))


def test_large_batches_are_processed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import qonnx.numerics.stats

    batches = _data()
    reference = _one_pass(batches)
    monkeypatch.setattr(qonnx.numerics.stats, "_CHUNK", 777)
    _assert_same(reference, _one_pass(batches))
    h = _one_pass(batches)
    bad = np.concatenate([np.ones(5000), [np.nan]])  # the NaN sits in the last chunk
    with pytest.raises(ValueError, match="non-finite"):
        h.update(bad)
    _assert_same(reference, h)

"""qonnx.hessian: Hutchinson on an explicit PSD matrix and on a numpy MLP's exact Gauss-Newton (§6.4 items 1-2)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from qonnx.numerics.hessian import hutchinson_trace, kl_divergence, rademacher


def hutchinson_variance(h: np.ndarray) -> float:
    """Var[v^T H v] for Rademacher v: 2 (||H||_F^2 - sum_i H_ii^2)."""
    return float(2.0 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)))


def recording(loss_fn: Callable[[np.ndarray], float]) -> tuple[Callable[[np.ndarray], float], list[np.ndarray]]:
    """Wrap loss_fn to keep every delta it is called with (to recover the probes)."""
    seen: list[np.ndarray] = []

    def wrapped(delta: np.ndarray) -> float:
        seen.append(delta.copy())
        return loss_fn(delta)

    return wrapped, seen


@pytest.fixture(scope="module")
def psd() -> np.ndarray:
    rng = np.random.default_rng(11)
    b = rng.normal(size=(20, 20))
    return b @ b.T / 20 + np.diag(rng.uniform(0, 1, 20))


# --------------------------------------------------------------------------- explicit quadratic
def test_quadratic_samples_are_exact_quadratic_forms(psd: np.ndarray) -> None:
    loss, seen = recording(lambda d: 0.5 * d @ psd @ d)
    est = hutchinson_trace(loss, 20, eps=0.3, probes=10, rng=0, check_probes=3)
    assert est.evaluations == 2 * 10 + 2 * 3 == len(seen)
    probes = np.array(seen[: 2 * 10 : 2]) / 0.3  # the +delta of each main probe
    assert set(np.unique(probes)) == {-1.0, 1.0}
    np.testing.assert_allclose(-np.array(seen[1 : 2 * 10 : 2]) / 0.3, probes)
    np.testing.assert_allclose(est.samples, np.einsum("ji,ik,jk->j", probes, psd, probes), rtol=1e-12)
    assert est.step_ratio == pytest.approx(1.0, abs=1e-12)  # a quadratic has no truncation error
    assert est.stderr == pytest.approx(est.samples.std(ddof=1) / np.sqrt(10))


def test_quadratic_unbiased_with_predicted_variance(psd: np.ndarray) -> None:
    trace, var1 = float(np.trace(psd)), hutchinson_variance(psd)
    m, reps = 8, 4000
    rng = np.random.default_rng(5)
    runs = [hutchinson_trace(lambda d: 0.5 * d @ psd @ d, 20, 0.1, m, rng, check_probes=0) for _ in range(reps)]
    means = np.array([r.mean for r in runs])
    # Unbiased: the grand mean is within 4 standard errors of Tr(H).
    assert abs(means.mean() - trace) < 4 * np.sqrt(var1 / m / reps)
    # Var of an m-probe estimate is 2(||H||_F^2 - sum H_ii^2)/m; the standard error of a sample
    # variance is sqrt((mu4 - sigma^4)/reps), estimated from the same runs.
    centred = means - means.mean()
    var_hat = float(np.mean(centred**2))
    se_var = float(np.sqrt((np.mean(centred**4) - var_hat**2) / reps))
    assert abs(var_hat - var1 / m) < 4 * se_var, (var_hat, var1 / m, se_var)
    # The reported stderr^2 is an unbiased estimate of the same variance.
    stderr2 = np.array([r.stderr**2 for r in runs])
    assert abs(stderr2.mean() - var1 / m) < 4 * stderr2.std() / np.sqrt(reps)


def test_per_element_eps_estimates_weighted_trace(psd: np.ndarray) -> None:
    """delta = eps * v: samples are (Dv)^T H (Dv) / mean(eps^2), unbiased for sum_i eps_i^2 H_ii / mean(eps^2)."""
    rng = np.random.default_rng(2)
    eps = rng.uniform(0.01, 0.1, 20)
    norm = np.mean(eps**2)
    loss, seen = recording(lambda d: 0.5 * d @ psd @ d)
    est = hutchinson_trace(loss, 20, eps, probes=4000, rng=rng, check_probes=0)
    deltas = np.array(seen[::2])
    np.testing.assert_allclose(np.abs(deltas), np.broadcast_to(eps, deltas.shape))
    np.testing.assert_allclose(est.samples, np.einsum("ji,ik,jk->j", deltas, psd, deltas) / norm, rtol=1e-12)
    dhd = psd * np.outer(eps, eps) / norm
    assert abs(est.mean - np.trace(dhd)) < 4 * np.sqrt(hutchinson_variance(dhd) / 4000)
    # A constant array is the scalar case.
    same = hutchinson_trace(lambda d: 0.5 * d @ psd @ d, 20, np.full(20, 0.1), 5, 3, check_probes=0)
    scalar = hutchinson_trace(lambda d: 0.5 * d @ psd @ d, 20, 0.1, 5, 3, check_probes=0)
    np.testing.assert_allclose(same.samples, scalar.samples, rtol=1e-12)


def test_subtract_base_for_general_loss(psd: np.ndarray) -> None:
    """L = c + g.delta + delta^T H delta / 2: the central difference cancels g; L(0) = c must be subtracted."""
    g = np.linspace(-1.0, 1.0, 20)

    def loss(d: np.ndarray) -> float:
        return 3.0 + g @ d + 0.5 * d @ psd @ d

    exact = hutchinson_trace(lambda d: 0.5 * d @ psd @ d, 20, 0.05, 16, 9, check_probes=2)
    general = hutchinson_trace(loss, 20, 0.05, 16, 9, subtract_base=True, check_probes=2)
    assert general.base_loss == 3.0 and general.evaluations == 1 + 32 + 4
    np.testing.assert_allclose(general.samples, exact.samples, rtol=1e-9)
    naive = hutchinson_trace(loss, 20, 0.05, 16, 9, check_probes=0)
    np.testing.assert_allclose(naive.samples - exact.samples, 2 * 3.0 / 0.05**2, rtol=1e-9)


# --------------------------------------------------------------------------- MLP with an exact Gauss-Newton
class Mlp:
    """8 -> 6 (tanh) -> 4 logits, softmax output, 64 inputs, float64; the first layer's weights are probed."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(64, 8))
        self.w1 = rng.normal(size=(6, 8)) / np.sqrt(8)
        self.b1 = rng.normal(size=6) * 0.1
        self.w2 = rng.normal(size=(4, 6)) * 2 / np.sqrt(6)
        self.b2 = rng.normal(size=4) * 0.1
        self.ref = self.logits(np.zeros(self.w1.size))

    def logits(self, delta: np.ndarray) -> np.ndarray:
        hidden = np.tanh(self.x @ (self.w1 + delta.reshape(self.w1.shape)).T + self.b1)
        return hidden @ self.w2.T + self.b2

    def loss(self, delta: np.ndarray) -> float:
        """mean KL(p(w) || p(w + delta)): zero with zero gradient at delta = 0."""
        return kl_divergence(self.ref, self.logits(delta))

    def jacobian(self) -> np.ndarray:
        """[n, 4, 48]: d logits[n, c] / d w1[j, k] = w2[c, j] (1 - h[n, j]^2) x[n, k]."""
        hidden = np.tanh(self.x @ self.w1.T + self.b1)
        return np.einsum("cj,nj,nk->ncjk", self.w2, 1 - hidden**2, self.x).reshape(len(self.x), 4, -1)

    def gauss_newton(self) -> np.ndarray:
        """mean_n J_n^T (diag(p_n) - p_n p_n^T) J_n: the exact Hessian of the mean KL at delta = 0."""
        p = np.exp(self.ref - self.ref.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        cov = np.einsum("nc,cd->ncd", p, np.eye(4)) - np.einsum("nc,nd->ncd", p, p)
        jac = self.jacobian()
        return np.einsum("nca,ncd,ndb->ab", jac, cov, jac) / len(self.x)


@pytest.fixture(scope="module")
def mlp() -> Mlp:
    return Mlp()


def test_mlp_reference_is_right(mlp: Mlp) -> None:
    """The analytic Jacobian matches central differences, and the loss's finite-difference Hessian the GGN."""
    h = 1e-6
    basis = np.eye(mlp.w1.size)
    fd = np.stack([(mlp.logits(h * e) - mlp.logits(-h * e)) / (2 * h) for e in basis], axis=-1)
    np.testing.assert_allclose(fd, mlp.jacobian(), rtol=1e-6, atol=1e-9)
    ggn = mlp.gauss_newton()
    i, j, s = 3, 17, 1e-3  # one diagonal and one off-diagonal entry of the Hessian by differences
    ei, ej = basis[i] * s, basis[j] * s
    hii = (mlp.loss(ei) + mlp.loss(-ei)) / s**2
    hij = (mlp.loss(ei + ej) - mlp.loss(ei - ej) - mlp.loss(ej - ei) + mlp.loss(-ei - ej)) / (4 * s**2)
    assert hii == pytest.approx(ggn[i, i], rel=1e-4)
    assert hij == pytest.approx(ggn[i, j], rel=1e-4, abs=1e-8)


def test_mlp_trace_within_ten_percent(mlp: Mlp) -> None:
    ggn = mlp.gauss_newton()
    trace = float(np.trace(ggn))
    # Honest tolerance: the predicted relative standard error at 64 probes is ~3.6%, so 10% is ~2.8 sigma.
    predicted = np.sqrt(hutchinson_variance(ggn) / 64) / trace
    assert predicted < 0.04
    est = hutchinson_trace(mlp.loss, ggn.shape[0], eps=1e-3, probes=64, rng=1)
    assert abs(est.mean / trace - 1) < 0.10
    assert est.step_ratio == pytest.approx(1.0, abs=1e-3)
    assert 1e-7 < est.loss_range[0] and est.loss_range[1] < 1e-4  # KL stays in the quadratic regime
    assert est.stderr / trace == pytest.approx(predicted, rel=0.3)  # the reported error bar is right


def test_mlp_samples_match_exact_quadratic_forms(mlp: Mlp) -> None:
    """Probe by probe, the second difference equals v^T G v up to the O(eps^2) truncation term."""
    ggn = mlp.gauss_newton()
    loss, seen = recording(mlp.loss)
    est = hutchinson_trace(loss, ggn.shape[0], eps=1e-3, probes=16, rng=4, check_probes=0)
    probes = np.array(seen[::2]) / 1e-3
    np.testing.assert_allclose(est.samples, np.einsum("ji,ik,jk->j", probes, ggn, probes), rtol=1e-4)


def test_mlp_error_shrinks_with_probes(mlp: Mlp) -> None:
    ggn = mlp.gauss_newton()
    trace = float(np.trace(ggn))
    seeds = range(100, 110)

    def mean_abs_error(probes: int) -> float:
        errors = [hutchinson_trace(mlp.loss, 48, 1e-3, probes, s, check_probes=0).mean / trace - 1 for s in seeds]
        return float(np.mean(np.abs(errors)))

    small, large = mean_abs_error(16), mean_abs_error(256)
    # 1/sqrt(m) predicts a factor 4 between 16 and 256 probes; ten seeds leave room for noise, not for 2.
    assert large < small / 2, (small, large)
    assert large < 0.05


def test_mlp_large_step_flagged_by_ratio(mlp: Mlp) -> None:
    """eps = 0.3 leaves the quadratic regime: the eps vs eps/2 ratio says so, and the estimate is off."""
    trace = float(np.trace(mlp.gauss_newton()))
    est = hutchinson_trace(mlp.loss, 48, eps=0.3, probes=64, rng=1)
    assert est.step_ratio < 0.9
    assert est.mean < 0.85 * trace


# --------------------------------------------------------------------------- KL and helpers
def test_kl_divergence_matches_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    p = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(axis=1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert kl_divergence(a, b) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(a, a) == 0.0
    assert kl_divergence(a, b + rng.normal(size=(5, 1))) == pytest.approx(expected, rel=1e-12)  # row shifts
    assert kl_divergence(a.T, b.T, axis=0) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(a[0], b[0]) == pytest.approx(np.sum(p[0] * np.log(p[0] / q[0])), rel=1e-12)


def test_kl_divergence_large_logits_and_float32() -> None:
    a = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    b = np.array([[999.0, 1.0, -1000.0]], dtype=np.float32)
    # p is one-hot on class 0 to double precision, so KL = log-sum-exp(b) - b[0] ~ 0 + tiny.
    value = kl_divergence(a, b)
    assert np.isfinite(value) and value == pytest.approx(0.0, abs=1e-300)
    # log p = [0, -800], log q = [-800, 0]: KL = 800, where exp(800) overflows and softmax underflows to 0.
    value = kl_divergence(np.array([[800.0, 0.0]]), np.array([[0.0, 800.0]]))
    assert value == pytest.approx(800.0, rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(np.zeros((2, 3)), np.zeros((3, 2)))


def test_rademacher_and_bad_arguments() -> None:
    v = rademacher(np.random.default_rng(0), 1000)
    assert v.dtype == np.float64 and set(np.unique(v)) == {-1.0, 1.0}
    assert abs(v.mean()) < 0.1
    with pytest.raises(ValueError, match="eps"):
        hutchinson_trace(lambda d: 0.0, 4, np.ones(3))
    with pytest.raises(ValueError, match="eps"):
        hutchinson_trace(lambda d: 0.0, 4, -1.0)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_trace(lambda d: 0.0, 4, 1.0, probes=0)
    single = hutchinson_trace(lambda d: float(d @ d), 4, 1.0, probes=1, rng=0)
    assert single.mean == pytest.approx(8.0) and np.isnan(single.stderr)

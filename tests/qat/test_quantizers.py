"""QAT building blocks (algorithms.md §5.1, §7.3): oscillation tracker, freezing, dampening, LSQ, MAD, OCTAV."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qonnx.numerics.octav import octav_symmetric, raw_tails  # noqa: E402
from qonnx.numerics.quant import QuantScheme  # noqa: E402
from qonnx.qat.oscillations import OscillationTracker, cosine_anneal, dampening_weight, freeze_threshold  # noqa: E402
from qonnx.qat.quantizers import (  # noqa: E402
    WeightQuantizer,
    dampening_loss,
    grad_scale,
    lsq_fake_quant,
    mad_fake_quant,
    octav_clip,
    round_ste,
)


def track(sequence, momentum=0.1):
    tracker = OscillationTracker((1,), momentum)
    return [bool(tracker.update(torch.tensor([float(v)]))[0]) for v in sequence], tracker


def test_tracker_reference_sequences():
    assert track([0, 1, 0, 1])[0] == [False, False, True, True]
    assert track([0, 1, 1, 0])[0] == [False, False, False, True]  # prev_dir persists through a zero move
    assert track([0, 1, 2])[0] == [False, False, False]


def test_tracker_ema_closed_form():
    m = 0.1
    seq = [0, 1, 0, 1, 0, 0, 1]
    osc, tracker = track(seq, m)
    expected = sum(m * (1 - m) ** (len(seq) - 1 - j) * float(o) for j, o in enumerate(osc))
    assert float(tracker.freq[0]) == pytest.approx(expected, rel=1e-6)
    ema = float(seq[0])
    for v in seq[1:]:
        ema = m * v + (1 - m) * ema
    assert float(tracker.ema_int[0]) == pytest.approx(ema, rel=1e-6)


def test_freeze_mask_is_monotone_and_frozen_values_constant():
    torch.manual_seed(0)
    scheme = QuantScheme(bits=3, signed=True, symmetric=True, axis=0)
    w = torch.nn.Parameter(torch.randn(4, 8) * 0.3)
    q = WeightQuantizer(w.detach(), scheme, torch.full((4,), 0.1), track=True, momentum=0.2)
    previous = torch.zeros_like(q.tracker.frozen)
    frozen_values = {}
    for step in range(60):
        with torch.no_grad():  # jitter the weights across bin boundaries to make them oscillate
            w.add_(torch.randn_like(w) * 0.05 * (1 if step % 2 else -1))
        q.tracker.update(q.codes(w.detach()))
        q.tracker.freeze(0.05)
        assert bool((q.tracker.frozen | ~previous).all())  # never unfreezes
        out = q(w).detach()
        for idx, value in frozen_values.items():
            assert float(out[idx]) == value
        for idx in zip(*torch.nonzero(q.tracker.frozen, as_tuple=True), strict=True):
            idx = tuple(int(i) for i in idx)
            frozen_values.setdefault(idx, float(out[idx]))
        previous = q.tracker.frozen.clone()
    assert frozen_values, "the jittered weights should have frozen"
    grad = torch.autograd.grad(q(w).sum(), w)[0]
    assert bool((grad[q.tracker.frozen] == 0).all())


def test_schedules():
    assert freeze_threshold(10, 100, 0.1, 0.01) == 0.0  # no freezing before 25%
    assert freeze_threshold(25, 100, 0.1, 0.01) == pytest.approx(0.1)
    assert freeze_threshold(99, 100, 0.1, 0.01) == pytest.approx(0.01)
    assert dampening_weight(0, 100, 0.1) == 0.0 and dampening_weight(99, 100, 0.1) == pytest.approx(0.1)
    assert cosine_anneal(62, 100, 1.0, 0.0, 0.25) == pytest.approx(0.5, abs=0.02)


def test_dampening_gradient():
    s, qmin, qmax = torch.tensor(0.1), -7, 7
    w = torch.tensor([0.012, -0.234, 0.46, 0.95, -0.8], requires_grad=True)  # last two beyond +-0.7
    loss = dampening_loss(w, s, qmin, qmax, reduction="sum")
    grad = torch.autograd.grad(loss, w)[0]
    q = torch.clamp(torch.round(w.detach() / s), qmin, qmax) * s
    inside = w.detach().abs() <= 0.7
    expected = torch.where(inside, 2 * (w.detach() - q), torch.zeros_like(q))
    assert torch.allclose(grad, expected, atol=1e-7)
    assert bool((grad[~inside] == 0).all())


def lsq_reference(x, s, zero_point, qmin, qmax, g):
    """LSQ written as autograd ops (Esser et al. 2020): what the one-node lsq_fake_quant must equal."""
    s = grad_scale(s, g)
    q = torch.clamp(round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


def test_lsq_step_gradient_matches_finite_differences_and_scales_once():
    x = torch.tensor([0.13, -0.41, 0.77, 2.5, -3.0])  # the last two are clipped at qmax / qmin
    qmin, qmax, s0 = -7, 7, 0.2
    g = 0.37
    s = torch.tensor(s0, requires_grad=True)
    out = lsq_fake_quant(x, s, 0.0, qmin, qmax, g)
    grads = [torch.autograd.grad(out[i], s, retain_graph=True)[0].item() for i in range(len(x))]
    eps = 1e-4
    for i, v in enumerate(x.tolist()):
        if qmin <= v / s0 <= qmax:
            # STE: the rounding residual c = round(v/s) - v/s is held at s0, so v^ = (c + v/s) s = c s + v.
            c = round(v / s0) - v / s0

            def f(sv, c=c, v=v):
                return (c + v / sv) * sv
        else:  # clipped: v^ = qmax s (or qmin s), the true derivative

            def f(sv, i=i):
                return float(lsq_fake_quant(x, torch.tensor(sv, dtype=torch.float64), 0.0, qmin, qmax, 1.0)[i])
        fd = (f(s0 + eps) - f(s0 - eps)) / (2 * eps)
        assert grads[i] == pytest.approx(g * fd, rel=1e-3, abs=1e-6)
    expected = [g * (round(v / s0) - v / s0) for v in x[:3].tolist()] + [g * qmax, g * qmin]
    assert grads == pytest.approx(expected, rel=1e-4)
    # Gradient to x: 1 inside the range (straight-through), 0 outside (PWL).
    xg = x.clone().requires_grad_(True)
    gx = torch.autograd.grad(lsq_fake_quant(xg, torch.tensor(s0), 0.0, qmin, qmax, g).sum(), xg)[0]
    assert gx.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("zero_point,qmin,qmax", [(0, 0, 255), (128, 0, 255), (3, 0, 15), (0, -8, 7)])
def test_lsq_matches_the_autograd_reference(zero_point, qmin, qmax):
    """The one-node activation quantizer gives the op-by-op form's values and gradients (float64)."""
    gen = torch.Generator().manual_seed(zero_point + qmax)
    x = (3 * torch.randn(2, 5, 7, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    s = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 7, 7, generator=gen, dtype=torch.float64)
    ref = lsq_reference(x, s, float(zero_point), qmin, qmax, 0.01)
    fused = lsq_fake_quant(x, s, zero_point, qmin, qmax, 0.01)
    assert torch.equal(ref, fused)
    clipped = ((torch.round(x / s) + zero_point < qmin) | (torch.round(x / s) + zero_point > qmax)).sum()
    assert 0 < int(clipped) < x.numel()  # both sides of the clamp are exercised
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (x, s))
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (x, s))
    torch.testing.assert_close(fused_grads[0], ref_grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fused_grads[1], ref_grads[1], rtol=1e-10, atol=1e-12)


def test_mad_gradient():
    s = torch.tensor(0.1)
    w = torch.tensor([0.3, -0.69, 1.4, -2.8], requires_grad=True)  # clip at 0.7
    grad = torch.autograd.grad(mad_fake_quant(w, s, -7, 7).sum(), w)[0]
    assert grad.tolist() == pytest.approx([1.0, 1.0, 0.7 / 1.4, 0.7 / 2.8])


def test_octav_per_step_matches_numpy_reference():
    gen = np.random.default_rng(0)
    w = gen.standard_normal((6, 500)) * gen.uniform(0.5, 2.0, (6, 1))
    mag = np.abs(w)
    k = 1.0 / (12 * 7**2)
    s0 = mag.mean(1)
    ref = octav_symmetric(raw_tails(mag), np.count_nonzero(w, 1), s0, mag.max(1), k, 20, rtol=0.0)
    got = octav_clip(torch.from_numpy(mag), torch.from_numpy(s0), k, 20).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    # Warm-started single steps converge to the same fixed point.
    s = torch.from_numpy(s0)
    for _ in range(20):
        s = octav_clip(torch.from_numpy(mag), s, k, 1)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6)
    # Gaussian at 4 bits (algorithms.md §5.3): about 2.49.
    big = np.abs(np.random.default_rng(1).standard_normal((1, 200_000)))
    clip = octav_clip(torch.from_numpy(big), torch.tensor([big.mean()], dtype=torch.float64), k, 30)
    assert float(clip[0]) == pytest.approx(2.49, abs=0.03)
    assert math.isfinite(float(clip[0]))

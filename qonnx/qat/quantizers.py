"""Fake quantizers for QAT: LSQ step sizes, per-step OCTAV clipping with magnitude-aware gradients, dampening.

Grids follow the quant table (qonnx/numerics/quant.py): codes clamp(round_half_even(x / s) + z, qmin, qmax), value
(q - z) s, so the fake-quant arithmetic is what the exported QuantizeLinear/DequantizeLinear compute.

- LSQ (Esser et al. 2020, algorithms.md §5.1): s is learned; with round's straight-through estimator
  dv^/ds = round(v/s) - v/s inside the range and qmin - z / qmax - z outside, scaled once by
  g = 1 / sqrt(N Q_P). N is the number of elements sharing the step size: the weights of one output channel
  (per-channel scales each see only their channel's gradient) or the features of one activation sample.
- OCTAV (Sakr et al. 2022): the weight clip is the fixed point of the MSE recursion, warm-started from the
  previous step's and iterated a few times per step (no gradient to s). Weights get magnitude-aware
  differentiation (MAD): gradient 1 inside the clip and s/|w| outside, which keeps clipped weights learning
  without the explosion of a plain STE. Activations use the piecewise-linear gradient (1 inside, 0 outside).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qonnx.numerics.quant import MIN_SCALE, QuantScheme
from qonnx.qat.oscillations import OscillationTracker


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ONNX QuantizeLinear) with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """s in the forward pass, g * ds in the backward pass (LSQ's step-size gradient scale, applied once)."""
    scaled = s * g
    return (s - scaled).detach() + scaled


class _LsqQuant(torch.autograd.Function):
    """LSQ fake quantization at a per-tensor step as one autograd node.

    Written as autograd ops (grad_scale(s), clamp(round_ste(x / s) + z), (q - z) s) it is ~10 nodes per tensor,
    over half of a Lite0 QAT step's time; here the forward works in place on one buffer and the backward
    recomputes x / s from the saved input instead of keeping the intermediates (tests compare it with that form).
    """

    @staticmethod
    def forward(ctx, x, s, zero_point, qmin, qmax, g):  # noqa: D102
        ctx.save_for_backward(x, s)
        ctx.params = (zero_point, qmin, qmax, g)
        out = x / s
        return out.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, s = ctx.saved_tensors
        zero_point, qmin, qmax, g = ctx.params
        v = x / s
        code = torch.round(v).add_(zero_point)
        clamped = code.clamp(qmin, qmax)
        inside = code.eq_(clamped)  # 1.0 where the code was not clamped, else 0.0 (reuses code's buffer)
        grad_x = grad * inside
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d out / d s = (clamped code - z) - v * inside: round(v) - v on the grid, qmin - z / qmax - z off it
            flat = grad.reshape(-1)
            grad_s = (torch.dot(flat, clamped.sub_(zero_point).reshape(-1))
                      - torch.dot(grad_x.reshape(-1), v.reshape(-1))).mul_(g).reshape(s.shape)
        return grad_x, grad_s, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, s: torch.Tensor, zero_point: float, qmin: int, qmax: int, g: float
                   ) -> torch.Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) s for a scalar step s, with LSQ's gradients: straight-through to x
    inside the grid (0 outside), round(x/s) - x/s (inside) or qmin - z / qmax - z (outside) to s, scaled by g."""
    return _LsqQuant.apply(x, s, float(zero_point), qmin, qmax, g)


class _MadQuant(torch.autograd.Function):
    """Symmetric fake quantization at a fixed step s with MAD gradients (frozen elements get none)."""

    @staticmethod
    def forward(ctx, w, s, clip, qmin, qmax, frozen, frozen_int):  # noqa: D102
        q = torch.clamp(torch.round(w / s), qmin, qmax)
        if frozen is not None:
            q = torch.where(frozen, frozen_int, q)
        ctx.save_for_backward(w, clip, frozen)
        return q * s

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        w, clip, frozen = ctx.saved_tensors
        mag = w.abs()
        factor = torch.where(mag <= clip, torch.ones_like(w), clip / mag.clamp_min(1e-30))
        if frozen is not None:
            factor = torch.where(frozen, torch.zeros_like(factor), factor)
        return grad * factor, None, None, None, None, None, None


def mad_fake_quant(w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, frozen=None, frozen_int=None):
    """Fake quantization of w at step s (broadcastable) with gradient 1 on |w| <= qmax s, s qmax/|w| beyond."""
    s = s.detach()
    return _MadQuant.apply(w, s, s * qmax, qmin, qmax, frozen, frozen_int)


def octav_clip(mag_rows: torch.Tensor, s: torch.Tensor, k: float, iterations: int) -> torch.Tensor:
    """OCTAV fixed-point iterations per row of magnitudes (qonnx/numerics/octav.py's octav_symmetric, in torch)."""
    nonzero = (mag_rows > 0).sum(1).to(mag_rows.dtype)
    s_max = mag_rows.amax(1)
    s = torch.minimum(s, s_max)
    for _ in range(iterations):
        above = mag_rows > s[:, None]
        n_out = above.sum(1).to(mag_rows.dtype)
        m_out = torch.where(above, mag_rows, torch.zeros_like(mag_rows)).sum(1)
        denom = k * (nonzero - n_out) + n_out
        ok = (n_out > 0) & (denom > 0)
        s = torch.minimum(torch.where(ok, m_out / torch.where(denom > 0, denom, torch.ones_like(denom)), s), s_max)
    return s


def dampening_loss(w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, reduction: str = "kernel_mean",
                   quantized: torch.Tensor | None = None) -> torch.Tensor:
    """sum (stopgrad(q(w)) - clip(w, s qmin, s qmax))^2; kernel_mean sums over dim 0, then takes the mean."""
    s = s.detach()
    if quantized is None:
        quantized = torch.clamp(torch.round(w / s), qmin, qmax) * s
    diff = (quantized.detach() - torch.clamp(w, s * qmin, s * qmax)) ** 2
    if reduction == "sum":
        return diff.sum()
    return diff.sum(0).mean() if diff.dim() > 1 else diff.mean()


def _channel_shape(scheme: QuantScheme, ndim: int) -> list[int]:
    shape = [1] * ndim
    if scheme.axis is not None:
        shape[scheme.axis % ndim] = -1
    return shape


class WeightQuantizer(nn.Module):
    """Symmetric signed weight grid, per channel or per tensor, with LSQ or per-step OCTAV steps.

    `tracker` (weights of <= max_bits) tracks oscillations and holds the frozen mask and integers.
    """

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, mode: str = "lsq",
                 octav_iterations: int = 2, track: bool = False, momentum: float = 0.01):
        super().__init__()
        if not (scheme.signed and scheme.symmetric) or scheme.block_size:
            raise ValueError("weight quantizer needs a symmetric signed grid per tensor or per channel")
        self.qmin, self.qmax, self.mode = scheme.qmin, scheme.qmax, mode
        self.shape = _channel_shape(scheme, weight.dim())
        self.axis = None if scheme.axis is None else scheme.axis % weight.dim()
        per_scale = weight.numel() // max(1, scale.numel())
        self.g = 1.0 / math.sqrt(per_scale * self.qmax)
        self.k = 1.0 / (12.0 * scheme.steps_per_side ** 2)
        self.octav_iterations = octav_iterations
        if mode == "lsq":
            self.scale = nn.Parameter(scale.clone().float())
        else:  # OCTAV: the clip (= qmax * step) is recomputed every step, warm-started from this buffer
            self.register_buffer("scale", scale.clone().float())
        self.tracker = OscillationTracker(tuple(weight.shape), momentum) if track else None

    def step_size(self) -> torch.Tensor:
        return torch.clamp(self.scale, min=MIN_SCALE)

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return w.reshape(1, -1)
        return w.movedim(self.axis, 0).reshape(w.shape[self.axis], -1)

    @torch.no_grad()
    def update_octav(self, w: torch.Tensor) -> None:
        if self.mode != "octav":
            return
        clip = octav_clip(self._rows(w).abs().double(), (self.scale * self.qmax).reshape(-1).double(), self.k,
                          self.octav_iterations)
        self.scale.copy_(torch.clamp(clip / self.qmax, min=MIN_SCALE).reshape(self.scale.shape).float())

    def _frozen(self):
        if self.tracker is None or not bool(self.tracker.frozen.any()):
            return None, None
        return self.tracker.frozen, self.tracker.frozen_int

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        frozen, frozen_int = self._frozen()
        if self.mode == "octav":
            return mad_fake_quant(w, self.step_size().reshape(self.shape), self.qmin, self.qmax, frozen, frozen_int)
        s = grad_scale(self.step_size(), self.g).reshape(self.shape)
        q = torch.clamp(round_ste(w / s), self.qmin, self.qmax)
        if frozen is not None:
            q = torch.where(frozen, frozen_int, q)
        return q * s

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / self.step_size().reshape(self.shape)), self.qmin, self.qmax)
        frozen, frozen_int = self._frozen()
        return torch.where(frozen, frozen_int, q) if frozen is not None else q

    def dampening(self, w: torch.Tensor) -> torch.Tensor:
        s = self.step_size().reshape(self.shape)
        return dampening_loss(w, s, self.qmin, self.qmax)


class ActQuantizer(nn.Module):
    """Per-tensor activation grid [qmin, qmax] with a fixed integer zero point and an LSQ (or fixed) step."""

    def __init__(self, scheme: QuantScheme, scale: float, zero_point: int, learn: bool = True):
        super().__init__()
        self.qmin, self.qmax = scheme.qmin, scheme.qmax
        self.q_p = max(1, scheme.qmax - int(zero_point))
        self.zero_point = float(zero_point)  # fixed by the quant table: not learned, not saved
        value = torch.tensor(float(scale))
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        features = max(1, x[0].numel()) if x.dim() > 0 else 1
        g = 1.0 / math.sqrt(features * self.q_p)
        return lsq_fake_quant(x, torch.clamp(self.scale, min=MIN_SCALE), self.zero_point, self.qmin, self.qmax, g)


class BiasQuantizer(nn.Module):
    """int32 bias on the grid s_x * s_w (as the exporter writes it), straight-through; the step sizes are read
    from the layer's input and weight quantizers and get no gradient from here (the bias grid is far finer)."""

    def __init__(self, act: ActQuantizer, weight: WeightQuantizer):
        super().__init__()
        self._refs = (act, weight)  # a tuple: not registered as submodules (they are owned elsewhere)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        act, weight = self._refs
        s = (torch.clamp(act.scale, min=MIN_SCALE) * weight.step_size()).detach().reshape(-1)
        return round_ste(b / s) * s

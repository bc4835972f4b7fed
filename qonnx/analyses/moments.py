"""Per-channel Gaussian moments carried through a float graph with no data (DFQ's data-free mode).

A folded BatchNorm says its layer's output channel c is distributed as
N(beta_c, gamma_c^2) (algorithms.md §3.1). From there, and from an assumed input
range, the means and variances are carried op by op:
- Conv/Gemm without a BN: mean W.E[x] + b, variance sum W^2 Var[x] (channels and
  kernel positions taken as independent; a folded BN overrides this);
- Relu/Clip/Min/Max: exact moments of a clipped Gaussian;
- other elementwise activations (Sigmoid, HardSigmoid, HardSwish, Tanh, LeakyRelu,
  PRelu with a per-channel slope, ...): quadrature of the Gaussian expectation;
- Add/Mul/Sub/Div with constants or independent operands, pooling, reshapes to [N, C].
Tensors reached by anything else are unknown; callers keep what reads them in float.

`Moments.low/high` is the range the tensor takes with all but a Gaussian tail of
`width` standard deviations (intersected with hard bounds such as a clip's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from qonnx.core.ir import Model
from qonnx.core.layers import channel_response
from qonnx.errors import PreconditionError
from qonnx.infra.context import Analysis, PassContext

_SQRT_2PI = float(np.sqrt(2 * np.pi))


def _pdf(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * t * t) / _SQRT_2PI


def clipped_gaussian_moments(mean, std, low=-np.inf, high=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """E[x] and Var[x] of x = clip(z, low, high), z ~ N(mean, std^2); std is used as |std|."""
    mu = np.asarray(mean, np.float64)
    sd = np.abs(np.asarray(std, np.float64))
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(sd > 0, sd, 1.0)
        a = np.where(sd > 0, (low - mu) / safe, np.where(mu >= low, -np.inf, np.inf))
        b = np.where(sd > 0, (high - mu) / safe, np.where(mu <= high, np.inf, -np.inf))
        cdf_a, cdf_b = ndtr(a), ndtr(b)
        pdf_a, pdf_b = _pdf(a), _pdf(b)
        inside = cdf_b - cdf_a
        # integrals of t*phi(t) and t^2*phi(t) over [a, b]; a*phi(a) -> 0 at infinity
        t1 = pdf_a - pdf_b
        t2 = inside - (np.where(np.isfinite(b), b * pdf_b, 0.0) - np.where(np.isfinite(a), a * pdf_a, 0.0))
        lo = np.where(np.isfinite(low), low, 0.0)  # bounds may be per channel; an infinite one has no mass
        hi = np.where(np.isfinite(high), high, 0.0)
        first = cdf_a * lo + (1.0 - cdf_b) * hi + mu * inside + sd * t1
        second = cdf_a * lo * lo + (1.0 - cdf_b) * hi * hi + mu * mu * inside + 2 * mu * sd * t1 + sd * sd * t2
    var = np.maximum(second - first * first, 0.0)
    degenerate = sd == 0
    if np.any(degenerate):
        clipped = np.clip(mu, low, high)
        first = np.where(degenerate, clipped, first)
        var = np.where(degenerate, 0.0, var)
    return first, var


# A fine trapezoid grid over +-10 standard deviations rather than Gauss-Hermite: the activations
# here have kinks (HardSigmoid, HardSwish), where Gauss-Hermite converges slowly (~1e-3 at 96 nodes).
_NODES = np.linspace(-10.0, 10.0, 4001)
_WEIGHTS = _pdf(_NODES) * (_NODES[1] - _NODES[0])
_WEIGHTS[[0, -1]] *= 0.5


def gaussian_expectation(fn: Callable[[np.ndarray], np.ndarray], mean, std) -> tuple[np.ndarray, np.ndarray]:
    """E[f(z)] and Var[f(z)] for z ~ N(mean, std^2) per channel, by quadrature on the normal density."""
    mu = np.asarray(mean, np.float64)[..., None]
    sd = np.abs(np.asarray(std, np.float64))[..., None]
    values = fn(mu + sd * _NODES)
    w = _WEIGHTS
    first = values @ w
    second = (values * values) @ w
    return first, np.maximum(second - first * first, 0.0)


def _hard_sigmoid(node) -> Callable[[np.ndarray], np.ndarray]:
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return lambda x: np.clip(alpha * x + beta, 0.0, 1.0)


def _leaky(node) -> Callable[[np.ndarray], np.ndarray]:
    alpha = float(node.attrs.get("alpha", 0.01))
    return lambda x: np.where(x >= 0, x, alpha * x)


ELEMENTWISE: dict[str, tuple[Callable, tuple[float, float]]] = {
    "Sigmoid": (lambda node: lambda x: 0.5 * (1 + np.tanh(0.5 * x)), (0.0, 1.0)),
    "HardSigmoid": (_hard_sigmoid, (0.0, 1.0)),
    "HardSwish": (lambda node: lambda x: x * np.clip(x / 6 + 0.5, 0.0, 1.0), (-0.375, np.inf)),
    "Tanh": (lambda node: np.tanh, (-1.0, 1.0)),
    "LeakyRelu": (_leaky, (-np.inf, np.inf)),
    "Softplus": (lambda node: lambda x: np.logaddexp(0.0, x), (0.0, np.inf)),
}
PASS_THROUGH = frozenset({"Identity", "Dropout", "GlobalAveragePool", "AveragePool", "MaxPool"})


@dataclass
class Moments:
    """Per-channel (axis 1) mean and variance of a tensor, with its likely range."""

    mean: np.ndarray
    var: np.ndarray
    low: float
    high: float
    bound: tuple[float, float] = (-np.inf, np.inf)  # hard limits (clip bounds, sigmoid's [0, 1])

    @classmethod
    def gaussian(cls, mean, var, width: float, bound=(-np.inf, np.inf)) -> Moments:
        mean, var = np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1)
        std = np.sqrt(np.maximum(var, 0.0))
        low = float(np.clip(np.min(mean - width * std), *bound))
        high = float(np.clip(np.max(mean + width * std), *bound))
        return cls(mean, var, low, high, bound)


def _channel_constant(value: np.ndarray, rank: int | None, channels: int) -> np.ndarray | None:
    """A constant operand as per-channel values (axis 1), or None if it varies along other axes."""
    v = np.asarray(value, np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if rank is None or v.ndim > rank or v.ndim < rank - 1:
        return None
    full = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).copy()


class MomentPropagator:
    """Carries Moments through the graph in topological order; `result[name]` for known tensors."""

    def __init__(self, model: Model, input_range: tuple[float, float], width: float = 4.0):
        self.model, self.width = model, width
        self.result: dict[str, Moments] = {}
        lo, hi = input_range
        for t in model.graph.inputs:
            shape = t.shape or []
            channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 1
            mean, var = np.full(channels, (lo + hi) / 2), np.full(channels, (hi - lo) ** 2 / 12)
            self.result[t.name] = Moments(mean, var, lo, hi, (lo, hi))

    def run(self) -> dict[str, Moments]:
        for node in self.model.toposort():
            try:
                out = self._node(node)
            except (ValueError, IndexError):  # shapes that do not line up: unknown, not an error
                out = None
            if out is not None:
                self.result[node.outputs[0].name] = out
        return self.result

    def _gauss(self, mean, var, bound=(-np.inf, np.inf)) -> Moments:
        return Moments.gaussian(mean, var, self.width, bound)

    def _clipped(self, x: Moments, low: float, high: float) -> Moments:
        low, high = max(low, x.bound[0]), min(high, x.bound[1])
        mean, var = clipped_gaussian_moments(x.mean, np.sqrt(x.var), low, high)
        return Moments(mean, var, float(np.clip(x.low, low, high)), float(np.clip(x.high, low, high)), (low, high))

    def _node(self, node) -> Moments | None:
        m, op = self.model, node.op
        if not node.outputs or not node.inputs:
            return None
        x = self.result.get(node.inputs[0].name)
        norm = m.folded_norms.get(node.outputs[0].name)
        if op in ("Conv", "Gemm") and norm is not None:
            return self._gauss(norm.beta, np.square(norm.gamma))
        if x is None:
            return None
        if op in ("Conv", "Gemm"):
            return self._layer(node, x)
        if op in ("Relu", "Clip"):
            bounds = m.clip_bounds(node)
            return None if bounds is None else self._clipped(x, *bounds)
        if op in ("Min", "Max") and len(node.inputs) == 2:
            c = m.constant_value(node.inputs[1])
            if c is None:
                return None
            if op == "Min":
                # CLE's per-channel bound [1, C, 1, ...] fixes the rank when the input's shape is unknown
                upper = _channel_constant(c, m.rank_of(node.inputs[0]) or c.ndim, x.mean.size)
                if upper is None:
                    return None
                producer = m.producer(node.inputs[0])
                relu_bounds = (m.clip_bounds(producer) if producer is not None and producer.op in ("Relu", "Clip")
                               else None)
                pre = (self.result.get(producer.inputs[0].name)
                       if relu_bounds is not None and producer is not None else None)
                if pre is not None:
                    assert relu_bounds is not None  # pre is only looked up below a Relu/Clip with known bounds
                    # Relu + Min is CLE's exact rewrite of Clip(0, b): clip the Gaussian before the Relu
                    # once, as the Clip was, instead of treating the rectified tensor as a Gaussian again.
                    high = np.minimum(upper, min(relu_bounds[1], pre.bound[1]))
                    low = np.minimum(max(relu_bounds[0], pre.bound[0]), high)  # Min below the clip: constant
                    mean, var = clipped_gaussian_moments(pre.mean, np.sqrt(pre.var), low, high)
                else:
                    mean, var = clipped_gaussian_moments(x.mean, np.sqrt(x.var), -np.inf, upper)
                return Moments(mean, var, min(x.low, float(np.max(c))), min(x.high, float(np.max(c))),
                               (x.bound[0], min(x.bound[1], float(np.max(c)))))
            return self._clipped(x, float(np.min(c)), np.inf) if np.ptp(c) == 0 else None
        if op == "PRelu" and len(node.inputs) == 2:
            slope = m.constant_value(node.inputs[1])
            per_channel = None if slope is None else _channel_constant(slope, m.rank_of(node.inputs[0]), x.mean.size)
            if per_channel is None:
                return None
            k = per_channel[:, None]
            mean, var = gaussian_expectation(lambda v: np.where(v >= 0, v, k * v), x.mean, np.sqrt(x.var))
            ends = np.concatenate([[x.low, x.high], x.low * per_channel, x.high * per_channel])
            return Moments(mean, var, float(np.min(ends)), float(np.max(ends)))
        if op in ELEMENTWISE:
            make, bound = ELEMENTWISE[op]
            fn = make(node)
            mean, var = gaussian_expectation(fn, x.mean, np.sqrt(x.var))
            ends = fn(np.array([x.low, x.high]))
            return Moments(mean, var, float(max(np.min(ends), bound[0])), float(min(np.max(ends), bound[1])), bound)
        if op in PASS_THROUGH:
            return x
        if op in ("Flatten", "Reshape", "Squeeze"):
            shape = node.outputs[0].shape
            return x if shape is not None and len(shape) >= 2 and shape[1] == x.mean.size else None
        if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            return self._binary(node, x)
        return None

    def _layer(self, node, x: Moments) -> Moments | None:
        w = self.model.constant_value(node.inputs[1])
        if w is None:
            return None
        w = w.astype(np.float64)
        mean, var = channel_response(node, w, x.mean), channel_response(node, w * w, x.var)
        if mean is None or var is None:
            return None
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = self.model.constant_value(node.inputs[2])
            if b is None:
                return None
            mean = mean + b.astype(np.float64).reshape(-1)
        return self._gauss(mean, var)

    def _binary(self, node, x: Moments) -> Moments | None:
        m = self.model
        a_t, b_t = node.inputs
        const = m.constant_value(b_t)
        channels = x.mean.size
        if const is not None:
            c = _channel_constant(const, m.rank_of(a_t), channels)
            if c is None:
                return None
            if node.op in ("Add", "Sub"):
                sign = 1.0 if node.op == "Add" else -1.0
                return self._gauss(x.mean + sign * c, x.var)
            if node.op == "Div":
                if np.any(c == 0):
                    return None
                c = 1.0 / c
            return self._gauss(x.mean * c, x.var * c * c)
        y = self.result.get(b_t.name)
        if y is None or node.op == "Div":
            return None
        mean_y = y.mean if y.mean.size == channels else np.broadcast_to(y.mean, (channels,))
        var_y = y.var if y.var.size == channels else np.broadcast_to(y.var, (channels,))
        if node.op in ("Add", "Sub"):  # independent operands
            sign = 1.0 if node.op == "Add" else -1.0
            return self._gauss(x.mean + sign * mean_y, x.var + var_y)
        mean = x.mean * mean_y
        second = (x.var + x.mean ** 2) * (var_y + mean_y ** 2)
        corners = np.array([x.low * y.low, x.low * y.high, x.high * y.low, x.high * y.high])
        out = self._gauss(mean, np.maximum(second - mean ** 2, 0.0))
        out.low, out.high = max(out.low, float(np.min(corners))), min(out.high, float(np.max(corners)))
        return out


def checked_input_range(owner: str, raw: tuple[float, ...]) -> tuple[float, float]:
    """A pass's `input_range` option as (low, high), or a clear error naming the pass."""
    if len(raw) != 2 or not raw[0] < raw[1]:
        raise PreconditionError(f"{owner}: input_range must be 'low;high' with low < high, got {raw}")
    return float(raw[0]), float(raw[1])


def propagate_moments(model: Model, input_range: tuple[float, float], width: float = 4.0) -> dict[str, Moments]:
    return MomentPropagator(model, input_range, width).run()

# The data-free defaults: images normalized to [-1, 1], ranges of mean +- 8 standard deviations.
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
DEFAULT_WIDTH = 8.0


@dataclass
class PropagatedMoments(Analysis):
    """Per-channel Gaussian moments of every tensor the propagation reaches, for one input range and width."""

    input_range: tuple[float, float]
    width: float
    moments: dict[str, Moments]


def moments_for(model: Model, ctx: PassContext, input_range: tuple[float, float], width: float
                ) -> dict[str, Moments]:
    """The propagated moments, cached in the context (analytic bias correction reuses them)."""
    cached = ctx.analyses.get(PropagatedMoments)
    if cached is not None and (cached.input_range, cached.width) == (tuple(input_range), width):
        return cached.moments
    moments = propagate_moments(model, input_range, width)
    ctx.analyses.put(PropagatedMoments(tuple(input_range), width, moments))  # type: ignore[arg-type]
    return moments

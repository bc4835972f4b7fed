"""Per-layer sensitivity to weight precision (HAWQ, algorithms.md §6.1), from forward passes only.

Omega_i(b) is the loss increase when unit i's weight (see `qonnx.analyses.costs.Unit`) is quantized at b bits
and everything else stays float. The loss L is a divergence of the model's output from the float
model's on calibration samples: KL over the last axis of the logits (a final Softmax is looked through),
or the normalized MSE for outputs that are not class scores. Two estimators:

- measured: Omega_i(b) = L(W_i = Q_b(W_i)), one forward pass per unit and bit width; it includes the
  real rounding pattern of the range method that calibrate will use.
- hessian: HAWQ-V2's Omega_i(b) = 1/2 Tr(H_i)/n_i ||Q_b(W_i) - W_i||^2, with Tr(H_i) by Hutchinson
  (Rademacher probes, central second differences of L, `qonnx.numerics.hessian`). The 1/2 makes it the
  second-order Taylor estimate of L, in the same units as `measured`. The probe step is eps_factor x
  the per-channel 4-bit quantization step, checked by halving on a few probes; the standard error and
  the step ratio are reported per layer.

Each unit gets one ORT session serving all its evaluations: the model from the unit's layers to the
output, with the weight as a graph input (so a probe is a feed, not a session rebuild) and the tensors
it needs from the unchanged part of the model computed once and fed. Results are cached in the pass
context and, with a file name, in a JSON file that a later run reuses when its fingerprint (weights,
schemes, settings, calibration samples) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qonnx.analyses.costs import PRECISIONS, Unit, find_units
from qonnx.core.ir import Model
from qonnx.core.modelio import write_bytes_atomic
from qonnx.errors import InputError, PreconditionError
from qonnx.infra.context import Analysis, PassContext
from qonnx.numerics.hessian import hutchinson_trace, kl_divergence
from qonnx.numerics.quant import expand_blocked, fake_quantize, scale_zero_point
from qonnx.numerics.weight_ranges import WEIGHT_METHODS, weight_range
from qonnx.runtime.probe import UnitProbe

log = logging.getLogger(__name__)

OBJECTIVES = ("measured", "hessian")
LOSSES = ("auto", "kl", "mse")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SensitivitySettings:
    objective: str = "measured"
    samples: int = 16  # calibration samples (the same ones for every unit and probe)
    batch_size: int = 8
    weight_method: str = "mse"  # the range method calibrate will use for weights
    loss: str = "auto"
    probes: int = 16  # hessian: Rademacher probes per unit
    check_probes: int = 2  # hessian: probes re-evaluated at eps/2
    eps_factor: float = 0.5  # hessian: step = eps_factor x the 4-bit quantization step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PreconditionError(f"unknown sensitivity objective '{self.objective}' "
                                    f"(one of: {', '.join(OBJECTIVES)})")
        if self.loss not in LOSSES:
            raise PreconditionError(f"unknown sensitivity loss '{self.loss}' (one of: {', '.join(LOSSES)})")
        if self.weight_method not in WEIGHT_METHODS:
            raise PreconditionError(f"unknown weight range method '{self.weight_method}' "
                                    f"(one of: {', '.join(WEIGHT_METHODS)})")
        if self.samples < 1 or self.batch_size < 1 or self.probes < 2 or self.check_probes < 0:
            raise PreconditionError("sensitivity needs samples >= 1, batch_size >= 1, probes >= 2, check_probes >= 0")
        if not self.eps_factor > 0:
            raise PreconditionError(f"eps_factor must be positive, got {self.eps_factor}")


@dataclass
class LayerSensitivity:
    weight: str
    nodes: tuple[str, ...]
    params: int
    omega: dict[str, float]  # precision -> loss increase (float: 0)
    sq_error: dict[str, float]  # precision -> ||Q_b(W) - W||^2
    trace_per_param: float | None = None  # hessian: Tr(H)/n (weighted by the squared probe steps)
    trace_stderr: float | None = None  # hessian: standard error of trace_per_param
    step_ratio: float | None = None  # hessian: estimate(eps) / estimate(eps/2), ~1 when eps is right
    loss_range: tuple[float, float] | None = None  # hessian: min/max probe loss
    evaluations: int = 0


@dataclass
class SensitivityReport(Analysis):
    """Per-layer sensitivities (cached for the mixed-precision pass; saved as JSON with `write_report`)."""

    settings: SensitivitySettings
    target: str  # the tensor the loss compares
    loss: str  # kl or mse
    fingerprint: str
    layers: list[LayerSensitivity]
    seconds: float = 0.0
    source: str = "computed"  # or the JSON file it was read from
    warnings: list[str] = field(default_factory=list)

    def omega(self, units: list[Unit], precisions: tuple[str, ...]) -> np.ndarray:
        """[U, P] sensitivities in the order of `units`."""
        by_weight = {layer.weight: layer for layer in self.layers}
        missing = [u.weight for u in units if u.weight not in by_weight]
        if missing:
            raise PreconditionError(f"no sensitivity for weight '{missing[0]}'")
        return np.array([[by_weight[u.weight].omega[p] for p in precisions] for u in units], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "target": self.target,
                "loss": self.loss, "seconds": round(self.seconds, 3), "warnings": self.warnings,
                "settings": dataclasses.asdict(self.settings),
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> SensitivityReport:
        if data.get("format") != FORMAT_VERSION:
            raise InputError(f"{source}: not a sensitivity file of format {FORMAT_VERSION}")
        layers = []
        for item in data["layers"]:
            item = dict(item, nodes=tuple(item["nodes"]))
            if item.get("loss_range") is not None:
                item["loss_range"] = tuple(item["loss_range"])
            layers.append(LayerSensitivity(**item))
        return cls(SensitivitySettings(**data["settings"]), data["target"], data["loss"], data["fingerprint"],
                   layers, data.get("seconds", 0.0), source, list(data.get("warnings", [])))


# ------------------------------------------------------------------------------------------ loss
def loss_target(model: Model, loss: str = "auto") -> tuple[str, str]:
    """(tensor, loss kind) compared with the float model: the first output, before a final Softmax."""
    out = model.outputs[0]
    producer = model.producer(out)
    softmax = producer is not None and producer.op in ("Softmax", "LogSoftmax") and \
        int(producer.attrs.get("axis", -1)) in (-1, (len(out.shape) - 1) if out.shape is not None else -1)
    tensor = producer.inputs[0] if softmax and producer is not None else out
    if loss != "auto":
        return tensor.name, loss
    classes = out.shape[-1] if out.shape else None
    scores = softmax or (out.shape is not None and len(out.shape) == 2 and (not isinstance(classes, int)
                                                                             or classes >= 2))
    return tensor.name, "kl" if scores else "mse"


def divergence(kind: str, reference: np.ndarray, output: np.ndarray) -> float:
    if kind == "kl":
        return kl_divergence(reference, output, axis=-1)
    ref = reference.astype(np.float64)
    return float(np.mean((output.astype(np.float64) - ref) ** 2) / max(float(np.mean(ref * ref)), 1e-30))


# ------------------------------------------------------------------------------------------ estimators
def quantized_weight(w: np.ndarray, unit: Unit, precision: str, method: str) -> np.ndarray:
    """Q_b(W): the weight fake-quantized on the plan's grid at the precision's bits (range `method`)."""
    scheme = unit.scheme_at(precision)
    if scheme is None:
        return w
    rmin, rmax = weight_range(w, scheme, method)
    scale, zero_point = scale_zero_point(rmin, rmax, scheme)
    return fake_quantize(w, scale, zero_point, scheme)


def _step(w: np.ndarray, unit: Unit, method: str) -> np.ndarray:
    """The 4-bit quantization step of every weight element (per channel or block)."""
    scheme = unit.scheme_at("int4")
    assert scheme is not None  # only the float precision has no scheme
    rmin, rmax = weight_range(w, scheme, method)
    scale, _ = scale_zero_point(rmin, rmax, scheme)
    return _broadcast_scale(np.asarray(scale, np.float64), w.shape, scheme)


def _broadcast_scale(scale: np.ndarray, shape: tuple[int, ...], scheme) -> np.ndarray:
    if scheme.axis is None:
        return np.full(shape, float(scale))
    if scheme.block_size:
        return expand_blocked(scale, shape, scheme.axis, scheme.block_size)
    view = [1] * len(shape)
    view[scheme.axis % len(shape)] = -1
    return np.broadcast_to(scale.reshape(view), shape)


def _measure_unit(probe: UnitProbe, w: np.ndarray, unit: Unit, s: SensitivitySettings, kind: str,
                  reference: np.ndarray, result: LayerSensitivity) -> None:
    for precision in PRECISIONS[:2]:
        output = probe.run(quantized_weight(w, unit, precision, s.weight_method))
        result.omega[precision] = max(divergence(kind, reference, output), 0.0)
        result.evaluations += 1


def _hessian_unit(probe: UnitProbe, w: np.ndarray, unit: Unit, s: SensitivitySettings, kind: str,
                  reference: np.ndarray, result: LayerSensitivity, rng: np.random.Generator) -> None:
    eps = s.eps_factor * _step(w, unit, s.weight_method).reshape(-1)

    def loss(delta: np.ndarray) -> float:
        return divergence(kind, reference, probe.run((w + delta.reshape(w.shape)).astype(np.float32)))

    est = hutchinson_trace(loss, w.size, eps, probes=s.probes, rng=rng, check_probes=s.check_probes)
    trace = max(est.mean, 0.0)
    result.trace_per_param = trace / w.size
    result.trace_stderr = est.stderr / w.size
    result.step_ratio = est.step_ratio
    result.loss_range = est.loss_range
    result.evaluations += est.evaluations
    for precision in PRECISIONS[:2]:
        result.omega[precision] = 0.5 * result.trace_per_param * result.sq_error[precision]


# ------------------------------------------------------------------------------------------ driver
def _fingerprint(model: Model, units: list[Unit], settings: SensitivitySettings, target: str, kind: str,
                 feeds: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([dataclasses.asdict(settings), target, kind], sort_keys=True).encode())
    tensors = model.tensors()
    for unit in units:
        h.update(f"{unit.weight}|{unit.nodes}|{unit.shape}|{unit.scheme}".encode())
        h.update(np.ascontiguousarray(model.constant_value(tensors[unit.weight])).tobytes())
    for feed in feeds:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> SensitivityReport | None:
    if not path.exists():
        return None
    try:
        report = SensitivityReport.from_json(json.loads(path.read_text()), str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring sensitivity file %s: %s", path, e)
        return None
    if report.fingerprint != fingerprint:
        log.warning("sensitivity file %s was made for another model, data or settings: recomputing", path)
        return None
    log.info("sensitivity read from %s", path)
    return report


def write_report(report: SensitivityReport, path: str | Path) -> None:
    write_bytes_atomic(json.dumps(report.to_json(), indent=1).encode(), Path(path))


def analyze_sensitivity(model: Model, ctx: PassContext, settings: SensitivitySettings, units: list[Unit] | None = None,
                        cache_file: str | Path | None = None) -> SensitivityReport:
    """Omega per unit and precision, from the context's cache, the JSON file, or computed (and saved)."""
    if ctx.calibration is None:
        raise PreconditionError("sensitivity analysis needs calibration data")
    # The seed draws the Hutchinson probes; measured sensitivities do not depend on it.
    settings = dataclasses.replace(settings, seed=ctx.seed if settings.objective == "hessian" else 0)
    units = find_units(model) if units is None else units
    if not units:
        raise PreconditionError("no quantized weights in the plan: run 'plan' first (and quantize some layers)")
    feeds = list(ctx.calibration.head(settings.samples).batches(settings.batch_size))
    target, kind = loss_target(model, settings.loss)
    fingerprint = _fingerprint(model, units, settings, target, kind, feeds)
    cached = ctx.analyses.get(SensitivityReport)
    if cached is not None and cached.fingerprint == fingerprint:
        return cached
    report = _read_cache(Path(cache_file), fingerprint) if cache_file else None
    if report is None:
        start = time.perf_counter()
        model.toposort()
        proto = model.to_onnx()
        tensors = model.tensors()
        threads = ctx.threads
        layers, warnings = [], []
        desc = f"sensitivity ({settings.objective})"
        for unit in tqdm(units, desc=desc, unit="layer", disable=not ctx.progress, leave=False):
            w = np.asarray(model.constant_value(tensors[unit.weight]), np.float32)
            result = LayerSensitivity(unit.weight, unit.nodes, unit.params, {p: 0.0 for p in PRECISIONS}, {
                p: float(np.sum((quantized_weight(w, unit, p, settings.weight_method).astype(np.float64) - w) ** 2))
                for p in PRECISIONS})
            probe = UnitProbe(proto, unit.weight, target, feeds, threads)
            if probe.affects_output:
                reference = probe.run(w)
                result.evaluations += 1
                if settings.objective == "measured":
                    _measure_unit(probe, w, unit, settings, kind, reference, result)
                else:
                    _hessian_unit(probe, w, unit, settings, kind, reference, result, ctx.rng(f"hessian:{unit.weight}"))
                    if result.step_ratio is not None and not abs(result.step_ratio - 1.0) < 0.25:
                        warnings.append(f"{unit.weight}: Hutchinson step ratio {result.step_ratio:.3g} "
                                        "(eps may be outside the quadratic regime)")
            layers.append(result)
        report = SensitivityReport(settings, target, kind, fingerprint, layers, time.perf_counter() - start,
                                   warnings=warnings)
        log.info("sensitivity (%s) of %d layers in %.1fs", settings.objective, len(layers), report.seconds)
        if cache_file:
            write_report(report, cache_file)
    ctx.analyses.put(report)
    return report

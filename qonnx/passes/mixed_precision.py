"""mixed-precision: choose int4 / int8 / float per weight under size, BOPs or latency budgets (HAWQ-V3).

Runs after `plan` and before `calibrate`. Each planned weight (with the layers that read it: shared
weights are one unit) gets the precision that minimises the summed sensitivity (qonnx.sensitivity)
subject to the budgets, solved exactly as a binary ILP (qonnx.ilp). The decision is written into the
quant table: the weight entry's scheme gets 4 or 8 bits, and layers chosen float are re-planned as
excluded (qonnx.quantize.planning.replan_excluding), so calibrate, AdaRound and the exporters act on it.

Budgets are fractions or absolute values with a unit. By default a fraction interpolates between the
all-int4 (0) and all-int8 (1) totals, HAWQ's convention: size=0.5 is halfway between the two model
sizes. relative_to=int8 makes it a fraction of the all-int8 total instead (latency=1.1: at most 10%
slower than all-int8).

strategy=greedy and strategy=random are the baselines the ILP is measured against (`baseline_choice`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import numpy as np

from qonnx.analyses.activation_stats import ActivationStats, ChannelMeans
from qonnx.analyses.costs import PRECISIONS, CostTable, Unit, compute_costs, find_units
from qonnx.analyses.sensitivity import (
    LOSSES,
    OBJECTIVES,
    SensitivityReport,
    SensitivitySettings,
    analyze_sensitivity,
)
from qonnx.core.ir import Model
from qonnx.core.qtable import Role
from qonnx.errors import PreconditionError
from qonnx.export.micro import measure_latency_costs
from qonnx.infra.base import Pass, PassResult, option
from qonnx.infra.context import PassContext
from qonnx.numerics.ilp import InfeasibleBudget, budget_from_fraction, solve_precision_ilp
from qonnx.numerics.weight_ranges import WEIGHT_METHODS
from qonnx.quantize.planning import apply_plan, replan_excluding

log = logging.getLogger(__name__)

FLOAT_REASON = "mixed-precision: kept float"
STRATEGIES = ("ilp", "greedy", "random")
BUDGETS = ("size", "bops", "latency")
_UNITS = {
    "size": {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3},
    "bops": {"ops": 1.0, "kops": 1e3, "mops": 1e6, "gops": 1e9, "tops": 1e12},
    "latency": {"ms": 1.0, "us": 1e-3, "s": 1e3},
}


@dataclass(frozen=True)
class MixedPrecisionOptions:
    size: str = option("", "weight-size budget: a fraction (see relative_to) or bytes with a unit (3.5MB, 800kB, "
                           "2MiB, 120000B)")
    bops: str = option("", "bit-operations budget (MACs x weight bits x activation bits): a fraction or a count "
                           "with a unit (4.2Gops)")
    latency: str = option("", "latency budget (summed per-layer microbenchmarks in ORT, measured on this machine): "
                              "a fraction or a time (4.5ms)")
    relative_to: str = option("int4-int8", "what a fractional budget means: int4-int8 = 0 is the all-int4 total "
                                           "and 1 the all-int8 total (HAWQ); int8 = a fraction of the all-int8 total",
                              choices=("int4-int8", "int8"))
    objective: str = option("measured", "sensitivity: measured = output KL with only that layer quantized; "
                                        "hessian = 1/2 Tr(H)/n ||Q(W)-W||^2 with a Hutchinson trace",
                            choices=OBJECTIVES)
    strategy: str = option("ilp", "ilp = exact minimum of the summed sensitivity; greedy / random = baselines "
                                  "(promote the most sensitive / random layers from int4 while the budget allows)",
                           choices=STRATEGIES)
    precisions: tuple[str, ...] = option(("int4", "int8"), "choices per layer, separated by ';': int4, int8, float "
                                                           "(float: not for a Conv/Gemm with uint8 activations, "
                                                           "which ORT quantizes itself)")
    keep_8bit: tuple[str, ...] = option((), "layers pinned to int8, separated by ';': first, last, depthwise or "
                                            "node names")
    tie: tuple[str, ...] = option((), "groups of node names that take one precision, separated by ';', members "
                                      "joined by '+' (weights shared by several layers are tied already)")
    samples: int = option(16, "calibration samples for the sensitivity (the same ones for every layer)")
    weight_method: str = option("mse", "weight range method the sensitivity quantizes with (use calibrate's)",
                                choices=WEIGHT_METHODS)
    loss: str = option("auto", "output divergence: kl over the last axis (logits; a final Softmax is looked "
                               "through), mse (normalized), or auto", choices=LOSSES)
    probes: int = option(16, "hessian: Rademacher probes per layer")
    cache: str = option("", "JSON file of sensitivities: reused when it matches the model, data and settings, "
                            "else computed and written there")


# ------------------------------------------------------------------------------------------ budgets
def parse_budget(kind: str, text: str) -> tuple[float, bool]:
    """(value, absolute): a bare number is a fraction; a number with one of the kind's units is absolute."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise PreconditionError(f"pass 'mixed-precision': {kind}='{text}' is not a number with an optional unit")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        return value, False
    factors = _UNITS[kind]
    if unit not in factors:
        raise PreconditionError(f"pass 'mixed-precision': unknown {kind} unit '{m.group(2)}' "
                                f"(units: {', '.join(factors)}; no unit = a fraction)")
    return value * factors[unit], True


def absolute_budgets(opts: MixedPrecisionOptions, costs: dict[str, np.ndarray],
                     precisions: tuple[str, ...]) -> dict[str, float]:
    """The options' budgets in the costs' units ([U, P] matrices over `precisions`)."""
    out = {}
    for kind in BUDGETS:
        text = getattr(opts, kind)
        if not text:
            continue
        value, absolute = parse_budget(kind, text)
        if absolute:
            out[kind] = value
            continue
        if "int8" not in precisions or (opts.relative_to == "int4-int8" and "int4" not in precisions):
            raise PreconditionError(f"pass 'mixed-precision': a fractional {kind} budget relative to "
                                    f"{opts.relative_to} needs those precisions among {';'.join(precisions)}")
        low = precisions.index("int4") if opts.relative_to == "int4-int8" else None
        out[kind] = budget_from_fraction(costs[kind], value, precisions.index("int8"), low)
    return out


# ------------------------------------------------------------------------------------------ pins, ties
def _unit_of_node(units: list[Unit]) -> dict[str, int]:
    return {node: i for i, u in enumerate(units) for node in u.nodes}


def pins_and_ties(model: Model, units: list[Unit], opts: MixedPrecisionOptions,
                  precisions: tuple[str, ...]) -> tuple[dict[int, int], list[list[int]]]:
    of_node = _unit_of_node(units)
    pins: dict[int, int] = {}
    if opts.keep_8bit:
        if "int8" not in precisions:
            raise PreconditionError("pass 'mixed-precision': keep_8bit needs int8 among the precisions")
        nodes = {n.name: n for n in model.nodes}
        for item in opts.keep_8bit:
            if item == "first":
                hits = [0]
            elif item == "last":
                hits = [len(units) - 1]
            elif item == "depthwise":
                hits = [i for i, u in enumerate(units) if u.ops[0] == "Conv" and u.shape[1] == 1
                        and int(nodes[u.nodes[0]].attrs.get("group", 1)) > 1]
            elif item in of_node:
                hits = [of_node[item]]
            else:
                raise PreconditionError(f"pass 'mixed-precision': keep_8bit names '{item}', which is neither "
                                        "first, last, depthwise nor a quantized layer")
            pins.update({i: precisions.index("int8") for i in hits})
    ties = []
    for group in opts.tie:
        members = [m for m in group.split("+") if m]
        unknown = [m for m in members if m not in of_node]
        if unknown:
            raise PreconditionError(f"pass 'mixed-precision': tie names '{unknown[0]}', which is not a quantized layer")
        ties.append(sorted({of_node[m] for m in members}))
    return pins, ties


# ------------------------------------------------------------------------------------------ baselines
def baseline_choice(kind: str, omega: np.ndarray, costs: dict[str, np.ndarray], budgets: dict[str, float],
                    pins: dict[int, int] | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """A greedy or random configuration within the budgets (the baselines the ILP is compared with).

    Every unit starts at its cheapest choice (int4, in the order of `costs` of the first budget); then,
    in order of decreasing sensitivity at that choice (greedy) or in a seeded random order (random),
    each unit is promoted to its least sensitive choice whose extra cost still fits every budget.
    Pinned units keep their pin. Raises InfeasibleBudget when even the cheapest configuration does not fit.
    """
    omega = np.asarray(omega, np.float64)
    pins = dict(pins or {})
    if not budgets:
        raise PreconditionError("a baseline configuration needs at least one budget")
    first = costs[next(iter(budgets))]
    choice = np.argmin(first, axis=1)
    for unit, pin in pins.items():
        choice[unit] = pin
    rows = np.arange(len(choice))
    totals = {k: float(costs[k][rows, choice].sum()) for k in budgets}
    over = [k for k in budgets if totals[k] > budgets[k] * (1 + 1e-12)]
    if over:
        raise InfeasibleBudget(f"infeasible budget: {over[0]} = {budgets[over[0]]:.6g} is below the cheapest "
                               f"configuration's {totals[over[0]]:.6g}", budgets, totals, over)
    free = [i for i in rows if i not in pins]
    if kind == "greedy":
        order = sorted(free, key=lambda i: -omega[i, choice[i]])
    elif kind == "random":
        order = list((rng or np.random.default_rng(0)).permutation(free))
    else:
        raise ValueError(f"unknown baseline '{kind}' (greedy or random)")
    for i in order:
        for k in np.argsort(omega[i], kind="stable"):
            if omega[i, k] >= omega[i, choice[i]]:
                break
            extra = {b: costs[b][i, k] - costs[b][i, choice[i]] for b in budgets}
            if all(totals[b] + extra[b] <= budgets[b] * (1 + 1e-12) for b in budgets):
                for b in budgets:
                    totals[b] += extra[b]
                choice[i] = k
                break
    return choice


def runs_int8_anyway(unit: Unit) -> bool:
    """True when "float" is no real choice for this unit: a Conv/Gemm between quantized activations.

    ORT's WeightBiasQuantization transformer (onnxruntime/core/optimizer/qdq_transformer) quantizes
    the float weight of a Conv/Gemm whose input comes from a DequantizeLinear and whose output goes to
    a QuantizeLinear, to per-tensor int8 (worse than our per-channel int8), and runs a QLinearConv.
    Checked with ORT 1.32: `plan{exclude=[...]}` on a Conv between quantized layers gives a QLinearConv.
    """
    return unit.activations_quantized and any(op in ("Conv", "Gemm") for op in unit.ops)


# ------------------------------------------------------------------------------------------ applying
def _restore_plan(model: Model) -> None:
    """Undo an earlier run's float exclusions so that a re-run sees the same layers (idempotence)."""
    table = model.quant
    mine = {n for n, reason in table.kept_float.items() if reason.startswith(FLOAT_REASON)}
    if not mine or table.plan_options is None:
        return
    others = {k: v for k, v in table.kept_float.items() if k not in mine}
    base = table.plan_options
    apply_plan(model, dataclasses.replace(base, exclude=tuple(sorted(set(base.exclude) - mine))))
    table.kept_float.update(others)


def apply_choice(model: Model, units: list[Unit], precision_of: dict[str, str]) -> None:
    """Write weight precision -> the quant table: bits on the weight schemes, float layers re-planned."""
    float_nodes = {node: FLOAT_REASON for u in units if precision_of[u.weight] == "float" for node in u.nodes}
    if float_nodes:
        replan_excluding(model, float_nodes)
    for unit in units:
        precision = precision_of[unit.weight]
        if precision == "float":
            continue
        entry = model.quant.get(unit.weight)
        if entry is None or entry.role is not Role.WEIGHT:
            raise PreconditionError(f"pass 'mixed-precision': weight '{unit.weight}' left the plan when other "
                                    "layers were kept float")
        scheme = unit.scheme_at(precision)
        assert scheme is not None  # only "float" has no scheme, skipped above
        entry.scheme = scheme


def _state(model: Model) -> tuple:
    table = model.quant
    return (tuple(sorted((n, e.scheme) for n, e in table.of_role(Role.WEIGHT).items())),
            tuple(sorted(table.kept_float.items())))


def _costs(model: Model, ctx: PassContext, units: list[Unit], need_latency: bool, precisions: tuple[str, ...]
           ) -> CostTable:
    cached = ctx.analyses.get(CostTable)
    table = cached if cached is not None and tuple(cached.units) == tuple(units) else compute_costs(model, ctx, units)
    if need_latency and (table.latency is None or np.isnan(table.matrix("latency", precisions)).any()):
        measure_latency_costs(model, ctx, table, precisions)
    ctx.analyses.put(table)
    return table


class MixedPrecision(Pass):
    name = "mixed-precision"
    summary = "choose int4/int8/float per weight minimising the summed sensitivity under size/BOPs/latency budgets"
    Options = MixedPrecisionOptions
    requires = frozenset({"plan", "calibration-data"})
    provides = frozenset({"mixed-precision"})
    forbidden_after = {"calibrated": "it changes weight bit widths: run it before calibrate",
                       "rounded": "weights are already rounded: run it before calibrate and adaround"}
    preserves = frozenset({SensitivityReport, CostTable, ActivationStats, ChannelMeans})
    exact = True
    edits_graph = False

    def _precisions(self) -> tuple[str, ...]:
        chosen = tuple(dict.fromkeys(self.options.precisions))
        unknown = sorted(set(chosen) - set(PRECISIONS))
        if unknown or not chosen:
            raise PreconditionError(f"pass 'mixed-precision': precisions must be among {', '.join(PRECISIONS)}, "
                                    f"got {';'.join(self.options.precisions) or 'none'}")
        return tuple(p for p in PRECISIONS if p in chosen)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        precisions = self._precisions()
        if not any(getattr(opts, k) for k in BUDGETS):
            raise PreconditionError("pass 'mixed-precision' needs a budget: size, bops or latency "
                                    "(e.g. mixed-precision{size=0.5})")
        before = _state(model)
        _restore_plan(model)
        units = find_units(model)
        if not units:
            return PassResult(model, _state(model) != before, {"layers": 0})
        costs = _costs(model, ctx, units, bool(opts.latency), precisions)
        cost_mats = {k: costs.matrix(k, precisions) for k in BUDGETS if getattr(opts, k) or k != "latency"}
        budgets = absolute_budgets(opts, cost_mats, precisions)
        settings = SensitivitySettings(opts.objective, opts.samples, weight_method=opts.weight_method,
                                       loss=opts.loss, probes=opts.probes)
        report = analyze_sensitivity(model, ctx, settings, units, opts.cache or None)
        omega = report.omega(units, precisions)
        if "float" in precisions:
            omega[:, precisions.index("float")] = [np.inf if runs_int8_anyway(u) else 0.0 for u in units]
        pins, ties = pins_and_ties(model, units, opts, precisions)
        stats: dict = {"objective": opts.objective, "strategy": opts.strategy, "layers": len(units),
                       "sensitivity_seconds": round(report.seconds, 2), "sensitivity_source": report.source}
        if report.warnings:
            stats["sensitivity_warnings"] = len(report.warnings)
        try:
            if opts.strategy == "ilp":
                result = solve_precision_ilp(omega, cost_mats, budgets, ties=ties, pins=pins)
                choice = result.choice
                stats.update(ilp_seconds=round(result.seconds, 3), optimal=result.optimal)
            else:
                if ties:
                    raise PreconditionError(f"pass 'mixed-precision': strategy={opts.strategy} does not support tie")
                choice = baseline_choice(opts.strategy, omega, cost_mats, budgets, pins,
                                         ctx.rng(f"mixed-precision:{opts.strategy}"))
        except InfeasibleBudget as e:
            raise InfeasibleBudget(f"pass 'mixed-precision': {e}{self._hint(e, cost_mats, precisions)}",
                                   e.budgets, e.smallest, e.violated) from e
        precision_of = {u.weight: precisions[k] for u, k in zip(units, choice)}
        apply_choice(model, units, precision_of)
        rows = np.arange(len(units))
        for p in precisions:
            stats[p] = int(sum(v == p for v in precision_of.values()))
        for kind, mat in cost_mats.items():
            stats[f"{kind}_total"] = float(mat[rows, choice].sum())
            if kind in budgets:
                stats[f"{kind}_budget"] = float(budgets[kind])
        stats["predicted_omega"] = float(omega[rows, choice].sum())
        for i, (unit, k) in enumerate(zip(units, choice)):
            log.debug("mixed-precision: %s (%s) -> %s, omega %.3g", unit.weight, ",".join(unit.nodes),
                      precisions[k], omega[i, k])
        return PassResult(model, _state(model) != before, stats)

    def _hint(self, e: InfeasibleBudget, costs: dict[str, np.ndarray], precisions: tuple[str, ...]) -> str:
        """The smallest feasible value as a fraction too, in the options' own terms."""
        parts = []
        for kind in e.violated:
            if "int8" not in precisions:
                continue
            high = float(costs[kind][:, precisions.index("int8")].sum())
            if self.options.relative_to == "int4-int8" and "int4" in precisions:
                low = float(costs[kind][:, precisions.index("int4")].sum())
                frac = (e.smallest[kind] - low) / (high - low) if high != low else 0.0
            else:
                frac = e.smallest[kind] / high
            parts.append(f"{kind} >= {frac:.4g} (relative_to={self.options.relative_to})")
        return f"; smallest feasible: {', '.join(parts)}" if parts else ""


"""Mixed-precision assignment as a binary ILP (HAWQ-V3, algorithms.md §6.2), solved exactly by HiGHS.

One precision choice k per layer i. With binary variables x[i, k]:

    minimise    sum_{i,k} omega[i,k] x[i,k]
    subject to  sum_k x[i,k] = 1                              one choice per layer
                sum_{i,k} cost_c[i,k] x[i,k] <= budget_c      each budgeted cost c (size, BOPs, latency, ...)
                x[i,k] = x[j,k]                               tied layers i, j share their choice
                x[i,k] = [k == pin_i]                         pinned layers
                x[i,k] = 0                                    where choice k is not allowed for layer i

Ties are imposed by contraction, which is equivalent to the equality rows x[i,k] = x[j,k]: every tie
group becomes one "super-layer" whose omega and costs are the sums over its members and whose allowed
choices are the intersection of its members' (and of their pins). The feasible sets are in bijection,
the problem gets smaller, and the smallest achievable total of one cost alone becomes a closed form:
the sum over groups of the group's cheapest allowed choice. Pins and disallowed choices are upper
bounds of 0 on variables.

Numerics: HiGHS stops on an absolute gap (1e-6) as well as on the relative one we set to 0, so tiny
sensitivities (Tr(H)/n ||dW||^2 is often 1e-8) would stop the search early. We therefore shift each
group's objective by its minimum (a constant, since each group takes exactly one choice) and scale it
to a maximum of 1; cost rows get the same shift-and-scale so that BOP counts around 1e9 and sizes
around 1e3 are equally well conditioned. Totals and the objective are reported in the original units.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from qonnx.errors import QonnxError

log = logging.getLogger(__name__)

# Relative slack when comparing a budget with the smallest achievable total: a budget computed as
# "1.0 x the all-int8 total" sums the same numbers in another order, so it can differ by a few ulps.
_BUDGET_RTOL = 1e-9


class InfeasibleBudget(QonnxError, ValueError):
    """No assignment meets the budgets under the ties, pins and allowed choices.

    `smallest[name]` is the smallest total that cost `name` alone can reach under the ties, pins and
    allowed choices (the other budgets are ignored for it). `violated` names the budgets below their
    smallest achievable value; it is empty when each budget can be met alone but not all together.
    """

    def __init__(
        self, message: str, budgets: Mapping[str, float], smallest: Mapping[str, float], violated: Sequence[str]
    ) -> None:
        super().__init__(message)
        self.budgets = dict(budgets)
        self.smallest = dict(smallest)
        self.violated = tuple(violated)


class IlpSolverError(QonnxError, RuntimeError):
    """HiGHS stopped without any feasible assignment (time limit, or a solver failure)."""


@dataclass(frozen=True)
class IlpResult:
    """The chosen precision per layer and what it costs.

    `optimal` is False only when the time limit stopped HiGHS with a feasible but unproven assignment.
    """

    choice: np.ndarray  # [L] int64, the choice index of each layer
    objective: float  # sum_i omega[i, choice[i]], original units
    totals: dict[str, float]  # sum_i cost[i, choice[i]] for every named cost (budgeted or not)
    budgets: dict[str, float]  # the absolute budgets that were imposed
    optimal: bool
    status: int  # scipy.optimize.milp status (0 = optimal, 1 = limit reached); 0 for trivial problems
    message: str
    seconds: float  # wall time of the whole call (validation, model build, solve)
    smallest: dict[str, float] = field(default_factory=dict)  # smallest achievable total per budgeted cost


# --------------------------------------------------------------------------- budgets
def reference_total(cost: np.ndarray, reference: int | Sequence[int] | np.ndarray) -> float:
    """Total of `cost` [L, K] when every layer takes choice `reference` (an int, or one index per layer)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D [layers, choices] array, got shape {cost.shape}")
    n_layers, n_choices = cost.shape
    ref = np.broadcast_to(np.asarray(reference), (n_layers,))
    if not np.issubdtype(ref.dtype, np.integer) or ref.min(initial=0) < 0 or ref.max(initial=0) >= n_choices:
        raise ValueError(f"reference choice(s) must be integers in [0, {n_choices}), got {reference!r}")
    picked = cost[np.arange(n_layers), ref]
    if not np.all(np.isfinite(picked)):
        bad = int(np.flatnonzero(~np.isfinite(picked))[0])
        raise ValueError(f"cost at the reference choice is not finite for layer {bad}: {picked[bad]}")
    return float(picked.sum())


def budget_from_fraction(
    cost: np.ndarray,
    fraction: float,
    reference: int | Sequence[int] | np.ndarray,
    low: int | Sequence[int] | np.ndarray | None = None,
) -> float:
    """Absolute budget from a fraction.

    Without `low`: `fraction x total at reference` ("0.6 of the all-int8 size").
    With `low`: HAWQ's interpolation `total(low) + fraction x (total(reference) - total(low))`,
    so 0 means the all-`low` total and 1 the all-`reference` total.
    """
    if not np.isfinite(fraction):
        raise ValueError(f"fraction must be finite, got {fraction}")
    high_total = reference_total(cost, reference)
    if low is None:
        return float(fraction) * high_total
    low_total = reference_total(cost, low)
    return low_total + float(fraction) * (high_total - low_total)


# --------------------------------------------------------------------------- validation
def _as_matrix(name: str, values: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [layers, choices] array, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (the shape of omega)")
    return arr


def _allowed_mask(omega: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Validate omega (no NaN, nothing negative) and combine `allowed` with omega's +inf entries."""
    if omega.shape[0] == 0 or omega.shape[1] == 0:
        raise ValueError(f"omega must have at least one layer and one choice, got shape {omega.shape}")
    nan = np.argwhere(np.isnan(omega))
    if nan.size:
        i, k = nan[0]
        raise ValueError(f"omega is NaN at layer {i}, choice {k} (use np.inf or `allowed` to forbid a choice)")
    neg = np.argwhere(omega < 0)
    if neg.size:
        i, k = neg[0]
        raise ValueError(f"omega is negative at layer {i}, choice {k}: {omega[i, k]} (sensitivities are >= 0)")
    mask = np.isfinite(omega)
    if allowed is not None:
        allowed = np.asarray(allowed)
        if allowed.shape != omega.shape:
            raise ValueError(f"allowed has shape {allowed.shape}, expected {omega.shape} (the shape of omega)")
        if allowed.dtype != np.bool_:
            raise ValueError(f"allowed must be a boolean mask, got dtype {allowed.dtype}")
        mask &= allowed
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"layer {int(empty[0])} has no allowed choice (all masked or omega = inf)")
    return mask


def _check_index(what: str, value: object, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < size:
        raise ValueError(f"{what} must be an integer in [0, {size}), got {value!r}")
    return int(value)


def _group_ids(n_layers: int, ties: Iterable[Sequence[int]]) -> np.ndarray:
    """Union-find over tie groups: group id per layer, numbered by first member (overlapping ties merge)."""
    parent = list(range(n_layers))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tie in ties:
        members = [_check_index("tied layer index", m, n_layers) for m in tie]
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(n_layers)])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def _pin_mask(mask: np.ndarray, groups: np.ndarray, pins: Mapping[int, int]) -> np.ndarray:
    """Restrict each pinned layer's allowed set to its pin; conflicting pins in a tie group are errors."""
    n_layers, n_choices = mask.shape
    mask = mask.copy()
    pinned_by_group: dict[int, tuple[int, int]] = {}
    for layer, choice in pins.items():
        layer = _check_index("pinned layer index", layer, n_layers)
        choice = _check_index(f"pin of layer {layer}", choice, n_choices)
        if not mask[layer, choice]:
            raise ValueError(f"layer {layer} is pinned to choice {choice}, which is not allowed for it")
        g = int(groups[layer])
        if g in pinned_by_group and pinned_by_group[g][1] != choice:
            other, other_choice = pinned_by_group[g]
            raise ValueError(
                f"tied layers {other} and {layer} are pinned to different choices ({other_choice} and {choice})"
            )
        pinned_by_group[g] = (layer, choice)
        mask[layer] = False
        mask[layer, choice] = True
    return mask


def _contract(values: np.ndarray, groups: np.ndarray, n_groups: int, mask: np.ndarray) -> np.ndarray:
    """Sum rows of `values` per group; entries masked out anywhere in a group do not matter (set 0)."""
    out = np.zeros((n_groups, values.shape[1]))
    np.add.at(out, groups, np.where(mask, values, 0.0))
    return out


# --------------------------------------------------------------------------- solver
@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while HiGHS runs.

    HiGHS 1.12 (scipy 1.17) printf()s a leftover debug line
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();" to stdout whenever it
    repairs a solution mapped back from presolve (ERGO-Code/HiGHS#2783), even with disp=False. That
    would corrupt machine-readable stdout (CLI JSON), so it goes to stderr with the logs instead.
    Nothing is lost: anything else written to fd 1 meanwhile also lands on stderr.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (AttributeError, OSError, ValueError):
        yield  # no usable fd 1 (embedded interpreter, closed stdout): nothing to protect
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class _Problem:
    """The contracted problem: one row per tie group."""

    groups: np.ndarray  # [L] group id per layer
    mask: np.ndarray  # [G, K] allowed choices per group (ties, pins, allowed, omega finite)
    omega: np.ndarray  # [G, K] summed sensitivities (0 where masked)
    costs: dict[str, np.ndarray]  # name -> [G, K] summed costs (0 where masked)


def _build(
    omega: np.ndarray,
    costs: Mapping[str, np.ndarray],
    budgets: Mapping[str, float],
    ties: Iterable[Sequence[int]],
    pins: Mapping[int, int],
    allowed: np.ndarray | None,
) -> tuple[_Problem, dict[str, np.ndarray], dict[str, float]]:
    omega = _as_matrix("omega", omega)
    layer_mask = _allowed_mask(omega, allowed)
    cost_arrays = {name: _as_matrix(f"cost '{name}'", c, omega.shape) for name, c in costs.items()}
    for name, c in cost_arrays.items():
        bad = np.argwhere(layer_mask & ~np.isfinite(c))
        if bad.size:
            i, k = bad[0]
            raise ValueError(f"cost '{name}' is not finite at layer {i}, choice {k}, an allowed choice: {c[i, k]}")
    abs_budgets: dict[str, float] = {}
    for name, b in budgets.items():
        if name not in cost_arrays:
            raise ValueError(f"budget given for unknown cost '{name}' (costs: {sorted(cost_arrays)})")
        if np.isnan(b):
            raise ValueError(f"budget '{name}' is NaN")
        abs_budgets[name] = float(b)

    groups = _group_ids(omega.shape[0], ties)
    n_groups = int(groups.max()) + 1
    layer_mask = _pin_mask(layer_mask, groups, pins)
    group_mask = np.ones((n_groups, omega.shape[1]), dtype=bool)
    np.logical_and.at(group_mask, groups, layer_mask)
    empty = np.flatnonzero(~group_mask.any(axis=1))
    if empty.size:
        members = np.flatnonzero(groups == empty[0]).tolist()
        raise ValueError(f"tied layers {members} have no allowed choice in common (after pins)")
    # Contract with the group mask so that a choice one member forbids never contributes.
    full_mask = group_mask[groups]
    problem = _Problem(
        groups=groups,
        mask=group_mask,
        omega=_contract(omega, groups, n_groups, full_mask),
        costs={name: _contract(c, groups, n_groups, full_mask) for name, c in cost_arrays.items()},
    )
    return problem, cost_arrays, abs_budgets


def _smallest(cost: np.ndarray, mask: np.ndarray) -> float:
    """Smallest total of one cost under ties, pins and allowed choices: each group's cheapest allowed choice."""
    return float(np.where(mask, cost, np.inf).min(axis=1).sum())


def _check_budgets(problem: _Problem, budgets: Mapping[str, float]) -> dict[str, float]:
    """Raise InfeasibleBudget for budgets below their smallest achievable total; return those totals."""
    smallest = {name: _smallest(problem.costs[name], problem.mask) for name in budgets}
    violated = [
        name
        for name, b in budgets.items()
        if smallest[name] > b + _BUDGET_RTOL * max(abs(b), abs(smallest[name]), 1e-300)
    ]
    if violated:
        parts = [f"'{n}' = {budgets[n]:.6g} is below the smallest achievable {smallest[n]:.6g}" for n in violated]
        raise InfeasibleBudget(
            "infeasible budget: " + "; ".join(parts) + " (smallest under ties, pins and allowed choices)",
            budgets,
            smallest,
            violated,
        )
    return smallest


def _shift_scale(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-group shift to a minimum of 0 and a global scale to a maximum of 1 (see module docstring).

    Returns (scaled, total shift, scale) with: original total = total shift + scale * scaled total.
    """
    lows = np.where(mask, values, np.inf).min(axis=1, keepdims=True)
    shifted = np.where(mask, values - lows, 0.0)
    scale = float(shifted.max())
    if scale <= 0.0:
        scale = 1.0
    return shifted / scale, float(lows.sum()), scale


def _solve_contracted(
    problem: _Problem, budgets: Mapping[str, float], smallest: Mapping[str, float], time_limit: float
) -> tuple[np.ndarray, bool, int, str]:
    """Run HiGHS on the contracted problem; return (choice per group, optimal, status, message)."""
    n_groups, n_choices = problem.mask.shape
    if np.all(problem.mask.sum(axis=1) == 1):
        # Everything is decided by pins/masks; the budget check already proved feasibility.
        return problem.mask.argmax(axis=1), True, 0, "trivial: every layer has a single allowed choice"

    n_vars = n_groups * n_choices
    c, _, _ = _shift_scale(problem.omega, problem.mask)
    rows = np.repeat(np.arange(n_groups), n_choices)
    one_hot = csr_matrix((np.ones(n_vars), (rows, np.arange(n_vars))), shape=(n_groups, n_vars))
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    for name, budget in budgets.items():
        row, shift, scale = _shift_scale(problem.costs[name], problem.mask)
        if not np.isfinite(budget) or np.all(row == 0):
            continue  # unconstrained, or constant: feasibility already checked in closed form
        # A budget within rounding of the smallest achievable total must not go (slightly) negative.
        rhs = max((budget - shift) / scale, 0.0)
        constraints.append(LinearConstraint(row.reshape(1, -1), -np.inf, rhs))
    upper = problem.mask.ravel().astype(np.float64)
    with _stdout_to_stderr():
        # Presolve stays on: it halves the median time and the worst case on HAWQ-like instances.
        res = milp(
            c.ravel(),
            constraints=constraints,
            integrality=np.ones(n_vars),
            bounds=Bounds(np.zeros(n_vars), upper),
            options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "disp": False},
        )
    if res.status == 2:
        names = ", ".join(f"'{n}'" for n in budgets)
        detail = ", ".join(f"{n} >= {smallest[n]:.6g} (budget {budgets[n]:.6g})" for n in budgets)
        raise InfeasibleBudget(
            f"infeasible budgets: {names} cannot be met together, although each can alone "
            f"(smallest achievable, under ties, pins and allowed choices: {detail})",
            budgets,
            smallest,
            (),
        )
    if res.x is None:
        raise IlpSolverError(f"HiGHS found no assignment (status {res.status}): {res.message}")
    if res.status != 0:
        log.warning("ILP stopped before proving optimality (status %d, gap %s): %s", res.status,
                    getattr(res, "mip_gap", None), res.message)
    choice = np.round(res.x).reshape(n_groups, n_choices).argmax(axis=1)
    return choice, res.status == 0, int(res.status), str(res.message)


def solve_precision_ilp(
    omega: np.ndarray,
    costs: Mapping[str, np.ndarray] | None = None,
    budgets: Mapping[str, float] | None = None,
    ties: Iterable[Sequence[int]] = (),
    pins: Mapping[int, int] | None = None,
    allowed: np.ndarray | None = None,
    time_limit: float = 60.0,
) -> IlpResult:
    """Choose one precision per layer minimising total sensitivity under budgets (exact, HiGHS).

    omega: [L, K] sensitivity of layer i at choice k, >= 0; +inf forbids the choice.
    costs: named [L, K] cost matrices ("size", "bops", "latency", ...), finite where allowed.
    budgets: absolute upper bounds for any subset of `costs` (see `budget_from_fraction`).
    ties: groups of layer indices that must take the same choice (overlapping groups merge).
    pins: layer index -> the choice it must take.
    allowed: optional boolean [L, K] mask of the choices each layer may take.

    Raises ValueError for malformed input, InfeasibleBudget (a ValueError) when no assignment meets
    the budgets, IlpSolverError when HiGHS stops without any assignment.
    """
    start = time.perf_counter()
    costs = dict(costs or {})
    budgets = dict(budgets or {})
    problem, cost_arrays, budgets = _build(omega, costs, budgets, ties, dict(pins or {}), allowed)
    smallest = _check_budgets(problem, budgets)
    group_choice, optimal, status, message = _solve_contracted(problem, budgets, smallest, time_limit)

    choice = group_choice[problem.groups].astype(np.int64)
    layers = np.arange(choice.size)
    omega = np.asarray(omega, dtype=np.float64)
    totals = {name: float(c[layers, choice].sum()) for name, c in cost_arrays.items()}
    for name, b in budgets.items():
        # HiGHS works to a feasibility tolerance of ~1e-7 on the scaled row; more than that is a bug.
        if totals[name] > b + 1e-6 * max(abs(b), 1.0):
            log.warning("ILP solution exceeds budget '%s': %.9g > %.9g", name, totals[name], b)
    seconds = time.perf_counter() - start
    log.debug("ILP: %d layers x %d choices, %d budgets, %.3f s, %s", *omega.shape, len(budgets), seconds, message)
    return IlpResult(
        choice=choice,
        objective=float(omega[layers, choice].sum()),
        totals=totals,
        budgets=budgets,
        optimal=optimal,
        status=status,
        message=message,
        seconds=seconds,
        smallest=smallest,
    )


# --------------------------------------------------------------------------- benchmark
def random_hawq_instance(
    layers: int = 200, choices: int = 3, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """A HAWQ-like instance: omega = Tr/n * n * (quant error ~ 4^-bits), size and BOPs at fractions of all-max.

    Bit-widths are spread over [4, 8]; the size budget is 0.6 and the BOPs budget 0.45 of the all-8-bit
    totals (between the all-4-bit totals, 0.5 and 0.25, and 1), so the instance is feasible and tight.
    """
    rng = np.random.default_rng(seed)
    bits = np.round(np.linspace(4, 8, choices)) if choices > 1 else np.array([8.0])
    params = np.exp(rng.uniform(np.log(1e3), np.log(1e6), layers))
    macs = params * np.exp(rng.uniform(np.log(10), np.log(1000), layers))
    trace_per_param = np.exp(rng.normal(0.0, 2.0, layers))
    sq_err = params[:, None] * 4.0 ** (-bits[None, :]) * rng.uniform(0.8, 1.2, (layers, choices))
    omega = trace_per_param[:, None] * sq_err
    costs = {"size": params[:, None] * bits[None, :] / 8, "bops": macs[:, None] * bits[None, :] ** 2}
    top = choices - 1
    budgets = {
        "size": budget_from_fraction(costs["size"], 0.6, top),
        "bops": budget_from_fraction(costs["bops"], 0.45, top),
    }
    return omega, costs, budgets


def benchmark_ilp(layers: int = 200, choices: int = 3, seed: int = 0, repeats: int = 5) -> float:
    """Median wall time in seconds of `solve_precision_ilp` on `random_hawq_instance` (size + BOPs budgets)."""
    omega, costs, budgets = random_hawq_instance(layers, choices, seed)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        solve_precision_ilp(omega, costs, budgets)
        times.append(time.perf_counter() - start)
    return float(np.median(times))

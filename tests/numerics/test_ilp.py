"""qonnx.ilp against brute-force enumeration on small random instances (algorithms.md §6.4 item 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from qonnx.numerics.ilp import (
    IlpResult,
    InfeasibleBudget,
    benchmark_ilp,
    budget_from_fraction,
    random_hawq_instance,
    reference_total,
    solve_precision_ilp,
)


@dataclass
class Instance:
    omega: np.ndarray
    costs: dict[str, np.ndarray]
    budgets: dict[str, float] = field(default_factory=dict)
    ties: list[list[int]] = field(default_factory=list)
    pins: dict[int, int] = field(default_factory=dict)
    allowed: np.ndarray | None = None

    def solve(self) -> IlpResult:
        return solve_precision_ilp(self.omega, self.costs, self.budgets, self.ties, self.pins, self.allowed)


def all_configs(n_layers: int, n_choices: int) -> np.ndarray:
    """Every assignment as rows of an [K^L, L] int array."""
    return np.stack(np.unravel_index(np.arange(n_choices**n_layers), (n_choices,) * n_layers), axis=1)


def structurally_feasible(inst: Instance, configs: np.ndarray) -> np.ndarray:
    """Configs that respect the allowed mask, omega = inf, ties and pins (budgets ignored)."""
    layers = np.arange(inst.omega.shape[0])
    allowed = np.isfinite(inst.omega) if inst.allowed is None else inst.allowed & np.isfinite(inst.omega)
    ok = allowed[layers, configs].all(axis=1)
    for tie in inst.ties:
        ok &= (configs[:, tie] == configs[:, [tie[0]]]).all(axis=1)
    for layer, choice in inst.pins.items():
        ok &= configs[:, layer] == choice
    return ok


def totals(matrix: np.ndarray, configs: np.ndarray) -> np.ndarray:
    layers = np.arange(matrix.shape[0])
    return np.where(np.isfinite(matrix), matrix, 0.0)[layers, configs].sum(axis=1)


def random_instance(rng: np.random.Generator) -> Instance:
    n_layers = int(rng.integers(3, 11))
    n_choices = int(rng.integers(2, 4))
    omega = rng.uniform(0.0, 1.0, (n_layers, n_choices))
    names = ["size", "bops"][: int(rng.integers(1, 3))]
    costs = {name: rng.uniform(0.5, 10.0, (n_layers, n_choices)) for name in names}
    costs["latency"] = rng.uniform(0.0, 1.0, (n_layers, n_choices))  # reported, never budgeted
    order = rng.permutation(n_layers)
    ties, start = [], 0
    for _ in range(int(rng.integers(0, 3))):
        size = int(rng.integers(2, 4))
        if start + size <= n_layers:
            ties.append(sorted(order[start : start + size].tolist()))
            start += size
    pins = {}
    for layer in rng.choice(n_layers, size=int(rng.integers(0, 3)), replace=False).tolist():
        tie = next((t for t in ties if layer in t), [layer])
        if not any(m in pins for m in tie):  # conflicting pins are tested separately
            pins[layer] = int(rng.integers(n_choices))
    allowed = None
    if rng.random() < 0.4:
        allowed = rng.random((n_layers, n_choices)) < 0.8
        allowed[np.arange(n_layers), rng.integers(n_choices, size=n_layers)] = True
        for layer, choice in pins.items():
            allowed[layer, choice] = True
    if rng.random() < 0.3:
        layer = int(rng.integers(n_layers))
        if layer not in pins:
            omega[layer, int(rng.integers(n_choices))] = np.inf
    return Instance(omega, costs, {}, ties, pins, allowed)


def set_budgets(inst: Instance, rng: np.random.Generator, feasible: np.ndarray, configs: np.ndarray) -> None:
    """Budgets between a bit below the smallest and well inside the range of structurally feasible totals."""
    for name in [n for n in inst.costs if n != "latency"]:
        t = totals(inst.costs[name], configs[feasible])
        inst.budgets[name] = float(t.min() + rng.uniform(-0.1, 0.6) * (t.max() - t.min()))


def check_choice(inst: Instance, choice: np.ndarray) -> None:
    """Ties, pins, allowed choices and budgets hold for `choice`."""
    assert structurally_feasible(inst, choice[None, :])[0]
    for name, budget in inst.budgets.items():
        assert totals(inst.costs[name], choice[None, :])[0] <= budget + 1e-9 * abs(budget)


def compare_with_brute_force(inst: Instance, configs: np.ndarray) -> str:
    """Solve and compare with enumeration; return the outcome ("optimal", "violated", "joint")."""
    feasible = structurally_feasible(inst, configs)
    within = feasible.copy()
    for name, budget in inst.budgets.items():
        within &= totals(inst.costs[name], configs) <= budget
    smallest = {name: totals(inst.costs[name], configs[feasible]).min() for name in inst.budgets}

    if not within.any():
        with pytest.raises(InfeasibleBudget) as info:
            inst.solve()
        for name in inst.budgets:
            assert info.value.smallest[name] == pytest.approx(smallest[name], rel=1e-12)
        expected = [n for n in inst.budgets if smallest[n] > inst.budgets[n]]
        assert sorted(info.value.violated) == sorted(expected)
        for name in expected:
            assert f"'{name}'" in str(info.value) and f"{smallest[name]:.6g}" in str(info.value)
        return "violated" if expected else "joint"

    result = inst.solve()
    objective = totals(inst.omega, configs[within])
    order = np.argsort(objective)
    best = objective[order[0]]
    assert result.optimal and result.status == 0
    assert result.objective == pytest.approx(best, rel=1e-12, abs=1e-12)
    check_choice(inst, result.choice)
    if objective.size == 1 or objective[order[1]] > best + 1e-9:
        np.testing.assert_array_equal(result.choice, configs[within][order[0]])
    for name, matrix in inst.costs.items():
        assert result.totals[name] == pytest.approx(totals(matrix, result.choice[None, :])[0], rel=1e-12)
    for name in inst.budgets:
        assert result.smallest[name] == pytest.approx(smallest[name], rel=1e-12)
    return "optimal"


# --------------------------------------------------------------------------- against brute force
def test_random_instances_match_brute_force() -> None:
    rng = np.random.default_rng(20240601)
    outcomes: dict[str, int] = {"optimal": 0, "violated": 0, "joint": 0}
    with_ties = with_pins = 0
    n_done = 0
    while n_done < 120:
        inst = random_instance(rng)
        configs = all_configs(*inst.omega.shape)
        feasible = structurally_feasible(inst, configs)
        if not feasible.any():
            continue  # ties + masks leave nothing; covered by the bad-input tests
        set_budgets(inst, rng, feasible, configs)
        outcomes[compare_with_brute_force(inst, configs)] += 1
        with_ties += bool(inst.ties)
        with_pins += bool(inst.pins)
        n_done += 1
    # The generator must actually exercise every path, or the comparison proves little.
    assert outcomes["optimal"] >= 60 and outcomes["violated"] >= 10 and outcomes["joint"] >= 2, outcomes
    assert with_ties >= 40 and with_pins >= 40


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_twelve_layers_two_budgets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_layers, n_choices = 12, 3
    inst = Instance(
        omega=rng.uniform(0.0, 1.0, (n_layers, n_choices)),
        costs={"size": rng.uniform(1, 10, (n_layers, n_choices)), "bops": rng.uniform(1, 10, (n_layers, n_choices))},
        ties=[[0, 5], [2, 7, 11]],
        pins={3: 1},
    )
    configs = all_configs(n_layers, n_choices)
    feasible = structurally_feasible(inst, configs)
    for name in ("size", "bops"):
        t = totals(inst.costs[name], configs[feasible])
        inst.budgets[name] = float(t.min() + 0.35 * (t.max() - t.min()))
    assert compare_with_brute_force(inst, configs) == "optimal"


def test_hawq_scale_values_stay_exact() -> None:
    """Sensitivities ~1e-9 and BOPs ~1e9: HiGHS's absolute gap must not stop the search early."""
    rng = np.random.default_rng(7)
    n_layers, n_choices = 9, 3
    inst = Instance(
        omega=1e-9 * rng.uniform(0.0, 1.0, (n_layers, n_choices)),
        costs={"bops": 1e9 * rng.uniform(1, 10, (n_layers, n_choices)), "size": rng.uniform(1, 10, (n_layers, 3))},
        ties=[[1, 4]],
    )
    configs = all_configs(n_layers, n_choices)
    for name in ("bops", "size"):
        t = totals(inst.costs[name], configs)
        inst.budgets[name] = float(t.min() + 0.3 * (t.max() - t.min()))
    assert compare_with_brute_force(inst, configs) == "optimal"


# --------------------------------------------------------------------------- semantics
def test_ties_and_pins_respected() -> None:
    omega = np.array([[0.0, 5.0], [5.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    size = np.array([[1.0, 2.0]] * 4)
    # Unconstrained optimum is [0, 1, 0, 1]; tie (0, 1) and pin 2 -> 1 change it.
    res = solve_precision_ilp(omega, {"size": size}, {"size": 8.0}, ties=[[0, 1]], pins={2: 1})
    assert res.choice[0] == res.choice[1]
    assert res.choice[2] == 1
    assert res.objective == pytest.approx(5.0 + 1.0 + 0.0)
    assert res.totals["size"] == pytest.approx(res.choice.sum() + 4.0)


def test_overlapping_ties_merge() -> None:
    omega = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    res = solve_precision_ilp(omega, ties=[[0, 1], [1, 2]])
    assert len(set(res.choice.tolist())) == 1
    np.testing.assert_array_equal(res.choice, [1, 1, 1])


def test_disallowed_choices_avoided() -> None:
    omega = np.array([[0.0, 1.0, np.inf], [0.0, 2.0, 3.0]])
    allowed = np.array([[True, True, True], [False, True, True]])
    res = solve_precision_ilp(omega, allowed=allowed)
    np.testing.assert_array_equal(res.choice, [0, 1])


def test_fully_pinned_is_trivial_but_checked() -> None:
    omega = np.ones((3, 2))
    size = np.array([[1.0, 2.0]] * 3)
    res = solve_precision_ilp(omega, {"size": size}, {"size": 6.0}, pins={0: 1, 1: 1, 2: 0})
    np.testing.assert_array_equal(res.choice, [1, 1, 0])
    assert res.totals["size"] == 5.0
    with pytest.raises(InfeasibleBudget):
        solve_precision_ilp(omega, {"size": size}, {"size": 4.5}, pins={0: 1, 1: 1, 2: 0})


def test_budget_at_exact_reference_total_is_feasible() -> None:
    """fraction 1.0 of the all-lowest total sums in another order; it must not be called infeasible."""
    rng = np.random.default_rng(3)
    omega = rng.uniform(0, 1, (50, 3))
    size = rng.uniform(0, 1, (50, 1)) * np.array([0.1, 0.7, 0.3])
    budget = budget_from_fraction(size, 1.0, 0)
    res = solve_precision_ilp(omega, {"size": size}, {"size": budget})
    np.testing.assert_array_equal(res.choice, np.zeros(50))


def test_budget_helpers() -> None:
    cost = np.array([[4.0, 8.0], [2.0, 4.0]])
    assert reference_total(cost, 1) == 12.0
    assert reference_total(cost, [0, 1]) == 8.0
    assert budget_from_fraction(cost, 0.5, 1) == 6.0
    assert budget_from_fraction(cost, 0.5, reference=1, low=0) == 9.0  # HAWQ interpolation
    with pytest.raises(ValueError, match="reference"):
        reference_total(cost, 2)
    with pytest.raises(ValueError, match="not finite"):
        reference_total(np.array([[1.0, np.inf]]), 1)


def test_benchmark_runs() -> None:
    omega, costs, budgets = random_hawq_instance(30, 3, seed=1)
    assert set(budgets) == {"size", "bops"}
    assert solve_precision_ilp(omega, costs, budgets).optimal
    assert benchmark_ilp(layers=30, choices=3, repeats=1) > 0.0


# --------------------------------------------------------------------------- infeasibility and bad input
def test_infeasible_message_names_budget_and_smallest() -> None:
    omega = np.zeros((2, 2))
    size = np.array([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InfeasibleBudget, match=r"'size' = 3 is below the smallest achievable 4") as info:
        solve_precision_ilp(omega, {"size": size}, {"size": 3.0})
    assert isinstance(info.value, ValueError)
    assert info.value.smallest == {"size": 4.0} and info.value.violated == ("size",)
    # With a pin, the smallest achievable value accounts for it.
    with pytest.raises(InfeasibleBudget) as info:
        solve_precision_ilp(omega, {"size": size}, {"size": 4.5}, pins={1: 1})
    assert info.value.smallest["size"] == 5.0


def test_jointly_infeasible_budgets() -> None:
    omega = np.zeros((2, 2))
    costs = {"size": np.array([[1.0, 2.0], [1.0, 2.0]]), "bops": np.array([[2.0, 1.0], [2.0, 1.0]])}
    with pytest.raises(InfeasibleBudget, match="together") as info:
        solve_precision_ilp(omega, costs, {"size": 2.5, "bops": 2.5})
    assert info.value.violated == ()
    assert info.value.smallest == {"size": 2.0, "bops": 2.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"omega": np.zeros(3)}, "2-D"),
        ({"omega": np.zeros((0, 2))}, "at least one layer"),
        ({"costs": {"size": np.ones((3, 3))}}, r"cost 'size' has shape \(3, 3\)"),
        ({"allowed": np.ones((2, 3), dtype=bool)}, "allowed has shape"),
        ({"allowed": np.ones((3, 2))}, "boolean"),
        ({"omega": np.array([[0.0, -1.0], [0, 0], [0, 0]])}, "negative"),
        ({"omega": np.array([[0.0, np.nan], [0, 0], [0, 0]])}, "NaN"),
        ({"omega": np.array([[0.0, 1.0], [np.inf, np.inf], [0, 0]])}, "layer 1 has no allowed choice"),
        ({"allowed": np.array([[True, True], [True, True], [False, False]])}, "layer 2 has no allowed choice"),
        ({"ties": [[0, 2]], "pins": {0: 0, 2: 1}}, "pinned to different choices"),
        ({"ties": [[0, 1]], "allowed": np.array([[True, False], [False, True], [True, True]])}, "in common"),
        ({"pins": {5: 0}}, "pinned layer index"),
        ({"pins": {0: 2}}, "pin of layer 0"),
        ({"pins": {0: 1}, "allowed": np.array([[True, False], [True, True], [True, True]])}, "not allowed"),
        ({"ties": [[0, 3]]}, "tied layer index"),
        ({"budgets": {"bops": 1.0}}, "unknown cost 'bops'"),
        ({"budgets": {"size": float("nan")}}, "budget 'size' is NaN"),
        ({"costs": {"size": np.array([[1.0, np.nan], [1, 1], [1, 1]])}}, "not finite at layer 0, choice 1"),
    ],
)
def test_bad_input_rejected(kwargs: dict, match: str) -> None:
    args = {"omega": np.zeros((3, 2)), "costs": {"size": np.ones((3, 2))}, "budgets": {"size": 10.0}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        solve_precision_ilp(**args)
    assert not isinstance(info.value, InfeasibleBudget)


def test_nan_cost_where_forbidden_is_fine() -> None:
    omega = np.array([[0.0, np.inf], [1.0, 0.0]])
    size = np.array([[1.0, np.nan], [1.0, 2.0]])
    res = solve_precision_ilp(omega, {"size": size}, {"size": 3.0})
    np.testing.assert_array_equal(res.choice, [0, 1])

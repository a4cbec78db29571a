"""oamipc.solver: exact answers on hand-solved problems, honest statuses at limits, warm starts."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pulp
import pytest

from oamipc import solver as solver_mod
from oamipc.errors import SolverError, UsageError
from oamipc.solver import SOLVERS, SolveResult, available_solvers, solve
from oamipc.solver import highs as highs_backend

AVAILABLE = available_solvers()
REPO = Path(__file__).resolve().parents[1]


def test_available_solvers() -> None:
    # highspy is a dependency; CBC comes bundled with PuLP on the usual platforms.
    assert AVAILABLE[0] == "highs"
    assert AVAILABLE == [s for s in SOLVERS if s in AVAILABLE]


def test_scip_is_tested_wherever_pyscipopt_is_installed() -> None:
    # The SCIP cases below are parametrized over AVAILABLE: a broken detection would drop them
    # silently.  pyscipopt is in the test extra, so CI runs them.
    installed = importlib.util.find_spec("pyscipopt") is not None
    assert ("scip" in AVAILABLE) == installed


# ---------------------------------------------------------------------------------------------
# Hand-sized problems
# ---------------------------------------------------------------------------------------------


def knapsack() -> tuple[pulp.LpProblem, list[pulp.LpVariable]]:
    """0/1 knapsack: weights 2,3,4,5,9, values 3,4,5,8,10, capacity 20.

    All five items weigh 23 (value 30), so items of weight >= 3 must go.  Dropping one item of
    weight >= 3 costs its value: 4 (item 1), 5, 8 or 10; dropping item 0 (weight 2) alone is not
    enough and with any other item costs at least 3 + 4 = 7.  The unique optimum drops item 1:
    x = (1, 0, 1, 1, 1), weight 20, value 26.
    """
    weights = [2, 3, 4, 5, 9]
    values = [3, 4, 5, 8, 10]
    prob = pulp.LpProblem("knapsack5", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(5)]
    prob += pulp.lpSum(v * xi for v, xi in zip(values, x))
    prob += pulp.lpSum(w * xi for w, xi in zip(weights, x)) <= 20, "capacity"
    return prob, x


KNAPSACK_OPT = 26.0
KNAPSACK_X = [1, 0, 1, 1, 1]


def general_integer() -> tuple[pulp.LpProblem, dict[str, pulp.LpVariable]]:
    """min 4a + 5b + c + 10,  a + b + c = 7.5,  a + 2b >= 6.5,  a, b integer in [0, 10], c >= 0.

    c = 7.5 - a - b >= 0 turns the objective into 3a + 4b + 17.5 with a + b <= 7, and for
    integers a + 2b >= 6.5 means a + 2b >= 7.  Covering the 7 with b costs 2 per unit, with a
    3 per unit, b can only cover even amounts: (a, b) = (1, 3) costs 15, (0, 4) 16, (3, 2) 17,
    (5, 1) 19, (7, 0) 21.  Optimum a = 1, b = 3, c = 3.5, objective 15 + 17.5 = 32.5 (the LP
    relaxation, b = 3.5, gives 31.5, so integrality matters).
    """
    prob = pulp.LpProblem("general_integer", pulp.LpMinimize)
    a = pulp.LpVariable("a", 0, 10, cat="Integer")
    b = pulp.LpVariable("b", 0, 10, cat="Integer")
    c = pulp.LpVariable("c", 0)
    prob += 4 * a + 5 * b + c + 10
    prob += a + b + c == 7.5, "total"
    prob += a + 2 * b >= 6.5, "cover"
    return prob, {"a": a, "b": b, "c": c}


def mkp(n: int = 60, m: int = 5, seed: int = 3) -> tuple[pulp.LpProblem, list[pulp.LpVariable]]:
    """A deterministic multi-dimensional 0/1 knapsack with correlated values (hard: HiGHS needs
    ~15000 nodes and ~10 s to prove its optimum 1886)."""
    rng = random.Random(seed)
    weights = [[rng.randint(10, 100) for _ in range(n)] for _ in range(m)]
    values = [sum(weights[k][i] for k in range(m)) // m + rng.randint(0, 10) for i in range(n)]
    prob = pulp.LpProblem("mkp", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i:03d}", cat="Binary") for i in range(n)]
    prob += pulp.lpSum(values[i] * x[i] for i in range(n))
    for k in range(m):
        prob += pulp.lpSum(weights[k][i] * x[i] for i in range(n)) <= sum(weights[k]) // 2, f"c{k}"
    return prob, x


def greedy_start(prob: pulp.LpProblem, x: list[pulp.LpVariable]) -> dict[pulp.LpVariable, float]:
    """Take items in order while every capacity allows: a feasible, mediocre MIP start."""
    cons = list(prob.constraints.values())
    load = [0.0] * len(cons)
    start: dict[pulp.LpVariable, float] = {}
    for xi in x:
        if all(load[k] + c.get(xi, 0) <= -c.constant for k, c in enumerate(cons)):
            for k, c in enumerate(cons):
                load[k] += c.get(xi, 0)
            start[xi] = 1.0
        else:
            start[xi] = 0.0
    return start


def assert_consistent(res: SolveResult) -> None:
    """Invariants every result must satisfy, whatever its status."""
    assert res.status in solver_mod.STATUSES
    if res.status in ("optimal", "feasible"):
        assert res.has_solution() and res.values is not None and res.objective is not None
    else:
        assert not res.has_solution()
        assert res.values is None and res.objective is None and res.gap is None
    if res.status == "optimal":
        assert res.gap is not None and res.gap <= 1e-4
    if res.gap is not None and res.dual_bound is not None:
        expected = abs(res.objective - res.dual_bound) / max(1e-9, abs(res.objective))
        assert res.gap == pytest.approx(expected, abs=1e-9)
    json.dumps(res.to_dict(), allow_nan=False)


@pytest.mark.parametrize("name", AVAILABLE)
def test_knapsack_solved_exactly(name: str) -> None:
    prob, x = knapsack()
    res = solve(prob, solver=name)
    assert_consistent(res)
    assert res.solver == name
    assert res.status == "optimal"
    assert res.objective == pytest.approx(KNAPSACK_OPT, abs=1e-9)
    assert res.gap == 0.0
    assert res.dual_bound == pytest.approx(KNAPSACK_OPT, abs=1e-6)
    assert res.values is not None
    assert [round(res.values[v.name]) for v in x] == KNAPSACK_X
    assert [v.varValue for v in x] == pytest.approx(KNAPSACK_X, abs=1e-6)  # left in the vars
    assert (res.n_variables, res.n_binaries, res.n_constraints, res.n_nonzeros) == (5, 5, 1, 5)
    assert res.warm_start_objective is None
    assert res.seconds >= 0


@pytest.mark.parametrize("name", AVAILABLE)
def test_general_integer_with_equality_and_constant(name: str) -> None:
    prob, v = general_integer()
    res = solve(prob, solver=name)
    assert_consistent(res)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(32.5, abs=1e-9)
    assert res.gap == 0.0
    assert res.dual_bound == pytest.approx(32.5, abs=1e-6)
    assert res.values is not None
    assert res.values["a"] == pytest.approx(1, abs=1e-6)
    assert res.values["b"] == pytest.approx(3, abs=1e-6)
    assert res.values["c"] == pytest.approx(3.5, abs=1e-6)
    assert (res.n_variables, res.n_binaries, res.n_constraints, res.n_nonzeros) == (3, 0, 2, 5)


@pytest.mark.parametrize("name", AVAILABLE)
def test_lp_bound_equals_objective(name: str) -> None:
    # min x + 2y + 3, x + y >= 1.5, x <= 1: x is cheaper, so x = 1, y = 0.5, objective 5.
    prob = pulp.LpProblem("lp", pulp.LpMinimize)
    x = pulp.LpVariable("x", 0, 1)
    y = pulp.LpVariable("y", 0)
    prob += x + 2 * y + 3
    prob += x + y >= 1.5
    res = solve(prob, solver=name)
    assert_consistent(res)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(5.0, abs=1e-9)
    assert res.dual_bound == res.objective
    assert res.gap == 0.0
    assert res.n_binaries == 0


@pytest.mark.parametrize("name", AVAILABLE)
def test_feasibility_problem_without_objective(name: str) -> None:
    # PuLP adds a "__dummy" variable while solving a problem without objective; it must not
    # leak into the values, nor break the warm start.  x integer, x >= 1.5, x <= 3: x in {2, 3}.
    prob = pulp.LpProblem("no_objective", pulp.LpMinimize)
    x = pulp.LpVariable("x", 0, 3, cat="Integer")
    prob += x >= 1.5
    res = solve(prob, solver=name, warm_start={x: 2})
    assert_consistent(res)
    assert res.status == "optimal" and res.objective == 0.0
    assert res.warm_start_objective == 0.0
    assert res.values is not None and set(res.values) == {"x"}
    assert res.values["x"] in (pytest.approx(2), pytest.approx(3))


def infeasible_problems() -> list[pulp.LpProblem]:
    # Bounds alone: x + y <= 2 < 3.
    p1 = pulp.LpProblem("infeasible_bounds", pulp.LpMinimize)
    x = pulp.LpVariable("x", cat="Binary")
    y = pulp.LpVariable("y", cat="Binary")
    p1 += x + y
    p1 += x + y >= 3
    # Parity: 2a + 2b is even, never 3 (the LP relaxation is feasible).
    p2 = pulp.LpProblem("infeasible_parity", pulp.LpMinimize)
    a = pulp.LpVariable("a", 0, 10, cat="Integer")
    b = pulp.LpVariable("b", cat="Binary")
    p2 += a + b
    p2 += 2 * a + 2 * b == 3
    return [p1, p2]


@pytest.mark.parametrize("name", AVAILABLE)
def test_infeasible(name: str) -> None:
    for prob in infeasible_problems():
        res = solve(prob, solver=name)
        assert_consistent(res)
        assert res.status == "infeasible", prob.name
        assert res.dual_bound is None


@pytest.mark.parametrize("name", AVAILABLE)
def test_unbounded_mip(name: str) -> None:
    # max x + y with x - y <= 1: y grows without limit.  HiGHS's presolve only says
    # "infeasible or unbounded" here (PuLP maps that to infeasible); solve() must find out.
    prob = pulp.LpProblem("unbounded", pulp.LpMaximize)
    x = pulp.LpVariable("x", 0, cat="Integer")
    y = pulp.LpVariable("y", 0)
    prob += x + y
    prob += x - y <= 1
    res = solve(prob, solver=name)
    assert_consistent(res)
    assert res.status == "unbounded"


# ---------------------------------------------------------------------------------------------
# Warm starts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AVAILABLE)
def test_warm_start_objective_and_optimum(name: str) -> None:
    prob, x = knapsack()
    # Items 0, 1, 2: weight 9, value 3 + 4 + 5 = 12.  x3, x4 are left out and start at 0.
    res = solve(prob, solver=name, warm_start={x[0]: 1, x[1]: 1, x[2]: 1})
    assert_consistent(res)
    assert res.warm_start_objective == 12.0
    assert res.status == "optimal"
    assert res.objective == pytest.approx(KNAPSACK_OPT, abs=1e-9)


def test_warm_start_defaults_and_constant() -> None:
    prob, v = general_integer()
    v["c"].setInitialValue(2.0)  # not in the warm start: its current value is used
    res = solve(prob, warm_start={v["a"]: 1, v["b"]: 3})
    # 4*1 + 5*3 + 2 + 10 = 31 (infeasible as a point: a + b + c = 6 != 7.5, which is only logged).
    assert res.warm_start_objective == 31.0
    assert res.status == "optimal" and res.objective == pytest.approx(32.5)


def test_highs_warm_start_is_used() -> None:
    # mip_max_nodes=0 stops HiGHS before presolve and the root node, so without a start there is
    # nothing to return, and with one the start itself (or better) comes back.
    prob, x = mkp()
    cold = solve(prob, solver="highs", node_limit=0)
    assert_consistent(cold)
    assert cold.status == "no_solution"
    assert cold.values is None and cold.warm_start_objective is None

    prob, x = mkp()
    start = greedy_start(prob, x)
    # Objective at the start, by hand from the objective's coefficients.
    expected = sum(prob.objective[xi] * val for xi, val in start.items())
    assert expected > 0
    warm = solve(prob, solver="highs", node_limit=0, warm_start=start)
    assert_consistent(warm)
    assert warm.warm_start_objective == pytest.approx(expected)
    assert warm.status == "feasible"
    assert warm.objective is not None and warm.objective >= expected - 1e-9
    assert warm.values is not None
    assert warm.values == pytest.approx({xi.name: val for xi, val in start.items()})


def test_cbc_reads_the_warm_start(caplog: pytest.LogCaptureFixture) -> None:
    if "cbc" not in AVAILABLE:
        pytest.skip("CBC not available")
    prob, x = mkp()
    start = greedy_start(prob, x)
    expected = sum(prob.objective[xi] * val for xi, val in start.items())
    with caplog.at_level(logging.INFO, logger="oamipc.solver"):
        res = solve(prob, solver="cbc", node_limit=0, warm_start=start, msg=True)
    assert res.warm_start_objective == pytest.approx(expected)
    assert res.status == "feasible" and res.objective >= expected - 1e-9
    # CBC's own log, forwarded to the logger with msg=True, confirms it took the start.
    assert f"MIPStart provided solution with cost {expected:g}" in caplog.text


def test_scip_warm_start_is_used() -> None:
    # With node_limit=0 SCIP stops after presolve; its heuristics find only the empty knapsack
    # (objective 0), so a better answer can only come from the start.
    if "scip" not in AVAILABLE:
        pytest.skip("pyscipopt not installed")
    prob, x = mkp()
    cold = solve(prob, solver="scip", node_limit=0)
    prob, x = mkp()
    start = greedy_start(prob, x)
    expected = sum(prob.objective[xi] * val for xi, val in start.items())
    assert cold.objective is None or cold.objective < expected
    warm = solve(prob, solver="scip", node_limit=0, warm_start=start)
    assert_consistent(warm)
    assert warm.warm_start_objective == pytest.approx(expected)
    assert warm.status == "feasible" and warm.objective is not None
    assert warm.objective >= expected - 1e-9


def test_infeasible_warm_start_is_reported_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    prob, x = knapsack()
    with caplog.at_level(logging.WARNING, logger="oamipc.solver"):
        res = solve(prob, warm_start={xi: 1 for xi in x})
    assert res.warm_start_objective == 30.0
    assert "warm start" in caplog.text and "capacity" in caplog.text
    assert res.status == "optimal" and res.objective == pytest.approx(KNAPSACK_OPT)


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AVAILABLE)
def test_node_limit_gives_feasible_with_gap(name: str) -> None:
    # The instance needs thousands of nodes; 10 nodes leave an incumbent and a real gap
    # (HiGHS: 1877 vs bound 1894; CBC: 1879 vs 1894.6; SCIP 6.3/pyscipopt: 1866 vs 1895).
    prob, _ = mkp()
    res = solve(prob, solver=name, node_limit=10)
    assert_consistent(res)
    assert res.status == "feasible"
    assert res.objective is not None and res.dual_bound is not None
    assert res.dual_bound > res.objective  # maximisation: the bound is above
    assert 0 < res.gap < 0.05
    assert res.objective <= 1886 + 1e-9  # the proven optimum of this instance
    assert res.dual_bound >= 1886 - 1e-9


def test_tiny_time_limit_status_is_consistent() -> None:
    # A time limit is not reproducible: only the invariants are checked.
    prob, _ = mkp(n=100, m=10, seed=5)
    res = solve(prob, solver="highs", time_limit=0.05)
    assert_consistent(res)
    assert res.status in ("optimal", "feasible", "no_solution")
    if res.status == "feasible" and res.dual_bound is not None:
        assert res.gap is not None and res.gap > 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_solver_is_usage_error() -> None:
    prob, _ = knapsack()
    with pytest.raises(UsageError, match="highs, cbc, scip"):
        solve(prob, solver="gurobi")


@pytest.mark.parametrize(
    "kwargs", [{"time_limit": -1}, {"gap": 1.5}, {"threads": 0}, {"node_limit": -2}]
)
def test_bad_options_are_usage_errors(kwargs: dict) -> None:
    prob, _ = knapsack()
    with pytest.raises(UsageError):
        solve(prob, **kwargs)


def test_scip_missing_names_pyscipopt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyscipopt", None)  # import pyscipopt -> ImportError
    prob, _ = knapsack()
    with pytest.raises(SolverError, match=r"oamipc\[scip\].*pyscipopt") as info:
        solve(prob, solver="scip")
    assert "\n" not in str(info.value)


def test_solver_crash_becomes_one_line_solver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: object, lp: pulp.LpProblem) -> None:
        raise RuntimeError("simulated crash\nsecond line")

    monkeypatch.setattr(highs_backend._HighsSolver, "callSolver", boom)
    prob, _ = knapsack()
    with pytest.raises(SolverError, match="simulated crash") as info:
        solve(prob, solver="highs")
    msg = str(info.value)
    assert "\n" not in msg and "second line" not in msg and "knapsack5" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------
# Determinism, threads, output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AVAILABLE)
def test_deterministic(name: str) -> None:
    first = solve(mkp()[0], solver=name, node_limit=10)
    second = solve(mkp()[0], solver=name, node_limit=10)
    assert first.values == second.values
    assert (first.status, first.objective, first.dual_bound) == (
        second.status,
        second.objective,
        second.dual_bound,
    )


def test_to_dict_is_json_without_values() -> None:
    res = solve(knapsack()[0])
    d = res.to_dict()
    assert "values" not in d
    assert json.loads(json.dumps(d))["status"] == "optimal"
    assert set(d) == {f for f in SolveResult.__dataclass_fields__ if f != "values"}


def test_row_slacks_name_the_violated_rows_and_the_near_ties() -> None:
    on = pulp.LpVariable("on", cat=pulp.LpBinary)
    y = pulp.LpVariable("y", 0, 10)
    prob = pulp.LpProblem("rows", pulp.LpMinimize)
    prob += pulp.LpConstraint(y - 5 * on, pulp.LpConstraintLE, rhs=0, name="y_at_most_5_on")
    prob += pulp.LpConstraint(y, pulp.LpConstraintGE, rhs=4, name="y_at_least_4")
    prob += y
    slacks = solver_mod.row_slacks(prob, {"on": 0.0, "y": 4.0})  # y <= 0 fails by 4
    assert slacks[0].name == "y_at_most_5_on" and slacks[0].slack == pytest.approx(-4.0)
    assert [r.slack for r in slacks] == sorted(r.slack for r in slacks)
    text = solver_mod.describe_slacks(slacks)
    assert text.startswith("1 rows are violated") and "y_at_most_5_on" in text and "violated by 4" in text
    # Feasible, with y >= 4 holding by 2e-6 only: reported as a near-tie, not as a violation.
    text = solver_mod.describe_slacks(solver_mod.row_slacks(prob, {"on": 1.0, "y": 4.000002}))
    assert "no row is violated" in text and "y_at_least_4" in text and "slack 2e-06" in text
    assert "upper bound of y" not in text  # 10 - 4 is no near-tie


def test_highs_threads_fixed_per_process() -> None:
    # HiGHS fails a run ("Not Solved") that asks for a thread count other than the first one of
    # the process.  In a fresh process (oamipc/__init__ is skipped: it imports torch), a second,
    # different setting must be ignored, not break the solve.
    code = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("oamipc"); pkg.__path__ = [{str(REPO / "oamipc")!r}]
        sys.modules["oamipc"] = pkg
        import pulp
        from oamipc.solver import solve
        def prob():
            p = pulp.LpProblem("k", pulp.LpMaximize)
            x = [pulp.LpVariable(f"x{{i}}", cat="Binary") for i in range(5)]
            p += pulp.lpSum(v * xi for v, xi in zip([3, 4, 5, 8, 10], x))
            p += pulp.lpSum(w * xi for w, xi in zip([2, 3, 4, 5, 9], x)) <= 20
            return p
        out = [solve(prob(), threads=t) for t in (1, 2, None, 1)]
        print([(r.status, r.objective) for r in out])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    # Only our print reaches stdout: HiGHS's start-up banner is silenced when msg=False.
    assert proc.stdout.strip() == str([("optimal", 26.0)] * 4)
    assert "threads=2 ignored" in proc.stderr


def test_highs_threads_mismatch_from_elsewhere_recovers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend this module believes the pool was made with a count HiGHS will refuse now: the
    # run fails inside HiGHS and solve() must rerun with the existing pool.
    solve(knapsack()[0])  # make sure HiGHS has a pool in this process
    monkeypatch.setattr(highs_backend, "_HIGHS_THREADS_FIXED", True)
    monkeypatch.setattr(highs_backend, "_HIGHS_THREADS", 13)
    with caplog.at_level(logging.WARNING, logger="oamipc.solver"):
        res = solve(knapsack()[0], threads=13)
    assert res.status == "optimal" and res.objective == pytest.approx(KNAPSACK_OPT)


def _dense_knapsack() -> pulp.LpProblem:
    """60 binaries, 30 random knapsack rows: enough branch and bound to use HiGHS's task scheduler."""
    import random

    rng = random.Random(0)
    prob = pulp.LpProblem("dense", pulp.LpMaximize)
    xs = [pulp.LpVariable(f"x{i}", cat=pulp.LpBinary) for i in range(60)]
    prob += pulp.LpAffineExpression([(x, rng.randint(1, 50)) for x in xs])
    for _ in range(30):
        prob += pulp.LpAffineExpression([(x, rng.randint(1, 50)) for x in xs]) <= 400
    return prob


def _solve_in_child(reset: bool) -> str:
    if reset:
        solver_mod.reset_after_fork()
    return solve(_dense_knapsack(), time_limit=20).status


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_worker_can_solve_after_the_parent_did() -> None:
    """A child forked after the parent ran HiGHS inherits a scheduler without threads; after
    reset_after_fork it solves normally (without it, this solve hangs)."""
    import multiprocessing

    assert solve(_dense_knapsack(), time_limit=20).status == "optimal"
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        assert pool.apply_async(_solve_in_child, (True,)).get(timeout=60) == "optimal"
    finally:
        pool.terminate()


def test_variables_listed_once_gives_pulps_list_and_lists_again_when_the_problem_grows() -> None:
    from oamipc.solver.core import variables_listed_once

    prob = pulp.LpProblem("grows", pulp.LpMinimize)
    x, y, z = (pulp.LpVariable(n, 0, 1) for n in "xyz")
    prob += x + y
    prob += x + y >= 1
    calls = []
    listing = pulp.LpProblem.variables

    def counted(self: pulp.LpProblem) -> list[pulp.LpVariable]:
        calls.append(1)
        return listing(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pulp.LpProblem, "variables", counted)
        with variables_listed_once(prob):
            first = [v.name for v in prob.variables()]
            assert [v.name for v in prob.variables()] == first == ["x", "y"]
            assert len(calls) == 1  # the second call was served from the list
            prob += x + z <= 1  # a new constraint with a new variable
            assert [v.name for v in prob.variables()] == ["x", "y", "z"]
            assert len(calls) == 2
        assert "variables" not in vars(prob)  # PuLP's own method again after the block
        assert [v.name for v in prob.variables()] == ["x", "y", "z"]


def test_solve_inside_variables_listed_once_sees_the_dummy_of_an_empty_objective() -> None:
    # PuLP adds "__dummy" to the objective while solving a problem without one: the listing must
    # follow, or HiGHS would get no column for it.  Same answer as outside any block.
    from oamipc.solver.core import variables_listed_once

    prob = pulp.LpProblem("no_objective_in_block", pulp.LpMinimize)
    x = pulp.LpVariable("x", 0, 3, cat="Integer")
    prob += x >= 1.5
    with variables_listed_once(prob):
        res = solve(prob, warm_start={x: 2})
    assert res.status == "optimal" and res.values is not None and set(res.values) == {"x"}
    assert res.values["x"] in (pytest.approx(2), pytest.approx(3))


def test_problem_size_counts_only_nonzero_coefficients() -> None:
    from oamipc.solver.core import ProblemSize, problem_size

    prob = pulp.LpProblem("zeros", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(4)]
    prob += pulp.lpSum(x)
    prob += pulp.LpAffineExpression([(x[0], 0.0), (x[1], -0.0), (x[2], 1e-300), (x[3], 2.0)]) >= 1
    prob += pulp.LpAffineExpression([(x[0], 0), (x[1], 3.0)]) <= 1
    assert problem_size(prob) == ProblemSize(n_variables=4, n_binaries=4, n_constraints=2, n_nonzeros=3)

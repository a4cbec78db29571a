"""The solver-independent half of :mod:`oamipc.solver`: options, warm starts, dispatch, results.

:func:`solve` checks the options, resolves and checks a warm start, hands the problem to one
backend (:mod:`~oamipc.solver.highs`, :mod:`~oamipc.solver.cbc`, :mod:`~oamipc.solver.scip`)
and turns the backend's :class:`~oamipc.solver.backend.Outcome` into a :class:`SolveResult`:
values read back from the variables, the objective evaluated at them, the dual bound with the
objective's constant restored, and the gap.  The statuses are described in :mod:`oamipc.solver`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import pulp
from pulp import constants as lpc

from oamipc.errors import SolverError, UsageError, describe
from oamipc.solver import cbc, highs, scip
from oamipc.solver.backend import Backend, default_start

__all__ = [
    "SOLVERS", "STATUSES", "ProblemSize", "SolveResult", "available_solvers", "complete_solution",
    "problem_size", "require_solver", "solve",
]

log = logging.getLogger("oamipc.solver")  # the package's one logger: the name users see and filter on

SOLVERS = ("highs", "cbc", "scip")
STATUSES = ("optimal", "feasible", "no_solution", "infeasible", "unbounded", "error")

_INSTALL_HINT = {
    "highs": "install it with `pip install highspy`",
    "cbc": "reinstall PuLP (`pip install --force-reinstall pulp`), which bundles CBC, or install "
    "CBC with `pip install pulp[cbc]`",
    "scip": "install it with `pip install 'oamipc[scip]'` (pyscipopt)",
}

# Absolute tolerance when checking a warm start against constraints, bounds and integrality.
_FEAS_TOL = 1e-6
# Gaps below this are float noise between the solver's objective and its bound.
_GAP_NOISE = 1e-9

# The backend modules, by solver name: each has available() and run().
_MODULES = {"highs": highs, "cbc": cbc, "scip": scip}
_BACKENDS: dict[str, Backend] = {"highs": highs.run, "cbc": cbc.run, "scip": scip.run}


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class SolveResult:
    """What one solver run produced, stated honestly.

    ``status`` is one of :data:`STATUSES` (see :mod:`oamipc.solver`).  ``objective`` and
    ``dual_bound`` are in the problem's own sense (a maximisation has an upper bound) and
    include the objective's constant term; ``objective`` is evaluated from ``values``, so the
    two always agree.  ``dual_bound`` is the solver's best bound (HiGHS ``mip_dual_bound``,
    CBC's final "Lower/Upper bound", SCIP ``getDualbound``), or ``objective`` itself for a
    proven optimum without a reported bound (LPs, CBC).  ``gap`` is
    ``|objective - dual_bound| / max(1e-9, |objective|)``: 0 for exact optima, at most the
    gap tolerance for an ``optimal`` result that used one (values below 1e-9 are rounded to 0),
    ``None`` when there is no solution or no finite bound.  ``seconds`` is the wall-clock time
    of the solver call, building the solver's model included.  ``warm_start_objective`` is the
    objective evaluated at the warm start (``None`` without one).  ``values`` maps every
    variable name of the problem to its value (``None`` without a solution).
    """

    solver: str
    status: str
    objective: float | None
    dual_bound: float | None
    gap: float | None
    seconds: float
    n_variables: int
    n_binaries: int
    n_constraints: int
    n_nonzeros: int
    warm_start_objective: float | None
    values: dict[str, float] | None

    def has_solution(self) -> bool:
        """True when the result carries a feasible point (status optimal or feasible)."""
        return self.status in ("optimal", "feasible") and self.values is not None

    def stopped_by_time(self, time_limit: float | None) -> bool:
        """True when the solve ended unproven at (about) ``time_limit``: its answer depends on load."""
        return (time_limit is not None and self.status in ("feasible", "no_solution", "error")
                and self.seconds >= 0.98 * time_limit)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict, without the (possibly huge) variable values."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "values":
                continue
            val = getattr(self, f.name)
            out[f.name] = None if isinstance(val, float) and not math.isfinite(val) else val
        return out


@dataclass(frozen=True)
class ProblemSize:
    """Size of a problem as the solvers see it."""

    n_variables: int
    n_binaries: int
    n_constraints: int
    n_nonzeros: int


def problem_size(prob: pulp.LpProblem) -> ProblemSize:
    """Count variables, 0/1 integer variables, constraints and non-zero constraint coefficients."""
    variables = prob.variables()
    n_bin = sum(
        1
        for v in variables
        if v.cat == lpc.LpInteger and v.lowBound == 0 and v.upBound == 1
    )
    # len minus the zero coefficients (counted in C): the same count as testing ``coef != 0`` term by
    # term, at a fraction of the cost on the joint stage's dense rows.
    n_nz = sum(len(c) - operator.countOf(c.values(), 0) for c in prob.constraints.values())
    return ProblemSize(len(variables), n_bin, len(prob.constraints), n_nz)


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def _is_available(name: str) -> bool:
    module = _MODULES.get(name)
    return module is not None and module.available()


def available_solvers() -> list[str]:
    """The names in :data:`SOLVERS` that can run in this environment, in that order."""
    return [name for name in SOLVERS if _is_available(name)]


def require_solver(name: str) -> None:
    """Raise :class:`UsageError` for an unknown solver, :class:`SolverError` for one not installed.

    Callers that solve many problems check once, up front, so that a missing solver fails before
    any other work rather than at the first solve.
    """
    if name not in SOLVERS:
        raise UsageError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}")
    if not _is_available(name):
        raise SolverError(
            f"solver {name!r} is not available here: {_INSTALL_HINT[name]}, "
            f"or pick one of: {', '.join(available_solvers()) or 'none'}"
        )


# --------------------------------------------------------------------------------------------
# Warm starts and gaps
# --------------------------------------------------------------------------------------------


def _resolve_warm_start(
    prob: pulp.LpProblem, warm_start: Mapping[pulp.LpVariable, float]
) -> dict[str, float]:
    """Start values for every variable of ``prob``, by name (unmentioned ones get defaults)."""
    given: dict[str, float] = {}
    for var, value in warm_start.items():
        name = var.name if isinstance(var, pulp.LpVariable) else str(var)
        given[name] = float(value)
    values: dict[str, float] = {}
    for var in prob.variables():
        values[var.name] = given.pop(var.name) if var.name in given else default_start(var)
    if given:
        extra = sorted(given)
        log.warning(
            "warm start: ignoring %d variable(s) that problem %r does not contain (first: %s)",
            len(extra),
            prob.name,
            extra[0],
        )
    return values


def _objective_at(prob: pulp.LpProblem, values: Mapping[str, float]) -> float:
    """Value of the objective (constant included) at ``values`` (variable name -> value)."""
    obj = prob.objective
    if obj is None:
        return 0.0
    total = float(obj.constant)
    for var, coef in obj.items():
        total += coef * values.get(var.name, 0.0)
    return total


def _warm_start_violations(prob: pulp.LpProblem, values: Mapping[str, float]) -> list[str]:
    """Names of constraints, bounds and integrality requirements the warm start breaks."""
    bad: list[str] = []
    at = {id(var): values[var.name] for var in prob.variables()}  # by identity: cheaper than by name per term
    for var in prob.variables():
        x = values[var.name]
        if var.lowBound is not None and x < var.lowBound - _FEAS_TOL:
            bad.append(f"lower bound of {var.name}")
        if var.upBound is not None and x > var.upBound + _FEAS_TOL:
            bad.append(f"upper bound of {var.name}")
        if var.cat == lpc.LpInteger and abs(x - round(x)) > _FEAS_TOL:
            bad.append(f"integrality of {var.name}")
    for name, con in prob.constraints.items():
        lhs = float(con.constant) + sum(coef * at[id(v)] for v, coef in con.items())
        tol = _FEAS_TOL * max(1.0, abs(float(con.constant)))
        if (con.sense == lpc.LpConstraintLE and lhs > tol) or (
            con.sense == lpc.LpConstraintGE and lhs < -tol
        ) or (con.sense == lpc.LpConstraintEQ and abs(lhs) > tol):
            bad.append(f"constraint {name}")
    return bad


def _gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None:
        return None
    g = abs(objective - bound) / max(1e-9, abs(objective))
    return 0.0 if g < _GAP_NOISE else g


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def variables_listed_once(prob: pulp.LpProblem) -> Iterator[None]:
    """Within the block, ``prob.variables()`` is listed again only when the problem grew.

    PuLP rebuilds the list at every call from every constraint's terms (and sorts it), and one
    solve asks for it about eight times (its size, the warm start and its check, the backend's
    model building and read-back, ...): on a LeNet-5 compile those listings were a tenth of the
    CPU time.  A solve does not change which variables a problem has, except that PuLP adds a
    ``__dummy`` variable to an objective without any; so the list is kept while the objective (its
    identity and length) and the number of constraints stay as they were, and PuLP's own method
    makes it otherwise, so the result is always the list PuLP would give.  Nested blocks share
    the outermost one's list.
    """
    if "variables" in vars(prob):  # already inside a block for this problem
        yield
        return
    listing = prob.variables  # PuLP's bound method
    cached: dict[str, Any] = {}

    def variables() -> list[pulp.LpVariable]:
        objective = prob.objective
        key = (id(objective), len(objective) if objective is not None else -1, len(prob.constraints))
        if cached.get("key") != key:
            cached["key"], cached["list"] = key, listing()
        return cached["list"]  # type: ignore[no-any-return]

    prob.variables = variables  # type: ignore[method-assign]
    try:
        yield
    finally:
        del prob.variables


def _check_options(
    solver: str,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
) -> None:
    if solver not in SOLVERS:
        raise UsageError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if time_limit is not None and not (time_limit >= 0 and math.isfinite(time_limit)):
        raise UsageError(f"time limit {time_limit!r} s: give a finite number of seconds >= 0")
    if gap is not None and not (0 <= gap < 1):
        raise UsageError(f"gap {gap!r}: give a relative gap in [0, 1), e.g. 0.01 for 1%")
    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads!r}: give a positive number of threads")
    if node_limit is not None and node_limit < 0:
        raise UsageError(f"node limit {node_limit!r}: give a number of nodes >= 0")


def solve(
    prob: pulp.LpProblem,
    *,
    solver: str = "highs",
    time_limit: float | None = None,
    gap: float | None = None,
    threads: int | None = None,
    warm_start: Mapping[pulp.LpVariable, float] | None = None,
    msg: bool = False,
    node_limit: int | None = None,
) -> SolveResult:
    """Solve ``prob`` with ``solver`` and report what happened (see :mod:`oamipc.solver`).

    ``time_limit`` is in seconds; ``gap`` is the relative gap at which the solver may stop and
    call the result optimal; ``threads`` is a wish: HiGHS keeps the first value used in a
    process (a later different one is logged and ignored), CBC runs ``threads > 1`` in its
    repeatable parallel mode, SCIP is single-threaded.  ``warm_start`` maps variables to start
    values (a MIP start); variables it leaves out start at their current ``varValue``, or else
    their lower bound (or 0).  ``node_limit`` stops branch and bound after that many nodes
    (HiGHS ``mip_max_nodes``: 0 stops before the root, so only a warm start can be returned;
    CBC ``maxNodes``: 0 still runs the root heuristics) - a reproducible alternative to
    ``time_limit``.  ``msg`` shows the solver's log: HiGHS and SCIP print it, CBC's is sent
    to the ``oamipc.solver`` logger at INFO level after the run.

    The solution is also left in the variables (``var.varValue``), as PuLP does.  Raises
    :class:`UsageError` for an unknown solver or out-of-range option and :class:`SolverError`
    when the solver is not installed or raises.
    """
    _check_options(solver, time_limit, gap, threads, node_limit)
    if not isinstance(prob, pulp.LpProblem):
        raise UsageError(f"solve() needs a pulp.LpProblem, got {type(prob).__name__}")
    require_solver(solver)
    with variables_listed_once(prob):
        return _solve(prob, solver, time_limit, gap, threads, warm_start, msg, node_limit)


def _solve(prob: pulp.LpProblem, solver: str, time_limit: float | None, gap: float | None, threads: int | None,
           warm_start: Mapping[pulp.LpVariable, float] | None, msg: bool, node_limit: int | None) -> SolveResult:
    """:func:`solve` after its checks (inside :func:`variables_listed_once`)."""
    size = problem_size(prob)
    # Taken before solving: PuLP adds a "__dummy" variable to a problem without objective.
    variables = list(prob.variables())  # a copy: PuLP returns its own list
    start: dict[str, float] | None = None
    warm_objective: float | None = None
    if warm_start is not None:
        start = _resolve_warm_start(prob, warm_start)
        warm_objective = _objective_at(prob, start)
        bad = _warm_start_violations(prob, start)
        if bad:
            log.warning(
                "warm start for problem %r is infeasible (%d violations, first: %s); the "
                "solver will most likely discard it",
                prob.name,
                len(bad),
                bad[0],
            )

    log.debug(
        "solving %r with %s: %d variables (%d binary), %d constraints, %d non-zeros",
        prob.name,
        solver,
        size.n_variables,
        size.n_binaries,
        size.n_constraints,
        size.n_nonzeros,
    )
    t0 = time.perf_counter()
    try:
        outcome = _BACKENDS[solver](
            prob,
            time_limit=time_limit,
            gap=gap,
            threads=threads,
            node_limit=node_limit,
            start=start,
            msg=msg,
        )
    except Exception as exc:
        raise SolverError(
            f"solver {solver!r} failed on problem {prob.name!r}: {describe(exc)}; rerun "
            f"with msg=True to see the solver's log, or try another solver"
        ) from exc
    seconds = time.perf_counter() - t0

    status = outcome.status
    values: dict[str, float] | None = None
    objective: float | None = None
    dual_bound: float | None = None
    gap_out: float | None = None
    if status in ("optimal", "feasible"):
        values = {
            v.name: float(v.varValue) if v.varValue is not None else math.nan
            for v in variables
        }
        objective = _objective_at(prob, values)
        if outcome.raw_bound is not None:
            # The solvers leave out the objective's constant; recover the offset from their own
            # objective value where they give one, so the bound matches ``objective``.
            if outcome.raw_objective is not None:
                offset = objective - outcome.raw_objective
            else:
                offset = float(prob.objective.constant) if prob.objective is not None else 0.0
            dual_bound = outcome.raw_bound + offset
        elif status == "optimal":
            dual_bound = objective  # an LP, or a solver that gives no bound for a proof
        gap_out = _gap(objective, dual_bound)
        if gap_out is None and status == "optimal":
            gap_out = 0.0

    result = SolveResult(
        solver=solver,
        status=status,
        objective=objective,
        dual_bound=dual_bound,
        gap=gap_out,
        seconds=seconds,
        n_variables=size.n_variables,
        n_binaries=size.n_binaries,
        n_constraints=size.n_constraints,
        n_nonzeros=size.n_nonzeros,
        warm_start_objective=warm_objective,
        values=values,
    )
    log.info(
        "%s on %r: %s, objective %s, bound %s, gap %s, %.3f s",
        solver,
        prob.name,
        status,
        objective,
        dual_bound,
        gap_out,
        seconds,
    )
    return result


def complete_solution(
    prob: pulp.LpProblem,
    fixed: Mapping[pulp.LpVariable, float],
    *,
    solver: str = "highs",
    time_limit: float | None = None,
    threads: int | None = None,
) -> tuple[dict[pulp.LpVariable, float], float] | None:
    """Extend a partial assignment (usually every binary) to a complete solution of ``prob``.

    The variables in ``fixed`` are held at their values while the rest is solved for (an LP when
    every integer variable is fixed); their bounds are restored afterwards.  Returns the values of
    every variable and the objective, or ``None`` when no completion exists.  This turns a plan
    into a MIP start that satisfies every auxiliary row (products, slacks, rounding counters).
    """
    saved = {v: (v.lowBound, v.upBound) for v in fixed}
    for v, value in fixed.items():
        v.lowBound = v.upBound = float(value)
    with variables_listed_once(prob):
        try:
            result = solve(prob, solver=solver, time_limit=time_limit, threads=threads)
        finally:
            for v, (lo, hi) in saved.items():
                v.lowBound, v.upBound = lo, hi
        if not result.has_solution():
            return None
        values = {v: float(v.varValue) for v in prob.variables() if v.varValue is not None}
    return values, float(result.objective) if result.objective is not None else float("nan")

"""One place that solves a :class:`pulp.LpProblem` with a named solver and says what happened.

PuLP's own status is not enough to tell apart "proved optimal", "stopped at a limit with a
solution" and "stopped at a limit with nothing": with a time limit and an incumbent, PuLP 3.3's
HiGHS interface reports ``LpStatusOptimal`` and only ``prob.sol_status`` says
``LpSolutionIntegerFeasible``.  :func:`solve` therefore reads PuLP's status *and* the solver's
own status (the highspy model, CBC's solution-file header and log, SCIP's status string) and
returns a :class:`SolveResult` with one of six statuses:

``optimal``
    The solver proved optimality (within its relative gap tolerance: ``gap``, or the solver's
    default, 1e-4 for HiGHS and SCIP, 0 for CBC).
``feasible``
    A limit (time, nodes, ...) stopped the solver while it held an incumbent; ``gap`` says how
    far from proven it is, where the solver gives a bound.
``no_solution``
    A limit stopped the solver before it found any feasible point.
``infeasible`` / ``unbounded``
    Proven by the solver.
``error``
    The solver returned, but without a usable answer (numerical trouble, an internal status
    that means nothing was solved).  An exception raised by the solver becomes
    :class:`~oamipc.errors.SolverError` instead.

Solvers: ``highs`` (in-process through highspy; the default), ``cbc`` (the binary bundled with
PuLP) and ``scip`` (through pyscipopt, when installed).  All three take a MIP start
(``warm_start``); HiGHS gets it through ``Highs.setSolution`` on the model PuLP builds, because
PuLP 3.3's HiGHS class has no warm start of its own.

Results are deterministic for a given problem and solver as long as no time limit stops the
search: HiGHS runs with ``random_seed=0``, CBC with fixed seeds (and repeatable threads), SCIP
with its default seed shift 0.  A time limit makes the stopping point depend on machine load;
use ``node_limit`` where a reproducible early stop is needed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import pulp
from pulp import constants as lpc

from oamipc.errors import SolverError, UsageError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class SolveResult:
    """What one solver run produced, stated honestly.

    ``status`` is one of :data:`STATUSES` (see the module docstring).  ``objective`` and
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
    n_nz = sum(
        1 for c in prob.constraints.values() for coef in c.values() if coef != 0
    )
    return ProblemSize(len(variables), n_bin, len(prob.constraints), n_nz)


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def _cbc_class() -> type | None:
    """The PuLP class that runs CBC here: PuLP's bundled binary first, a CBC on PATH second."""
    for name in ("PULP_CBC_CMD", "COIN_CMD"):
        base = getattr(pulp, name, None)
        if base is None:
            continue
        try:
            with warnings.catch_warnings():
                # PULP_CBC_CMD is deprecated for PuLP 4.0; it is still the CBC that PuLP ships.
                warnings.simplefilter("ignore", DeprecationWarning)
                ok = bool(base(msg=False).available())
        except Exception:  # noqa: BLE001 - a broken install simply is not available
            ok = False
        if ok:
            return base
    return None


def _is_available(name: str) -> bool:
    if name == "highs":
        try:
            import highspy  # noqa: F401
        except ImportError:
            return False
        return bool(pulp.HiGHS(msg=False).available())
    if name == "cbc":
        return _cbc_class() is not None
    if name == "scip":
        try:
            import pyscipopt  # noqa: F401
        except ImportError:
            return False
        return bool(pulp.SCIP_PY(msg=False).available())
    return False


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
# Shared helpers
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _default_start(var: pulp.LpVariable) -> float:
    """Start value of a variable the warm start does not mention."""
    if var.varValue is not None:
        return float(var.varValue)
    if var.lowBound is not None:
        return float(var.lowBound)
    if var.upBound is not None and var.upBound < 0:
        return float(var.upBound)
    return 0.0


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
        values[var.name] = given.pop(var.name) if var.name in given else _default_start(var)
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
    for var in prob.variables():
        x = values[var.name]
        if var.lowBound is not None and x < var.lowBound - _FEAS_TOL:
            bad.append(f"lower bound of {var.name}")
        if var.upBound is not None and x > var.upBound + _FEAS_TOL:
            bad.append(f"upper bound of {var.name}")
        if var.cat == lpc.LpInteger and abs(x - round(x)) > _FEAS_TOL:
            bad.append(f"integrality of {var.name}")
    for name, con in prob.constraints.items():
        lhs = float(con.constant) + sum(coef * values[v.name] for v, coef in con.items())
        tol = _FEAS_TOL * max(1.0, abs(float(con.constant)))
        if (con.sense == lpc.LpConstraintLE and lhs > tol) or (
            con.sense == lpc.LpConstraintGE and lhs < -tol
        ) or (con.sense == lpc.LpConstraintEQ and abs(lhs) > tol):
            bad.append(f"constraint {name}")
    return bad


def _is_mip(prob: pulp.LpProblem) -> bool:
    return any(v.cat == lpc.LpInteger for v in prob.variables())


def _gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None:
        return None
    g = abs(objective - bound) / max(1e-9, abs(objective))
    return 0.0 if g < _GAP_NOISE else g


@dataclass
class _Outcome:
    """What a solver backend reports back to :func:`solve`."""

    status: str
    # Dual bound in the problem's sense, *without* the objective's constant term.
    raw_bound: float | None = None
    # The solver's objective value of its incumbent, without the constant (None: unknown).
    raw_objective: float | None = None


# --------------------------------------------------------------------------------------------
# HiGHS
# --------------------------------------------------------------------------------------------

# HiGHS builds one thread pool per process at its first run; a later run that asks for another
# number of threads fails with "Not Solved".  The first setting made through this module wins.
_HIGHS_LOCK = threading.Lock()
_HIGHS_THREADS_FIXED = False
_HIGHS_THREADS: int = 0  # 0: HiGHS's default
_HIGHS_BANNER_SHOWN = False

_HIGHS_LIMIT_STATUSES = frozenset(
    {
        "kTimeLimit",
        "kIterationLimit",
        "kSolutionLimit",
        "kObjectiveBound",
        "kObjectiveTarget",
        "kInterrupt",
        "kHighsInterrupt",
        "kMemoryLimit",
    }
)


def _highs_threads(requested: int | None) -> int | None:
    """The ``threads`` option to give HiGHS now, honouring the process-wide first setting."""
    global _HIGHS_THREADS_FIXED, _HIGHS_THREADS
    with _HIGHS_LOCK:
        want = 0 if requested is None else int(requested)
        if not _HIGHS_THREADS_FIXED:
            _HIGHS_THREADS_FIXED = True
            _HIGHS_THREADS = want
            return requested
        if want == _HIGHS_THREADS:
            return requested
        if requested is not None:
            log.warning(
                "HiGHS threads=%d ignored: HiGHS fixes its thread pool at the first solve of a "
                "process (threads=%s here); start a new process to change it",
                want,
                _HIGHS_THREADS or "default",
            )
        return None


def reset_after_fork() -> None:
    """Make HiGHS usable in a process forked from one that already solved with it.

    A forked child inherits HiGHS's global task scheduler but none of its worker threads, so its
    first solve would wait for them forever; this drops the inherited scheduler (and the
    remembered thread setting) so the child starts its own.  Call it first thing in a worker.
    """
    global _HIGHS_THREADS_FIXED, _HIGHS_THREADS
    _HIGHS_THREADS_FIXED = False
    _HIGHS_THREADS = 0
    try:
        import highspy
    except ImportError:
        return
    reset = getattr(highspy.Highs, "resetGlobalScheduler", None)
    if reset is not None:
        reset(True)


@contextlib.contextmanager
def _stdout_fd_silenced(active: bool) -> Iterator[None]:
    """Send file descriptor 1 to the null device (C-level prints such as HiGHS's banner)."""
    if not active:
        yield
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).fflush(None)  # flush C stdio before fd 1 points back
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _HighsSolver(pulp.HiGHS):  # type: ignore[misc]
    """PuLP's HiGHS interface plus a MIP start, a quiet start-up and robust status reading.

    PuLP's ``actualSolve`` calls ``createAndConfigureSolver`` (makes ``lp.solverModel``),
    ``buildSolverModel`` (adds the columns, numbering them in ``var.index``), ``callSolver``
    (runs) and ``findSolutionValues`` (reads back).  The MIP start is set in ``callSolver``,
    where the columns exist and their order is known.
    """

    def __init__(self, *, start: Mapping[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start = start
        self.start_accepted: bool | None = None
        self.reran_without_presolve = False

    def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP hook
        global _HIGHS_BANNER_SHOWN
        # highspy prints a banner on stdout when the first Highs object of a process is made,
        # before output_flag can be switched off.
        with _stdout_fd_silenced(not self.msg and not _HIGHS_BANNER_SHOWN):
            super().createAndConfigureSolver(lp)
        _HIGHS_BANNER_SHOWN = True

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP hook
        import highspy
        import numpy as np

        h = lp.solverModel
        if self.start is not None:
            n = int(h.getNumCol())
            col = np.zeros(n, dtype=np.float64)
            for var in lp.variables():
                # .get: PuLP adds a "__dummy" column to problems without an objective.
                col[var.index] = self.start.get(var.name, _default_start(var))
            st = h.setSolution(n, np.arange(n, dtype=np.int32), col)
            self.start_accepted = st != highspy.HighsStatus.kError
            if not self.start_accepted:
                log.warning("HiGHS rejected the warm start (setSolution returned %s)", st)
        run_status = h.run()
        model_status = h.getModelStatus()
        if (
            run_status == highspy.HighsStatus.kError
            and model_status.name == "kNotset"
            and self.threads
        ):
            # Another part of the process already started HiGHS with a different thread count.
            log.warning(
                "HiGHS refused threads=%s (its thread pool is fixed per process); "
                "rerunning with the existing pool",
                self.threads,
            )
            h.setOptionValue("threads", 0)
            h.run()
            model_status = h.getModelStatus()
        if model_status.name == "kUnboundedOrInfeasible":
            # Presolve found the problem infeasible *or* unbounded; the solver without presolve
            # tells which.  (This second run gets the full time limit again.)
            log.info("HiGHS: infeasible or unbounded after presolve; rerunning without presolve")
            self.reran_without_presolve = True
            h.setOptionValue("presolve", "off")
            h.run()

    def findSolutionValues(self, lp: pulp.LpProblem) -> tuple[int, int]:  # noqa: N802
        import highspy

        try:
            return super().findSolutionValues(lp)  # type: ignore[no-any-return]
        except KeyError:
            # A model status PuLP 3.3 does not map (kSolutionLimit from a node limit,
            # kMemoryLimit, kHighsInterrupt): read the solution ourselves.
            h = lp.solverModel
            if h.getInfo().primal_solution_status == highspy.kSolutionStatusFeasible:
                col = list(h.getSolution().col_value)
                for var in lp.variables():
                    var.varValue = col[var.index]
                return lpc.LpStatusOptimal, lpc.LpSolutionIntegerFeasible
            return lpc.LpStatusNotSolved, lpc.LpSolutionNoSolutionFound


def _solve_highs(
    prob: pulp.LpProblem,
    *,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
    start: Mapping[str, float] | None,
    msg: bool,
) -> _Outcome:
    import highspy

    options: dict[str, Any] = {"random_seed": 0}
    if node_limit is not None:
        options["mip_max_nodes"] = int(node_limit)
    mip = _is_mip(prob)
    solver = _HighsSolver(
        start=start if mip else None,
        msg=msg,
        timeLimit=time_limit,
        gapRel=gap,
        threads=_highs_threads(threads),
        **options,
    )
    prob.solve(solver)

    h = prob.solverModel
    name = h.getModelStatus().name
    info = h.getInfo()
    has_point = (
        info.primal_solution_status == highspy.kSolutionStatusFeasible
        and prob.sol_status in (lpc.LpSolutionOptimal, lpc.LpSolutionIntegerFeasible)
    )
    sign = -1.0 if prob.sense == lpc.LpMaximize else 1.0  # PuLP hands HiGHS a minimisation
    raw_obj = sign * float(h.getObjectiveValue()) if has_point else None
    raw_bound: float | None = None
    if mip and math.isfinite(info.mip_dual_bound):
        raw_bound = sign * float(info.mip_dual_bound)
    log.debug(
        "HiGHS: model status %s, PuLP status %s / sol_status %s, primal status %s, "
        "mip_dual_bound %s, mip_gap %s, nodes %s",
        name,
        prob.status,
        prob.sol_status,
        info.primal_solution_status,
        info.mip_dual_bound,
        info.mip_gap,
        info.mip_node_count,
    )

    if name in ("kOptimal", "kModelEmpty"):
        status = "optimal" if has_point or name == "kModelEmpty" else "error"
    elif name == "kInfeasible":
        status = "infeasible"
    elif name == "kUnbounded":
        status = "unbounded"
    elif name == "kUnboundedOrInfeasible":
        log.warning(
            "HiGHS could not tell whether problem %r is infeasible or unbounded; reporting "
            "infeasible",
            prob.name,
        )
        status = "infeasible"
    elif name in _HIGHS_LIMIT_STATUSES:
        status = "feasible" if has_point else "no_solution"
    else:  # kNotset, kLoadError, kModelError, kPresolveError, kSolveError, kPostsolveError, ...
        log.warning("HiGHS returned model status %s on problem %r", name, prob.name)
        status = "error"
    return _Outcome(status, raw_bound=raw_bound, raw_objective=raw_obj)


# --------------------------------------------------------------------------------------------
# CBC
# --------------------------------------------------------------------------------------------

_CBC_BOUND_RE = re.compile(r"^\s*(?:Lower|Upper) bound:\s*(\S+)", re.MULTILINE)
_CBC_OBJ_RE = re.compile(r"^\s*Objective value:\s*(\S+)", re.MULTILINE)


def _cbc_solver_class(base: type) -> type:
    """``base`` (a PuLP CBC class) that also keeps the first line of CBC's solution file."""

    class _CbcSolver(base):  # type: ignore[misc, valid-type]
        status_line = ""

        def get_status(self, filename: str) -> tuple[int, int]:
            try:
                with open(filename) as f:
                    self.status_line = f.readline().strip()
            except OSError:
                self.status_line = ""
            return super().get_status(filename)  # type: ignore[no-any-return]

    return _CbcSolver


def _parse_float(text: str) -> float | None:
    try:
        val = float(text)
    except ValueError:
        return None
    return val if math.isfinite(val) else None


def _solve_cbc(
    prob: pulp.LpProblem,
    *,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
    start: Mapping[str, float] | None,
    msg: bool,
) -> _Outcome:
    base = _cbc_class()
    assert base is not None  # checked by solve()
    if start is not None:
        for var in prob.variables():
            var.setInitialValue(start[var.name])
    # randomCbcSeed 0 would mean "time of day": pin both seeds.  threads 100+n makes CBC's
    # parallel search repeatable.
    options = ["randomCbcSeed 1", "randomSeed 1234567"]
    cbc_threads = None if threads is None or threads <= 1 else 100 + int(threads)
    with tempfile.TemporaryDirectory(prefix="oamipc-cbc-") as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = _cbc_solver_class(base)(
                msg=False,  # CBC's log always goes to log_path; msg forwards it to the logger
                timeLimit=time_limit,
                gapRel=gap,
                threads=cbc_threads,
                maxNodes=node_limit,
                warmStart=start is not None,
                logPath=log_path,
                options=options,
            )
        # PuLP writes the model and solution files to the system temp directory by default: put
        # them in ours, which is removed even when the solve is interrupted (Ctrl-C).
        solver.tmpDir = tmp
        try:
            prob.solve(solver)
        finally:
            try:
                with open(log_path) as f:
                    cbc_log = f.read()
            except OSError:
                cbc_log = ""
            if msg:
                for line in cbc_log.splitlines():
                    log.info("cbc: %s", line)
    line = solver.status_line
    log.debug("CBC: %r, PuLP status %s / sol_status %s", line, prob.status, prob.sol_status)

    result_at = cbc_log.rfind("Result -")
    tail = cbc_log[result_at:] if result_at >= 0 else ""
    bound_m = _CBC_BOUND_RE.search(tail)
    obj_m = _CBC_OBJ_RE.search(tail)
    raw_bound = _parse_float(bound_m.group(1)) if bound_m else None
    raw_obj = _parse_float(obj_m.group(1)) if obj_m else None

    has_point = prob.sol_status in (lpc.LpSolutionOptimal, lpc.LpSolutionIntegerFeasible)
    if line.startswith("Optimal"):
        status = "optimal" if has_point else "error"
    elif line.startswith(("Infeasible", "Integer infeasible")):
        status = "infeasible"
    elif line.startswith("Unbounded"):
        status = "unbounded"
    elif line.startswith("Stopped"):
        if has_point:
            status = "feasible"
        elif "difficulties" in line:
            status = "error"
        else:
            status = "no_solution"
    else:
        log.warning("CBC returned %r on problem %r", line, prob.name)
        status = "error"
    if not has_point:
        raw_obj = None
    return _Outcome(status, raw_bound=raw_bound, raw_objective=raw_obj)


# --------------------------------------------------------------------------------------------
# SCIP
# --------------------------------------------------------------------------------------------

_SCIP_LIMIT_STATUSES = frozenset(
    {
        "timelimit",
        "userinterrupt",
        "nodelimit",
        "totalnodelimit",
        "stallnodelimit",
        "memlimit",
        "sollimit",
        "bestsollimit",
        "restartlimit",
        "primallimit",
        "duallimit",
        "terminate",
    }
)


class _ScipSolver(pulp.SCIP_PY):  # type: ignore[misc]
    """PuLP's SCIP interface with a pinned seed and tolerance for statuses PuLP does not map."""

    def buildSolverModel(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP hook
        super().buildSolverModel(lp)
        lp.solverModel.setParam("randomization/randomseedshift", 0)

    def findSolutionValues(self, lp: pulp.LpProblem) -> int:  # noqa: N802 - PuLP hook
        model = lp.solverModel
        try:
            status = super().findSolutionValues(lp)
        except KeyError:
            status = lpc.LpStatusUndefined
            lp.assignStatus(status, lpc.LpSolutionNoSolutionFound)
        if (
            lp.sol_status not in (lpc.LpSolutionOptimal, lpc.LpSolutionIntegerFeasible)
            and model.getStatus() in _SCIP_LIMIT_STATUSES
            and model.getNSols() > 0
        ):
            best = model.getBestSol()
            for var in lp.variables():
                var.varValue = model.getSolVal(best, var.solverVar)
            status = lpc.LpStatusOptimal
            lp.assignStatus(status, lpc.LpSolutionIntegerFeasible)
        return status  # type: ignore[no-any-return]


def _solve_scip(
    prob: pulp.LpProblem,
    *,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
    start: Mapping[str, float] | None,
    msg: bool,
) -> _Outcome:
    if start is not None:
        for var in prob.variables():
            var.setInitialValue(start[var.name])
    if threads is not None and threads > 1:
        log.info("SCIP runs single-threaded; threads=%d ignored", threads)
    solver = _ScipSolver(
        msg=msg,
        timeLimit=time_limit,
        gapRel=gap,
        maxNodes=node_limit,
        warmStart=start is not None,
    )
    prob.solve(solver)
    model = prob.solverModel
    scip_status = str(model.getStatus())
    has_point = prob.sol_status in (lpc.LpSolutionOptimal, lpc.LpSolutionIntegerFeasible)
    log.debug("SCIP: %s, PuLP status %s / sol_status %s", scip_status, prob.status, prob.sol_status)
    # PuLP gives SCIP no objective constant: solve() adds it back to the bound.
    raw_bound = None
    with contextlib.suppress(Exception):
        raw_bound = _parse_float(str(model.getDualbound()))

    if scip_status in ("optimal", "gaplimit"):  # gaplimit: proved within the requested gap
        status = "optimal" if has_point else "error"
    elif scip_status == "infeasible":
        status = "infeasible"
    elif scip_status == "unbounded":
        status = "unbounded"
    elif scip_status == "inforunbd":
        log.warning(
            "SCIP could not tell whether problem %r is infeasible or unbounded; reporting "
            "infeasible",
            prob.name,
        )
        status = "infeasible"
    elif scip_status in _SCIP_LIMIT_STATUSES:
        status = "feasible" if has_point else "no_solution"
    else:
        log.warning("SCIP returned status %r on problem %r", scip_status, prob.name)
        status = "error"
    return _Outcome(status, raw_bound=raw_bound)


_BACKENDS = {"highs": _solve_highs, "cbc": _solve_cbc, "scip": _solve_scip}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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
    """Solve ``prob`` with ``solver`` and report what happened (see the module docstring).

    ``time_limit`` is in seconds; ``gap`` is the relative gap at which the solver may stop and
    call the result optimal; ``threads`` is a wish: HiGHS keeps the first value used in a
    process (a later different one is logged and ignored), CBC runs ``threads > 1`` in its
    repeatable parallel mode, SCIP is single-threaded.  ``warm_start`` maps variables to start
    values (a MIP start); variables it leaves out start at their current ``varValue``, or else
    their lower bound (or 0).  ``node_limit`` stops branch and bound after that many nodes
    (HiGHS ``mip_max_nodes``: 0 stops before the root, so only a warm start can be returned;
    CBC ``maxNodes``: 0 still runs the root heuristics) - a reproducible alternative to
    ``time_limit``.  ``msg`` shows the solver's log: HiGHS and SCIP print it, CBC's is sent
    to this module's logger at INFO level after the run.

    The solution is also left in the variables (``var.varValue``), as PuLP does.  Raises
    :class:`UsageError` for an unknown solver or out-of-range option and :class:`SolverError`
    when the solver is not installed or raises.
    """
    _check_options(solver, time_limit, gap, threads, node_limit)
    if not isinstance(prob, pulp.LpProblem):
        raise UsageError(f"solve() needs a pulp.LpProblem, got {type(prob).__name__}")
    require_solver(solver)

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
    except Exception as exc:  # noqa: BLE001 - any solver failure is reported as SolverError
        raise SolverError(
            f"solver {solver!r} failed on problem {prob.name!r}: {_first_line(exc)}; rerun "
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
    try:
        result = solve(prob, solver=solver, time_limit=time_limit, threads=threads)
    finally:
        for v, (lo, hi) in saved.items():
            v.lowBound, v.upBound = lo, hi
    if not result.has_solution():
        return None
    values = {v: float(v.varValue) for v in prob.variables() if v.varValue is not None}
    return values, float(result.objective) if result.objective is not None else float("nan")

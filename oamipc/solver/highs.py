"""The HiGHS backend: in-process through highspy, the default solver.

PuLP 3.3's HiGHS class has no MIP start, says nothing about statuses it does not map (a node
limit's ``kSolutionLimit``) and lets highspy print its banner on stdout; :class:`_HighsSolver`
adds the start through ``Highs.setSolution``, reads those statuses itself and silences the
banner.  HiGHS also fixes its thread pool at the first solve of a process, and a forked child
inherits that pool without its threads: this module remembers the first setting and
:func:`reset_after_fork` lets a forked worker start afresh.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pulp
from pulp import constants as lpc

from oamipc.solver.backend import Outcome, default_start, is_mip

__all__ = ["available", "reset_after_fork", "run"]

log = logging.getLogger("oamipc.solver")  # the package's one logger: the name users see and filter on


def available() -> bool:
    """Whether highspy is installed and PuLP can drive it."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return bool(pulp.HiGHS(msg=False).available())


# HiGHS builds one thread pool per process at its first run; a later run that asks for another
# number of threads fails with "Not Solved".  The first setting made through this module wins.
_HIGHS_LOCK = threading.Lock()
_HIGHS_THREADS_FIXED = False
_HIGHS_THREADS: int = 0  # 0: HiGHS's default
_HIGHS_BANNER_SHOWN = False

ROW_BLOCK_NONZEROS = 1 << 22  # matrix entries handed to HiGHS per addRows call (48 MB of indices and values)

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

    def buildSolverModel(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP hook
        """PuLP's model, handed over in blocks of rows instead of one ``addRow`` call a row.

        The same columns (order, costs, bounds, integrality) and the same rows (order, entries in
        each row's order, zero coefficients dropped, bounds) as PuLP's own ``buildSolverModel``;
        only the calls differ: the columns at once, the rows in blocks of at most
        :data:`ROW_BLOCK_NONZEROS` entries, each row's entries read with ``numpy.fromiter``.  A
        MobileNetV2 head's sub-problem (64,000 rows of about 1,280 entries) spent about a minute
        in PuLP's per-row tuples and calls.
        """
        import highspy
        import numpy as np

        inf = highspy.kHighsInf
        h = lp.solverModel
        sign = -1 if lp.sense == lpc.LpMaximize else 1
        variables = lp.variables()
        n = len(variables)
        cost = np.array([sign * lp.objective.get(var, 0.0) for var in variables], dtype=np.float64)
        lower = np.array([-inf if var.lowBound is None else var.lowBound for var in variables], dtype=np.float64)
        upper = np.array([inf if var.upBound is None else var.upBound for var in variables], dtype=np.float64)
        for i, var in enumerate(variables):
            var.index = i
        empty_i, empty_f = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64)
        h.addCols(n, cost, lower, upper, 0, empty_i, empty_i, empty_f)
        if self.mip:
            integer = [var.index for var in variables if var.cat == lpc.LpInteger]
            if integer:
                h.changeColsIntegrality(len(integer), np.array(integer, dtype=np.int32),
                                        np.full(len(integer), highspy.HighsVarType.kInteger.value, dtype=np.uint8))
        block: list[tuple[Any, ...]] = []
        entries = 0
        for i, constraint in enumerate(lp._constraints.values()):
            constraint.index = i
            count = len(constraint)
            index = np.fromiter((var.index for var in constraint), dtype=np.int32, count=count)
            value = np.fromiter(constraint.values(), dtype=np.float64, count=count)
            nonzero = value != 0
            lb, ub = constraint.getLb(), constraint.getUb()
            block.append((-inf if lb is None else lb, inf if ub is None else ub, index[nonzero], value[nonzero]))
            entries += int(nonzero.sum())
            if entries >= ROW_BLOCK_NONZEROS:
                _add_rows(h, block)
                block, entries = [], 0
        if block:
            _add_rows(h, block)

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP hook
        import highspy
        import numpy as np

        h = lp.solverModel
        if self.start is not None:
            n = int(h.getNumCol())
            col = np.zeros(n, dtype=np.float64)
            for var in lp.variables():
                # .get: PuLP adds a "__dummy" column to problems without an objective.
                col[var.index] = self.start.get(var.name, default_start(var))
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


def _add_rows(h: Any, block: list[tuple[Any, ...]]) -> None:
    """Add rows ``(lower, upper, indices, values)`` to the HiGHS model ``h`` in one call."""
    import numpy as np

    lower = np.array([row[0] for row in block], dtype=np.float64)
    upper = np.array([row[1] for row in block], dtype=np.float64)
    starts = np.zeros(len(block), dtype=np.int32)
    np.cumsum([len(row[2]) for row in block[:-1]], out=starts[1:])
    index = np.concatenate([row[2] for row in block])
    value = np.concatenate([row[3] for row in block])
    h.addRows(len(block), lower, upper, len(index), starts, index, value)


def run(
    prob: pulp.LpProblem,
    *,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
    start: Mapping[str, float] | None,
    msg: bool,
) -> Outcome:
    import highspy

    options: dict[str, Any] = {"random_seed": 0}
    if node_limit is not None:
        options["mip_max_nodes"] = int(node_limit)
    mip = is_mip(prob)
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
    return Outcome(status, raw_bound=raw_bound, raw_objective=raw_obj)

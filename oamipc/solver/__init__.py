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

Layout: :mod:`~oamipc.solver.core` holds what does not depend on the solver (option checks,
warm starts, dispatch, :class:`SolveResult`); :mod:`~oamipc.solver.check` evaluates a problem's
rows at a given point (which are violated, which are near-ties) without solving; :mod:`~oamipc.solver.highs`,
:mod:`~oamipc.solver.cbc` and :mod:`~oamipc.solver.scip` each drive one solver and report an
:class:`~oamipc.solver.backend.Outcome` (:mod:`~oamipc.solver.backend` is their contract).  This
package re-exports the public API; import it from here.
"""

from __future__ import annotations

from oamipc.solver.check import RowSlack, describe_slacks, row_slacks
from oamipc.solver.core import (
    SOLVERS,
    STATUSES,
    ProblemSize,
    SolveResult,
    available_solvers,
    complete_solution,
    problem_size,
    require_solver,
    solve,
    variables_listed_once,
)
from oamipc.solver.highs import reset_after_fork

__all__ = [
    "SOLVERS",
    "STATUSES",
    "ProblemSize",
    "RowSlack",
    "SolveResult",
    "available_solvers",
    "complete_solution",
    "describe_slacks",
    "problem_size",
    "require_solver",
    "reset_after_fork",
    "row_slacks",
    "solve",
    "variables_listed_once",
]

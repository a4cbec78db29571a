"""The SCIP backend: in-process through pyscipopt (the optional ``scip`` extra).

PuLP's SCIP interface leaves the seed to SCIP, raises on statuses it does not map
(``primallimit``, ``duallimit``, ``terminate``) and drops the incumbent of some limits
(``sollimit``, ``restartlimit``); :class:`_ScipSolver` pins the seed and reads the incumbent of
any limit itself.  pyscipopt is imported only when SCIP is asked for, so oamipc runs without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import pulp
from pulp import constants as lpc

from oamipc.solver.backend import Outcome, parse_float

__all__ = ["available", "run"]

log = logging.getLogger("oamipc.solver")  # the package's one logger: the name users see and filter on


def available() -> bool:
    """Whether pyscipopt is installed and PuLP can drive it."""
    try:
        import pyscipopt  # noqa: F401
    except ImportError:
        return False
    return bool(pulp.SCIP_PY(msg=False).available())


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
        raw_bound = parse_float(str(model.getDualbound()))

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
    return Outcome(status, raw_bound=raw_bound)

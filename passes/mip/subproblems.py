"""The budget formulation's layer sub-problems as tasks: solved ahead, consumed in order.

:meth:`.budget.BudgetSolver.run` visits the groups one after another, each sub-problem starting
from the plan the previous ones left; a sub-problem depends on the others only through that
plan.  With a remote dispatch (``--executor ray``, :mod:`.remote`) the next ``workers`` groups
that will be solved are solved at once, at the current plan, as tasks; the run then takes them in
order, exactly as one worker would have: once a sub-problem's plan is accepted the plan has
moved, and the results solved ahead at the old plan are dropped and solved again at the new
one.  So the plan does not depend on the number of workers; only work a move makes useless is
wasted.  The solver state (network, unit graph, MILP samples) goes to the object store once per
run.  With the local dispatch nothing changes: every sub-problem is solved here when its turn comes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from oamipc.errors import UnsupportedGraphError
from oamipc.units import UnitGroup

from .remote import resolve, solver_threads

if TYPE_CHECKING:
    from .budget import BudgetSolver, SubProblemRecord

log = logging.getLogger(__name__)

# What solving a sub-problem writes into its record (the rest is the run's bookkeeping).
_SOLVED_FIELDS = ("outcome", "solve", "encoding", "build_seconds", "objective_warm", "time_limited", "note")


class SubProblemsAhead:
    """Solves a solver's sub-problems where its dispatch says (see the module docstring)."""

    def __init__(self, solver: BudgetSolver) -> None:
        self.solver = solver
        self.results: dict[tuple[int, bytes], tuple[Any, ...]] = {}
        self.state: Any = None  # the solver's worker copy, once in the object store

    def solve(self, group: UnitGroup, free: list[int], current: np.ndarray, time_limit: float,
              record: SubProblemRecord, order: list[UnitGroup]) -> np.ndarray | None:
        """:meth:`.budget.BudgetSolver.solve_group`'s answer for ``group`` at ``current``."""
        solver = self.solver
        if not solver.where.remote:
            return solver.solve_group(group, free, current, time_limit, record)
        plan = current.tobytes()
        if (group.id, plan) not in self.results:
            batch = [(group, free)] + self.upcoming(group, order)[:solver.where.workers - 1]
            tasks = [(g, f, _fresh_record(g, f, current)) for g, f in batch]
            results = solver.where.map(_group_task, (self.worker_state(), current, time_limit, tasks), len(tasks))
            self.results = {(g.id, plan): res for (g, _), res in zip(batch, results)}
        solved, candidate, error, unsupported = self.results.pop((group.id, plan))
        record.__dict__.update({k: getattr(solved, k) for k in _SOLVED_FIELDS})
        if unsupported is not None:
            raise UnsupportedGraphError(unsupported)
        if error is not None:
            solver.solver_error = error
            log.warning("MILP for %s: %s; keeping the plan found so far and skipping the remaining MILPs",
                        group.name, error)
        return None if candidate is None else np.array(candidate)  # writable (the object store's is not)

    def upcoming(self, group: UnitGroup, order: list[UnitGroup]) -> list[tuple[UnitGroup, list[int]]]:
        """The groups after ``group`` in ``order`` whose turn will solve a sub-problem (as :meth:`run` decides)."""
        from .budget import exact_too_large

        solver = self.solver
        out = []
        for g in order[next(i for i, g in enumerate(order) if g is group) + 1:]:
            free = [u for u in g.units if not solver.pinned[u] and u not in solver.forced]
            if free and exact_too_large(solver, g, free) is None:
                out.append((g, free))
        return out

    def worker_state(self) -> Any:
        """A handle to what a sub-problem needs of the solver (put in the object store once)."""
        if self.state is None:
            solver = self.solver
            shell = copy.copy(solver)
            calib = solver.calib
            shell.calib = dataclasses.replace(calib, x_hold=calib.x_hold[:0], y_hold=calib.y_hold[:0],
                                              margin_hold=calib.margin_hold[:0])
            shell.opts = dataclasses.replace(solver.opts, threads=solver_threads(solver.opts.threads, solver.where))
            for name in ("progress", "plain_net", "net", "plain_heldout", "heldout", "where", "ahead"):
                setattr(shell, name, None)
            shell.records, shell.joint_rounds, shell.joint_effects = [], [], []
            self.state = solver.where.put(shell)
        return self.state


def _fresh_record(group: UnitGroup, free: list[int], current: np.ndarray) -> SubProblemRecord:
    from .budget import SubProblemRecord

    kept = int(current[group.units].sum())
    return SubProblemRecord(group.name, len(free), kept, kept, "skipped")


def _group_task(shared: tuple[Any, np.ndarray, float, list[tuple[UnitGroup, list[int], Any]]],
                index: int) -> tuple[Any, np.ndarray | None, str | None, str | None]:
    """One sub-problem in a worker: (its record, the candidate plan, a solver error, a missing encoding)."""
    state, current, time_limit, tasks = shared
    solver = resolve(state)
    current = np.array(current)  # writable (an array from the object store is not)
    group, free, record = tasks[index]
    solver.solver_error = None
    try:
        candidate = solver.solve_group(group, free, current, time_limit, record)
    except UnsupportedGraphError as exc:
        return record, None, None, str(exc)
    return record, candidate, solver.solver_error, None

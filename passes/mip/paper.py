"""The MIP planner's ``paper`` formulation: the thesis's continuous importance scores.

What the OAMIP thesis does (method notes, section 2), with a linear loss so that it stays a MILP:

* one continuous score ``s_u`` in [0, 1] per free unit of *every* prunable group, shared by all
  samples and all positions of a channel;
* a unit enters every layer that reads it through the shifted ReLU ``relu(x - (1 - s_u) U+)``
  (``U+`` the upper bound of ``x``; :mod:`.encoder`, ``mode="paper"``): ``s = 1`` is the
  network, ``s = 0`` removes the unit;
* loss: the multiclass hinge on the logit margin, ``xi_k >= M_k - (z_y - z_c)`` for ``c != y``
  with ``M_k`` the original network's margin (the thesis's log-sum-exp would need a conic solver);
* objective ``lambda * mean xi + sum_groups (1 / N_g) sum_u (s_u - 2)`` (``lambda = 5``);
* calibration: one correctly classified sample per class (``--mip-samples`` changes the count;
  samples are taken per class in the calibration set's seeded, stratified order), one MILP per
  class (the thesis's scale trick) with the scores averaged over the classes.  The per-class
  problems are independent: ``--jobs N`` solves them in N forked worker processes (where the
  platform has fork; elsewhere one after another), or as Ray tasks with ``--executor ray``
  (:mod:`.remote`);
* bounds: ``--bounds crown`` (default, sound for every score) or ``--bounds sample``, the
  thesis's per-sample box: every downstream ReLU keeps the phase it has in the unpruned network on
  that sample (no binaries; not valid once units are removed, exactly as in the thesis);
* ``--relax`` solves the LP relaxation (ReLU phase binaries continuous) instead;
* the plan: the averaged scores ranked to the target (``--flops-budget``/``--prune-ratio``, by the
  ordinary selection, raw scores compared across layers), and the report also gives the thesis's
  threshold rule ``s >= tau`` (``tau`` 0.1 by default) and the MACs it would keep.

A class problem that ends without an incumbent, or whose solver fails, gives score 1 to every unit
(nothing learned) and says so in the report; every class problem is warm-started from ``s = 1`` (the unpruned network,
always feasible).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch
from torch import fx

from oamipc.errors import SolverError
from oamipc.solver import complete_solution, solve
from oamipc.units import UnitGraph

from .encoder import Encoder, margin_hinge
from .remote import Dispatch, LocalDispatch, resolve, solver_threads

log = logging.getLogger(__name__)

LAMBDA = 5.0


@dataclass
class ClassProblem:
    """Inputs of one class's MILP (picklable: it travels to worker processes)."""

    label: int
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor  # original margins


@dataclass
class ClassRecord:
    """How one class's MILP ended."""

    label: int
    samples: int
    status: str = ""
    outcome: str = "solved"  # solved | no-incumbent | solver-error
    solve: dict[str, Any] = field(default_factory=dict)
    encoding: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    scores: list[float] = field(default_factory=list)


def pick_samples(x: torch.Tensor, y: torch.Tensor, predicted: torch.Tensor, target: torch.Tensor, classes: int,
                 per_class: int) -> list[ClassProblem]:
    """The first ``per_class`` correctly classified samples of every class, in calibration order."""
    problems = []
    for c in range(classes):
        idx = torch.nonzero((y == c) & (predicted == c)).flatten()[:per_class]
        if len(idx):
            problems.append(ClassProblem(c, x[idx], y[idx], target[idx]))
    return problems


def solve_class(gm: fx.GraphModule, graph: UnitGraph, free: list[int], problem: ClassProblem, *, solver: str,
                time_limit: float, threads: int | None, relax: bool, bounds: str = "crown",
                gap: float | None = None, lam: float = LAMBDA) -> ClassRecord:
    """Build and solve one class's MILP; return its scores (see the module docstring)."""
    t0 = time.perf_counter()
    rec = ClassRecord(problem.label, len(problem.x))
    prob = pulp.LpProblem(f"paper_class{problem.label}", pulp.LpMinimize)
    s = {u: pulp.LpVariable(f"s{u}", lowBound=0.0, upBound=1.0) for u in free}
    enc = Encoder(gm, graph, problem.x, graph.all_kept(), s, prob, mode="paper", name=f"c{problem.label}",
                  bounds=bounds)
    logits = enc.logits()
    xi = margin_hinge(prob, enc, logits, problem.y, problem.target)
    terms = [(v, lam / len(xi)) for v in xi]
    for group in graph.groups:
        units = [u for u in group.units if u in s]
        terms += [(s[u], 1.0 / len(units)) for u in units]
    prob += pulp.LpAffineExpression(terms)
    if relax:
        for var in prob.variables():
            if var.cat == pulp.LpInteger:
                var.cat = pulp.LpContinuous
    rec.encoding = enc.stats.to_dict()
    rec.build_seconds = time.perf_counter() - t0
    try:
        # s = 1 is the unpruned network; its ReLU phases are fixed too, so the completion is an LP.
        warm = complete_solution(prob, enc.reference_phases(np.ones(graph.n_units)), solver=solver,
                                 time_limit=time_limit, threads=threads)
        result = solve(prob, solver=solver, time_limit=time_limit, gap=gap, threads=threads,
                       warm_start=warm[0] if warm else None)
    except SolverError as exc:  # like no incumbent: this class teaches nothing, the others still count
        log.warning("paper MILP for class %d: %s; its scores are left at 1", problem.label, exc)
        rec.status, rec.outcome, rec.solve = "error", "solver-error", {"status": "error", "error": str(exc)}
        rec.scores = [1.0] * len(free)
        return rec
    rec.solve = result.to_dict()
    rec.status = result.status
    if not result.has_solution():
        rec.outcome = "no-incumbent"
        rec.scores = [1.0] * len(free)
    else:
        rec.scores = [float(min(1.0, max(0.0, s[u].varValue or 0.0))) for u in free]
    return rec


def _class_task(shared: tuple[Any, ...], index: int) -> ClassRecord:
    state, kwargs = shared
    gm, graph, free, problems = resolve(state)
    return solve_class(gm, graph, free, problems[index], **kwargs)


def paper_scores(gm: fx.GraphModule, graph: UnitGraph, free: list[int], problems: list[ClassProblem], *,
                 solver: str, time_limit: float, threads: int | None, relax: bool, jobs: int, bounds: str = "crown",
                 gap: float | None = None, progress: Any = None, where: Dispatch | None = None
                 ) -> tuple[np.ndarray, list[ClassRecord]]:
    """Average the class problems' scores (units outside ``free`` score 1).

    The class problems run where ``where`` says (default: ``jobs`` forked workers); on Ray the
    network, unit graph and samples go to the object store once and every class problem is a task.
    """
    where = where or LocalDispatch(jobs)
    kwargs = {"solver": solver, "time_limit": time_limit, "threads": solver_threads(threads, where),
              "relax": relax, "bounds": bounds, "gap": gap}
    records: list[ClassRecord] = []
    if progress:
        progress("MILP classes", 0, len(problems))
    shared = (where.put((gm, graph, free, problems)), kwargs)
    for rec in where.map(_class_task, shared, len(problems)):
        records.append(rec)
        if progress:
            progress("MILP classes", len(records), len(problems))
    scores = np.ones(graph.n_units)
    if records:
        scores[free] = np.mean([r.scores for r in records], axis=0)
    return scores, records

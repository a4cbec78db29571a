"""The joint stage of the ``budget`` formulation: move units between *all* layers at once.

Why.  A layer sub-problem (:mod:`.mip_budget`) only changes *which* units its group keeps; the
split of the MAC budget across layers stays the warm start's, and sub-problems far from the
output carry thousands of ReLU binaries that no open solver moves in seconds.  This stage fixes
both with a MILP that is linear in the keep variables by construction:

* **Local model.**  Around the current plan ``cur``, the effect of flipping unit ``u`` (removing a
  kept one, restoring a removed one) on sample ``k``'s logits, ``d_ku = z_k(cur xor u) - z_k(cur)``,
  is measured by real forward passes (:class:`.mip_masked.MaskedNetwork`, every flip in one
  batch).  With a binary flip variable ``t_u``, ``z_k ~ z_k(cur) + sum_u t_u d_ku``: exact for
  any single flip, first order for several (their interactions are ignored).
* **Rivals only.**  Each sample's hinge rows cover its ``competitors`` strongest other classes at
  the current plan (2 by default): the rows are dense in the flip variables, and a class far
  behind cannot overtake within one small trust region (held-out acceptance checks it anyway).
* **Trust region.**  ``sum_u t_u <= r``: a few flips at a time, where the model is good.
* **Same loss and budget as the layer sub-problems**: the margin hinge on the MILP samples and
  the exact MAC row of the whole network (products of two free widths linearised, see
  :mod:`.mip_rows`), every group's count/rounding/block rules.  Every group is free, so MACs can
  move from one layer to another.
* **Acceptance on held-out samples** by a real forward pass.  Accepted: recompute the effects
  around the new plan and go on.  Rejected: halve ``r``.  Stop at ``r < 1``, after ``max_rounds``,
  or when the time is up.  The HiGHS solves are small (units + samples variables) and warm-started
  from ``t = 0`` (the current plan, always feasible).
* **Deterministic.**  Each solve stops after ``node_limit`` branch-and-bound nodes (a fixed amount
  of work, so the same plan every run); the time limit is only a safety net, and a round that
  reaches it is marked ``time_limited`` in the report (its plan may differ from run to run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch

from oamipc.solver import complete_solution, solve
from oamipc.units import UnitGraph

from .mip_masked import MaskedNetwork
from .mip_rows import Keep, group_rows, mac_expression

log = logging.getLogger(__name__)


@dataclass
class JointRound:
    """One round of the joint stage, for the report."""

    radius: int
    flips: int = 0
    outcome: str = "unchanged"  # improved | rejected | unchanged | no-incumbent
    holdout_before: float = 0.0
    holdout_after: float | None = None
    model_objective: float | None = None  # the linear model's hinge at the solution
    warm_objective: float | None = None
    solve: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    time_limited: bool = False


class JointStage:
    """Trust-region rounds of the joint linearised MILP (see the module docstring)."""

    def __init__(self, net: MaskedNetwork, graph: UnitGraph, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor, *, free: list[int], magnitude: np.ndarray, flops_budget: float | None,
                 fixed_count: bool, min_keep: int, round_to: int, solver: str, time_limit: float,
                 threads: int | None, tie_reward: float, node_limit: int | None = None, competitors: int = 2) -> None:
        self.net = net
        self.graph = graph
        self.x, self.y, self.target = x, y, target
        self.free = free
        self.magnitude = magnitude
        self.flops_budget = flops_budget
        self.fixed_count = fixed_count
        self.min_keep = min_keep
        self.round_to = round_to
        self.solver = solver
        self.time_limit = time_limit
        self.threads = threads
        self.tie_reward = tie_reward
        self.node_limit = node_limit
        self.competitors = competitors
        self.rounds: list[JointRound] = []

    def effects(self, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits at ``current`` (N, C) and the flip effects (U, N, C)."""
        plans = np.repeat(current[None, :], len(self.free) + 1, axis=0)
        for i, u in enumerate(self.free):
            plans[i + 1, u] = not current[u]
        z = self.net.logits(self.x, plans).numpy()
        return z[0], z[1:] - z[0]

    def run(self, current: np.ndarray, holdout: Callable[[np.ndarray], float], *, radius: int, max_rounds: int,
            deadline: float) -> np.ndarray:
        best = holdout(current)
        r = radius
        while r >= 1 and len(self.rounds) < max_rounds:
            left = deadline - time.perf_counter()
            if left <= 0.5:
                break
            rec = JointRound(radius=r, holdout_before=best)
            self.rounds.append(rec)
            candidate = self.solve_round(current, r, min(self.time_limit, left), rec)
            if candidate is None or np.array_equal(candidate, current):
                if rec.outcome == "unchanged" and r > 1:
                    r //= 2  # the model sees no better plan this far out; look closer
                    continue
                break
            rec.flips = int((candidate != current).sum())
            loss = holdout(candidate)
            rec.holdout_after = loss
            if loss < best - 1e-12:
                rec.outcome = "improved"
                current, best = candidate, loss
            else:
                rec.outcome = "rejected"
                r = min(r, rec.flips) // 2
        return current

    def solve_round(self, current: np.ndarray, radius: int, time_limit: float, rec: JointRound) -> np.ndarray | None:
        t0 = time.perf_counter()
        z0, d = self.effects(current)
        prob = pulp.LpProblem("joint", pulp.LpMinimize)
        t = {u: pulp.LpVariable(f"t{u}", cat=pulp.LpBinary) for u in self.free}
        m: Keep = {u: pulp.LpAffineExpression([(t[u], -1.0)], constant=1.0) if current[u]
                   else pulp.LpAffineExpression([(t[u], 1.0)]) for u in self.free}
        n = len(self.x)
        xi = [pulp.LpVariable(f"xi{k}", lowBound=0.0) for k in range(n)]
        tvars = [t[u] for u in self.free]
        for k in range(n):
            yk = int(self.y[k])
            tk = float(self.target[k])
            rivals = [c for c in np.argsort(-z0[k], kind="stable").tolist() if c != yk][:self.competitors]
            for c in rivals:
                # xi_k >= target - (z_y - z_c), z = z0 + sum_u t_u d_u
                slope = d[:, k, yk] - d[:, k, c]
                gap = tk - (z0[k, yk] - z0[k, c])
                terms = [(xi[k], 1.0)] + [(v, float(s)) for v, s in zip(tvars, slope) if abs(s) >= 1e-9]
                prob += pulp.LpConstraint(pulp.LpAffineExpression(terms), pulp.LpConstraintGE, rhs=gap)
        prob += pulp.LpAffineExpression([(t[u], 1.0) for u in self.free]) <= radius
        for group in self.graph.groups:
            if group.prunable and any(u in m for u in group.units):
                group_rows(prob, group, m, current, fixed_count=self.fixed_count, min_keep=self.min_keep,
                           round_to=self.round_to, prefix="j")
        if self.flops_budget is not None:
            macs = mac_expression(prob, self.graph, m, current, prefix="j")
            prob += macs <= self.flops_budget * self.graph.macs()
        # Objective: mean hinge, minus a tiny reward for kept group-normalised magnitude.
        reward = []
        for group in self.graph.groups:
            units = [u for u in group.units if u in m]
            if not units:
                continue
            top = float(self.magnitude[group.units].max()) or 1.0
            for u in units:
                w = self.tie_reward / len(units) * float(self.magnitude[u]) / top
                sign = -1.0 if not current[u] else 1.0  # reward m_u: -w m_u = -w (cur + (1-2cur) t)
                reward.append((t[u], sign * w))
        prob += pulp.LpAffineExpression([(v, 1.0 / n) for v in xi] + reward)
        rec.build_seconds = time.perf_counter() - t0
        completed = complete_solution(prob, {v: 0.0 for v in tvars}, solver=self.solver, time_limit=time_limit,
                                      threads=self.threads)
        if completed is None:  # cannot happen for a plan within budget; guard the solver's word anyway
            rec.outcome = "no-incumbent"
            rec.solve = {"status": "current plan infeasible in the joint model"}
            return None
        rec.warm_objective = completed[1]
        result = solve(prob, solver=self.solver, time_limit=time_limit, threads=self.threads,
                       warm_start=completed[0], node_limit=self.node_limit)
        rec.solve = result.to_dict()
        rec.time_limited = result.seconds >= time_limit * 0.98
        if not result.has_solution():
            rec.outcome = "no-incumbent"
            return None
        rec.model_objective = float(np.mean([v.varValue or 0.0 for v in xi]))
        candidate = current.copy()
        for u in self.free:
            if (t[u].varValue or 0.0) > 0.5:
                candidate[u] = not current[u]
        if self.flops_budget is not None and self.graph.macs(candidate) > self.flops_budget * self.graph.macs() * (1 + 1e-9):
            rec.outcome = "rejected"
            log.warning("joint MILP returned a plan over budget; ignored")
            return None
        return candidate

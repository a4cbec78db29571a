"""The joint stage of the ``budget`` formulation: move units between *all* layers at once.

Why.  A layer sub-problem (:mod:`.budget`) only changes *which* units its group keeps; the
split of the MAC budget across layers stays the warm start's, and sub-problems far from the
output carry thousands of ReLU binaries that no open solver moves in seconds.  This stage fixes
both with a MILP that is linear in the keep variables by construction:

* **Local model.**  Around the current plan ``cur``, the effect of flipping unit ``u`` (removing a
  kept one, restoring a removed one) on sample ``k``'s logits, ``d_ku = z_k(cur xor u) - z_k(cur)``,
  is measured by real forward passes (:class:`.masked.MaskedNetwork`, every flip in one
  batch).  With a binary flip variable ``t_u``, ``z_k ~ z_k(cur) + sum_u t_u d_ku``: exact for
  any single flip, first order for several (their interactions are ignored).
* **Rivals only.**  Each sample's hinge rows cover its ``competitors`` strongest other classes at
  the current plan (2 by default): the rows are dense in the flip variables, and a class far
  behind cannot overtake within one small trust region (held-out acceptance checks it anyway).
* **Trust region.**  ``sum_u t_u <= r``: a few flips at a time, where the model is good.
* **Same loss and budget as the layer sub-problems**: the margin hinge on the MILP samples and
  the exact MAC row of the whole network (products of two free widths linearised, see
  :mod:`.rows`), every group's count/rounding/block rules.  Every group is free, so MACs can
  move from one layer to another.
* **Acceptance on held-out samples** by a real forward pass, under the noise-aware rule of
  :mod:`.evidence` (the verdict and its evidence go into the round's record).  Accepted: recompute the effects
  around the new plan and go on.  Rejected: halve ``r``.  At ``r < 1`` start again from the first
  radius if the plan moved since the last start, else stop; stop also after ``max_rounds`` or
  when the time is up.
* **Screening.**  With many free units a round's variables are the units that matter most as
  single flips (:meth:`JointStage.candidates`): the solves stay small and far from their time
  limits.  The HiGHS solves are small (units + samples variables) and warm-started
  from ``t = 0`` (the current plan, always feasible).
* **Deterministic.**  Each solve stops after ``node_limit`` branch-and-bound nodes (a fixed amount
  of work, so the same plan every run); the time limit is only a safety net, and a round that
  reaches it is marked ``time_limited`` in the report (its plan may differ from run to run).
* **Parallel (``jobs``).**  A round's solve depends on the previous round only through the plan
  and the radius, and a rejected or empty round is followed, at the same plan, by one of half the
  radius (the common case).  So with ``jobs > 1`` the radii ``r, r/2, r/4, ...`` are solved at once
  in forked workers (:mod:`.workers`) and the rounds then consume them in order, exactly as
  one worker would have: the plan does not depend on ``jobs``; only solves a jump past them
  makes useless are wasted.  Flip effects are measured once per plan.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch

from oamipc.errors import SolverError
from oamipc.solver import complete_solution, solve
from oamipc.target import Target, granularity
from oamipc.units import UnitGraph

from .evidence import HeldOut
from .masked import MaskedNetwork
from .rows import Keep, group_rows, mac_expression, plan_violations
from .workers import fork_map

log = logging.getLogger(__name__)


@dataclass
class JointRound:
    """One round of the joint stage, for the report."""

    radius: int
    flips: int = 0
    outcome: str = "unchanged"  # improved | rejected | unchanged | no-incumbent | invalid | solver-error
    holdout_before: float = 0.0
    holdout_after: float | None = None
    model_objective: float | None = None  # the linear model's hinge at the solution
    warm_objective: float | None = None
    solve: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    time_limited: bool = False
    candidates: int = 0  # free units screened in (see JointStage.candidates)
    evidence: dict[str, Any] = field(default_factory=dict)  # the held-out verdict (.evidence.Verdict)
    note: str = ""  # why a solution was invalid, or the solver's error


class JointStage:
    """Trust-region rounds of the joint linearised MILP (see the module docstring)."""

    def __init__(self, net: MaskedNetwork, graph: UnitGraph, x: torch.Tensor, y: torch.Tensor,
                 margin: torch.Tensor, *, free: list[int], magnitude: np.ndarray, target: Target, solver: str,
                 time_limit: float, threads: int | None, tie_reward: float, gap: float | None = None,
                 node_limit: int | None = None, competitors: int = 2,
                 screen_min: int = 48, screen_per_flip: int = 8, screen_max: int = 128, spend: bool = False) -> None:
        self.net = net
        self.graph = graph
        self.x, self.y, self.margin = x, y, margin
        self.free = free
        self.magnitude = magnitude
        self.target = target
        self.steps = granularity(target, graph)
        self.flops_budget = target.flops_budget
        self.spend = spend  # never fewer MACs than the round's starting plan (MipOptions.spend_budget)
        self.gap = gap
        self.solver = solver
        self.time_limit = time_limit
        self.threads = threads
        self.tie_reward = tie_reward
        self.node_limit = node_limit
        self.competitors = competitors
        self.screen_min = screen_min
        self.screen_per_flip = screen_per_flip
        self.screen_max = screen_max
        self.rounds: list[JointRound] = []

    def effects(self, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits at ``current`` (N, C) and the flip effects (U, N, C)."""
        plans = np.repeat(current[None, :], len(self.free) + 1, axis=0)
        for i, u in enumerate(self.free):
            plans[i + 1, u] = not current[u]
        z = self.net.logits(self.x, plans).numpy()
        return z[0], z[1:] - z[0]

    def run(self, current: np.ndarray, holdout: HeldOut, *, radius: int, max_rounds: int,
            deadline: float, jobs: int = 1) -> np.ndarray:
        best = holdout.loss(current)
        r = radius
        ahead: dict[int, tuple[np.ndarray | None, JointRound]] = {}  # solves at the current plan, by radius
        effects: tuple[np.ndarray, np.ndarray] | None = None  # at the current plan
        improved_since_restart = False
        while len(self.rounds) < max_rounds:
            if r < 1:
                if not improved_since_restart:
                    break
                r, improved_since_restart = radius, False  # the plan moved: look far again
            left = deadline - time.perf_counter()
            if left <= 0.5:
                break
            if r not in ahead:
                if effects is None:
                    effects = self.effects(current)
                radii = [r]
                while len(radii) < jobs and radii[-1] > 1:
                    radii.append(radii[-1] // 2)  # the radius a rejection usually falls back to
                shared = (self, current, effects, radii, min(self.time_limit, left))
                ahead = dict(zip(radii, fork_map(_round_task, shared, len(radii), jobs)))
            candidate, rec = ahead.pop(r)
            rec.holdout_before = best
            self.rounds.append(rec)
            if candidate is None or np.array_equal(candidate, current):
                if rec.outcome != "unchanged":
                    break  # no answer from the solver: stop
                r //= 2  # the model sees no better plan this far out; look closer
                continue
            rec.flips = int((candidate != current).sum())
            verdict = holdout.judge(candidate, current)
            rec.holdout_after, rec.evidence = verdict.hinge_after, verdict.to_dict()
            if verdict.accepted:
                rec.outcome = "improved"
                current, best = candidate, verdict.hinge_after
                ahead, effects = {}, None
                improved_since_restart = True
            else:
                rec.outcome = "rejected"
                r = min(r, rec.flips) // 2
        return current

    def candidates(self, current: np.ndarray, effects: tuple[np.ndarray, np.ndarray], radius: int) -> list[int]:
        """The free units this round may flip: all of them, or a screened set when there are many.

        A round flips at most ``radius`` units, so it needs only the units that matter most as
        single flips; with fewer columns the dense hinge rows and the MAC product rows shrink and
        each solve stays far from the time limit (so the plan is reproducible).  Screening is exact
        for single flips (the effects are): each flip's change of the mean hinge ``dL_u`` and of the
        MACs ``dM_u``.  Kept: for removals and for restorations separately, the best by ``dL_u``
        and the best by ``dL_u`` per MAC moved, ``screen_per_flip * radius`` units in all, at
        least ``screen_min`` and at most ``screen_max``; ties go to the lower unit id.
        """
        size = min(max(self.screen_min, self.screen_per_flip * radius), self.screen_max)
        if len(self.free) <= size:
            return list(self.free)
        z0, d = effects
        idx = np.arange(len(self.y))
        y = self.y.numpy()

        def hinge(z: np.ndarray) -> np.ndarray:  # (..., N, C) -> mean hinge over samples
            zy = z[..., idx, y]
            other = z.copy()
            other[..., idx, y] = -np.inf
            return np.clip(self.margin.numpy() - (zy - other.max(-1)), 0.0, None).mean(-1)

        d_loss = hinge(z0[None] + d) - hinge(z0)
        base = self.graph.macs(current)
        d_macs = np.empty(len(self.free))
        for i, u in enumerate(self.free):
            flipped = current.copy()
            flipped[u] = not current[u]
            d_macs[i] = abs(self.graph.macs(flipped) - base)
        keep = np.array([bool(current[u]) for u in self.free])
        chosen: set[int] = set()
        quarter = max(1, size // 4)
        for side in (keep, ~keep):  # removals, then restorations
            pos = np.flatnonzero(side)
            # lowest first: least harm (removals) or most gain (restorations), alone and per MAC moved
            for key in (d_loss[pos], d_loss[pos] / np.maximum(d_macs[pos], 1.0)):
                chosen.update(pos[np.argsort(key, kind="stable")[:quarter]].tolist())
        return [self.free[i] for i in sorted(chosen)]

    def solve_round(self, current: np.ndarray, effects: tuple[np.ndarray, np.ndarray], radius: int,
                    time_limit: float, rec: JointRound) -> np.ndarray | None:
        """One trust-region MILP around ``current`` (``effects`` measured there); ``None``: no answer."""
        t0 = time.perf_counter()
        z0, d = effects
        cands = self.candidates(current, effects, radius)
        rec.candidates = len(cands)
        d = d[[self.free.index(u) for u in cands]] if len(cands) < len(self.free) else d
        prob = pulp.LpProblem("joint", pulp.LpMinimize)
        t = {u: pulp.LpVariable(f"t{u}", cat=pulp.LpBinary) for u in cands}
        m: Keep = {u: pulp.LpAffineExpression([(t[u], -1.0)], constant=1.0) if current[u]
                   else pulp.LpAffineExpression([(t[u], 1.0)]) for u in cands}
        n = len(self.x)
        xi = [pulp.LpVariable(f"xi{k}", lowBound=0.0) for k in range(n)]
        tvars = [t[u] for u in cands]
        for k in range(n):
            yk = int(self.y[k])
            tk = float(self.margin[k])
            rivals = [c for c in np.argsort(-z0[k], kind="stable").tolist() if c != yk][:self.competitors]
            for c in rivals:
                # xi_k >= target - (z_y - z_c), z = z0 + sum_u t_u d_u
                slope = d[:, k, yk] - d[:, k, c]
                gap = tk - (z0[k, yk] - z0[k, c])
                terms = [(xi[k], 1.0)] + [(v, float(s)) for v, s in zip(tvars, slope) if abs(s) >= 1e-9]
                prob += pulp.LpConstraint(pulp.LpAffineExpression(terms), pulp.LpConstraintGE, rhs=gap)
        prob += pulp.LpAffineExpression([(t[u], 1.0) for u in cands]) <= radius
        for group in self.graph.groups:
            if group.prunable and any(u in m for u in group.units):
                group_rows(prob, group, m, current, self.target, round_to=self.steps[group.id], prefix="j")
        if self.flops_budget is not None:
            macs = mac_expression(prob, self.graph, m, current, prefix="j")
            prob += macs <= self.flops_budget * self.graph.macs()
            if self.spend:
                prob += macs >= self.graph.macs(current)
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
        try:
            completed = complete_solution(prob, {v: 0.0 for v in tvars}, solver=self.solver, time_limit=time_limit,
                                          threads=self.threads)
        except SolverError as exc:
            return self._solver_failed(rec, exc)
        if completed is None:  # cannot happen for a plan within budget; guard the solver's word anyway
            rec.outcome = "no-incumbent"
            rec.solve = {"status": "current plan infeasible in the joint model"}
            return None
        rec.warm_objective = completed[1]
        try:
            result = solve(prob, solver=self.solver, time_limit=time_limit, gap=self.gap, threads=self.threads,
                           warm_start=completed[0], node_limit=self.node_limit)
        except SolverError as exc:
            return self._solver_failed(rec, exc)
        rec.solve = result.to_dict()
        rec.time_limited = result.stopped_by_time(time_limit)
        if not result.has_solution():
            rec.outcome = "no-incumbent"
            return None
        rec.model_objective = float(np.mean([v.varValue or 0.0 for v in xi]))
        candidate = current.copy()
        for u in cands:
            if (t[u].varValue or 0.0) > 0.5:
                candidate[u] = not current[u]
        broken = plan_violations(self.graph, candidate, current, self.target, spend=self.spend)
        if broken:
            rec.outcome = "invalid"
            rec.note = "; ".join(broken)
            log.warning("joint MILP returned a plan that breaks its own rows (%s); ignored", broken[0])
            return None
        return candidate

    @staticmethod
    def _solver_failed(rec: JointRound, exc: SolverError) -> None:
        """Record a solver failure: the round has no answer and the stage stops (see :meth:`run`)."""
        rec.outcome = "solver-error"
        rec.note = str(exc)
        rec.solve = {"status": "error"}
        log.warning("joint MILP: %s; keeping the plan found so far", exc)


def _round_task(shared: tuple[JointStage, np.ndarray, tuple[np.ndarray, np.ndarray], list[int], float],
                index: int) -> tuple[np.ndarray | None, JointRound]:
    """Solve the round of radius ``radii[index]`` (a worker task of :func:`.workers.fork_map`)."""
    stage, current, effects, radii, time_limit = shared
    rec = JointRound(radius=radii[index])
    candidate = stage.solve_round(current, effects, radii[index], time_limit, rec)
    return candidate, rec

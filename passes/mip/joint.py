"""The joint stage of the ``budget`` formulation: move units between *all* layers at once.

Why.  A layer sub-problem (:mod:`.budget`) only changes *which* units its group keeps; the
split of the MAC budget across layers stays the warm start's, and sub-problems far from the
output carry thousands of ReLU binaries that no open solver moves in seconds.  This stage fixes
both with a MILP that is linear in the keep variables by construction:

* **Local model.**  Around the current plan ``cur``, the effect of flipping unit ``u`` (removing a
  kept one, restoring a removed one) on sample ``k``'s logits, ``d_ku = z_k(cur xor u) - z_k(cur)``,
  is measured by real forward passes (:meth:`.masked.MaskedNetwork.flip_logits`: the pass at
  ``cur`` is kept at every layer, and a flip reruns the network only from its unit's first
  reading layer on, many flips per batch).  With a binary flip variable ``t_u``,
  ``z_k ~ z_k(cur) + sum_u t_u d_ku``: exact for any single flip, first order for several (their
  interactions are ignored).
* **Which effects are measured.**  All free units' when that costs at most ``exact_macs``
  multiply-accumulates (2e12 by default: every shipped example, many times over; a flip costs the
  MACs from its first reader on, times the samples).  Beyond that (a ResNet-18 at 224x224 has
  thousands of units, each flip a large part of a 116 GMAC pass), a first-order screen ranks
  them first: one forward and one backward pass per rival rank give every unit's gradient of
  every sample's margins (:meth:`.masked.MaskedNetwork.margin_gradients`), hence an estimated
  single-flip change of the hinge, and the units it ranks best (removals and restorations,
  alone and per MAC moved, in turn) are measured until ``exact_macs`` is spent.  A budget in
  MACs, not seconds, so the same units are measured on every machine.  The report's
  ``joint_effects`` gives, per measured plan, the counts and how well the screen ranked the
  measured units (Spearman correlation).
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
* **On Ray** (``--executor ray``, :mod:`.remote`): the radii are Ray tasks, and so are the exact
  flip effects when the network runs on the CPU: ``jobs`` tasks walk the batches one call of
  :meth:`.masked.MaskedNetwork.each_flip` would make, and each measures the batches its share
  gives it (:class:`.masked.FlipShare`: batch by batch, to the least loaded share by flip cost),
  so the effects, hence the plan, are those of one local worker.  The stage (network, samples)
  goes to the object store once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch

from oamipc.errors import SolverError
from oamipc.solver import complete_solution, solve, variables_listed_once
from oamipc.target import Target, granularity
from oamipc.units import UnitGraph

from .evidence import HeldOut
from .masked import FlipShare, MaskedNetwork
from .remote import Dispatch, LocalDispatch, resolve, solver_threads
from .rows import Keep, flip_macs, group_rows, mac_expression, plan_violations, single_flip_macs

log = logging.getLogger(__name__)


@dataclass
class Effects:
    """Flip effects measured at one plan, on the classes the MILP rows read.

    ``cols[k]`` are sample ``k``'s label and its ``competitors`` strongest other classes at the
    plan (:meth:`JointStage.columns`); ``d[i, k, j] = z_k(plan with units[i] flipped) - z_k(plan)``
    at class ``cols[k, j]``; ``loss[i]`` the flip's change of the mean hinge (over all classes).
    Only these are kept: a (units, samples, classes) array of a 1000-class network is gigabytes.
    """

    z0: np.ndarray  # (samples, classes) logits at the plan
    units: list[int]  # the units measured exactly (all free units, or the screened pool)
    cols: np.ndarray  # (samples, 1 + competitors) class columns
    d: np.ndarray  # (len(units), samples, 1 + competitors)
    loss: np.ndarray  # (len(units),)


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
                 screen_min: int = 48, screen_per_flip: int = 8, screen_max: int = 128, spend: bool = False,
                 exact_macs: float = 2e12, where: Dispatch | None = None) -> None:
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
        self.exact_macs = exact_macs  # MACs per plan for exact flip effects; beyond, the screen chooses
        self.rounds: list[JointRound] = []
        self.measurements: list[dict[str, Any]] = []  # one per plan whose effects were measured
        self.where = where or LocalDispatch()  # remote: flip effects and radii as tasks (:mod:`.remote`)
        self.stored: Any = None  # this stage's worker copy in the object store (:meth:`worker_state`)

    def worker_state(self) -> Any:
        """A handle to this stage for remote tasks, put in the object store once.  Its MILPs solve
        with one thread unless ``threads`` says otherwise; its network is sent only when it runs on
        the CPU (a GPU's flip effects are measured here)."""
        if self.stored is None:
            shell = copy.copy(self)
            shell.threads = solver_threads(self.threads, self.where)
            shell.rounds, shell.measurements, shell.where, shell.stored = [], [], None, None
            if not self.remote_flips():
                shell.net = None  # type: ignore[assignment]
            self.stored = self.where.put(shell)
        return self.stored

    def remote_flips(self) -> bool:
        """Whether flip effects are measured by remote tasks (a remote dispatch, the network on the CPU)."""
        return self.where.remote and self.net.device.type == "cpu"

    def columns(self, z0: np.ndarray) -> np.ndarray:
        """Per sample: its label, then its ``competitors`` strongest other classes at ``z0`` (the
        classes of its hinge rows), (samples, 1 + competitors)."""
        y = self.y.numpy()
        cols = np.empty((len(z0), 1 + self.competitors), dtype=np.int64)
        for k in range(len(z0)):
            rivals = [c for c in np.argsort(-z0[k], kind="stable").tolist() if c != y[k]][:self.competitors]
            cols[k] = [y[k], *rivals]
        return cols

    def effects(self, current: np.ndarray, deadline: float = float("inf")) -> Effects:
        """Logits at ``current`` and the exact flip effects of the screened units (:class:`Effects`).

        Screen: one forward and one backward pass per rival rank give every free unit's
        first-order (Taylor) effect on its samples' margins to the two strongest other classes,
        hence an estimated change of the mean hinge (:meth:`estimated_loss_change`).  When there
        are more free units than ``exact``, the pool measured exactly is chosen from those
        estimates the way :meth:`candidates` chooses from exact ones; otherwise every free unit is
        measured (the estimates then only go into the record, as a check of the screen).  Exact
        effects are real forward passes from each unit's first reading layer on
        (:meth:`.masked.MaskedNetwork.each_flip`); past ``deadline`` the rest are not measured
        (the record says so).
        """
        t0 = time.perf_counter()
        estimate = self.estimated_loss_change(current)
        t1 = time.perf_counter()
        costs = self.net.flip_costs(current) * self.graph.macs(current) * len(self.x)  # MACs of each flip
        if costs[self.free].sum() <= self.exact_macs:
            pool = list(self.free)
        else:
            order = _ranked(estimate, self.free, current, single_flip_macs(self.graph, current))
            spent = np.cumsum(costs[order])
            pool = sorted(order[:max(1, int(np.searchsorted(spent, self.exact_macs, side="right")))])
        z0 = self.net.logits(self.x, current[None, :])[0].numpy()
        cols = self.columns(z0)
        base_hinge = self._mean_hinge(z0)
        d = np.zeros((len(pool), *cols.shape))
        loss = np.zeros(len(pool))
        got = np.zeros(len(pool), dtype=bool)

        def store(slots: list[int], losses: np.ndarray, changes: np.ndarray) -> None:
            loss[slots], d[slots] = losses, changes
            got[slots] = True

        def take(block: torch.Tensor, slots: list[int]) -> None:
            store(slots, *self.flip_rows(block, cols, z0, base_hinge))

        if self.remote_flips():
            self._remote_flips(current, pool, costs, (cols, z0, base_hinge), store, deadline)
        else:
            self.net.each_flip(self.x, current, pool, take, stop=lambda: time.perf_counter() > deadline)
        pool = [u for u, ok in zip(pool, got) if ok]
        out = Effects(z0, pool, cols, d[got], loss[got])
        exact_change = out.loss
        position = {u: i for i, u in enumerate(self.free)}
        predicted = estimate[[position[u] for u in pool]]
        self.measurements.append({
            "free": len(self.free), "exact": len(pool), "exact_macs": float(costs[pool].sum()),
            "cut_by_deadline": not bool(got.all()),
            "screen_seconds": t1 - t0,
            "exact_seconds": time.perf_counter() - t1, "spearman": _spearman(predicted, exact_change),
            "top_overlap": _top_overlap(predicted, exact_change, max(1, min(self.screen_max, len(pool)) // 4))})
        return out

    def flip_rows(self, block: torch.Tensor, cols: np.ndarray, z0: np.ndarray, base_hinge: float
                  ) -> tuple[np.ndarray, np.ndarray]:
        """A batch of flipped logits (flips, samples, classes) -> each flip's change of the mean
        hinge and of the logits at the rows' classes ``cols`` (see :class:`Effects`)."""
        z = block.numpy()
        rows = np.arange(len(z0))[:, None]
        return self._mean_hinge(z) - base_hinge, z[:, rows, cols] - z0[rows, cols]

    def _remote_flips(self, current: np.ndarray, pool: list[int], costs: np.ndarray,
                      at: tuple[np.ndarray, np.ndarray, float],
                      store: Callable[[list[int], np.ndarray, np.ndarray], None], deadline: float) -> None:
        """The flips of ``pool`` as remote tasks, each measuring a share of their batches.

        Every task runs the pass at ``current`` up to the last layer a flip starts at and, of the
        batches :meth:`.masked.MaskedNetwork.each_flip` makes of the flips in one call, those its
        :class:`.masked.FlipShare` gives it (balanced by each flip's MACs), so the logits are the
        same as measured here.  Units no layer reads change nothing: they are handed over here
        with the current logits.  Past ``deadline`` the tasks measure nothing more.
        """
        cols, z0, base_hinge = at
        starts = self.net.first_reader[pool]
        unread = [i for i, s in enumerate(starts) if s >= len(self.net.run_gm.graph.nodes)]
        if unread:
            z = torch.from_numpy(z0)
            store(unread, *self.flip_rows(z.expand(len(unread), *z.shape), cols, z0, base_hinge))
        read = np.array(sorted(set(range(len(pool))) - set(unread)), dtype=np.int64)
        units = np.asarray(pool, dtype=np.int64)[read]
        if len(units) == 0:
            return
        parts = min(self.where.workers, len(units))
        slot = {u: i for i, u in enumerate(pool)}
        wall_deadline = time.time() + (deadline - time.perf_counter())
        shared = (self.worker_state(), current, (units.tolist(), costs[units].astype(float).tolist(), parts), at,
                  wall_deadline)
        for measured, losses, changes in self.where.map(_flip_task, shared, parts):
            store([slot[u] for u in measured], losses, changes)

    def estimated_loss_change(self, current: np.ndarray) -> np.ndarray:
        """First-order estimate of each free unit's single-flip change of the mean hinge.

        ``g[k, r, u]``: gradient of sample ``k``'s margin to its ``r``-th strongest rival with
        respect to unit ``u``'s keep value (:meth:`.masked.MaskedNetwork.margin_gradients`); a flip
        moves that margin by about ``g * (1 - 2 current[u])``.  The hinge after the flip is taken
        over those two rivals (the strongest is the true margin at ``current``).
        """
        y = self.y.long()
        z, rivals, grads = self.net.margin_gradients(self.x, current, y, 2)
        g = grads.numpy()  # (N, R, units)
        zn = z.numpy()
        idx = np.arange(len(zn))
        gaps = zn[idx, y.numpy()][:, None] - np.take_along_axis(zn, rivals.numpy(), axis=1)  # (N, R)
        free = np.asarray(self.free)
        sign = np.where(current[free], -1.0, 1.0)
        moved = gaps[:, :, None] + g[:, :, free] * sign  # (N, R, free)
        target = self.margin.numpy()[:, None]
        after = np.clip(target - moved.min(axis=1), 0.0, None).mean(0)
        before = np.clip(self.margin.numpy() - gaps.min(axis=1), 0.0, None).mean()
        return after - before

    def _mean_hinge(self, z: np.ndarray) -> np.ndarray:
        """(..., N, C) logits -> the mean margin hinge over the samples (all other classes)."""
        idx = np.arange(len(self.y))
        y = self.y.numpy()
        zy = z[..., idx, y]
        other = z.copy()
        other[..., idx, y] = -np.inf
        return np.clip(self.margin.numpy() - (zy - other.max(-1)), 0.0, None).mean(-1)

    def run(self, current: np.ndarray, holdout: HeldOut, *, radius: int, max_rounds: int,
            deadline: float, jobs: int = 1) -> np.ndarray:
        best = holdout.loss(current)
        r = radius
        ahead: dict[int, tuple[np.ndarray | None, JointRound]] = {}  # solves at the current plan, by radius
        effects: Effects | None = None  # at the current plan
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
                    effects = self.effects(current, deadline)
                radii = [r]
                while len(radii) < jobs and radii[-1] > 1:
                    radii.append(radii[-1] // 2)  # the radius a rejection usually falls back to
                where = self.where if self.where.remote else LocalDispatch(jobs)
                stage = self.worker_state() if where.remote else self
                shared = (stage, current, effects, radii, min(self.time_limit, left))
                ahead = dict(zip(radii, where.map(_round_task, shared, len(radii))))
            candidate, rec = ahead.pop(r)
            candidate = None if candidate is None else np.array(candidate)  # writable (a Ray task's is not)
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

    def candidates(self, current: np.ndarray, effects: Effects, radius: int) -> list[int]:
        """The units this round may flip: every measured one, or a screened set when there are many.

        A round flips at most ``radius`` units, so it needs only the units that matter most as
        single flips; with fewer columns the dense hinge rows and the MAC product rows shrink and
        each solve stays far from the time limit (so the plan is reproducible).  Screening is exact
        for single flips (the measured effects are): each flip's change of the mean hinge ``dL_u``
        and of the MACs ``dM_u``.  Kept: for removals and for restorations separately, the best by
        ``dL_u`` and the best by ``dL_u`` per MAC moved, ``screen_per_flip * radius`` units in all,
        at least ``screen_min`` and at most ``screen_max``; ties go to the lower unit id.
        """
        size = min(max(self.screen_min, self.screen_per_flip * radius), self.screen_max)
        units = effects.units
        if len(units) <= size:
            return list(units)
        d_loss = effects.loss
        d_macs = flip_macs(self.graph, current, units)
        keep = np.array([bool(current[u]) for u in units])
        chosen: set[int] = set()
        quarter = max(1, size // 4)
        for side in (keep, ~keep):  # removals, then restorations
            pos = np.flatnonzero(side)
            # lowest first: least harm (removals) or most gain (restorations), alone and per MAC moved
            for key in (d_loss[pos], d_loss[pos] / np.maximum(d_macs[pos], 1.0)):
                chosen.update(pos[np.argsort(key, kind="stable")[:quarter]].tolist())
        return [units[i] for i in sorted(chosen)]

    def solve_round(self, current: np.ndarray, effects: Effects, radius: int,
                    time_limit: float, rec: JointRound) -> np.ndarray | None:
        """One trust-region MILP around ``current`` (``effects`` measured there); ``None``: no answer."""
        t0 = time.perf_counter()
        z0 = effects.z0
        cands = self.candidates(current, effects, radius)
        rec.candidates = len(cands)
        row = {u: i for i, u in enumerate(effects.units)}
        d = effects.d[[row[u] for u in cands]] if cands != effects.units else effects.d
        prob = pulp.LpProblem("joint", pulp.LpMinimize)
        t = {u: pulp.LpVariable(f"t{u}", cat=pulp.LpBinary) for u in cands}
        m: Keep = {u: pulp.LpAffineExpression([(t[u], -1.0)], constant=1.0) if current[u]
                   else pulp.LpAffineExpression([(t[u], 1.0)]) for u in cands}
        n = len(self.x)
        xi = [pulp.LpVariable(f"xi{k}", lowBound=0.0) for k in range(n)]
        tvars = [t[u] for u in cands]
        for k in range(n):
            tk = float(self.margin[k])
            yk, rivals = int(effects.cols[k, 0]), effects.cols[k, 1:].tolist()
            for j, c in enumerate(rivals, start=1):
                # xi_k >= target - (z_y - z_c), z = z0 + sum_u t_u d_u
                slope = d[:, k, 0] - d[:, k, j]
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
        with variables_listed_once(prob):  # the completion and the solve read one listing
            try:
                completed = complete_solution(prob, {v: 0.0 for v in tvars}, solver=self.solver,
                                              time_limit=time_limit, threads=self.threads)
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


def _round_task(shared: tuple[JointStage, np.ndarray, Effects, list[int], float],
                index: int) -> tuple[np.ndarray | None, JointRound]:
    """Solve the round of radius ``radii[index]`` (a worker task of :func:`.workers.fork_map`)."""
    stored, current, effects, radii, time_limit = shared
    stage = resolve(stored)
    current = np.array(current)
    rec = JointRound(radius=radii[index])
    candidate = stage.solve_round(current, effects, radii[index], time_limit, rec)
    return candidate, rec


def _flip_task(shared: tuple[Any, np.ndarray, tuple[list[int], list[float], int],
                             tuple[np.ndarray, np.ndarray, float], float],
               index: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Measure share ``index`` of the flips in a worker (:meth:`JointStage._remote_flips`): the
    units it measured (in order; fewer past the deadline), their hinge and logit changes."""
    stored, current, (units, costs, parts), (cols, z0, base_hinge), wall_deadline = shared
    stage = resolve(stored)
    current = np.array(current)  # writable (an array from the object store is not)
    measured: list[int] = []
    losses: list[np.ndarray] = []
    changes: list[np.ndarray] = []

    def take(block: torch.Tensor, slots: list[int]) -> None:
        loss, d = stage.flip_rows(block, cols, z0, base_hinge)
        measured.extend(units[s] for s in slots)
        losses.append(loss)
        changes.append(d)

    stage.net.each_flip(stage.x, current, units, take, stop=lambda: time.time() > wall_deadline,
                        share=FlipShare(index, parts, costs))
    if not measured:
        return [], np.zeros(0), np.zeros((0, *cols.shape))
    return measured, np.concatenate(losses), np.concatenate(changes)


def _ranked(estimate: np.ndarray, free: list[int], current: np.ndarray, flip_macs: np.ndarray) -> list[int]:
    """The free units in the screen's order of preference, as :meth:`JointStage.candidates` picks
    by exact effects: four rankings (removals and restorations, each by the estimated loss change
    alone and per MAC moved), taken in turn, each unit at its first place."""
    units = np.asarray(free)
    keep = current[units]
    rankings = []
    for side in (keep, ~keep):
        pos = np.flatnonzero(side)
        for key in (estimate[pos], estimate[pos] / np.maximum(flip_macs[units[pos]], 1.0)):
            rankings.append(pos[np.argsort(key, kind="stable")].tolist())
    order: list[int] = []
    seen: set[int] = set()
    for depth in range(max((len(r) for r in rankings), default=0)):
        for r in rankings:
            if depth < len(r) and r[depth] not in seen:
                seen.add(r[depth])
                order.append(int(units[r[depth]]))
    return order


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their ranks (scipy's ``rankdata``; numpy only, as
    importing ``scipy.stats`` took 0.5-0.8 s of every compile started in a fresh process)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    edges = np.flatnonzero(v[order][1:] != v[order][:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(v)]))
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation of two vectors (average ranks for ties); ``None`` when either is constant."""
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _top_overlap(predicted: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Share of the ``k`` lowest exact loss changes among the ``k`` lowest predicted ones."""
    top = set(np.argsort(exact, kind="stable")[:k].tolist())
    return len(top & set(np.argsort(predicted, kind="stable")[:k].tolist())) / k

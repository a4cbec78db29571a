"""The MIP planner (``plan-mip``): units chosen by mixed-integer programming (the OAMIP analysis).

Unlike a criterion, the MILP needs the target (a MAC budget or a ratio) to decide, so it is a
planner (:mod:`.planner_base`): it returns a :class:`~oamipc.plan.Planned` whose record is the
report's ``mip`` section.  Its options are its own frozen fields (the target, and every
:class:`.mip.options.MipOptions` field), so a pipeline string can name them all:
``plan-mip{solver=cbc,time-limit=20,flops-budget=0.5},prune-units``.  Two formulations:

* ``budget`` (default): the plan starts from the best greedy plan of the cheap criteria (asked of
  :class:`.plan_greedy.PlanGreedyAnalysis`, so the analysis cache serves them) and is improved by
  :mod:`.mip.budget` (layer sub-problems, then the joint stage of :mod:`.mip.joint`), each move
  kept only when held-out samples say it is better (:mod:`.mip.evidence`).  The plan returned is
  never worse on those samples than the best solver-free plan: if the MILP's is, the report's
  ``selection`` says so and the solver-free plan is returned.  The reported score of a unit is
  1 + its normalised magnitude when kept, its normalised magnitude when removed: kept units
  always rank above removed ones.
* ``paper``: the thesis's continuous scores (:mod:`.mip.paper`), ranked to the target.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from oamipc.errors import UsageError
from oamipc.passmanager import AnalysisManager, register
from oamipc.plan import Plan, Planned
from oamipc.target import Target
from oamipc.units import UnitGraph

from .importance_base import get_criterion
from .mip.budget import WARM_CRITERIA, Calibration, network_logits, plan_budget, unit_magnitude
from .mip.evidence import HeldOut, Measure, no_worse
from .mip.masked import margins
from .mip.options import MipOptions
from .mip.paper import LAMBDA, paper_scores, pick_samples
from .mip.remote import Dispatch, dispatch
from .mip.rows import plan_violations
from .plan_greedy import PlanGreedyAnalysis, floor_units, select
from .planner_base import PlannerAnalysis, register_planner

log = logging.getLogger(__name__)


@register
@register_planner("mip")
@dataclass(frozen=True)
class PlanMipAnalysis(PlannerAnalysis):
    """Kept units chosen by MILPs over calibration samples, for the target (see the module docstring)."""

    name: ClassVar[str] = "plan-mip"
    options: MipOptions = field(default_factory=MipOptions)

    def plan(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        if am.context.calib_x is None:
            raise UsageError("importance 'mip' needs calibration data: pass --data (Python: data=...)")
        graph = am.get(self.unit_analysis(), gm)
        target = self.target.require()
        start = time.perf_counter()
        opts = self.options
        with dispatch(opts.executor, opts.jobs, opts.ray_address) as where:
            if opts.formulation == "paper":
                kept, scores, record = self._paper(gm, graph, am, target, where)
                bias_shift: dict[str, list[float]] = {}
            else:
                kept, scores, record, bias_shift = self._budget(gm, graph, am, target, where)
        record["executor"] = {"kind": opts.executor, "workers": opts.jobs, "ray_address": opts.ray_address}
        record["seconds"] = time.perf_counter() - start
        plan = Plan.from_mask(graph, kept, "mip", self.settings(am), bias_shift)
        model = self.latency_model(gm, am)
        calibration = record.pop("latency_calibration", None)
        if model is not None and calibration is not None:
            model = model.scaled(calibration["scale"])
        predicted = self.predicted_latency(graph, kept, model, calibration["rounds"] if calibration else None)
        return Planned(plan, self.group_scores(graph, scores), section="mip", record=record,
                       predicted_latency=predicted)

    def _warm_start(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, target: Target,
                    heldout: HeldOut) -> tuple[dict[str, tuple[np.ndarray, Measure]], str, str]:
        """The cheap criteria's greedy plans measured on the held-out samples, the warm start's name
        (the best by the acceptance rule) and the best solver-free plan's (by held-out accuracy, the
        hinge breaking ties: the plan the MILP's result must not fall below)."""
        opts = self.options
        names = [opts.warm] if opts.warm != "auto" else [
            c for c in WARM_CRITERIA if not (get_criterion(c).needs_labels and am.context.calib_y is None)]
        plans: dict[str, tuple[np.ndarray, Measure]] = {}
        for name in names:
            planned = am.get(PlanGreedyAnalysis(target=target, leaf_modules=self.leaf_modules, importance=name,
                                                prune_embed=self.prune_embed), gm)
            kept = planned.plan.kept_mask(graph)
            plans[name] = (kept, heldout.measure(kept))

        def by_accuracy(name: str) -> tuple[int, float]:
            m = plans[name][1]
            return (-int(m.correct.sum()), m.mean_hinge)

        best_free = min(names, key=by_accuracy)  # min keeps the first of equals: WARM_CRITERIA's order
        warm = min(names, key=lambda n: plans[n][1].mean_hinge) if opts.accept == "hinge" else best_free
        return plans, warm, best_free

    def _budget(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, target: Target, where: Dispatch
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, list[float]]]:
        """The default formulation: warm start, layer sub-problems, joint stage, final checks."""
        opts = self.options
        calib = Calibration.build(gm, am, opts, macs_per_sample=graph.macs())
        heldout = HeldOut(gm, graph, calib.x_hold, calib.y_hold, calib.margin_hold, rule=opts.accept, z=opts.accept_z,
                          loss_z=opts.accept_loss_z, device=opts.torch_device())
        record: dict[str, Any] = {
            "formulation": opts.formulation, "solver": opts.solver, "bounds": opts.bounds,
            "spend_budget": opts.spend_budget, "samples": len(calib.x), "holdout_samples": len(calib.x_hold),
            "holdout_source": calib.holdout_source,
            "loss": f"margin-preserving hinge (original margins), held-out acceptance: {opts.accept}"}
        plans, warm_name, free_name = self._warm_start(gm, graph, am, target, heldout)
        warm, warm_measure = plans[warm_name]
        warm_loss = warm_measure.mean_hinge
        record["warm_start"] = {"chosen": warm_name, "candidates": [
            {"criterion": name, "holdout_loss": m.mean_hinge, "holdout_accuracy": m.accuracy}
            for name, (_, m) in plans.items()]}
        if target.kind == "latency":  # the MILP keeps the warm start's widths: its calibration holds
            chosen = am.get(PlanGreedyAnalysis(target=target, leaf_modules=self.leaf_modules, importance=warm_name,
                                                prune_embed=self.prune_embed), gm)
            predicted = chosen.predicted_latency or {}
            record["latency_calibration"] = {"scale": predicted.get("scale", 1.0),
                                             "rounds": predicted.get("calibration", [])}
        forced = floor_units(graph, am.get(get_criterion(warm_name, self.leaf_modules, self.prune_embed), gm))
        kept, solver = plan_budget(gm, graph, am, warm=warm, opts=opts, calib=calib, target=target, forced=forced,
                                   heldout=heldout, where=where)
        record["subproblems"] = [r.__dict__ for r in solver.records]
        record["joint_rounds"] = [r.__dict__ for r in solver.joint_rounds]
        record["stages"] = _stages(solver.records, solver.joint_rounds)
        record["joint_effects"] = solver.joint_effects
        record["device"] = str(opts.torch_device())
        record["solver_error"] = solver.solver_error
        # Every accepted step was checked already; check the end result too, against the warm start
        # (always valid), so that no path can hand on a plan outside the target.
        broken = plan_violations(graph, kept, warm, target)
        record["fallback"] = None
        if broken:
            log.warning("the MILP plan breaks %s; using the warm start (%s) instead", broken[0], warm_name)
            record["fallback"] = f"the MILP plan broke: {'; '.join(broken)}; the warm start was used"
            kept, solver.bias_shift = warm.copy(), {}
        record["mean_replacement"] = solver.mean_replacement
        record["selection"], kept = self._select(solver, kept, plans, free_name)
        final = solver.holdout_loss(kept, means=bool(solver.bias_shift))
        record["holdout_loss"] = {"warm_start": warm_loss, "final": final}
        record["reproducible"] = solver.reproducible()
        if not record["reproducible"]:
            log.warning("a MILP time limit was reached (time_limit %g s per solve, total_time_limit %g s): "
                        "this plan may differ between runs; raise the limits for a reproducible plan",
                        opts.time_limit, opts.total_time_limit)
        mags = unit_magnitude(gm, graph)
        norm = np.zeros_like(mags)
        for g in graph.groups:
            top = mags[g.units].max() if g.units else 0.0
            norm[g.units] = mags[g.units] / top if top > 0 else 0.0
        return kept, norm + kept.astype(np.float64), record, solver.bias_shift

    def _select(self, solver: Any, kept: np.ndarray, plans: dict[str, tuple[np.ndarray, Measure]], free_name: str
                ) -> tuple[dict[str, Any], np.ndarray]:
        """The final check: the MILP's plan against the best solver-free plan on the same held-out samples.

        The MILP's plan stands when it is at least as accurate there (at equal accuracy, when its
        hinge is not higher); otherwise the solver-free plan is returned (without any bias shift).
        Returns the report's ``selection`` section and the plan.
        """
        opts = self.options
        mine = (solver.heldout if solver.bias_shift else solver.plain_heldout).measure(kept)
        free_kept, free = plans[free_name]
        moves = [r.outcome for r in solver.records] + [r.outcome for r in solver.joint_rounds]
        section: dict[str, Any] = {
            "rule": opts.accept, "z": opts.accept_z if opts.accept == "paired" else None,
            "loss_z": opts.accept_loss_z if opts.accept == "paired" else None,
            "holdout_samples": len(free.correct), "holdout_source": solver.calib.holdout_source,
            "moves_accepted": moves.count("improved"), "moves_rejected": moves.count("rejected"),
            "mip": mine.summary(), "best_solver_free": {"criterion": free_name, **free.summary()}}
        if no_worse(mine, free):
            section["chosen"] = "mip"
            section["decided_by"] = (f"the MILP's plan is no worse on the held-out samples than the best solver-free "
                                     f"plan ({free_name}): accuracy {mine.accuracy:.4f} vs {free.accuracy:.4f}")
            return section, kept
        log.warning("the MILP's plan is less accurate on %d held-out samples than %s's (%.4f < %.4f); using %s's plan",
                    len(free.correct), free_name, mine.accuracy, free.accuracy, free_name)
        section["chosen"] = "solver-free"
        section["decided_by"] = (f"the MILP's plan was worse on the held-out samples than the best solver-free plan "
                                 f"({free_name}): accuracy {mine.accuracy:.4f} vs {free.accuracy:.4f}; "
                                 f"{free_name}'s plan was returned")
        solver.bias_shift = {}
        return section, free_kept.copy()

    def _paper(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, target: Target, where: Dispatch
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The thesis's formulation: averaged class-problem scores, ranked to the target."""
        opts = self.options
        ctx = am.context
        assert ctx.calib_x is not None
        x = ctx.calib_x.float()
        with torch.no_grad():
            logits = network_logits(gm, x, opts.torch_device())
        predicted = logits.argmax(1)
        y = ctx.calib_y if ctx.calib_y is not None else predicted
        classes = int(logits.shape[1])
        per_class = max(1, (opts.samples or classes) // classes)
        problems = pick_samples(x, y, predicted, margins(logits, y), classes, per_class)
        pinned = graph.pinned_mask()
        free = [u for g in graph.groups if g.prunable for u in g.units if not pinned[u]]
        time_limit = min(opts.time_limit, opts.total_time_limit * opts.jobs / max(len(problems), 1))
        scores, records = paper_scores(gm, graph, free, problems, solver=opts.solver, time_limit=time_limit,
                                       threads=opts.threads, relax=opts.relax, jobs=opts.jobs, bounds=opts.bounds,
                                       gap=opts.gap, progress=ctx.tick, where=where)
        # The scores are comparable across layers already (the objective normalises by layer size).
        calibration = None
        if target.kind == "latency":
            kept, model, rounds = self.latency_select(gm, am, graph, scores, target, normalise=False)
            calibration = {"scale": model.scale, "rounds": rounds}
        else:
            kept = select(graph, scores, target, normalise=False)
        tau_kept = graph.all_kept()
        tau_kept[free] = scores[free] >= opts.tau
        record = {
            "formulation": "paper", "solver": opts.solver, "relaxed": opts.relax, "lambda": LAMBDA,
            "bounds": opts.bounds,
            "samples": int(sum(len(p.x) for p in problems)), "per_class": per_class, "jobs": opts.jobs,
            "loss": "multiclass hinge on the original logit margins (linear surrogate of cross-entropy)",
            "classes": [r.__dict__ for r in records],
            "threshold_rule": {"tau": opts.tau, "units_kept": int(tau_kept[free].sum()), "units_free": len(free),
                               "macs_kept": graph.macs(tau_kept) / graph.macs()},
        }
        if calibration is not None:
            record["latency_calibration"] = calibration
        return kept, scores, record


def _stages(records: list[Any], joint_rounds: list[Any]) -> dict[str, Any]:
    """Which stages of the budgeted MILP ran: the exact layer sub-problems (those whose graph the
    encoding covers) and the joint stage's rounds (measured flip effects, no encoding needed)."""
    solved = sum(r.outcome in ("improved", "unchanged", "rejected") for r in records)
    unencoded = sorted({r.group for r in records if r.outcome == "no-encoding"})
    why = next((r.note for r in records if r.outcome == "no-encoding"), None)
    return {"warm_start": True, "layer_subproblems_solved": int(solved),
            "layer_subproblems_without_encoding": unencoded, "no_encoding_reason": why,
            "joint_rounds": len(joint_rounds)}

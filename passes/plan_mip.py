"""The MIP planner (``plan-mip``): units chosen by mixed-integer programming (the OAMIP analysis).

Unlike a criterion, the MILP needs the target (a MAC budget or a ratio) to decide, so it is a
planner (:mod:`.planner_base`): it returns a :class:`~oamipc.plan.Planned` whose record is the
report's ``mip`` section.  Its options are its own frozen fields (the target, and every
:class:`.mip.options.MipOptions` field), so a pipeline string can name them all:
``plan-mip{solver=cbc,time-limit=20,flops-budget=0.5},prune-units``.  Two formulations:

* ``budget`` (default): the plan starts from the best greedy plan of the cheap criteria (asked of
  :class:`.plan_greedy.PlanGreedyAnalysis`, so the analysis cache serves them) and is improved by
  :mod:`.mip.budget` (layer sub-problems, then the joint stage of :mod:`.mip.joint`).  The
  reported score of a unit is 1 + its normalised magnitude when kept, its normalised magnitude
  when removed: kept units always rank above removed ones.
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
from .mip.budget import WARM_CRITERIA, Calibration, margin_loss, network_logits, plan_budget, unit_magnitude
from .mip.masked import margins
from .mip.options import MipOptions
from .mip.paper import LAMBDA, paper_scores, pick_samples
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
        if self.options.formulation == "paper":
            kept, scores, record = self._paper(gm, graph, am, target)
            bias_shift: dict[str, list[float]] = {}
        else:
            kept, scores, record, bias_shift = self._budget(gm, graph, am, target)
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
                    calib: Calibration) -> tuple[float, str, np.ndarray, list[dict[str, Any]]]:
        """The best greedy plan of the cheap criteria on held-out samples: (loss, name, kept, rows)."""
        opts = self.options
        names = [opts.warm] if opts.warm != "auto" else [
            c for c in WARM_CRITERIA if not (get_criterion(c).needs_labels and am.context.calib_y is None)]
        rows = []
        best: tuple[float, str, np.ndarray] | None = None
        for name in names:
            planned = am.get(PlanGreedyAnalysis(target=target, leaf_modules=self.leaf_modules, importance=name), gm)
            kept = planned.plan.kept_mask(graph)
            loss = margin_loss(gm, graph, kept, calib.x_hold, calib.y_hold, calib.margin_hold, opts.torch_device())
            rows.append({"criterion": name, "holdout_loss": loss})
            if best is None or loss < best[0] - 1e-12:
                best = (loss, name, kept)
        assert best is not None
        return (*best, rows)

    def _budget(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, target: Target
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, list[float]]]:
        """The default formulation: warm start, layer sub-problems, joint stage, final checks."""
        opts = self.options
        calib = Calibration.build(gm, am, opts)
        record: dict[str, Any] = {
            "formulation": opts.formulation, "solver": opts.solver, "bounds": opts.bounds,
            "spend_budget": opts.spend_budget, "samples": len(calib.x), "holdout_samples": len(calib.x_hold),
            "loss": "margin-preserving hinge (original margins), held-out acceptance"}
        warm_loss, warm_name, warm, rows = self._warm_start(gm, graph, am, target, calib)
        record["warm_start"] = {"chosen": warm_name, "candidates": rows}
        if target.kind == "latency":  # the MILP keeps the warm start's widths: its calibration holds
            chosen = am.get(PlanGreedyAnalysis(target=target, leaf_modules=self.leaf_modules, importance=warm_name), gm)
            predicted = chosen.predicted_latency or {}
            record["latency_calibration"] = {"scale": predicted.get("scale", 1.0),
                                             "rounds": predicted.get("calibration", [])}
        forced = floor_units(graph, am.get(get_criterion(warm_name, self.leaf_modules), gm))
        kept, solver = plan_budget(gm, graph, am, warm=warm, opts=opts, calib=calib, target=target, forced=forced)
        record["subproblems"] = [r.__dict__ for r in solver.records]
        record["joint_rounds"] = [r.__dict__ for r in solver.joint_rounds]
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
        record["holdout_loss"] = {"warm_start": warm_loss, "final": solver.holdout_loss(
            kept, solver.net if solver.bias_shift else solver.plain_net)}
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

    def _paper(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, target: Target
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
                                       gap=opts.gap, progress=ctx.tick)
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

"""The ``mip`` criterion: units chosen by mixed-integer programming (the OAMIP analysis).

Unlike the other criteria, the MILP needs the target (a MAC budget or a ratio) to decide, so it
*plans* rather than only scores: :class:`~.select_units.SelectUnitsAnalysis` calls
:meth:`MipImportance.plan` with the target.  Two formulations:

* ``budget`` (default): the plan starts from the best cheap criterion and is improved by
  :mod:`.mip.budget` (layer sub-problems, then the joint stage of :mod:`.mip.joint`).  The
  reported score of a unit is 1 + its normalised magnitude when kept, its normalised magnitude
  when removed: kept units always rank above removed ones.
* ``paper``: the thesis's continuous scores (:mod:`.mip.paper`), ranked to the target.

Solver settings come from ``CompileContext.options["mip"]`` (see :class:`.mip_budget.MipOptions`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from oamipc.errors import UsageError
from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, get_criterion, register_criterion
from .mip.budget import WARM_CRITERIA, Calibration, MipOptions, network_logits, margin_loss, plan_budget, unit_magnitude
from .mip.masked import margins
from .mip.paper import LAMBDA, paper_scores, pick_samples
from .mip.rows import plan_violations


log = logging.getLogger(__name__)

@register
@register_criterion
@dataclass(frozen=True)
class MipImportance(ImportanceAnalysis):
    """Kept units chosen by a MILP over calibration samples, for a given target."""

    name: ClassVar[str] = "importance-mip"
    criterion: ClassVar[str] = "mip"
    needs_data: ClassVar[bool] = True
    plans: ClassVar[bool] = True

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        raise UsageError("importance 'mip' chooses units for a target: use it through select-units/prune-units "
                         "with --flops-budget or --prune-ratio")

    def plan(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, *, prune_ratio: float | None,
             flops_budget: float | None, min_keep: int, round_to: int
             ) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
        """The kept mask for the target, per-unit scores consistent with it, and the bias shifts of
        mean replacement (empty unless ``--mean-replacement`` was asked for and helps)."""
        from .select_units import floor_units, select  # late: select_units imports this registry

        if am.context.calib_x is None:
            raise UsageError("importance 'mip' needs calibration data: pass --data")
        opts = MipOptions.from_context(am)
        start = time.perf_counter()
        if opts.formulation == "paper":
            return self._paper(gm, graph, am, opts, start, prune_ratio=prune_ratio, flops_budget=flops_budget,
                               min_keep=min_keep, round_to=round_to)
        calib = Calibration.build(gm, am, opts)
        report: dict[str, Any] = {"formulation": opts.formulation, "solver": opts.solver, "bounds": opts.bounds,
                                  "spend_budget": opts.spend_budget, "samples": len(calib.x), "holdout_samples": len(calib.x_hold),
                                  "loss": "margin-preserving hinge (original margins), held-out acceptance"}
        # Warm start: the best cheap criterion on held-out samples.
        names = [opts.warm] if opts.warm != "auto" else [
            c for c in WARM_CRITERIA if not (get_criterion(c).needs_labels and am.context.calib_y is None)]
        warm_rows = []
        best: tuple[float, str, np.ndarray] | None = None
        for name in names:
            scores = am.get(get_criterion(name, self.leaf_modules), gm)
            kept = select(graph, scores, prune_ratio=prune_ratio, flops_budget=flops_budget, min_keep=min_keep,
                          round_to=round_to)
            loss = margin_loss(gm, graph, kept, calib.x_hold, calib.y_hold, calib.margin_hold)
            warm_rows.append({"criterion": name, "holdout_loss": loss})
            if best is None or loss < best[0] - 1e-12:
                best = (loss, name, kept)
        assert best is not None
        report["warm_start"] = {"chosen": best[1], "candidates": warm_rows}
        forced = floor_units(graph, am.get(get_criterion(best[1], self.leaf_modules), gm))
        kept, solver = plan_budget(gm, graph, am, warm=best[2], opts=opts, calib=calib,
                                           prune_ratio=prune_ratio, flops_budget=flops_budget, min_keep=min_keep,
                                           round_to=round_to, forced=forced)
        report["subproblems"] = [r.__dict__ for r in solver.records]
        report["joint_rounds"] = [r.__dict__ for r in solver.joint_rounds]
        report["solver_error"] = solver.solver_error
        # Every accepted step was checked already; check the end result too, against the warm start
        # (always valid), so that no path can hand on a plan outside the target.
        broken = plan_violations(graph, kept, best[2], fixed_count=prune_ratio is not None, min_keep=min_keep,
                                 round_to=round_to, flops_budget=flops_budget)
        report["fallback"] = None
        if broken:
            log.warning("the MILP plan breaks %s; using the warm start (%s) instead", broken[0], best[1])
            report["fallback"] = f"the MILP plan broke: {'; '.join(broken)}; the warm start was used"
            kept, solver.bias_shift = best[2].copy(), {}
        report["mean_replacement"] = solver.mean_replacement
        report["holdout_loss"] = {"warm_start": best[0], "final": solver.holdout_loss(
            kept, solver.net if solver.bias_shift else solver.plain_net)}
        report["reproducible"] = solver.reproducible()
        if not report["reproducible"]:
            log.warning("a MILP time limit was reached (--time-limit %g s per solve, --total-time-limit %g s): "
                        "this plan may differ between runs; raise the limits for a reproducible plan",
                        opts.time_limit, opts.total_time_limit)
        report["seconds"] = time.perf_counter() - start
        am.context.report["mip"] = report
        mags = unit_magnitude(gm, graph)
        norm = np.zeros_like(mags)
        for g in graph.groups:
            top = mags[g.units].max() if g.units else 0.0
            norm[g.units] = mags[g.units] / top if top > 0 else 0.0
        return kept, norm + kept.astype(np.float64), solver.bias_shift

    def _paper(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, opts: MipOptions, start: float, *,
               prune_ratio: float | None, flops_budget: float | None, min_keep: int,
               round_to: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
        """The thesis's formulation: averaged class-problem scores, ranked to the target."""
        from .select_units import select

        ctx = am.context
        assert ctx.calib_x is not None
        x = ctx.calib_x.float()
        with torch.no_grad():
            logits = network_logits(gm, x)
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
                                       progress=ctx.tick)
        # The scores are comparable across layers already (the objective normalises by layer size).
        kept = select(graph, scores, prune_ratio=prune_ratio, flops_budget=flops_budget, min_keep=min_keep,
                      round_to=round_to, normalise=False)
        tau_kept = graph.all_kept()
        tau_kept[free] = scores[free] >= opts.tau
        ctx.report["mip"] = {
            "formulation": "paper", "solver": opts.solver, "relaxed": opts.relax, "lambda": LAMBDA,
            "bounds": opts.bounds,
            "samples": int(sum(len(p.x) for p in problems)), "per_class": per_class, "jobs": opts.jobs,
            "loss": "multiclass hinge on the original logit margins (linear surrogate of cross-entropy)",
            "classes": [r.__dict__ for r in records],
            "threshold_rule": {"tau": opts.tau, "units_kept": int(tau_kept[free].sum()), "units_free": len(free),
                               "macs_kept": graph.macs(tau_kept) / graph.macs()},
            "seconds": time.perf_counter() - start,
        }
        return kept, scores, {}

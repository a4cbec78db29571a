"""The ``mip`` criterion: units chosen by mixed-integer programming (the OAMIP analysis).

Unlike the other criteria, the MILP needs the target (a MAC budget or a ratio) to decide, so it
*plans* rather than only scores: :class:`~.select_units.SelectUnitsAnalysis` calls
:meth:`MipImportance.plan` with the target.  The plan starts from the best cheap criterion and
is improved by :mod:`.mip_budget` (the budgeted, layer-decomposed formulation).
Solver settings come from ``CompileContext.options["mip"]`` (see :class:`.mip_budget.MipOptions`).
The reported score of a unit is 1 + its normalised magnitude when kept, its normalised magnitude
when removed: kept units always rank above removed ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import fx

from oamipc.errors import UsageError
from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, get_criterion, register_criterion
from .mip_budget import WARM_CRITERIA, Calibration, MipOptions, margin_loss, plan_budget, unit_magnitude


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
             flops_budget: float | None, min_keep: int, round_to: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept mask for the target, and per-unit scores consistent with it."""
        from .select_units import floor_units, select  # late: select_units imports this registry

        if am.context.calib_x is None:
            raise UsageError("importance 'mip' needs calibration data: pass --data")
        opts = MipOptions.from_context(am)
        start = time.perf_counter()
        calib = Calibration.build(gm, am, opts)
        report: dict[str, Any] = {"formulation": opts.formulation, "solver": opts.solver,
                                  "samples": len(calib.x), "holdout_samples": len(calib.x_hold),
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
        kept, records = plan_budget(gm, graph, am, warm=best[2], opts=opts, calib=calib,
                                    prune_ratio=prune_ratio, flops_budget=flops_budget, min_keep=min_keep,
                                    round_to=round_to, forced=forced)
        report["subproblems"] = [r.__dict__ for r in records]
        report["holdout_loss"] = {"warm_start": best[0],
                                  "final": margin_loss(gm, graph, kept, calib.x_hold, calib.y_hold, calib.margin_hold)}
        report["seconds"] = time.perf_counter() - start
        am.context.report["mip"] = report
        mags = unit_magnitude(gm, graph)
        norm = np.zeros_like(mags)
        for g in graph.groups:
            top = mags[g.units].max() if g.units else 0.0
            norm[g.units] = mags[g.units] / top if top > 0 else 0.0
        return kept, norm + kept.astype(np.float64)

"""Prune transform: physically remove the units a plan drops.

The rules of the removal (smaller dense modules, every place a unit appears, rewritten sizes,
depthwise and grouped convolutions, bias shifts folded first) are those of the surgery,
:mod:`oamipc.surgery`; this pass only decides which plan to apply and reports what it did.
The plan comes from a planner (:mod:`.planner_base`) or is given explicitly (``plan=``, e.g.
replayed from a JSON file).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import fx

from oamipc.errors import UsageError
from oamipc.passmanager import AnalysisManager, Pass, PassResult, register
from oamipc.plan import Plan, Planned
from oamipc.surgery import apply_plan, fold_bias_shift
from oamipc.target import Target
from oamipc.units import Layout, UnitGraph

from .planner_base import planner_for
from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOutcome:
    """What the prune pass did, as data: the applied plan (and the planner's result when it planned)."""

    plan: Plan
    planned: Planned | None
    units_removed: int
    units_total: int
    predicted_macs_before: float  # the unit graph's cost model (exact counts, held as floats)
    predicted_macs_after: float
    rewritten: list[str]
    # Per Linear/Conv module target: the output channels (positions before the pass) it kept, for
    # passes that compare the pruned layers with the originals (reconstruction).  Not in the report.
    kept_outputs: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``prune`` section."""
        return {"plan": self.plan.to_dict(), "units_removed": self.units_removed, "units_total": self.units_total,
                "predicted_macs_before": self.predicted_macs_before,
                "predicted_macs_after": self.predicted_macs_after, "rewritten": self.rewritten}


@register
@dataclass(frozen=True)
class PruneUnitsPass(Pass):
    """Remove the units a plan drops; see the module docstring.

    Where the plan comes from, first match wins: ``plan`` (a saved plan replayed); this pass's own
    ``importance``/target (the planner for that name, :func:`.planner_base.planner_for`, with
    ``lossless``/``lossless_box`` passed on); the last planner a pipeline listed before this pass
    (``plan-mip{...},prune-units``).
    """

    name: ClassVar[str] = "prune-units"
    importance: str | None = None
    target: Target = field(default_factory=Target)
    leaf_modules: tuple[str, ...] = ()
    lossless: bool = False
    lossless_box: str = "feature"
    prune_embed: bool = False
    plan: Plan | None = field(default=None, compare=False)

    def _planned(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        if self.importance is not None or self.target.is_set:
            self.target.require()
            return am.get(planner_for(self.importance or "l1", self.target, self.leaf_modules,
                                      lossless=self.lossless, lossless_box=self.lossless_box,
                                      prune_embed=self.prune_embed), gm)
        if am.planned is not None:
            return am.planned
        raise UsageError("prune-units has no plan: give it a target (prune-ratio or flops-budget), a saved plan, "
                         "or run a planner before it in the pipeline (plan-greedy, plan-mip)")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        graph = am.get(UnitGroupAnalysis(self.leaf_modules, self.prune_embed), gm)
        planned = None if self.plan is not None else self._planned(gm, am)
        plan = self.plan if self.plan is not None else planned.plan  # type: ignore[union-attr]
        kept = plan.kept_mask(graph)
        macs_before, macs_after = graph.macs(), graph.macs(kept)
        if plan.bias_shift:  # removed inputs' constant contributions folded into their readers' biases
            fold_bias_shift(gm, plan.bias_shift)
        changed = apply_plan(gm, graph, kept) if not kept.all() else []
        outcome = PruneOutcome(plan, planned, int((~kept).sum()), int(graph.n_units), macs_before, macs_after, changed,
                               kept_outputs(graph, kept))
        log.info("removed %d of %d units; rewrote %d nodes", outcome.units_removed, graph.n_units, len(changed))
        return PassResult(gm, modified=bool(changed), outcome=outcome)


def kept_outputs(graph: UnitGraph, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The output positions each Linear/Conv layer keeps under ``kept`` (the surgery's own rule)."""
    out: dict[str, np.ndarray] = {}
    for layer in graph.layers:
        lay = graph.layouts.get(layer.node)
        if isinstance(lay, Layout):
            out[layer.target] = lay.keep_positions(kept)
    return out

"""Prune transform: physically remove the units a plan drops (the surgery is :mod:`oamipc.surgery`).

Rules of the surgery:
1. Every Linear/Conv/BatchNorm/LayerNorm/GroupNorm module whose input or output channels lose
   units is replaced by a new, smaller module holding the copied slices of its weights, bias and
   running statistics (never a mask: the result is a plain dense GraphModule).
2. A unit is removed from every place it appears at once: the producer's output rows, the
   normalisation entries, and the input slice of every consumer (a flattened channel takes its
   whole ``H*W`` block of features with it).
3. Sizes baked into the graph are rewritten: constant sizes of ``view``/``reshape`` on the channel
   dim, and ``split``/``chunk`` along it (replaced by ``split`` with the new sizes).
4. Depthwise convs shrink with their input (``groups`` follows); grouped convs keep their groups.

The plan comes from :class:`passes.select_units.SelectUnitsAnalysis` (built from this pass's
options) or is given explicitly (``plan=``, e.g. replayed from a JSON file).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from torch import fx

from oamipc.passmanager import AnalysisManager, Pass, PassResult, register
from oamipc.plan import Plan
from oamipc.surgery import apply_plan, fold_bias_shift

from .select_units import SelectUnitsAnalysis
from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class PruneUnitsPass(Pass):
    """Remove the units that the selection (or a given plan) drops; see the module docstring."""

    name: ClassVar[str] = "prune-units"
    importance: str = "l1"
    prune_ratio: float | None = None
    flops_budget: float | None = None
    min_keep: int = 1
    round_to: int = 1
    leaf_modules: tuple[str, ...] = ()
    plan: Plan | None = field(default=None, compare=False)

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        graph = am.get(UnitGroupAnalysis(self.leaf_modules), gm)
        plan = self.plan
        if plan is None:
            plan = am.get(SelectUnitsAnalysis(self.importance, self.prune_ratio, self.flops_budget,
                                              self.min_keep, self.round_to, self.leaf_modules), gm)
        kept = plan.kept_mask(graph)
        macs_before, macs_after = graph.macs(), graph.macs(kept)
        if plan.bias_shift:  # mean replacement: removed inputs' means folded into their readers' biases
            fold_bias_shift(gm, plan.bias_shift)
        changed = apply_plan(gm, graph, kept) if not kept.all() else []
        am.context.report["prune"] = {
            "plan": plan.to_dict(),
            "units_removed": int((~kept).sum()),
            "units_total": int(graph.n_units),
            "predicted_macs_before": macs_before,
            "predicted_macs_after": macs_after,
            "rewritten": changed,
        }
        log.info("removed %d of %d units; rewrote %d nodes", int((~kept).sum()), graph.n_units, len(changed))
        return PassResult(gm, modified=bool(changed))

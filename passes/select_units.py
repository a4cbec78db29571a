"""Selection: turn importance scores into a plan (kept units per group).

Two ways to say how much to remove:

* ``prune_ratio`` R: each group drops ``floor(R * size)`` units, the lowest-scored ones.
* ``flops_budget`` F: keep at most F of the network's MACs, chosen globally.  Scores are first
  normalised by their group's mean (raw magnitudes are not comparable across layers), then the
  cheapest removal step over all groups is taken repeatedly until the exact MAC count of the
  pruned network (the unit analysis's cost model) is within budget.

In both, a group keeps at least ``min_keep`` units (and every pinned unit), kept widths can be
rounded up to a multiple of ``round_to`` (friendlier to vectorised kernels), and groups with
equal-count blocks (grouped convs, GroupNorm) keep the same number in every block.  Ties break by
unit index, so the same scores always give the same plan.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import fx

from oamipc.errors import PlanError, UsageError
from oamipc.passmanager import Analysis, AnalysisManager, register
from oamipc.plan import Plan
from oamipc.units import UnitGraph, UnitGroup

from .importance_base import get_criterion
from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)


class _GroupChooser:
    """The nested kept sets of one group, indexed by kept count."""

    def __init__(self, group: UnitGroup, scores: np.ndarray, min_keep: int, round_to: int,
                 forced: set[int] | None = None) -> None:
        self.group = group
        self.scores = scores
        blocks = group.blocks or [list(group.units)]
        self.blocks = blocks
        must = set(group.pinned) | (forced or set())
        # Per block: pinned/forced units first, then the rest by descending score (ties: lower index).
        self.order = [sorted(b, key=lambda u: (u not in must, -scores[u], u)) for b in blocks]
        n_blocks = len(blocks)
        block_size = len(blocks[0])
        pinned_max = max(sum(u in must for u in b) for b in blocks)
        k_min = max(pinned_max, math.ceil(max(min_keep, 1) / n_blocks))
        counts = [k * n_blocks for k in range(min(k_min, block_size), block_size + 1)]
        allowed = [n for n in counts if n % max(round_to, 1) == 0 or n == group.size]
        self.allowed = sorted(set(allowed or [group.size]))

    def kept(self, n: int) -> list[int]:
        per_block = n // len(self.blocks)
        return sorted(u for order in self.order for u in order[:per_block])

    def at_least(self, n: int) -> int:
        """The smallest allowed kept count >= n."""
        for a in self.allowed:
            if a >= n:
                return a
        return self.allowed[-1]

    def next_lower(self, n: int) -> int | None:
        lower = [a for a in self.allowed if a < n]
        return lower[-1] if lower else None


def select(graph: UnitGraph, scores: np.ndarray, *, prune_ratio: float | None, flops_budget: float | None,
           min_keep: int = 1, round_to: int = 1, normalise: bool = True) -> np.ndarray:
    """The kept-unit mask for the given scores and target (see the module docstring).

    ``normalise=False`` ranks raw scores across groups (for scores that are already comparable,
    such as the thesis's layer-normalised MILP scores in [0, 1]).
    """
    if (prune_ratio is None) == (flops_budget is None):
        raise UsageError("give exactly one of --prune-ratio and --flops-budget")
    if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
        raise UsageError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    if flops_budget is not None and not 0.0 < flops_budget <= 1.0:
        raise UsageError(f"--flops-budget must be in (0, 1], got {flops_budget}")
    if min_keep < 1:
        raise UsageError(f"--min-keep must be at least 1, got {min_keep}")
    if round_to < 1:
        raise UsageError(f"--round-to must be at least 1, got {round_to}")
    kept = graph.all_kept()
    forced = floor_units(graph, scores)
    choosers = [_GroupChooser(g, scores, min_keep, round_to, forced) for g in graph.groups if g.prunable]
    if prune_ratio is not None:
        for ch in choosers:
            n = ch.at_least(ch.group.size - math.floor(prune_ratio * ch.group.size))
            _apply(kept, ch, n)
        return kept
    assert flops_budget is not None
    return _select_budget(graph, scores, choosers, kept, flops_budget, normalise)


def floor_units(graph: UnitGraph, scores: np.ndarray) -> set[int]:
    """The best-scoring unit of every split piece that has no pinned unit: kept so no piece empties."""
    pinned = graph.pinned_mask()
    forced: set[int] = set()
    for piece in graph.floors:
        units = piece.tolist()
        if not units or any(pinned[u] or u in forced for u in units):
            continue
        forced.add(min(units, key=lambda u: (-scores[u], u)))
    return forced


def _apply(kept: np.ndarray, ch: _GroupChooser, n: int) -> None:
    keep = set(ch.kept(n))
    for u in ch.group.units:
        kept[u] = u in keep


def _select_budget(graph: UnitGraph, scores: np.ndarray, choosers: list[_GroupChooser], kept: np.ndarray,
                   budget: float, normalise: bool = True) -> np.ndarray:
    total = graph.macs()
    target = budget * total
    # Incremental MACs: per layer, how many input/output positions each unit occupies.
    n = graph.n_units
    layers = graph.layers
    cin = np.zeros((len(layers), n))
    cout = np.zeros((len(layers), n))
    for i, layer in enumerate(layers):
        t = layer.in_units[layer.in_units >= 0]
        np.add.at(cin[i], t, 1)
        t = layer.out_units[layer.out_units >= 0]
        np.add.at(cout[i], t, 1)
    w_in = np.array([len(layer.in_units) for layer in layers], dtype=np.float64)
    w_out = np.array([len(layer.out_units) for layer in layers], dtype=np.float64)
    c_io = np.array([layer.c_io for layer in layers])
    c_o = np.array([layer.c_o for layer in layers])

    def macs() -> float:
        return float((c_io * w_in * w_out + c_o * w_out).sum())

    norm = {}
    for ch in choosers:
        s = scores[ch.group.units]
        mean = float(np.mean(np.abs(s)))
        norm[ch.group.id] = mean if mean > 0 and normalise else 1.0
    current = {ch.group.id: ch.group.size for ch in choosers}
    heap: list[tuple[float, int, int]] = []

    def push(ch: _GroupChooser) -> None:
        lower = ch.next_lower(current[ch.group.id])
        if lower is None:
            return
        removed = set(ch.kept(current[ch.group.id])) - set(ch.kept(lower))
        cost = float(np.mean([scores[u] for u in removed])) / norm[ch.group.id]
        heapq.heappush(heap, (cost, ch.group.id, lower))

    by_id = {ch.group.id: ch for ch in choosers}
    for ch in choosers:
        push(ch)
    while macs() > target + 1e-9 * total:
        if not heap:
            raise PlanError(f"--flops-budget {budget:g} is unreachable: every group is at its minimum width, "
                            f"which keeps {macs() / total:.3f} of the MACs; lower --min-keep/--round-to or "
                            "raise the budget")
        _, gid, lower = heapq.heappop(heap)
        ch = by_id[gid]
        removed = sorted(set(ch.kept(current[gid])) - set(ch.kept(lower)))
        for u in removed:
            kept[u] = False
        w_in -= cin[:, removed].sum(axis=1)
        w_out -= cout[:, removed].sum(axis=1)
        current[gid] = lower
        push(ch)
    return kept


@register
@dataclass(frozen=True)
class SelectUnitsAnalysis(Analysis[Plan]):
    """Build the plan from an importance criterion and a ratio or MAC budget."""

    name: ClassVar[str] = "select-units"
    importance: str = "l1"
    prune_ratio: float | None = None
    flops_budget: float | None = None
    min_keep: int = 1
    round_to: int = 1
    leaf_modules: tuple[str, ...] = ()

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Plan:
        graph = am.get(UnitGroupAnalysis(self.leaf_modules), gm)
        criterion = get_criterion(self.importance, self.leaf_modules)
        if getattr(criterion, "plans", False):  # the MILP chooses for the target itself
            kept, scores, *extra = criterion.plan(  # type: ignore[attr-defined]
                gm, graph, am, prune_ratio=self.prune_ratio, flops_budget=self.flops_budget,
                min_keep=self.min_keep, round_to=self.round_to)
            bias_shift = extra[0] if extra else {}
        else:
            bias_shift = {}
            scores = am.get(criterion, gm)
            kept = select(graph, scores, prune_ratio=self.prune_ratio, flops_budget=self.flops_budget,
                          min_keep=self.min_keep, round_to=self.round_to)
        settings = {"prune_ratio": self.prune_ratio, "flops_budget": self.flops_budget,
                    "min_keep": self.min_keep, "round_to": self.round_to, "seed": am.context.seed}
        am.context.report["scores"] = {
            g.name: [float(scores[u]) for u in g.units] for g in graph.groups if g.prunable}
        return Plan.from_mask(graph, kept, self.importance, settings, bias_shift)

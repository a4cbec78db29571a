"""The greedy planner: turn any criterion's scores into a plan (kept units per group).

Importance criteria only score units; this planner chooses, for a :class:`~oamipc.target.Target`:

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

from oamipc.errors import PlanError
from oamipc.latency import LatencyModel
from oamipc.passmanager import AnalysisManager, register
from oamipc.plan import Plan, Planned
from oamipc.target import Target, granularity
from oamipc.units import UnitGraph, UnitGroup

from .importance_base import get_criterion
from .planner_base import PlannerAnalysis

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

    def next_higher(self, n: int) -> int | None:
        higher = [a for a in self.allowed if a > n]
        return higher[0] if higher else None

    @property
    def coarse(self) -> bool:
        """Whether one step of this group moves more than one unit per block (rounding)."""
        return any(b - a > len(self.blocks) for a, b in zip(self.allowed, self.allowed[1:]))


def select(graph: UnitGraph, scores: np.ndarray, target: Target, *, normalise: bool = True,
           latency: LatencyModel | None = None) -> np.ndarray:
    """The kept-unit mask for the given scores and target (see the module docstring).

    ``normalise=False`` ranks raw scores across groups (for scores that are already comparable,
    such as the thesis's layer-normalised MILP scores in [0, 1]).  A latency target needs the
    measured ``latency`` model of the graph.
    """
    target.require()
    kept = graph.all_kept()
    forced = floor_units(graph, scores)
    steps = granularity(target, graph)
    choosers = [_GroupChooser(g, scores, target.min_keep, steps[g.id], forced) for g in graph.groups
                if g.prunable]
    if target.prune_ratio is not None:
        for ch in choosers:
            n = ch.at_least(ch.group.size - math.floor(target.prune_ratio * ch.group.size))
            _apply(kept, ch, n)
        return kept
    if target.kind == "latency":
        if latency is None:
            raise PlanError("a latency budget needs the measured latency model of the network")
        return _select_latency(graph, scores, choosers, kept, target, latency, normalise)
    assert target.flops_budget is not None
    return _select_budget(graph, scores, choosers, kept, target.flops_budget, normalise)


def _norms(scores: np.ndarray, choosers: list[_GroupChooser], normalise: bool) -> dict[int, float]:
    """Each group's mean absolute score (raw magnitudes are not comparable across layers)."""
    norm = {}
    for ch in choosers:
        mean = float(np.mean(np.abs(scores[ch.group.units])))
        norm[ch.group.id] = mean if mean > 0 and normalise else 1.0
    return norm


def _select_latency(graph: UnitGraph, scores: np.ndarray, choosers: list[_GroupChooser], kept: np.ndarray,
                    target: Target, model: LatencyModel, normalise: bool) -> np.ndarray:
    """Remove the step that loses the least (normalised) score per millisecond it saves, until the
    predicted latency is within budget; then give back the steps that still fit (a greedy knapsack
    with measured latency as the cost)."""
    assert target.latency_budget is not None
    limit = target.latency_budget * model.dense_ms
    norm = _norms(scores, choosers, normalise)
    current = {ch.group.id: ch.group.size for ch in choosers}

    def predicted(mask: np.ndarray) -> float:
        return model.predict({layer.target: layer.widths(mask) for layer in graph.layers})

    def step(ch: _GroupChooser, to: int | None) -> list[int]:
        return sorted(set(ch.kept(current[ch.group.id])) ^ set(ch.kept(to))) if to is not None else []

    now = predicted(kept)
    while now > limit * (1 + 1e-9):
        # Cheapest score lost per millisecond saved; where no step saves anything (a flat stretch
        # of a measured curve), the step losing the least score, to walk on to the next stair.
        best: tuple[tuple[bool, float], int, int, list[int], float] | None = None
        for ch in choosers:
            lower = ch.next_lower(current[ch.group.id])
            removed = step(ch, lower)
            if lower is None or not removed:
                continue
            trial = kept.copy()
            trial[removed] = False
            after = predicted(trial)
            saved = now - after
            lost = float(np.sum(scores[removed])) / norm[ch.group.id]
            cost = (False, lost / saved) if saved > 1e-12 else (True, lost)
            if best is None or cost < best[0]:
                best = (cost, ch.group.id, lower, removed, after)
        if best is None:
            raise PlanError(f"the latency budget {target.latency_budget:g} is unreachable: the smallest widths "
                            f"allowed are predicted at {now / model.dense_ms:.3f} of the dense latency; raise the "
                            "budget or lower the minimum width or rounding (min_keep, round_to)")
        _, gid, lower, removed, now = best
        kept[removed] = False
        current[gid] = lower
    while True:  # give back what still fits, most score per millisecond first
        best_add: tuple[float, int, int, list[int], float] | None = None
        for ch in choosers:
            higher = ch.next_higher(current[ch.group.id])
            added = step(ch, higher)
            if higher is None or not added:
                continue
            trial = kept.copy()
            trial[added] = True
            after = predicted(trial)
            if after > limit:
                continue
            gain = float(np.sum(scores[added])) / norm[ch.group.id] / max(after - now, 1e-12)
            if best_add is None or gain > best_add[0]:
                best_add = (gain, ch.group.id, higher, added, after)
        if best_add is None:
            return kept
        _, gid, higher, added, now = best_add
        kept[added] = True
        current[gid] = higher


def floor_units(graph: UnitGraph, scores: np.ndarray) -> set[int]:
    """The best-scoring unit of every split or cat piece that has no pinned unit: kept so no piece empties."""
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
    """Remove the cheapest step until the MACs fit, then give back what still fits."""
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

    norm = _norms(scores, choosers, normalise)
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
            raise PlanError(f"the MAC budget {budget:g} is unreachable: every group is at its minimum width, "
                            f"which keeps {macs() / total:.3f} of the MACs; lower the minimum width or the "
                            "rounding (min_keep, round_to) or raise the budget")
        _, gid, lower = heapq.heappop(heap)
        ch = by_id[gid]
        removed = sorted(set(ch.kept(current[gid])) - set(ch.kept(lower)))
        for u in removed:
            kept[u] = False
        w_in -= cin[:, removed].sum(axis=1)
        w_out -= cout[:, removed].sum(axis=1)
        current[gid] = lower
        push(ch)
    _spend(kept, choosers, current, scores, norm, (cin, cout), (w_in, w_out), (c_io, c_o), target + 1e-9 * total)
    return kept


def _spend(kept: np.ndarray, choosers: list[_GroupChooser], current: dict[int, int], scores: np.ndarray,
           norm: dict[int, float], counts: tuple[np.ndarray, np.ndarray], widths: tuple[np.ndarray, np.ndarray],
           costs: tuple[np.ndarray, np.ndarray], limit: float) -> None:
    """Give back steps that still fit the budget, best-scored first (rounding must not leave a
    plan far under its budget).  Only when some group has coarse steps: then every group takes
    part, since the units a coarse step freed are best spent wherever they score most (a Linear
    layer's units, often); plans made without rounding are exactly the removal loop's.

    ``counts`` are the per-layer input/output positions of every unit, ``widths`` the layers'
    current input/output widths (updated in place), ``costs`` their ``c_io``/``c_o``.
    """
    (cin, cout), (w_in, w_out), (c_io, c_o) = counts, widths, costs

    def macs(wi: np.ndarray, wo: np.ndarray) -> float:
        return float((c_io * wi * wo + c_o * wo).sum())

    if not any(ch.coarse for ch in choosers):
        return
    while True:
        best: tuple[float, int, int, list[int]] | None = None
        for ch in choosers:
            gid = ch.group.id
            higher = ch.next_higher(current[gid])
            if higher is None:
                continue
            added = sorted(set(ch.kept(higher)) - set(ch.kept(current[gid])))
            if macs(w_in + cin[:, added].sum(axis=1), w_out + cout[:, added].sum(axis=1)) > limit:
                continue
            value = float(np.mean([scores[u] for u in added])) / norm[gid]
            if best is None or value > best[0]:
                best = (value, gid, higher, added)
        if best is None:
            return
        _, gid, higher, added = best
        kept[added] = True
        w_in += cin[:, added].sum(axis=1)
        w_out += cout[:, added].sum(axis=1)
        current[gid] = higher


@register
@dataclass(frozen=True)
class PlanGreedyAnalysis(PlannerAnalysis):
    """Plan from one importance criterion's scores: the lowest-scored units go first."""

    name: ClassVar[str] = "plan-greedy"
    importance: str = "l1"

    def plan(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        graph = am.get(self.unit_analysis(), gm)
        target = self.target.require()
        scores = am.get(get_criterion(self.importance, self.leaf_modules, self.prune_embed), gm)
        model, rounds = None, None
        if target.kind == "latency":
            kept, model, rounds = self.latency_select(gm, am, graph, scores, target)
        else:
            kept = select(graph, scores, target)
        plan = Plan.from_mask(graph, kept, self.importance, self.settings(am))
        return Planned(plan, self.group_scores(graph, scores),
                       predicted_latency=self.predicted_latency(graph, kept, model, rounds))

"""Lossless removal first: dead units go before any criterion runs, and cost the budget nothing.

A planner with ``lossless=True`` (every planner: :mod:`.planner_base` calls :func:`plan_lossless`)
plans in four steps:

1. :class:`.dead_units.DeadUnitAnalysis` finds the units that are constant at every reader over
   the data's box; :func:`removable` keeps those the target's rules allow to go (every group keeps
   ``min_keep`` units, kept widths stay multiples of the rounding step, equal counts in
   equal-count blocks, one unit in every split piece; the lowest-numbered dead units go first).
2. They are removed from a copy of the network, their constant contributions folded into the
   readers' biases (:func:`.dead_units.bias_shifts`): on every input of the box this copy
   computes what the original computes, up to float rounding.
3. The planner itself (with ``lossless=False``, so any criterion, ``mip`` included, sees only a
   smaller network and a target) plans on the copy, for the target *lifted* to the copy: a MAC
   or latency budget is a fraction of the **original** network, so the copy gets the fraction
   ``F * original / copy`` of its own MACs (or predicted latency); when the dead units alone meet
   the budget, nothing else is removed.  A prune ratio applies to the live units of each group.
   This is what "they cost the budget nothing" means: the dead units' MACs are not spent on
   anything, and every unit the planner removes is a live one it chose.
4. The copy's plan is lifted back to the original network: the dead units removed, the copy's
   kept units mapped to their original indices, the bias shifts (the dead units' and any of the
   planner's own) in the original layers' widths.  So the plan replays on the original model
   like any other (``--plan``), without data.

The report's ``lossless`` section (the returned :class:`~oamipc.plan.Planned`'s ``lossless``)
says how many units were dead, how many went, the MACs they took, and the time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import fx

from oamipc.passmanager import AnalysisManager
from oamipc.plan import Plan, Planned
from oamipc.surgery import apply_plan, fold_bias_shift
from oamipc.target import Target, granularity
from oamipc.tracing import propagate_shapes
from oamipc.units import UnitGraph

from .dead_units import DeadUnitAnalysis, DeadUnits, bias_shifts

if TYPE_CHECKING:
    from .planner_base import PlannerAnalysis

log = logging.getLogger(__name__)


def removable(graph: UnitGraph, dead: DeadUnits, target: Target) -> np.ndarray:
    """The dead units that go under the target's rules (see the module docstring), as a mask."""
    removed = np.zeros(graph.n_units, dtype=bool)
    if not dead.dead.any():
        return removed
    steps = granularity(target, graph)
    for g in graph.groups:
        if not g.units or not dead.dead[g.units].any():
            continue
        blocks = g.blocks or [list(g.units)]
        size = len(blocks[0])
        dead_in = [[u for u in b if dead.dead[u]] for b in blocks]
        floor = min(max(target.min_keep, 1), g.size)
        step = max(int(steps[g.id]), 1)
        keep = next(k for k in range(size - min(len(d) for d in dead_in), size + 1)
                    if k * len(blocks) >= floor and (k * len(blocks) % step == 0 or k == size))
        for d in dead_in:
            removed[d[:size - keep]] = True
    for piece in graph.floors:  # a split or cat piece keeps a unit: leave such groups whole
        units = piece.tolist()
        if units and removed[units].all():
            for gid in sorted({int(graph.unit_group[u]) for u in units}):
                removed[graph.groups[gid].units] = False
    return removed


def plan_lossless(planner: PlannerAnalysis, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
    """Plan with ``planner`` after the dead units are gone (see the module docstring)."""
    target = planner.target.require()
    graph = am.get(planner.unit_analysis(), gm)
    dead = am.get(DeadUnitAnalysis(box=planner.lossless_box, leaf_modules=planner.leaf_modules,
                                   prune_embed=planner.prune_embed), gm)
    removed = removable(graph, dead, target)
    record = _record(graph, dead, removed)
    if not removed.any():  # the planner's own plan (called directly: its time is already this call's)
        record["planned_target"] = target.to_dict()
        return dataclasses.replace(planner.plan(gm, am), lossless=record)
    shifts = bias_shifts(gm, dead, removed)
    reduced = _reduced(gm, graph, removed, shifts, am)
    sub = AnalysisManager(am.context)
    lifted = _lifted_target(planner, target, graph, removed, gm, am, reduced, sub)
    record["planned_target"] = lifted.to_dict() if lifted is not None else None
    settings = {**planner.settings(am), "lossless": {"box": dead.box, "units_removed": int(removed.sum())}}
    if lifted is None:
        log.info("lossless: the %d dead units alone meet the target; nothing else is removed", int(removed.sum()))
        plan = Plan.from_mask(graph, ~removed, _criterion(planner), settings, shifts)
        planned = Planned(plan, {}, predicted_latency=_predicted(planner, gm, am, reduced, sub, None))
        record["note"] = "the dead units alone meet the target; no criterion ran"
    else:
        inner = sub.get(dataclasses.replace(planner, lossless=False, target=lifted), reduced)
        planned = _lift(inner, graph, sub.get(planner.unit_analysis(), reduced), removed, shifts, settings)
        planned = dataclasses.replace(planned, predicted_latency=_predicted(planner, gm, am, reduced, sub,
                                                                            inner.predicted_latency))
    for key, seconds in sub.timings.items():  # the planner's own time is the caller's to count
        if key != planner.name:
            am.timings[key] = am.timings.get(key, 0.0) + seconds
    return dataclasses.replace(planned, lossless=record)


def _criterion(planner: PlannerAnalysis) -> str:
    from .planner_base import planner_names

    return str(getattr(planner, "importance", "") or planner_names().get(type(planner), planner.name))


def _record(graph: UnitGraph, dead: DeadUnits, removed: np.ndarray) -> dict[str, Any]:
    """The report's ``lossless`` section before planning."""
    kept = ~removed
    out = dead.summary(graph)
    by_name = {g.name: g for g in graph.groups}
    for row in out["groups"]:
        row["removed"] = int(removed[by_name[row["name"]].units].sum())
    out.update({
        "enabled": True,
        "units_removed": int(removed.sum()),
        "units_kept_by_rules": int((dead.dead & ~removed).sum()),
        "macs_before": graph.macs(), "macs_after": graph.macs(kept),
        "params_before": float(sum(layer.params(graph.all_kept()) for layer in graph.layers)),
        "params_after": float(sum(layer.params(kept) for layer in graph.layers)),
    })
    return out


def _reduced(gm: fx.GraphModule, graph: UnitGraph, removed: np.ndarray, shifts: dict[str, list[float]],
             am: AnalysisManager) -> fx.GraphModule:
    """A copy of ``gm`` without the removed dead units, their contributions folded into biases."""
    reduced = copy.deepcopy(gm)
    fold_bias_shift(reduced, shifts)
    apply_plan(reduced, graph, ~removed)
    propagate_shapes(reduced, am.context.example_inputs)
    return reduced


def _lifted_target(planner: PlannerAnalysis, target: Target, graph: UnitGraph, removed: np.ndarray,
                   gm: fx.GraphModule, am: AnalysisManager, reduced: fx.GraphModule,
                   sub: AnalysisManager) -> Target | None:
    """The target for the reduced copy (None: the dead units alone meet it); see the module docstring."""
    kind = target.kind
    if kind == "ratio":
        return target
    if kind == "macs":
        assert target.flops_budget is not None
        fraction = target.flops_budget * graph.macs() / graph.macs(~removed)
        return dataclasses.replace(target, flops_budget=fraction) if fraction < 1.0 - 1e-12 else None
    assert target.latency_budget is not None
    dense, smaller = planner.latency_model(gm, am), planner.latency_model(reduced, sub)
    assert dense is not None and smaller is not None
    fraction = target.latency_budget * dense.dense_ms / smaller.dense_ms
    return dataclasses.replace(target, latency_budget=fraction) if fraction < 1.0 - 1e-12 else None


def _unit_map(graph: UnitGraph, smaller: UnitGraph, removed: np.ndarray) -> dict[int, int]:
    """Each unit of ``graph`` that was not removed -> its unit in the reduced copy's graph.

    Matched through the layers that produce them: the ``i``-th surviving output of a layer is
    output ``i`` of the same layer in the copy."""
    layers = {layer.target: layer for layer in smaller.layers}
    out: dict[int, int] = {}
    for layer in graph.layers:
        units = layer.out_units
        surviving = [u for u in units.tolist() if u < 0 or not removed[u]]
        for u, v in zip(surviving, layers[layer.target].out_units.tolist()):
            if u >= 0 and v >= 0:
                out[u] = v
    return out


def _surviving_outputs(graph: UnitGraph, target: str, removed: np.ndarray) -> np.ndarray:
    layer = next(layer for layer in graph.layers if layer.target == target)
    units = layer.out_units
    return np.array([i for i, u in enumerate(units.tolist()) if u < 0 or not removed[u]], dtype=np.int64)


def _lift(inner: Planned, graph: UnitGraph, smaller: UnitGraph, removed: np.ndarray,
          shifts: dict[str, list[float]], settings: dict[str, Any]) -> Planned:
    """The reduced copy's plan as a plan of the original network (see the module docstring)."""
    mapping = _unit_map(graph, smaller, removed)
    kept_small = inner.plan.kept_mask(smaller)
    kept = ~removed
    for u in np.nonzero(kept)[0].tolist():
        kept[u] = bool(kept_small[mapping[u]])
    shift = {k: np.asarray(v, dtype=np.float64) for k, v in shifts.items()}
    for target, values in inner.plan.bias_shift.items():
        layer = next(layer for layer in graph.layers if layer.target == target)
        full = np.zeros(len(layer.out_units))
        full[_surviving_outputs(graph, target, removed)] = values
        shift[target] = shift.get(target, np.zeros(len(full))) + full
    plan = Plan.from_mask(graph, kept, inner.plan.criterion, settings,
                          {k: [float(x) for x in v] for k, v in shift.items()})
    small_groups = smaller.group_by_key()
    scores: dict[str, list[float]] = {}
    for g in graph.groups:
        sg = small_groups.get(g.key)
        small_scores = inner.scores.get(sg.name) if sg is not None else None
        if small_scores is None:
            continue
        index = {u: i for i, u in enumerate(sg.units)}
        scores[g.name] = [0.0 if removed[u] else small_scores[index[mapping[u]]] for u in g.units]
    return Planned(plan, scores, inner.section, inner.record)


def _predicted(planner: PlannerAnalysis, gm: fx.GraphModule, am: AnalysisManager, reduced: fx.GraphModule,
               sub: AnalysisManager, inner: dict[str, Any] | None) -> dict[str, Any] | None:
    """A latency target's prediction, as the planner of the reduced copy made it, against the original.

    The budget is a fraction of the original network's measured latency; the plan was chosen with
    the reduced copy's latency model (its prediction ``inner``; without one, the copy's own measured
    latency, when the dead units alone met the budget), which is the prediction reported.
    """
    if planner.target.latency_budget is None:
        return None
    dense, smaller = planner.latency_model(gm, am), planner.latency_model(reduced, sub)
    assert dense is not None and smaller is not None
    against = {"dense_ms": dense.dense_ms, "budget_ms": planner.target.latency_budget * dense.dense_ms,
               "model": "the latency model of the network without its dead units"}
    if inner:
        return {**inner, **against}
    return {"batch": dense.setup.batch, "provider": dense.provider, "predicted_ms": smaller.dense_ms,
            "measurements": dense.measured + smaller.measured, "from_cache": dense.cached + smaller.cached, **against}


__all__ = ["plan_lossless", "removable"]

"""Planners: analyses that turn a target (and scores, or a model and data) into a :class:`Plan`.

Importance criteria (:mod:`.importance_base`) only score units.  A planner decides which units
each group keeps for a :class:`~oamipc.target.Target`:

* :class:`.plan_greedy.PlanGreedyAnalysis` (``plan-greedy``) over any criterion's scores;
* :class:`.plan_mip.PlanMipAnalysis` (``plan-mip``), the MILP, which needs the target to decide
  and so cannot be a criterion.

A planner is a frozen dataclass whose fields are its options (the target among them), so an
instance is its own cache key, and it is nameable in a pipeline string with every option
(``plan-mip{solver=cbc,time-limit=20,flops-budget=0.5},prune-units``).  It returns
:class:`~oamipc.plan.Planned` data and never writes into the report: the driver does that.

``importance`` names map to planners here (:func:`planner_for`): a criterion's name gives the
greedy planner over it; a name registered with :func:`register_planner` (``mip``) gives that
planner.

Every planner takes ``lossless`` (off unless asked for; the driver asks when data is given): the
units that are provably dead on the data's box are removed first and the planner plans over the
rest, with the target lifted so that they cost nothing (:mod:`.lossless`).  Subclasses implement
:meth:`PlannerAnalysis.plan`; :meth:`PlannerAnalysis.run` adds the lossless step around it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx

from oamipc.errors import PlanError, UsageError
from oamipc.latency import LatencyModel
from oamipc.passmanager import Analysis, AnalysisManager
from oamipc.plan import Planned
from oamipc.target import Target
from oamipc.units import UnitGraph

from .importance_base import criteria
from .unit_groups import UnitGroupAnalysis

CALIBRATION_ROUNDS = 3
CALIBRATION_SLACK = 0.02  # a measured ratio this far (relative) over the budget still meets it: timing noise


def _measure_plan(gm: fx.GraphModule, am: AnalysisManager, graph: UnitGraph, kept: np.ndarray,
                  model: LatencyModel) -> float:
    """The pruned network's latency over the dense one's, measured whole (see :func:`measure_pair`)."""
    import copy
    import tempfile
    from pathlib import Path

    from oamipc.export import export_onnx
    from oamipc.latency import cache_session, measure_pair
    from oamipc.surgery import apply_plan

    inputs = am.context.example_inputs
    pruned = copy.deepcopy(gm)
    apply_plan(pruned, graph, kept)
    with tempfile.TemporaryDirectory(prefix="oamipc-calibrate-") as tmp, cache_session() as cache:
        dense_path = export_onnx(gm, inputs, Path(tmp) / "dense.onnx")
        pruned_path = export_onnx(pruned, inputs, Path(tmp) / "pruned.onnx")
        return measure_pair(dense_path, pruned_path, tuple(inputs[0].shape[1:]), model.setup, cache)


@dataclass(frozen=True)
class PlannerAnalysis(Analysis[Planned]):
    """Base of every planner: the target, the modules kept opaque while tracing, and whether the
    provably dead units go first (``lossless``, on the ``lossless_box``: ``feature`` or ``channel``)."""

    target: Target = field(default_factory=Target)
    leaf_modules: tuple[str, ...] = ()
    lossless: bool = False
    lossless_box: str = "feature"
    prune_embed: bool = False

    def __post_init__(self) -> None:
        from .dead_units import BOXES

        if self.lossless_box not in BOXES:
            raise UsageError(f"lossless_box must be one of {', '.join(BOXES)}, got {self.lossless_box!r}")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        """The plan for the target; with ``lossless``, after the dead units are gone (:mod:`.lossless`)."""
        if self.lossless:
            from .lossless import plan_lossless

            return plan_lossless(self, gm, am)
        return self.plan(gm, am)

    @abstractmethod
    def plan(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        """The plan for the target on ``gm`` as it is (every subclass's own method)."""

    def unit_analysis(self) -> Analysis[UnitGraph]:
        return UnitGroupAnalysis(self.leaf_modules, self.prune_embed)

    def settings(self, am: AnalysisManager) -> dict[str, Any]:
        """How the plan was made, as the plan file records it (target and seed)."""
        return {**self.target.to_dict(), "seed": am.context.seed, **({"prune_embed": True} if self.prune_embed else {})}

    def latency_model(self, gm: fx.GraphModule, am: AnalysisManager) -> LatencyModel | None:
        """The measured latency model a latency target needs (None for other targets).

        Keyed by the rounding and the batch only, so every planner and budget of one compile
        shares one set of measurements."""
        if self.target.kind != "latency":
            return None
        from . import latency_model

        return am.get(latency_model.LatencyModelAnalysis(
            batch=self.target.latency_batch, round_to=self.target.round_to, channel_block=self.target.channel_block,
            leaf_modules=self.leaf_modules, prune_embed=self.prune_embed, method=latency_model.DEFAULT_METHOD), gm)

    def predicted_latency(self, graph: UnitGraph, kept: np.ndarray, model: LatencyModel | None,
                          calibration: list[dict[str, float]] | None = None) -> dict[str, Any] | None:
        """What the latency model predicts for the plan, for the report (None without a model)."""
        if model is None or self.target.latency_budget is None:
            return None
        widths = {layer.target: layer.widths(kept) for layer in graph.layers}
        out = {"batch": model.setup.batch, "provider": model.provider, "dense_ms": model.dense_ms,
               "budget_ms": self.target.latency_budget * model.dense_ms, "predicted_ms": model.predict(widths),
               "uncalibrated_ms": model.scaled(1.0).predict(widths), "scale": model.scale,
               "measurements": model.measured, "from_cache": model.cached, "method": model.method}
        if calibration is not None:
            out["calibration"] = calibration
        return out

    def latency_select(self, gm: fx.GraphModule, am: AnalysisManager, graph: UnitGraph, scores: np.ndarray,
                       target: Target, *, normalise: bool = True
                       ) -> tuple[np.ndarray, LatencyModel, list[dict[str, float]]]:
        """A latency target's plan, checked on the whole network and re-planned until it holds.

        Each round plans with the model, builds and exports the pruned network, and times it
        against the dense one interleaved (:func:`oamipc.latency.measure_pair`).  When the whole
        network saved a different share than the layers predicted, the layers' changes are scaled
        by the ratio seen (``LatencyModel.scale``) and the plan is made again; at most
        :data:`CALIBRATION_ROUNDS` rounds, keeping the plan that met the budget with the most of it
        spent (or else the last).  Returns the plan, the calibrated model and one record per round."""
        from .plan_greedy import select

        base = self.latency_model(gm, am)
        assert base is not None and target.latency_budget is not None
        limit = target.latency_budget
        model, rounds = base, []
        best: tuple[np.ndarray, LatencyModel] | None = None
        best_ratio = 0.0
        kept = graph.all_kept()
        last: tuple[np.ndarray, LatencyModel] | None = None
        for _ in range(CALIBRATION_ROUNDS):
            try:
                kept = select(graph, scores, target, normalise=normalise, latency=model)
            except PlanError:
                if last is None:
                    raise
                break  # the calibrated model says the budget is out of reach: keep what was measured
            if last is not None and np.array_equal(kept, last[0]):
                break  # the same plan again: its measurement, and so the next scale, would repeat
            last = (kept, model)
            widths = {layer.target: layer.widths(kept) for layer in graph.layers}
            layer_saving = base.dense_ms - base.predict(widths)  # what the layers alone say, unscaled
            ratio = _measure_plan(gm, am, graph, kept, base)
            rounds.append({"scale": model.scale, "predicted_ratio": model.predict(widths) / base.dense_ms,
                           "measured_ratio": ratio})
            if ratio <= limit * (1 + CALIBRATION_SLACK) and (best is None or ratio > best_ratio):
                best, best_ratio = (kept, model), ratio  # the met plan that spends most of the budget
                if ratio >= limit * (1 - 3 * CALIBRATION_SLACK):
                    break  # met, and not far under: no more rounds needed
            if layer_saving <= 1e-12 or ratio >= 1.0:
                break
            model = base.scaled((1.0 - ratio) * base.dense_ms / layer_saving)
        kept, model = best if best is not None else last  # type: ignore[misc]
        return kept, model, rounds

    @staticmethod
    def group_scores(graph: UnitGraph, scores: np.ndarray) -> dict[str, list[float]]:
        """Per prunable group (by name), the score of each of its units."""
        return {g.name: [float(scores[u]) for u in g.units] for g in graph.groups if g.prunable}


_PLANNERS: dict[str, Callable[..., PlannerAnalysis]] = {}


def register_planner(importance: str) -> Callable[[type[PlannerAnalysis]], type[PlannerAnalysis]]:
    """Class decorator: ``importance=<name>`` (CLI ``--importance``) selects this planner."""
    def wrap(cls: type[PlannerAnalysis]) -> type[PlannerAnalysis]:
        _PLANNERS[importance] = cls
        return cls
    return wrap


def planner_names() -> dict[type[PlannerAnalysis], str]:
    """The ``importance`` name of every planner registered with :func:`register_planner`, by class."""
    return {cls: name for name, cls in _PLANNERS.items()}  # type: ignore[misc]


def importance_names() -> list[str]:
    """Every name ``--importance`` accepts: the criteria and the planners of their own."""
    return sorted(set(criteria()) | set(_PLANNERS))


def planner_for(importance: str, target: Target, leaf_modules: tuple[str, ...] = (), *, lossless: bool = False,
                lossless_box: str = "feature", prune_embed: bool = False, **options: Any) -> PlannerAnalysis:
    """The planner for an ``importance`` name; ``options`` go to a planner of its own (e.g. the MIP's)."""
    common: dict[str, Any] = {"target": target, "leaf_modules": leaf_modules, "lossless": lossless,
                              "lossless_box": lossless_box, "prune_embed": prune_embed}
    if importance in _PLANNERS:
        return _PLANNERS[importance](**common, **options)
    if importance not in criteria():
        raise UsageError(f"unknown importance {importance!r}; choose one of: {', '.join(importance_names())}")
    if options:
        raise UsageError(f"importance {importance!r} takes no planner options ({', '.join(sorted(options))}); "
                         "they belong to --importance mip")
    from .plan_greedy import PlanGreedyAnalysis  # late: plan_greedy subclasses this module's base

    return PlanGreedyAnalysis(**common, importance=importance)

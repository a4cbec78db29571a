"""The pruning plan: which units of which group are kept, as plain data.

A plan is the hand-off between choosing (importance + selection) and removing (the prune
transform).  It names groups by their producers (``UnitGroup.key``), so it can be saved as JSON,
inspected, compared between criteria, and replayed on a fresh copy of the same model: the unit
analysis of that copy must find the same groups with the same sizes, or the plan is rejected.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oamipc.atomic import atomic_output
from oamipc.errors import PlanError
from oamipc.units import UnitGraph, UnitGroup


@dataclass
class GroupPlan:
    """Kept units of one group, by local index (position in ``UnitGroup.units``)."""

    key: str
    name: str
    size: int
    kept: list[int]

    @property
    def removed(self) -> int:
        return self.size - len(self.kept)


def _check_widths(group: UnitGroup, mask: np.ndarray) -> None:
    """A plan keeps at least one unit of a group, and equal numbers in its equal-count blocks.

    A layer of width 0 is no network (a convolution cannot even be built with it), and a grouped
    convolution or GroupNorm needs the same number of channels in every group; the selection
    never produces either, so a plan that does was edited by hand or made for other blocks.
    """
    if group.units and not mask[group.units].any():
        raise PlanError(f"plan keeps no unit of group {group.name!r}, which would leave a layer of width 0; "
                        "keep at least one unit per group (as --min-keep does)")
    if group.blocks:
        counts = [int(mask[b].sum()) for b in group.blocks]
        if len(set(counts)) > 1:
            raise PlanError(f"plan keeps {counts} units in the {len(counts)} equal-count blocks of group "
                            f"{group.name!r} (a grouped convolution or GroupNorm); keep the same number in each block")


@dataclass
class Plan:
    """Kept units per group plus how they were chosen (criterion, settings).

    ``bias_shift`` is plain data for the surgery: per Linear or Conv module, what to add to its bias
    before its removed inputs go (the constant a provably dead unit contributed, or the mean a
    removed unit contributed on average; see :func:`oamipc.surgery.fold_bias_shift`).
    """

    groups: list[GroupPlan]
    criterion: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    bias_shift: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_mask(cls, graph: UnitGraph, kept: np.ndarray, criterion: str = "",
                  settings: dict[str, Any] | None = None, bias_shift: dict[str, list[float]] | None = None) -> Plan:
        groups = [GroupPlan(g.key, g.name, g.size, [i for i, u in enumerate(g.units) if kept[u]])
                  for g in graph.groups]
        return cls(groups, criterion, dict(settings or {}), dict(bias_shift or {}))

    def with_kept(self, kept: Mapping[str, Sequence[int]]) -> Plan:
        """A copy whose groups named in ``kept`` keep those units instead.

        Used to replay a candidate that a report lists by its kept units (the refit selection's
        candidates).  The bias shift is dropped: it belongs to the units this plan removed.
        """
        groups = [GroupPlan(g.key, g.name, g.size, list(kept[g.name]) if g.name in kept else list(g.kept))
                  for g in self.groups]
        return Plan(groups, self.criterion, copy.deepcopy(self.settings))

    def kept_mask(self, graph: UnitGraph) -> np.ndarray:
        """The plan as a mask over ``graph``'s units; PlanError if it does not fit the graph."""
        by_key = graph.group_by_key()
        mask = np.ones(graph.n_units, dtype=bool)
        for gp in self.groups:
            g = by_key.get(gp.key)
            if g is None:
                raise PlanError(f"plan names group {gp.name!r} ({gp.key}) that this model does not have; "
                                "was the plan made for another architecture?")
            if g.size != gp.size:
                raise PlanError(f"plan has {gp.size} units for group {gp.name!r} but the model has {g.size}; "
                                "replay a plan only on the model it was made for")
            bad = [i for i in gp.kept if not 0 <= i < g.size]
            if bad:
                raise PlanError(f"plan keeps unit {bad[0]} of group {gp.name!r}, which has {g.size} units")
            keep = set(gp.kept)
            for i, u in enumerate(g.units):
                mask[u] = i in keep
            lost = [u for u in g.pinned if not mask[u]]
            if lost:
                raise PlanError(f"plan removes unit {g.units.index(lost[0])} of group {gp.name!r}, which must be "
                                f"kept ({g.pinned[lost[0]]})")
            _check_widths(g, mask)
        return mask

    def widths(self) -> dict[str, tuple[int, int]]:
        return {gp.name: (gp.size, len(gp.kept)) for gp in self.groups}

    def to_dict(self) -> dict[str, Any]:
        out = {"criterion": self.criterion, "settings": self.settings, "groups": [asdict(g) for g in self.groups]}
        if self.bias_shift:
            out["bias_shift"] = self.bias_shift
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        try:
            groups = [GroupPlan(str(g["key"]), str(g["name"]), int(g["size"]), [int(i) for i in g["kept"]])
                      for g in data["groups"]]
            shift = {str(k): [float(v) for v in vals] for k, vals in dict(data.get("bias_shift", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"not a valid plan: missing or malformed field {exc}; "
                            "use a file written by `oamipc compile --save-plan`") from exc
        return cls(groups, str(data.get("criterion", "")), dict(data.get("settings", {})), shift)

    def save(self, path: str | Path) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise PlanError(f"plan file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}; it must be JSON written by oamipc") from exc
        if not isinstance(data, dict):
            raise PlanError(f"plan {path} is not a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class Planned:
    """What a planner returns: the plan, every unit's score by group, and the planner's own record.

    ``record`` (e.g. how each MILP went) goes into the report under ``section``; the planner
    itself never writes the report.  ``lossless``: the lossless removal's record (the report's
    ``lossless`` section), when the planner removed the provably dead units first.
    """

    plan: Plan
    scores: dict[str, list[float]] = field(default_factory=dict)
    section: str | None = None
    record: dict[str, Any] | None = None
    # A latency target's prediction: batch, dense and predicted milliseconds, the budget's limit.
    predicted_latency: dict[str, Any] | None = None
    lossless: dict[str, Any] | None = None
    # The refit-aware selection's record (the report's ``refit_select`` section), when it ran.
    refit_select: dict[str, Any] | None = None

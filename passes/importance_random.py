"""Random importance: seeded uniform scores, the control every criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import fx

from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, register_criterion


@register
@register_criterion
@dataclass(frozen=True)
class RandomImportance(ImportanceAnalysis):
    """Uniform random scores from the compile seed (same seed, same plan)."""

    name: ClassVar[str] = "importance-random"
    criterion: ClassVar[str] = "random"

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        return np.random.default_rng(am.context.seed).random(graph.n_units)

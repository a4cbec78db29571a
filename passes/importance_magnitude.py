"""Weight-magnitude importance (L1 after Li et al. 2017, and L2): the norm of each output filter.

A unit's score is the norm of the weights (and bias) that produce it, summed over the producers
it couples (e.g. every conv joined by a residual add).  Cheap, data-free, and a strong baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import fx

from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, aggregate, producer_weights, register_criterion


def _norms(gm: fx.GraphModule, graph: UnitGraph, p: int) -> np.ndarray:
    per_producer = {}
    with torch.no_grad():
        for target, (w, b) in producer_weights(gm, graph).items():
            rows = w if b is None else torch.cat([w, b.reshape(-1, 1)], dim=1)
            per_producer[target] = torch.linalg.vector_norm(rows.double(), ord=p, dim=1).numpy()
    return aggregate(graph, per_producer)


@register
@register_criterion
@dataclass(frozen=True)
class L1Importance(ImportanceAnalysis):
    """L1 norm of each unit's incoming weights and bias."""

    name: ClassVar[str] = "importance-l1"
    criterion: ClassVar[str] = "l1"

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        return _norms(gm, graph, 1)


@register
@register_criterion
@dataclass(frozen=True)
class L2Importance(ImportanceAnalysis):
    """L2 norm of each unit's incoming weights and bias."""

    name: ClassVar[str] = "importance-l2"
    criterion: ClassVar[str] = "l2"

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        return _norms(gm, graph, 2)

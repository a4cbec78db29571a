"""One interface for every importance criterion: a score per unit, higher = more important.

Criteria (L1/L2 magnitude, mean activation, first-order Taylor, random, and the MILP) are
analyses that return a float array over the units of the :class:`oamipc.units.UnitGraph`.  A
unit that couples several producers' channels gets the sum of its members' scores.  Criteria
register under a short name (``l1``, ``taylor``, ...) so the selection step and the CLI can ask
for them by name; the registry is filled as the criteria's modules are imported (``oamipc.passes``).

Criteria that run the network over the calibration samples do so in passes sized by the
activations (:func:`samples_per_pass`): on an ImageNet-size network a fixed batch is gigabytes
(ResNet-50 at 224x224 run forward and backward keeps about 90 MB per sample for the backward
pass, 11 GiB for a batch of 128).  The passes only split the sums a criterion accumulates, so its
scores change at most by the order of float summation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from oamipc import ir
from oamipc.errors import UsageError
from oamipc.passmanager import Analysis, AnalysisManager
from oamipc.units import UnitGraph

from .unit_groups import UnitGroupAnalysis


@dataclass(frozen=True)
class ImportanceAnalysis(Analysis[np.ndarray]):
    """Base class: subclasses set ``criterion`` and implement :meth:`scores`."""

    criterion: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    leaf_modules: tuple[str, ...] = ()
    prune_embed: bool = False

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> np.ndarray:
        ctx = am.context
        if self.needs_data and ctx.calib_x is None:
            raise UsageError(f"importance {self.criterion!r} needs calibration data: pass --data")
        if self.needs_labels and ctx.calib_y is None:
            raise UsageError(f"importance {self.criterion!r} needs labelled data: give --data with labels")
        graph = am.get(self.unit_analysis(), gm)
        scores = np.asarray(self.scores(gm, graph, am), dtype=np.float64)
        if scores.shape != (graph.n_units,):
            raise AssertionError(f"{self.criterion}: {scores.shape} scores for {graph.n_units} units")
        return np.nan_to_num(scores, nan=0.0, posinf=np.finfo(np.float64).max)

    def unit_analysis(self) -> Analysis[UnitGraph]:
        return UnitGroupAnalysis(self.leaf_modules, self.prune_embed)

    @abstractmethod
    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        """A score per unit of ``graph`` (higher: more important)."""


def aggregate(graph: UnitGraph, per_producer: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum per-channel scores of every producer into the units that own those channels."""
    out = np.zeros(graph.n_units, dtype=np.float64)
    for unit, members in graph.members.items():
        out[unit] = sum(float(per_producer[t][c]) for t, c in members if t in per_producer)
    return out


def producer_weights(gm: fx.GraphModule, graph: UnitGraph) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every producer layer, weight reshaped to (out, -1)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for layer in graph.layers:
        if layer.target in out:
            continue
        mod = gm.get_submodule(layer.target)
        w: Any = mod.weight
        out[layer.target] = (w.reshape(w.shape[0], -1), getattr(mod, "bias", None))
    return out


#: Values in the largest activation of one forward pass without gradients (as the layer
#: reconstruction's ``FORWARD_ELEMENTS``: 128 MiB of float32).
FORWARD_ELEMENTS = 1 << 25
#: Values in all activations together of one pass run forward and backward (2 GiB of float32; what
#: autograd keeps for the backward pass is less: ResNet-50 at 224x224, 12 samples a pass, peaked at
#: 1.7 GiB for the whole process).  Smaller passes cost CPU time: ResNet-50 took 2.5x the CPU
#: seconds per sample in passes of 3 as in passes of 24, 1.2x in passes of 12.
BACKWARD_ELEMENTS = 1 << 29


def samples_per_pass(gm: fx.GraphModule, example_batch: int, batch: int, *, backward: bool) -> int:
    """Samples per pass over the calibration data: ``batch``, fewer when the pass would exceed
    ``BACKWARD_ELEMENTS`` values in all activations together (``backward``) or ``FORWARD_ELEMENTS``
    in its largest one (read from the graph's ``tensor_meta``, traced with ``example_batch``
    samples; without that metadata, ``batch``)."""
    sizes = ir.activation_sizes(gm, example_batch)
    per_sample = sum(sizes) if backward else max(sizes, default=0)
    if per_sample <= 0:
        return batch
    return max(1, min(batch, (BACKWARD_ELEMENTS if backward else FORWARD_ELEMENTS) // per_sample))


_CRITERIA: dict[str, type[ImportanceAnalysis]] = {}


def register_criterion(cls: type[ImportanceAnalysis]) -> type[ImportanceAnalysis]:
    """Class decorator: make a criterion available by its ``criterion`` name."""
    _CRITERIA[cls.criterion] = cls
    return cls


def criteria() -> dict[str, type[ImportanceAnalysis]]:
    """Registered criteria by name (import ``oamipc.passes`` first)."""
    return dict(sorted(_CRITERIA.items()))


def get_criterion(name: str, leaf_modules: tuple[str, ...] = (), prune_embed: bool = False) -> ImportanceAnalysis:
    if name not in _CRITERIA:
        raise UsageError(f"unknown importance {name!r}; choose one of: {', '.join(sorted(_CRITERIA))}")
    return _CRITERIA[name](leaf_modules=leaf_modules, prune_embed=prune_embed)

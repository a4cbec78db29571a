"""Mean-activation importance: how strongly each unit fires on the calibration data.

A unit's score is the mean absolute value of its channel where the next Linear/Conv layer reads
it (after the activation, pooling and normalisation in between), averaged over samples,
positions and every consumer; a unit that no layer reads is scored at its producer's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, register_criterion, samples_per_pass

#: Samples per forward pass, fewer where one activation of the pass would exceed
#: :data:`.importance_base.FORWARD_ELEMENTS` values (:func:`.importance_base.samples_per_pass`).
BATCH = 256


class _Recorder(fx.Interpreter):
    """Runs the graph and accumulates per-channel mean |x| of chosen nodes' values."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, int]) -> None:
        super().__init__(gm)
        self.watch = watch  # node name -> channel dim
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        dim = self.watch.get(n.name)
        if dim is not None and isinstance(value, torch.Tensor):
            reduce = [d for d in range(value.dim()) if d != dim]
            m = value.detach().abs().double().mean(dim=reduce) * value.shape[0]
            self.sums[n.name] = self.sums.get(n.name, 0) + m
        return value


def channel_means(gm: fx.GraphModule, x: torch.Tensor, watch: dict[str, int], batch: int = BATCH
                  ) -> dict[str, np.ndarray]:
    """Mean |value| per channel of the watched nodes over all samples of ``x``, run ``batch`` samples
    at a time (the per-batch sums are float64; the batch changes only their summation order)."""
    rec = _Recorder(gm, watch)
    with torch.no_grad():
        for start in range(0, len(x), batch):
            rec.run(x[start:start + batch])
    return {k: (v / len(x)).numpy() for k, v in rec.sums.items()}


@register
@register_criterion
@dataclass(frozen=True)
class ActivationImportance(ImportanceAnalysis):
    """Mean absolute activation of each unit on the calibration samples."""

    name: ClassVar[str] = "importance-activation"
    criterion: ClassVar[str] = "activation"
    needs_data: ClassVar[bool] = True

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        x = am.context.calib_x
        assert x is not None
        nodes = {n.name: n for n in gm.graph.nodes}
        watch: dict[str, int] = {}
        readers: list[tuple[str, np.ndarray]] = []
        for layer in graph.layers:
            src = nodes[layer.node].args[0]
            if isinstance(src, fx.Node) and (layer.in_units >= 0).any():
                lay = graph.layouts.get(src.name)
                if lay is not None and hasattr(lay, "dim"):
                    watch[src.name] = lay.dim  # type: ignore[union-attr]
                    readers.append((src.name, layer.in_units))
            watch[layer.node] = graph.layouts[layer.node].dim if layer.node in graph.layouts else 1  # type: ignore[union-attr]
        batch = samples_per_pass(gm, int(am.context.example_inputs[0].shape[0]), BATCH, backward=False)
        means = channel_means(gm, x, watch, batch)
        total = np.zeros(graph.n_units)
        count = np.zeros(graph.n_units)
        for name, units in readers:
            tracked = units >= 0
            np.add.at(total, units[tracked], means[name][tracked])
            np.add.at(count, units[tracked], 1)
        for layer in graph.layers:  # fallback: units no layer reads
            units = layer.out_units
            tracked = (units >= 0) & (count[np.maximum(units, 0)] == 0)
            if tracked.any() and layer.node in means:
                np.add.at(total, units[tracked], means[layer.node][tracked])
                np.add.at(count, units[tracked], 1)
        return np.divide(total, np.maximum(count, 1))

"""Mean replacement: a removed unit is replaced by its mean activation instead of zero.

Where a Linear layer reads a removed unit, the unit's mean value on the calibration samples (per
input position, so a channel flattened into H*W features keeps one mean per feature) can be
folded into that layer's bias: ``b += W[:, removed] @ mean[removed]``.  This is exact for Linear
readers; for a convolution a constant input map is not a bias (padding makes the border
differ), so units read by convolutions are removed plainly.

The method notes measured that applying it after the fact *hurts* without fine-tuning (the mean
restores a class-dependent offset while the signal shrinks), and that it helped only when the
MILP knew about it.  So with ``--mean-replacement`` the budget formulation models it (the encoder
and the masked forward use ``x -> m x + (1 - m) mean``), and the result keeps it only if the
held-out loss is lower with it than without; the report says which.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx, nn

from oamipc import ir
from oamipc.units import Layout, UnitGraph


class _Inputs(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: set[str]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.nodes:
            self.seen[n.name] = self.env[n.args[0]].detach()  # type: ignore[index]
        return super().run_node(n)


def reading_means(gm: fx.GraphModule, reading: dict[str, Layout], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position input means (float64) of every Linear layer among ``reading`` (reader node ->
    layout of its input, as :class:`.masked.MaskedNetwork` finds them) that reads removable units."""
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = {name for name, lay in reading.items()
             if lay.dim == 1 and bool((lay.units >= 0).any())
             and isinstance(ir.get_module(gm, str(by_name[name].target)), nn.Linear)}
    if not nodes:
        return {}
    rec = _Inputs(gm, nodes)
    with torch.no_grad():
        rec.run(x.float())
    return {name: t.double().reshape(t.shape[0], -1).mean(0) for name, t in rec.seen.items() if t.dim() == 2}


def bias_shift(gm: fx.GraphModule, graph: UnitGraph, kept: np.ndarray,
               means: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per Linear reader (module target): what to add to its bias (all original outputs)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    shifts: dict[str, list[float]] = {}
    for name, mu in means.items():
        node = by_name[name]
        lay = graph.layouts[node.args[0].name]
        assert isinstance(lay, Layout)
        removed = np.zeros(len(lay.units), dtype=bool)
        tracked = lay.units >= 0
        removed[tracked] = ~kept[lay.units[tracked]]
        if not removed.any():
            continue
        mod = ir.get_module(gm, str(node.target))
        idx = torch.from_numpy(np.nonzero(removed)[0])
        shift = mod.weight.detach().double()[:, idx] @ mu[idx]
        shifts[str(node.target)] = shift.tolist()
    return shifts

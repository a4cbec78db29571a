"""Cost analysis: parameters and multiply-accumulates of the network as it is now.

Counted from the real modules and propagated shapes (not from the unit analysis's model of
them), so it is the independent check that pruning removed what the plan predicted.  MACs are
counted for Linear and Conv layers, per sample (batch 1); FLOPs in oamipc's reports are these
multiply-accumulates, the convention of most pruning papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx, nn

from oamipc import ir
from oamipc.passmanager import Analysis, AnalysisManager, register


@dataclass
class Costs:
    """Totals and per-layer widths/MACs."""

    macs: int
    params: int
    layers: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params, "layers": self.layers}


def layer_macs(mod: nn.Module, out_shape: tuple[int, ...]) -> int:
    """MACs of one Linear/Conv call producing ``out_shape`` (per sample)."""
    per_sample = ir.prod(out_shape[1:]) if len(out_shape) > 1 else ir.prod(out_shape)
    if isinstance(mod, nn.Linear):
        return per_sample * mod.in_features
    if isinstance(mod, ir.CONV_MODULES):
        return per_sample * (mod.in_channels // mod.groups) * ir.prod(mod.kernel_size)
    return 0


def count_costs(gm: fx.GraphModule) -> Costs:
    """Parameters and MACs of a shape-propagated GraphModule."""
    layers: dict[str, dict[str, Any]] = {}
    macs = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = ir.get_module(gm, str(node.target))
        shape = ir.tensor_shape(node)
        if shape is None or not isinstance(mod, (nn.Linear, *ir.CONV_MODULES)):
            continue
        m = layer_macs(mod, shape)
        macs += m
        if isinstance(mod, nn.Linear):
            width_in, width_out = mod.in_features, mod.out_features
        else:
            width_in, width_out = mod.in_channels, mod.out_channels
        entry = layers.setdefault(str(node.target), {"type": type(mod).__name__, "in": width_in,
                                                      "out": width_out, "macs": 0})
        entry["macs"] += m
    params = sum(p.numel() for p in gm.parameters())
    return Costs(int(macs), int(params), layers)


@register
@dataclass(frozen=True)
class CostAnalysis(Analysis[Costs]):
    """Parameters and MACs of the current graph."""

    name: ClassVar[str] = "costs"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Costs:
        return count_costs(gm)

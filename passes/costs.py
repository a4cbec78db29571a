"""Cost analysis: parameters and multiply-accumulates of the network as it is now.

Counted from the real modules and propagated shapes (not from the unit analysis's model of
them), so it is the independent check that pruning removed what the plan predicted.  MACs are
counted for Linear and Conv layers, per sample (batch 1); FLOPs in oamipc's reports are these
multiply-accumulates, the convention of most pruning papers.

*Opaque* modules are ``call_module`` nodes the tracer kept whole and the unit analysis does not
look inside: torch.nn modules other than the layers oamipc prunes or passes through (fx keeps
every torch.nn module as one call: ``nn.TransformerEncoder``, ``nn.MultiheadAttention``,
``nn.LSTM``, ``nn.ConvTranspose2d``), and the modules named by ``--leaf-module``.  Their MACs
are counted by running the module once under ``torch.utils.flop_counter.FlopCounterMode`` on
inputs of the recorded shapes (with autograd on, so that torch's fused inference kernels, which
the counter does not know, stay out of the way); where that fails, or counts nothing in a module
with weight matrices, the MACs are *unknown* (``None``), never zero.  ``macs`` stays the MACs
of the Linear/Conv layers the unit analysis sees; ``macs_total`` adds the opaque ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from oamipc import ir
from oamipc.errors import first_line
from oamipc.passmanager import Analysis, AnalysisManager, register

log = logging.getLogger(__name__)

#: Modules the unit analysis understands, or that do no multiply-accumulates (an embedding is a
#: lookup): never opaque.
_SEEN_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Linear, *ir.CONV_MODULES, *ir.BATCHNORM_MODULES, nn.LayerNorm, nn.GroupNorm, *ir.ELEMENTWISE_MODULES,
    *ir.POOL_MODULES, nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax, nn.Embedding,
)


@dataclass
class Costs:
    """Totals and per-layer widths/MACs, and the opaque modules (see the module docstring)."""

    macs: int
    params: int
    layers: dict[str, dict[str, Any]]
    opaque: list[dict[str, Any]] = field(default_factory=list)

    @property
    def opaque_macs(self) -> int:
        """The counted MACs of the opaque modules (those with unknown MACs add nothing here)."""
        return sum(int(m["macs"]) for m in self.opaque if m["macs"] is not None)

    @property
    def opaque_unknown(self) -> list[str]:
        """The opaque modules whose MACs could not be counted."""
        return [str(m["name"]) for m in self.opaque if m["macs"] is None]

    @property
    def macs_total(self) -> int:
        """Linear/Conv MACs plus the counted MACs of the opaque modules (a lower bound when some are unknown)."""
        return self.macs + self.opaque_macs

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"macs": self.macs, "params": self.params, "layers": self.layers}
        if self.opaque:
            data.update(macs_total=self.macs_total, opaque=self.opaque, opaque_macs=self.opaque_macs,
                        opaque_params=sum(int(m["params"]) for m in self.opaque),
                        opaque_macs_unknown=self.opaque_unknown)
        return data


def layer_macs(mod: nn.Module, out_shape: tuple[int, ...]) -> int:
    """MACs of one Linear/Conv call producing ``out_shape`` (per sample)."""
    per_sample = ir.prod(out_shape[1:]) if len(out_shape) > 1 else ir.prod(out_shape)
    if isinstance(mod, nn.Linear):
        return per_sample * mod.in_features
    if isinstance(mod, ir.CONV_MODULES):
        return per_sample * (mod.in_channels // mod.groups) * ir.prod(mod.kernel_size)
    return 0


def count_costs(gm: fx.GraphModule, leaf_modules: Sequence[str] = ()) -> Costs:
    """Parameters and MACs of a shape-propagated GraphModule; ``leaf_modules`` were kept opaque by name."""
    layers: dict[str, dict[str, Any]] = {}
    macs = 0
    opaque: dict[str, dict[str, Any]] = {}
    batch = _example_batch(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = ir.get_module(gm, str(node.target))
        if _is_opaque(mod, str(node.target), leaf_modules):
            _count_opaque(opaque, node, mod, str(node.target) in leaf_modules, batch)
            continue
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
    return Costs(int(macs), int(params), layers, list(opaque.values()))


def _is_opaque(mod: nn.Module, target: str, leaf_modules: Sequence[str]) -> bool:
    if target in leaf_modules:
        return True
    if isinstance(mod, _SEEN_THROUGH):
        return False
    return any(True for _ in mod.parameters()) or any(True for _ in mod.children())


def _example_batch(gm: fx.GraphModule) -> int:
    """The batch size of the example the shapes were propagated with (the first input's dim 0)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = ir.tensor_shape(node)
            return max(1, shape[0]) if shape else 1
    return 1


def _count_opaque(opaque: dict[str, dict[str, Any]], node: fx.Node, mod: nn.Module, named: bool, batch: int) -> None:
    """Add one call of an opaque module: its MACs per sample, or None with the reason."""
    target = str(node.target)
    entry = opaque.get(target)
    if entry is None:
        why = ("named by --leaf-module" if named else
               f"torch.fx keeps torch.nn.{type(mod).__name__} as one call and the unit analysis does not look inside")
        entry = opaque[target] = {"name": target, "type": type(mod).__name__, "why": why,
                                  "params": int(sum(p.numel() for p in mod.parameters())), "calls": 0, "macs": 0,
                                  "macs_note": None}
    entry["calls"] += 1
    if entry["macs"] is None:
        return
    macs, note = _flop_count(node, mod, batch)
    if macs is None:
        entry["macs"], entry["macs_note"] = None, note
        log.info("MACs inside opaque module %s (%s) are unknown: %s", target, type(mod).__name__, note)
    else:
        entry["macs"] += macs


def _flop_count(node: fx.Node, mod: nn.Module, batch: int) -> tuple[int | None, str | None]:
    """MACs per sample of one call of ``mod`` with the node's recorded input shapes (None: unknown, and why)."""
    from torch.utils.flop_counter import FlopCounterMode

    missing: list[str] = []

    def fake(arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        meta = arg.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            missing.append(arg.name)
            return None
        if meta.dtype.is_floating_point:
            return torch.randn(tuple(meta.shape), dtype=meta.dtype, generator=torch.Generator().manual_seed(0))
        return torch.zeros(tuple(meta.shape), dtype=meta.dtype)

    args = map_aggregate(node.args, fake)
    kwargs = map_aggregate(node.kwargs, fake)
    if missing:
        return None, f"the shape of its input {missing[0]} was not recorded"
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            mod(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign forward: say so, count nothing
        return None, f"torch.utils.flop_counter could not run it ({type(exc).__name__}: {first_line(exc)})"
    flops = int(counter.get_total_flops())
    if flops == 0 and any(p.dim() >= 2 for p in mod.parameters()):
        return None, "torch.utils.flop_counter counted none of its ops"
    return flops // 2 // batch, None


@register
@dataclass(frozen=True)
class CostAnalysis(Analysis[Costs]):
    """Parameters and MACs of the current graph."""

    name: ClassVar[str] = "costs"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Costs:
        return count_costs(gm)

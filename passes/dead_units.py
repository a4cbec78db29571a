"""Dead-unit analysis (``dead-units``): the units whose removal changes no output on the data's box.

The box is the range of the data, per input feature (``box=feature``, the default: each pixel
its own ``[min, max]`` over the train split) or per input channel (``box=channel``: every
position of a channel shares the channel's ``[min, max]``; wider, so it proves less).  Bounds of
every value over the box come from :mod:`.input_bounds` (interval and forward linear bounds,
sound in floating point).

What removing a unit does (see :mod:`oamipc.surgery`): the unit's positions vanish from every
tensor, so a layer that *reads* them (a Linear or Conv layer whose input holds them) no longer
adds their contribution.  That is lossless exactly when, at every reading layer, those positions
hold values that do not depend on the input (``const`` in the bounds: a ReLU whose input is
below zero on the whole box outputs exactly 0; a BatchNorm or bias after it turns that 0 into
another constant) *and* their contribution can be folded into the reader's bias:

* a Linear reader: the contribution ``W[:, positions] @ values`` is one vector when the values
  are the same at every other index of the input (tokens), and is added to the bias;
* a Conv reader: ``value * sum(W[o, c])`` per output channel when the channel holds one value at
  every position, and the convolution does not pad with zeros, or the value is 0 (zero padding
  would make the border outputs differ from the inner ones, which no bias can express).

A unit that passes every check at every reader is *dead*.  Units that must be kept (pinned: they
reach an output or a barrier) are never dead.  Channels mixed with other channels on their way
(LayerNorm, GroupNorm) are never constant, so they are never dead either: removing them would
change the others' normalisation.

The analysis only finds the units; :mod:`.lossless` decides which of them go under a target's
rules (minimum width, rounding, equal-count blocks) and computes the bias shifts, and the
planners plan over what is left (:mod:`.planner_base`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx, nn

from oamipc import ir
from oamipc.errors import UsageError
from oamipc.passmanager import Analysis, AnalysisManager, register
from oamipc.units import Layout, UnitGraph

from .input_bounds import LINEAR_LIMIT, Val, propagate
from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)

BOXES = ("feature", "channel")
METHODS = ("linear", "interval")


@dataclass(frozen=True)
class ReaderInput:
    """One Linear/Conv layer that reads units: its input's layout and value on the box's midpoint."""

    node: str
    target: str
    kind: str  # linear | conv
    dim: int  # the channel dimension of the input
    units: np.ndarray  # unit of each index along ``dim`` (-1: not removable)
    value: torch.Tensor  # the input on the reference point (batch 1), the network's dtype


@dataclass
class DeadUnits:
    """The analysis result: which units are dead, what their readers see, how the proof went."""

    dead: np.ndarray  # bool per unit
    readers: list[ReaderInput] = field(default_factory=list)
    box: str = "feature"
    method: str = "linear"
    source: str = ""  # which data the box spans
    input_features: int = 0
    constant_features: int = 0  # features with one value in all the data (not variables of the box)
    relus: dict[str, dict[str, int]] = field(default_factory=dict)
    concretised: list[str] = field(default_factory=list)
    unbounded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None  # why no unit could be proved dead (the analysis did not run)

    @property
    def count(self) -> int:
        return int(self.dead.sum())

    def summary(self, graph: UnitGraph) -> dict[str, Any]:
        """Plain data for the report: the box, the proof, the dead units per group."""
        groups = [{"name": g.name, "units": g.size, "dead": int(self.dead[g.units].sum())}
                  for g in graph.groups if g.units and self.dead[g.units].any()]
        return {"box": self.box, "bounds": self.method, "data": self.source, "input_features": self.input_features,
                "constant_features": self.constant_features, "units_dead": self.count, "groups": groups,
                "relus": self.relus, "linear_bounds_dropped_at": self.concretised,
                "unbounded_nodes": self.unbounded, "seconds": self.seconds, "skipped": self.skipped}


@register
@dataclass(frozen=True)
class DeadUnitAnalysis(Analysis[DeadUnits]):
    """Find the units that are constant at every reader over the data's box (module docstring)."""

    name: ClassVar[str] = "dead-units"
    box: str = "feature"
    bounds: str = "linear"
    linear_limit: int = LINEAR_LIMIT
    leaf_modules: tuple[str, ...] = ()
    prune_embed: bool = False

    def __post_init__(self) -> None:
        if self.box not in BOXES:
            raise UsageError(f"dead-units box must be one of {', '.join(BOXES)}, got {self.box!r}")
        if self.bounds not in METHODS:
            raise UsageError(f"dead-units bounds must be one of {', '.join(METHODS)}, got {self.bounds!r}")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> DeadUnits:
        start = time.perf_counter()
        graph = am.get(UnitGroupAnalysis(self.leaf_modules, self.prune_embed), gm)
        none = np.zeros(graph.n_units, dtype=bool)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            why = f"the model has {len(placeholders)} inputs; the input box covers models with one"
            return DeadUnits(none, box=self.box, method=self.bounds, skipped=why)
        lo, hi, source = self._box(am)
        sample_shape = tuple(am.context.example_inputs[0].shape[1:])
        if tuple(lo.shape[1:]) != sample_shape:
            raise UsageError(f"the data's samples have shape {tuple(lo.shape[1:])}, the model's input {sample_shape}; "
                             "the lossless removal needs data of the model's input shape")
        result = propagate(gm, lo, hi, linear=self.bounds == "linear", linear_limit=self.linear_limit)
        readers, ok = _readers(gm, graph, result.values, result.ref)
        dead = ok & ~graph.pinned_mask()
        out = DeadUnits(dead, readers, self.box, self.bounds, source, int(lo.numel()), int((lo == hi).sum()),
                        {k: v.to_dict() for k, v in result.relus.items()}, sorted(set(result.concretised)),
                        result.unknown, time.perf_counter() - start)
        log.info("dead units: %d of %d proved constant on the %s box of %s in %.2f s", out.count, graph.n_units,
                 self.box, source, out.seconds)
        return out

    def _box(self, am: AnalysisManager) -> tuple[torch.Tensor, torch.Tensor, str]:
        ctx = am.context
        if ctx.input_range is not None:
            lo, hi, source = ctx.input_range.lo, ctx.input_range.hi, ctx.input_range.source
        elif ctx.calib_x is not None:
            x = ctx.calib_x
            lo, hi, source = x.amin(0, keepdim=True), x.amax(0, keepdim=True), f"{len(x)} calibration samples"
        else:
            raise UsageError("the lossless removal needs data for its input box: pass --data (Python: data=...), "
                             "or turn it off (--no-lossless, Python: lossless=False)")
        lo, hi = lo.detach().float(), hi.detach().float()
        if self.box == "channel" and lo.dim() > 2:
            dims = tuple(range(2, lo.dim()))
            lo = lo.amin(dim=dims, keepdim=True).expand_as(lo).clone()
            hi = hi.amax(dim=dims, keepdim=True).expand_as(hi).clone()
        return lo, hi, source


def _pads_with_zeros(mod: nn.Module) -> bool:
    padding = getattr(mod, "padding", 0)
    if isinstance(padding, str):
        padded = padding == "same" and any(k > 1 for k in getattr(mod, "kernel_size", (1,)))
    else:
        padded = any(int(p) > 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    return padded and getattr(mod, "padding_mode", "zeros") == "zeros"


def _readers(gm: fx.GraphModule, graph: UnitGraph, values: dict[str, Any], ref: dict[str, Any]
             ) -> tuple[list[ReaderInput], np.ndarray]:
    """Every Linear/Conv layer that reads units, and per unit whether every reader sees it constant
    and foldable (see the module docstring)."""
    ok = np.ones(graph.n_units, dtype=bool)
    nodes = {n.name: n for n in gm.graph.nodes}
    readers: list[ReaderInput] = []
    for layer in graph.layers:
        if layer.kind not in ("linear", "conv") or not (layer.in_units >= 0).any():
            continue
        node = nodes[layer.node]
        arg = node.args[0]
        lay = graph.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        val = values.get(arg.name) if isinstance(arg, fx.Node) else None
        value = ref.get(arg.name) if isinstance(arg, fx.Node) else None
        units = layer.in_units
        if not isinstance(lay, Layout) or not isinstance(val, Val) or not isinstance(value, torch.Tensor):
            ok[units[units >= 0]] = False
            continue
        dim = lay.dim
        others = [d for d in range(value.dim()) if d != dim]
        const = val.const.expand(value.shape)
        flags = const.all(dim=others) if others else const
        v = value.detach()
        uniform = (v.amax(dim=others) == v.amin(dim=others)) if others else torch.ones_like(flags)
        flags = flags & uniform
        if layer.kind == "conv" and _pads_with_zeros(ir.get_module(gm, layer.target)):
            flags = flags & (v.abs().amax(dim=others) == 0)
        bad = lay.units[(lay.units >= 0) & ~flags.numpy()]
        ok[bad] = False
        readers.append(ReaderInput(layer.node, layer.target, layer.kind, dim, lay.units.copy(), v.clone()))
    return readers, ok


def bias_shifts(gm: fx.GraphModule, dead: DeadUnits, removed: np.ndarray) -> dict[str, list[float]]:
    """What each reading layer adds to its bias when the ``removed`` (dead) units go: the constant
    contribution of their positions (see the module docstring).  Layers with nothing to add are left out."""
    shifts: dict[str, list[float]] = {}
    for r in dead.readers:
        pos = np.nonzero((r.units >= 0) & removed[np.maximum(r.units, 0)])[0]
        if not len(pos):
            continue
        mod = ir.get_module(gm, r.target)
        weight = mod.weight.detach().to(torch.float64)
        idx = torch.as_tensor(pos, dtype=torch.long)
        # One value per position (the checks made every other index hold the same value).
        first = r.value.to(torch.float64).movedim(r.dim, -1).reshape(-1, r.value.shape[r.dim])[0, idx]
        if r.kind == "linear":
            shift = weight[:, idx] @ first
        else:
            shift = (weight[:, idx].flatten(2).sum(2) * first).sum(1)
        if bool((shift != 0).any()):  # each layer reads once (a layer called twice is a barrier)
            shifts[r.target] = [float(s) for s in shift.tolist()]
    return shifts


__all__ = ["BOXES", "METHODS", "DeadUnitAnalysis", "DeadUnits", "ReaderInput", "bias_shifts"]

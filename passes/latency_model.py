"""Latency-model analysis: every prunable layer's measured latency at candidate widths.

Builds a :class:`oamipc.latency.LatencyModel` for the graph as it is now: the dense network is
exported to ONNX and timed whole at ``batch``; each Linear/Conv layer that can lose units is
timed alone at the widths its target's rounding allows (see :mod:`oamipc.latency`).  The
greedy planner reads it for a latency budget; ``oamipc profile`` prints it.  The options are
the cache key of the analysis; the measurements themselves are cached on disk.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import fx, nn

from oamipc import ir
from oamipc.latency import (
    LatencyModel,
    LayerSignature,
    MeasureSetup,
    cache_session,
    candidate_widths,
    measure_curve,
    measure_network,
)
from oamipc.passmanager import Analysis, AnalysisManager, register
from oamipc.target import Target, granularity
from oamipc.units import LayerCost, UnitGraph

from .unit_groups import UnitGroupAnalysis


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def signature(gm: fx.GraphModule, layer: LayerCost) -> LayerSignature | None:
    """The layer's op and geometry (None for a grouped convolution, whose groups fix its widths)."""
    mod = ir.get_module(gm, layer.target)
    node = next(n for n in gm.graph.nodes if n.name == layer.node)
    src = node.args[0] if node.args else None
    shape = ir.tensor_shape(src) if isinstance(src, fx.Node) else None
    if shape is None:
        return None
    if isinstance(mod, nn.Linear):
        return LayerSignature("linear", tuple(int(d) for d in shape[1:-1]), bias=mod.bias is not None)
    if isinstance(mod, ir.CONV_MODULES) and layer.kind in ("conv", "depthwise"):
        n = len(shape) - 2
        if isinstance(mod.padding, str):
            return None  # "same"/"valid" padding: not measured alone (kept at its dense latency)
        return LayerSignature(layer.kind, tuple(int(d) for d in shape[2:]), _tuple(mod.kernel_size, n),
                              _tuple(mod.stride, n), _tuple(mod.padding, n), _tuple(mod.dilation, n),
                              mod.bias is not None)
    return None


def _step(owner: dict[int, int], units: Any, steps: dict[int, int]) -> int:
    """The rounding step of the group owning ``units`` (1 when they span several groups or none)."""
    owners = {owner[u] for u in units.tolist() if u in owner}
    return steps[next(iter(owners))] if len(owners) == 1 else 1


@register
@dataclass(frozen=True)
class LatencyModelAnalysis(Analysis[LatencyModel]):
    """Measured per-layer latency curves and the dense latency at ``batch`` (see the module docstring)."""

    name: ClassVar[str] = "latency-model"
    batch: int = 64
    threads: int = 1
    device: str = "cpu"
    round_to: int | str = 1  # the plans' rounding picks the widths worth measuring (see Target)
    channel_block: int | None = None
    leaf_modules: tuple[str, ...] = ()
    prune_embed: bool = False

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> LatencyModel:
        from oamipc.export import export_onnx

        graph = am.get(UnitGroupAnalysis(self.leaf_modules, self.prune_embed), gm)
        setup = MeasureSetup(self.batch, self.threads, self.device)  # type: ignore[arg-type]
        steps = granularity(Target(latency_budget=1.0, round_to=self.round_to, channel_block=self.channel_block),
                            graph)
        pinned = graph.pinned_mask()
        inputs = am.context.example_inputs
        counts = {"measured": 0, "cached": 0}
        owner = {int(u): g.id for g in graph.groups for u in g.units}
        curves = []
        free = {int(u) for g in graph.groups if g.prunable for u in g.units if not pinned[u]}
        with cache_session() as cache:
            with tempfile.TemporaryDirectory(prefix="oamipc-latency-") as tmp:
                path = export_onnx(gm, inputs, Path(tmp) / "dense.onnx")
                dense_ms, provider = measure_network(path, tuple(inputs[0].shape[1:]), setup, cache)
            for i, layer in enumerate(graph.layers):
                out_free = any(u in free for u in layer.out_units.tolist())
                in_free = any(u in free for u in layer.in_units.tolist())
                sig = signature(gm, layer) if out_free or in_free else None
                if sig is None:
                    continue
                full_in, full_out = len(layer.in_units), len(layer.out_units)
                step_out, step_in = _step(owner, layer.out_units, steps), _step(owner, layer.in_units, steps)
                # Only the widths a plan can give this layer are measured (its full widths always).
                outs = candidate_widths(full_out, step_out, lowest=step_out) if out_free else [full_out]
                ins = candidate_widths(full_in, step_in, lowest=step_in) if in_free and sig.kind != "depthwise" else []
                curves.append(measure_curve(layer.target, sig, full_in, full_out, outs, ins, setup, provider, cache,
                                            counts))
                am.context.tick("latency model", i + 1, len(graph.layers))
        return LatencyModel(setup, provider, dense_ms, curves, counts["measured"], counts["cached"])


def plan_latency_model(gm: fx.GraphModule, graph: UnitGraph, kept: Any, setup: MeasureSetup, dense_ms: float,
                       provider: str) -> LatencyModel:
    """A latency model measured only where one plan needs it: every layer whose widths the plan
    changes, timed alone at its full widths and at the plan's (cached like the full model).

    This is how every compile reports a prediction beside its measurement, also for MAC and ratio
    targets, without timing whole curves: ``dense_ms`` is the dense network's latency measured
    by the same benchmark, so the prediction is that measurement plus the layers' changes.
    """
    counts = {"measured": 0, "cached": 0}
    curves = []
    with cache_session() as cache:
        for layer in graph.layers:
            c_in, c_out = layer.widths(kept)
            full_in, full_out = len(layer.in_units), len(layer.out_units)
            if (c_in, c_out) == (full_in, full_out):
                continue
            sig = signature(gm, layer)
            if sig is None:
                continue
            ins = sorted({c_in, full_in}) if sig.kind != "depthwise" else []
            curves.append(measure_curve(layer.target, sig, full_in, full_out, sorted({c_out, full_out}), ins, setup,
                                        provider, cache, counts))
    return LatencyModel(setup, provider, dense_ms, curves, counts["measured"], counts["cached"])


def plan_widths(graph: UnitGraph, kept: Any) -> dict[str, tuple[int, int]]:
    """(input width, output width) of every Linear/Conv layer under a kept mask, by module name."""
    return {layer.target: layer.widths(kept) for layer in graph.layers}

"""Latency-model analysis: every prunable layer's latency at candidate widths, timed in context.

Builds a :class:`oamipc.latency.LatencyModel` for the graph as it is now.  By default
(``method="context"``) the layers are timed where they run: a handful of whole-network
variants are exported and profiled in onnxruntime (:mod:`oamipc.latency_context`), and each
layer's kernel time in each variant becomes a point of its curves:

* the groups are coloured in two (a layer's input groups one colour, its output groups the
  other, wherever the graph allows; a second colouring covers the layers the first could not
  separate), and for each colour and each fraction in :data:`CONTEXT_FRACTIONS` one variant
  narrows every group of that colour to the fraction (rounded as a plan would be) and keeps the
  others whole.  So a layer sees its output narrowed with its input whole (its output curve),
  and its input narrowed with its output whole (its input curve); a depthwise layer, or one
  whose input and output are one group, gets one curve of both together;
* a layer no variant separates splits what it showed with both narrowed evenly between the two
  curves (the separable model then predicts exactly what was measured on that diagonal).

Each layer's time is the median over the rounds, scaled so that the dense network's layers sum
to its whole-network median: a layer's change is then its share of the measured dense latency,
also on a busy machine whose stalls the per-layer medians leave out.

The dense network is timed whole in the same interleaved rotation; a plan is predicted as that
latency plus each layer's in-context change.  The measurements are cached on disk by the dense
file's bytes, the variants' widths and the setup (:func:`oamipc.latency.context_key`), so the
same network on the same machine gets the same model (and the same plan) without re-exporting.

``method="alone"`` times each Linear/Conv layer alone as a one-node ONNX graph at the widths its
target's rounding allows (see :mod:`oamipc.latency`), the model before in-context timing; it is
also the fallback when the exported file's nodes cannot be matched to the graph's layers, or the
device is not the CPU.  The greedy planner reads the model for a latency budget; ``oamipc
profile`` prints it.  The options are the cache key of the analysis.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import fx, nn

from oamipc import ir
from oamipc.errors import UsageError
from oamipc.latency import (
    LatencyModel,
    LayerCurve,
    LayerSignature,
    MeasureSetup,
    cache_session,
    candidate_widths,
    context_key,
    measure_curve,
    measure_network,
)
from oamipc.latency_context import LayerOp, profile_variants
from oamipc.passmanager import Analysis, AnalysisManager, register
from oamipc.target import Target, granularity
from oamipc.units import LayerCost, UnitGraph

from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)

CONTEXT_FRACTIONS = (0.75, 0.5, 0.25, 0.125)  # the narrowed groups' width in each in-context variant
DEFAULT_METHOD = "context"  # what planners ask for; benchmarks/latency.py sets "alone" to compare the two
COLORINGS = 2  # at most this many two-colourings of the groups (each one costs 2 x len(CONTEXT_FRACTIONS) variants)


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


def layer_ops(gm: fx.GraphModule) -> list[LayerOp]:
    """The Conv/Linear module calls of ``gm`` in execution order, as the exported file has them."""
    ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = ir.get_module(gm, node.target)
            if isinstance(mod, (nn.Linear, *ir.CONV_MODULES)):
                ops.append(LayerOp(str(node.target), tuple(int(d) for d in mod.weight.shape)))
    return ops


def _groups_of(units: Any, owner: dict[int, int]) -> frozenset[int]:
    return frozenset(owner[u] for u in units.tolist() if u in owner)


def colorings(sides: list[tuple[frozenset[int], frozenset[int]]], limit: int = COLORINGS) -> list[dict[int, int]]:
    """Two-colourings of the groups such that every layer (its input and output groups, ``sides``)
    has, in one of them, its inputs all of one colour and its outputs all of the other.

    Each colouring is a breadth-first 2-colouring of the graph whose edges join a layer's input
    and output groups, over the layers not yet separated (an odd cycle leaves some layers
    unseparated; the next colouring, over fewer layers, usually separates them).  Groups a
    colouring does not mention stay whole in its variants."""
    def separated(ins: frozenset[int], outs: frozenset[int], color: dict[int, int]) -> bool:
        cin, cout = {color.get(g) for g in ins}, {color.get(g) for g in outs}
        return len(cin) == 1 and len(cout) == 1 and None not in cin | cout and cin != cout

    todo = [(i, o) for i, o in sides if i and o and not i & o]
    out: list[dict[int, int]] = []
    while todo and len(out) < limit:
        adj: dict[int, set[int]] = {}
        for ins, outs in todo:
            for a in ins:
                for b in outs:
                    adj.setdefault(a, set()).add(b)
                    adj.setdefault(b, set()).add(a)
            for side in (ins, outs):  # one side's groups should share a colour: chain them at distance 2
                first = min(side)
                for g in side:
                    adj.setdefault(g, set())
                    if g != first:
                        adj[g].add(-first - 1)
                        adj.setdefault(-first - 1, set()).add(g)
                        adj[first].add(-first - 1)
                        adj[-first - 1].add(first)
        color: dict[int, int] = {}
        for root in sorted(adj):
            if root in color:
                continue
            color[root] = 0
            queue = [root]
            while queue:
                g = queue.pop(0)
                for h in sorted(adj[g]):
                    if h not in color:
                        color[h] = 1 - color[g]
                        queue.append(h)
        color = {g: c for g, c in color.items() if g >= 0}
        out.append(color)
        left = [(i, o) for i, o in todo if not separated(i, o, color)]
        if len(left) == len(todo):
            break
        todo = left
    return out


def fit_curve(name: str, sig: LayerSignature, full_in: int, full_out: int, dense_ms: float,
              points: list[tuple[int, int, float]], tied: bool) -> LayerCurve:
    """A layer's curves from its in-context times ``points`` ((input width, output width, ms) in
    the variants; ``dense_ms`` at its full widths).  ``tied``: its input and output always move
    together (depthwise, or one group both sides), so one curve over the output holds both."""
    outs: dict[int, list[float]] = {full_out: [dense_ms]}
    ins: dict[int, list[float]] = {full_in: [dense_ms]}
    diag: dict[tuple[int, int], list[float]] = {}
    for c_in, c_out, ms in points:
        if (c_in, c_out) == (full_in, full_out):
            outs[full_out].append(ms)
        elif tied or c_in == full_in:
            outs.setdefault(c_out, []).append(ms)
        elif c_out == full_out:
            ins.setdefault(c_in, []).append(ms)
        else:
            diag.setdefault((c_in, c_out), []).append(ms)
    if not tied:  # a side no variant separated: the diagonal's change split evenly (geometric) onto it
        bare_out, bare_in = len(outs) == 1, len(ins) == 1
        for (c_in, c_out), values in diag.items():
            share = math.sqrt(max(float(np.median(values)), 1e-9) / max(dense_ms, 1e-9))
            if bare_out:
                outs.setdefault(c_out, []).append(dense_ms * share)
            if bare_in:
                ins.setdefault(c_in, []).append(dense_ms * share)
    full = float(np.median(outs[full_out]))
    ins[full_in] = [full]
    curve = LayerCurve(name, sig, full_in, full_out)
    curve.out_widths = sorted(outs)
    curve.out_ms = [float(np.median(outs[w])) for w in curve.out_widths]
    if not tied and len(ins) > 1:
        curve.in_widths = sorted(ins)
        curve.in_ms = [float(np.median(ins[w])) for w in curve.in_widths]
    elif not tied:
        curve.in_widths, curve.in_ms = [full_in], [full]
    return curve


@register
@dataclass(frozen=True)
class LatencyModelAnalysis(Analysis[LatencyModel]):
    """Per-layer latency curves and the dense latency at ``batch`` (see the module docstring)."""

    name: ClassVar[str] = "latency-model"
    batch: int = 64
    threads: int = 1
    device: str = "cpu"
    round_to: int | str = 1  # the plans' rounding picks the widths worth measuring (see Target)
    channel_block: int | None = None
    leaf_modules: tuple[str, ...] = ()
    prune_embed: bool = False
    method: str = "context"  # "context": whole-network profiles; "alone": one-node graphs per layer

    def __post_init__(self) -> None:
        if self.method not in ("context", "alone"):
            raise UsageError(f"the latency model's method must be context or alone, got {self.method!r}")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> LatencyModel:
        graph = am.get(UnitGroupAnalysis(self.leaf_modules, self.prune_embed), gm)
        setup = MeasureSetup(self.batch, self.threads, self.device)  # type: ignore[arg-type]
        steps = granularity(Target(latency_budget=1.0, round_to=self.round_to, channel_block=self.channel_block),
                            graph)
        if self.method == "context" and self.device == "cpu":
            model = self._context(gm, am, graph, setup, steps)
            if model is not None:
                return model
            log.info("the layers could not be timed in context; timing them alone")
        return self._alone(gm, am, graph, setup, steps)

    def _alone(self, gm: fx.GraphModule, am: AnalysisManager, graph: UnitGraph, setup: MeasureSetup,
               steps: dict[int, int]) -> LatencyModel:
        from oamipc.export import export_onnx

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

    def _variants(self, graph: UnitGraph, steps: dict[int, int]) -> tuple[list[np.ndarray], dict[str, bool]]:
        """The kept masks of the in-context variants (see the module docstring), and per layer
        whether its input and output widths are tied."""
        from .plan_greedy import _GroupChooser, floor_units

        pinned = graph.pinned_mask()
        free_groups = [g for g in graph.groups if g.prunable and not all(pinned[u] for u in g.units)]
        owner = {int(u): g.id for g in free_groups for u in g.units if not pinned[u]}
        zeros = np.zeros(len(pinned))
        forced = floor_units(graph, zeros)
        choosers = {g.id: _GroupChooser(g, zeros, 1, steps[g.id], forced) for g in free_groups}
        sides = [(_groups_of(layer.in_units, owner), _groups_of(layer.out_units, owner)) for layer in graph.layers]
        tied = {layer.target: layer.kind == "depthwise" or bool(i & o) for layer, (i, o) in zip(graph.layers, sides)}
        masks: list[np.ndarray] = []
        seen: set[bytes] = {graph.all_kept().tobytes()}
        # Tied layers (depthwise, one group on both sides) need no colouring: every group of the
        # first colouring, and every group no colouring names, is narrowed in some variant.
        plans = colorings(sides) or [{}]
        named = {g for c in plans for g in c}
        plans[0] = {**{g: 0 for g in choosers if g not in named}, **plans[0]}
        for color in plans:
            for side in (0, 1):
                for fraction in CONTEXT_FRACTIONS:
                    kept = graph.all_kept()
                    for gid, c in color.items():
                        if c != side or gid not in choosers:
                            continue
                        ch = choosers[gid]
                        n = ch.at_least(math.ceil(fraction * ch.group.size))
                        keep = set(ch.kept(n))
                        for u in ch.group.units:
                            kept[u] = u in keep or bool(pinned[u])
                    key = kept.tobytes()
                    if key not in seen:
                        seen.add(key)
                        masks.append(kept)
        return masks, tied

    def _context(self, gm: fx.GraphModule, am: AnalysisManager, graph: UnitGraph, setup: MeasureSetup,
                 steps: dict[int, int]) -> LatencyModel | None:
        from oamipc.export import export_onnx
        from oamipc.runtime import CPU
        from oamipc.surgery import apply_plan

        inputs = am.context.example_inputs
        sample_shape = tuple(int(d) for d in inputs[0].shape[1:])
        masks, tied = self._variants(graph, steps)
        layers = list(graph.layers)
        widths = [[list(layer.widths(m)) for layer in layers] for m in masks]
        with cache_session() as cache, tempfile.TemporaryDirectory(prefix="oamipc-context-") as tmp:
            dense_path = export_onnx(gm, inputs, Path(tmp) / "dense.onnx")
            key = context_key(dense_path.read_bytes(), [layer.target for layer in layers], widths, sample_shape,
                              setup)
            hit = cache.get(key)
            measured = hit is None
            if hit is None:
                paths, ops = [dense_path], [layer_ops(gm)]
                for k, mask in enumerate(masks):
                    variant = copy.deepcopy(gm)
                    apply_plan(variant, graph, mask)
                    paths.append(export_onnx(variant, inputs, Path(tmp) / f"variant{k}.onnx"))
                    ops.append(layer_ops(variant))
                    am.context.tick("latency model", k + 1, len(masks))
                profiled = profile_variants(paths, ops, sample_shape, setup.batch, setup.threads)
                if profiled is None:
                    return None
                hit = {"dense_ms": profiled[0], "times": profiled[1]}
                cache.put(key, hit)
        dense_ms = float(hit["dense_ms"])
        # Each layer's time is a median over rounds, and a busy machine's stalls land on a few
        # layers of a run: the medians' sum leaves them out and the whole run's median does not
        # (MobileNetV2 under load: 65 ms of medians against 125 ms whole).  So the layers' times
        # are put in the whole network's units: a layer's change is its share of the dense time.
        profiled = sum(float(v) for v in hit["times"][0].values())
        unit = dense_ms / profiled if profiled > 0 else 1.0
        times = [{k: float(v) * unit for k, v in t.items()} for t in hit["times"]]
        curves = []
        for i, layer in enumerate(layers):
            sig = signature(gm, layer) or LayerSignature(layer.kind, ())
            full_in, full_out = len(layer.in_units), len(layer.out_units)
            points = [(w[i][0], w[i][1], float(t.get(layer.target, 0.0))) for w, t in zip(widths, times[1:])]
            if all((c_in, c_out) == (full_in, full_out) for c_in, c_out, _ in points):
                continue  # no variant changes this layer: no plan does either
            curves.append(fit_curve(layer.target, sig, full_in, full_out, float(times[0].get(layer.target, 0.0)),
                                    points, tied[layer.target]))
        n = len(masks) + 1
        return LatencyModel(setup, CPU, dense_ms, curves, n if measured else 0, 0 if measured else n,
                            method="context")


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

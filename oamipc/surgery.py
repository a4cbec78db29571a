"""Graph surgery: physically remove units from a GraphModule, as a plan says.

Knows the unit graph (:mod:`oamipc.units`) and fx, nothing of how units were chosen: it is
shared by the prune transform (:mod:`oamipc.passes.prune_units`) and by every analysis that must
measure a pruned copy of the network (the MIP planner's held-out checks).

Rules:
1. Every Linear/Conv/BatchNorm/LayerNorm/GroupNorm module whose input or output channels lose
   units is replaced by a new, smaller module holding the copied slices of its weights, bias and
   running statistics (never a mask: the result is a plain dense GraphModule).
2. A unit is removed from every place it appears at once: the producer's output rows, the
   normalisation entries, and the input slice of every consumer (a flattened channel takes its
   whole ``H*W`` block of features with it).
3. Sizes baked into the graph are rewritten: constant sizes of ``view``/``reshape``/``expand`` on
   the channel dim, and ``split``/``chunk`` along it (replaced by ``split`` with the new sizes).
   With ``prune_embed`` (the residual stream), ``nn.Embedding`` loses columns and a parameter the
   graph reads (class token, positional embedding) loses its slices along its channel dim.
4. Depthwise convs shrink with their input (``groups`` follows); grouped convs keep their groups.
5. Bias shifts (plain data in a plan: what to add to a Linear or Conv layer's bias before its
   inputs are removed, e.g. the constant a provably dead unit contributed, or the mean a removed
   unit contributed) are folded in first by :func:`fold_bias_shift`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from oamipc import ir
from oamipc.errors import PlanError, UnsupportedGraphError
from oamipc.units import Layout, SplitLayout, UnitGraph


def _index(t: torch.Tensor, dim: int, idx: np.ndarray) -> torch.Tensor:
    return t.detach().index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device)).clone()


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=True)


def _new_linear(mod: nn.Linear, in_idx: np.ndarray, out_idx: np.ndarray) -> nn.Linear:
    new = nn.Linear(len(in_idx), len(out_idx), bias=mod.bias is not None,
                    device=mod.weight.device, dtype=mod.weight.dtype)
    new.weight = _param(_index(_index(mod.weight, 0, out_idx), 1, in_idx))
    if mod.bias is not None:
        new.bias = _param(_index(mod.bias, 0, out_idx))
    return new


def _new_conv(mod: nn.Conv1d | nn.Conv2d, in_idx: np.ndarray, out_idx: np.ndarray, groups: int,
              slice_in: bool) -> nn.Module:
    cls = type(mod)
    new = cls(len(in_idx), len(out_idx), mod.kernel_size, stride=mod.stride, padding=mod.padding,  # type: ignore[arg-type]
              dilation=mod.dilation, groups=groups, bias=mod.bias is not None,
              padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype)
    w = _index(mod.weight, 0, out_idx)
    if slice_in:
        w = _index(w, 1, in_idx)
    new.weight = _param(w)
    if mod.bias is not None:
        new.bias = _param(_index(mod.bias, 0, out_idx))
    return new


def _new_batchnorm(mod: nn.BatchNorm1d | nn.BatchNorm2d, idx: np.ndarray) -> nn.Module:
    new = type(mod)(len(idx), eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                    track_running_stats=mod.track_running_stats)
    if mod.affine:
        new.weight = _param(_index(mod.weight, 0, idx))
        new.bias = _param(_index(mod.bias, 0, idx))
    if mod.track_running_stats and mod.running_mean is not None and mod.running_var is not None:
        new.running_mean = _index(mod.running_mean, 0, idx)
        new.running_var = _index(mod.running_var, 0, idx)
        new.num_batches_tracked = mod.num_batches_tracked.clone()  # type: ignore[union-attr]
    return new.train(mod.training)


def _new_layernorm(mod: nn.LayerNorm, idx: np.ndarray) -> nn.LayerNorm:
    new = nn.LayerNorm(len(idx), eps=mod.eps, elementwise_affine=mod.elementwise_affine,
                       bias=mod.bias is not None)
    if mod.elementwise_affine:
        new.weight = _param(_index(mod.weight, 0, idx))
        if mod.bias is not None:
            new.bias = _param(_index(mod.bias, 0, idx))
    return new


def _new_embedding(mod: nn.Embedding, idx: np.ndarray) -> nn.Embedding:
    new = nn.Embedding(mod.num_embeddings, len(idx), padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                       norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse,
                       device=mod.weight.device, dtype=mod.weight.dtype)
    new.weight = _param(_index(mod.weight, 1, idx))
    return new


def _new_groupnorm(mod: nn.GroupNorm, idx: np.ndarray) -> nn.GroupNorm:
    groups = len(idx) if mod.num_groups == mod.num_channels else mod.num_groups
    if len(idx) % groups:
        raise PlanError(f"GroupNorm with {mod.num_groups} groups cannot keep {len(idx)} channels")
    new = nn.GroupNorm(groups, len(idx), eps=mod.eps, affine=mod.affine)
    if mod.affine:
        new.weight = _param(_index(mod.weight, 0, idx))
        new.bias = _param(_index(mod.bias, 0, idx))
    return new


@dataclass
class _Rewriter:
    gm: fx.GraphModule
    graph: UnitGraph
    kept: np.ndarray
    changed: list[str] = field(default_factory=list)

    def keep(self, arg: Any, n: int) -> np.ndarray:
        """Kept positions of a node's channel layout (all of ``n`` when it has none)."""
        lay = self.graph.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        if isinstance(lay, Layout):
            return lay.keep_positions(self.kept)
        return np.arange(n)

    def run(self) -> None:
        layer_kinds = {layer.node: layer.kind for layer in self.graph.layers}
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module":
                self.module(node, layer_kinds.get(node.name))
            elif node.op == "get_attr":
                self.parameter(node)
            elif node.op in ("call_function", "call_method"):
                kind = ir.op_kind(node)
                if kind == ir.RESIZE_CONST or ir.op_name(node) == "expand":
                    self.fix_view(node)
                elif kind == ir.SPLIT:
                    self.fix_split(node)

    def module(self, node: fx.Node, layer_kind: str | None) -> None:
        target = str(node.target)
        mod = ir.get_module(self.gm, target)
        x = node.args[0] if node.args else None
        new: nn.Module | None = None
        if isinstance(mod, nn.Linear) and layer_kind == "linear":
            in_idx, out_idx = self.keep(x, mod.in_features), self.keep(node, mod.out_features)
            if len(in_idx) < mod.in_features or len(out_idx) < mod.out_features:
                new = _new_linear(mod, in_idx, out_idx)
        elif isinstance(mod, ir.CONV_MODULES) and layer_kind is not None:
            out_idx = self.keep(node, mod.out_channels)
            if layer_kind == "conv":
                in_idx = self.keep(x, mod.in_channels)
                groups, slice_in = 1, True
            elif layer_kind == "depthwise":
                in_idx = self.keep(x, mod.in_channels)
                groups, slice_in = len(in_idx), False
                if len(out_idx) != len(in_idx) * (mod.out_channels // mod.in_channels):
                    raise PlanError(f"depthwise conv {target}: kept outputs do not match kept inputs")
            else:
                in_idx, groups, slice_in = np.arange(mod.in_channels), mod.groups, False
            if len(in_idx) < mod.in_channels or len(out_idx) < mod.out_channels:
                new = _new_conv(mod, in_idx, out_idx, groups, slice_in)
        elif isinstance(mod, (*ir.BATCHNORM_MODULES, nn.LayerNorm, nn.GroupNorm)):
            width = mod.num_features if isinstance(mod, ir.BATCHNORM_MODULES) else (
                mod.normalized_shape[0] if isinstance(mod, nn.LayerNorm) else mod.num_channels)
            lay = self.graph.layouts.get(node.name)
            idx = lay.keep_positions(self.kept) if isinstance(lay, Layout) else np.arange(width)
            if len(idx) < width:
                if isinstance(mod, ir.BATCHNORM_MODULES):
                    new = _new_batchnorm(mod, idx)
                elif isinstance(mod, nn.LayerNorm):
                    new = _new_layernorm(mod, idx)
                else:
                    new = _new_groupnorm(mod, idx)
        elif isinstance(mod, nn.Embedding):
            idx = self.keep(node, mod.embedding_dim)
            if len(idx) < mod.embedding_dim:
                new = _new_embedding(mod, idx)
        if new is not None:
            new.train(mod.training)
            ir.replace_module(self.gm, target, new)
            self.changed.append(target)

    def parameter(self, node: fx.Node) -> None:
        """Slice a parameter joined to pruned channels (class token, positional embedding)."""
        lay = self.graph.layouts.get(node.name)
        target = str(node.target)
        if not isinstance(lay, Layout) or target in self.changed:
            return
        owner_name, _, leaf = target.rpartition(".")
        owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
        value = getattr(owner, leaf)
        idx = lay.keep_positions(self.kept)
        if not isinstance(value, nn.Parameter) or len(idx) == value.shape[lay.dim]:
            return
        setattr(owner, leaf, _param(_index(value, lay.dim, idx)))
        self.changed.append(target)

    def fix_view(self, node: fx.Node) -> None:
        """Rewrite a constant size on the channel dim of view/reshape to the kept width."""
        lay = self.graph.layouts.get(node.name)
        if not isinstance(lay, Layout):
            return
        new_width = len(lay.keep_positions(self.kept))
        if new_width == len(lay.units):
            return
        args = list(node.args)
        sizes, where = ir.size_args(node)

        def rebuild(s: list[Any]) -> list[Any]:
            if where == "list":
                return [args[0], type(args[1])(s)]
            if where is not None:  # a keyword: rewritten in place, the positional args stay
                node.kwargs = {**node.kwargs, where: tuple(s)}
                return args
            return [args[0], *s]
        if lay.dim >= len(sizes):
            raise UnsupportedGraphError(f"cannot rewrite the sizes of {ir.where(node)}")
        old = sizes[lay.dim]
        if isinstance(old, int) and old != -1:
            sizes[lay.dim] = new_width
            node.args = tuple(rebuild(sizes))
            self.changed.append(node.name)

    def fix_split(self, node: fx.Node) -> None:
        """Replace a split/chunk along the channel dim by a split with the kept sizes."""
        lay = self.graph.layouts.get(node.name)
        if not isinstance(lay, SplitLayout):
            return
        src = node.args[0]
        src_lay = self.graph.layouts.get(src.name) if isinstance(src, fx.Node) else None
        if not isinstance(src_lay, Layout) or any(p is None or p.dim != src_lay.dim for p in lay.pieces):
            return
        old = [len(p.units) for p in lay.pieces if p is not None]
        new = [len(p.keep_positions(self.kept)) for p in lay.pieces if p is not None]
        if old == new:
            return
        if 0 in new:
            raise PlanError(f"{ir.where(node)}: a split piece would lose all its channels; raise --min-keep")
        with self.gm.graph.inserting_before(node):
            repl = self.gm.graph.call_function(torch.split, (src, new), {"dim": src_lay.dim})
        repl.meta = dict(node.meta)
        node.replace_all_uses_with(repl)
        self.gm.graph.erase_node(node)
        self.changed.append(repl.name)


def apply_plan(gm: fx.GraphModule, graph: UnitGraph, kept: np.ndarray) -> list[str]:
    """Remove every unit not in ``kept`` from ``gm`` in place; return what was rewritten."""
    rewriter = _Rewriter(gm, graph, kept)
    rewriter.run()
    gm.graph.lint()
    gm.recompile()
    return rewriter.changed


def fold_bias_shift(gm: fx.GraphModule, shifts: dict[str, list[float]]) -> None:
    """Add the shifts to the Linear and Conv layers' biases (before pruning removes their inputs).

    A layer without a bias gets one (holding the shift)."""
    for target, shift in shifts.items():
        try:
            mod = ir.get_module(gm, target)
        except AttributeError:
            mod = None
        width = mod.out_features if isinstance(mod, nn.Linear) else (
            mod.out_channels if isinstance(mod, ir.CONV_MODULES) else None)
        if width != len(shift):
            raise PlanError(f"the plan's bias shift names {target!r} with {len(shift)} outputs, which this model does "
                            "not have as a Linear or Conv layer; replay a plan only on the model it was made for")
        assert isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
        delta = torch.tensor(shift, dtype=mod.weight.dtype, device=mod.weight.device)
        with torch.no_grad():
            if mod.bias is None:
                mod.bias = nn.Parameter(delta.clone())
            else:
                mod.bias.add_(delta)

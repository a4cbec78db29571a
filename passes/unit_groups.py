"""Unit-group analysis: which neurons and channels can be removed, and what each removal touches.

How it works (one forward walk over the graph, then a union-find):

1. Every output neuron of a Linear and output channel of a Conv (not depthwise) is a *source
   unit* with a fresh id.  Each tensor gets a layout: the source id behind each index of its
   channel dimension (see :mod:`oamipc.units`).
2. Ops move layouts forward: element-wise ops and pooling keep them; flatten/view expand a
   channel into its ``H*W`` block of features (and a flatten of tokens ``(B, T, C) -> (B, T*C)``
   repeats the channel layout ``T`` times); ``cat`` concatenates them (``cat([x, x])`` simply
   repeats the units); ``split``/``chunk`` slice them (every piece of a split, and every input of a
   ``cat``, keeps at least one unit: see :attr:`oamipc.units.UnitGraph.floors`); a depthwise conv
   maps output ``o`` to input channel ``o // multiplier``; ``transpose``/``permute`` move the
   channel dim.
   A reshape that cuts the channel dim into blocks (``(B, L, H*d) -> (B, L, H, d)``, attention
   heads) makes each block one unit, on the new ``H`` dim: a head is removed whole.  ``matmul``
   and ``scaled_dot_product_attention`` with heads on a batch dim match the heads of q, k and v
   like an element-wise op does, so a head's q, k and v rows and its slice of the output
   projection's input are one unit (``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers
   reach this form through their traced stand-ins, :mod:`oamipc.attention`).
3. Ops that combine tensors element-wise (``add``, ``sub``, ``mul``, ``div``) *couple* the source
   units at equal positions: a union-find merges them into one unit (a residual channel, a
   squeeze-excitation gate and the channel it scales).
4. Anything else is a barrier: every unit that reaches it is *pinned* (kept), with the reason,
   and its output is treated as not removable.  So are layers called twice or sharing a
   parameter with another layer (pruning would untie them), and channel widths that
   ``torch._assert`` checks.  The network outputs pin their units too, so output neurons are
   never removed; so do positions where a unit is added to a channel that no producer owns.
5. Grouped convolutions and GroupNorm add *equal-count blocks*: the kept count must be the same
   in every block so that the layer stays valid.
6. **The residual stream** of a transformer (a group that a LayerNorm normalises and that several
   layers add into) is kept unless ``prune_embed`` is set: removing its channels touches every
   block, and a LayerNorm over fewer channels computes other statistics, so that removal is not
   exact (the other removals are).  With ``prune_embed``, ``nn.Embedding`` outputs and the
   parameters the graph reads (class token, positional embedding: their last dim) are *passive*
   sources: joined to the stream by an add or a cat, they are cut with it, but they never make a
   unit on their own (only layers' outputs do, so every unit has a layer to score it by).
   ``expand`` (a class token over the batch) and basic indexing that leaves the channel dim whole
   (``x[:, 0]``) then keep the channels instead of being barriers.

The result (:class:`oamipc.units.UnitGraph`) also holds the exact cost model of every
Linear/Conv layer as a function of the kept units.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx, nn

from oamipc import attention, ir
from oamipc.passmanager import Analysis, AnalysisManager, register
from oamipc.units import Barrier, LayerCost, Layout, SplitLayout, UnitGraph, UnitGroup

log = logging.getLogger(__name__)

OUTPUT_REASON = "reaches a network output"
STREAM_REASON = "the residual stream (a LayerNorm over channels several layers add into): pruned only with prune_embed"


class _UnionFind:
    """Union-find over source ids, remembering why a set was pinned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pin_reason: dict[int, str] = {}

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Keep the smaller id as the root so results do not depend on call order.
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def pin(self, ids: np.ndarray, reason: str) -> int:
        n = 0
        for s in ids.tolist():
            if s >= 0:
                self.pin_reason.setdefault(s, reason)
                n += 1
        return n


class _Walker:
    """One forward walk over the graph that assigns layouts (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, leaf_modules: frozenset[str], prune_embed: bool = False) -> None:
        self.gm = gm
        self.leaf_modules = leaf_modules
        self.prune_embed = prune_embed
        self.uf = _UnionFind()
        # Sources that only follow the width they are joined to (``prune_embed``: an embedding's
        # columns, a class token, a positional embedding): sliced with their unit, never a unit alone.
        self.passive: set[int] = set()
        self.param_layouts: dict[str, Layout] = {}  # parameter target -> its channels (one per parameter)
        self.norm_reads: list[np.ndarray] = []  # the sources each LayerNorm normalises
        self.layouts: dict[str, Layout | SplitLayout | None] = {}
        self.producers: dict[int, tuple[str, int]] = {}  # source id -> (module target, channel)
        self.layers: list[tuple[fx.Node, str, np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[list[np.ndarray], str]] = []
        self.floors: list[np.ndarray] = []
        self.cat_floors: list[np.ndarray] = []
        self.barriers: list[Barrier] = []
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.tied = _tied_modules(gm)
        # Python values read from the shapes of tracked tensors: a whole shape (``x.shape``,
        # ``x.size()``) and the units whose count it holds, or values computed from channel widths.
        self.shapes_read: dict[str, tuple[Layout, int]] = {}
        self.widths_read: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- helpers
    def layout(self, arg: Any) -> Layout | None:
        if isinstance(arg, fx.Node):
            lay = self.layouts.get(arg.name)
            return lay if isinstance(lay, Layout) else None
        return None

    def barrier(self, node: fx.Node, reason: str) -> None:
        pinned = 0
        for arg in ir.iter_nodes((node.args, node.kwargs)):
            lay = self.layouts.get(arg.name)
            for piece in (lay.pieces if isinstance(lay, SplitLayout) else (lay,)):
                if piece is not None:
                    pinned += self.uf.pin(piece.units, f"feeds {ir.where(node)}: {reason}")
        if pinned:
            self.barriers.append(Barrier(node.name, ir.op_name(node) if node.op != "call_module"
                                         else type(ir.get_module(self.gm, str(node.target))).__name__,
                                         reason, pinned))
        self.layouts[node.name] = None

    def new_units(self, target: str, n: int, dim: int) -> Layout:
        ids = self.uf.add(n)
        for c, s in enumerate(ids.tolist()):
            self.producers[s] = (target, c)
        return Layout(dim, ids)

    def untracked(self, n: int, dim: int) -> np.ndarray:
        return np.full(n, -1, dtype=np.int64)

    # ----------------------------------------------------------------- walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and self.prune_embed:
                self.visit_parameter(node)
            elif node.op in ("placeholder", "get_attr"):
                self.layouts[node.name] = None
            elif node.op == "output":
                for arg in ir.iter_nodes(node.args):
                    lay = self.layouts.get(arg.name)
                    for piece in (lay.pieces if isinstance(lay, SplitLayout) else (lay,)):
                        if piece is not None:
                            self.uf.pin(piece.units, OUTPUT_REASON)
            elif node.op == "call_module":
                self.visit_module(node)
            else:
                self.visit_function(node)

    def visit_module(self, node: fx.Node) -> None:
        target = str(node.target)
        mod = ir.get_module(self.gm, target)
        x = node.args[0] if node.args else None
        lay = self.layout(x)
        if target in self.leaf_modules:
            return self.barrier(node, "kept opaque (leaf module)")
        if isinstance(mod, (nn.Linear, *ir.CONV_MODULES, *ir.BATCHNORM_MODULES, nn.LayerNorm,
                            nn.GroupNorm)) and self.calls[node.target] > 1:
            return self.barrier(node, f"module is called {self.calls[node.target]} times (shared weights)")
        if target in self.tied:
            return self.barrier(node, f"shares a parameter with {self.tied[target]} (tied weights)")
        if isinstance(mod, nn.Embedding) and self.prune_embed:
            return self.visit_embedding(node, target, mod)
        if isinstance(mod, nn.Linear):
            return self.visit_linear(node, target, mod, x, lay)
        if isinstance(mod, ir.CONV_MODULES):
            return self.visit_conv(node, target, mod, x, lay)
        if isinstance(mod, ir.BATCHNORM_MODULES):
            return self.pass_through(node, lay, dim=1)
        if isinstance(mod, nn.LayerNorm):
            shape = ir.tensor_shape(x)
            if len(mod.normalized_shape) != 1 or shape is None:
                return self.barrier(node, "LayerNorm over more than the channel dimension")
            if lay is not None:
                self.norm_reads.append(lay.units)
            return self.pass_through(node, lay, dim=len(shape) - 1)
        if isinstance(mod, nn.GroupNorm):
            return self.visit_groupnorm(node, mod, lay)
        if isinstance(mod, ir.ELEMENTWISE_MODULES):
            self.layouts[node.name] = lay
            return None
        if isinstance(mod, ir.POOL_MODULES):
            return self.pass_through(node, lay, dim=1)
        if isinstance(mod, nn.Flatten):
            return self.visit_reshape(node, lay)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.visit_softmax(node, lay, mod.dim)
        return self.barrier(node, f"{type(mod).__name__} is not supported by the unit analysis")

    def pass_through(self, node: fx.Node, lay: Layout | None, *, dim: int) -> None:
        """Ops that keep each channel where it is, provided it sits on ``dim``."""
        if lay is not None and lay.dim != dim:
            return self.barrier(node, f"expects channels on dim {dim}, got dim {lay.dim}")
        self.layouts[node.name] = lay
        return None

    def visit_linear(self, node: fx.Node, target: str, mod: nn.Linear, x: Any, lay: Layout | None) -> None:
        in_shape, out_shape = ir.tensor_shape(x), ir.tensor_shape(node)
        if in_shape is None or out_shape is None:
            return self.barrier(node, "shapes were not propagated")
        last = len(in_shape) - 1
        if lay is not None and lay.dim != last:
            self.barrier(node, "input channels are not on the feature dimension")
            lay = None
        in_units = lay.units if lay is not None else self.untracked(mod.in_features, last)
        out = self.new_units(target, mod.out_features, len(out_shape) - 1)
        self.layouts[node.name] = out
        self.layers.append((node, "linear", in_units, out.units))
        return None

    def visit_conv(self, node: fx.Node, target: str, mod: nn.Conv1d | nn.Conv2d, x: Any,
                   lay: Layout | None) -> None:
        if lay is not None and lay.dim != 1:
            self.barrier(node, "input channels are not on dim 1")
            lay = None
        cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
        if g == 1:
            in_units = lay.units if lay is not None else self.untracked(cin, 1)
            out = self.new_units(target, cout, 1)
            self.layers.append((node, "conv", in_units, out.units))
        elif g == cin and cin > 1:
            # Depthwise: output o reads input o // mult only, so it shares that input's unit.
            mult = cout // cin
            in_units = lay.units if lay is not None else self.untracked(cin, 1)
            out = Layout(1, np.repeat(in_units, mult))
            self.layers.append((node, "depthwise", in_units, out.units))
        else:
            # Grouped: keep every input (their per-group counts are fixed), prune outputs in
            # equal numbers per group.
            if lay is not None:
                self.uf.pin(lay.units, f"feeds grouped conv {target} (groups={g})")
            in_units = self.untracked(cin, 1)
            out = self.new_units(target, cout, 1)
            self.blocks.append((list(np.split(out.units, g)), f"grouped conv {target}"))
            self.layers.append((node, "grouped", in_units, out.units))
        self.layouts[node.name] = out
        return None

    def visit_groupnorm(self, node: fx.Node, mod: nn.GroupNorm, lay: Layout | None) -> None:
        if lay is not None and lay.dim != 1:
            return self.barrier(node, "GroupNorm input channels are not on dim 1")
        if lay is not None and 1 < mod.num_groups < mod.num_channels:
            self.blocks.append((list(np.split(lay.units, mod.num_groups)), f"GroupNorm {node.target}"))
        self.layouts[node.name] = lay
        return None

    def visit_function(self, node: fx.Node) -> None:
        kind = ir.op_kind(node)
        args = [a for a in node.args]
        lay = self.layout(args[0]) if args else None
        tracked_inputs = [a for a in ir.iter_nodes((node.args, node.kwargs))
                          if self.layouts.get(a.name) is not None]
        if node.target is attention.attention_mask:  # reads only the shapes of q and k
            self.layouts[node.name] = None
            return None
        if node.target is attention.zero_padded:  # zeroes whole tokens: every channel alike
            self.layouts[node.name] = lay
            return None
        if kind == ir.NON_TENSOR or (kind is None and not tracked_inputs):
            self.follow_widths(node, kind)
            self.layouts[node.name] = None
            return None
        if kind in (ir.ELEMENTWISE, ir.BINARY):
            self.pin_widths_as_numbers(node)
        if kind == ir.ELEMENTWISE:
            self.layouts[node.name] = lay
            return None
        if kind == ir.BINARY:
            return self.visit_binary(node)
        if kind == ir.POOL:
            return self.pass_through(node, lay, dim=1)
        if kind in (ir.RESHAPE, ir.RESIZE_CONST):
            return self.visit_reshape(node, lay)
        if kind == ir.REDUCE:
            return self.visit_reduce(node, lay)
        if kind == ir.SOFTMAX:
            return self.visit_softmax(node, lay, ir.arg_or_kwarg(node, 1, "dim"))
        if kind == ir.CAT:
            return self.visit_cat(node)
        if kind == ir.SPLIT:
            return self.visit_split(node, lay)
        if kind == ir.GETITEM:
            return self.visit_getitem(node)
        if kind == ir.PERMUTE:
            return self.visit_permute(node, lay)
        if kind in (ir.MATMUL, ir.ATTENTION):
            return self.visit_batched(node, kind)
        if self.prune_embed and ir.op_name(node) == "expand" and lay is not None:
            return self.visit_expand(node, lay)
        return self.barrier(node, f"op {ir.op_name(node)} is not supported by the unit analysis")

    def visit_binary(self, node: fx.Node, operands: list[fx.Node] | None = None) -> None:
        out_shape = ir.tensor_shape(node)
        if out_shape is None:
            return self.barrier(node, "shapes were not propagated")
        rank = len(out_shape)
        tensors = [a for a in (ir.iter_nodes(node.args) if operands is None else operands)
                   if ir.tensor_shape(a) is not None]
        dims = {}
        for a in tensors:
            lay = self.layout(a)
            if lay is not None:
                dims[a.name] = lay.dim + rank - len(ir.tensor_shape(a) or ())
        if not dims:
            self.layouts[node.name] = None
            return None
        if len(set(dims.values())) > 1:
            return self.barrier(node, "combines tensors whose channels lie on different dims")
        dim = next(iter(dims.values()))
        width = out_shape[dim]
        for a in tensors:
            shape = ir.tensor_shape(a) or ()
            adim = dim - (rank - len(shape))
            if 0 <= adim < len(shape) and shape[adim] not in (1, width):
                return self.barrier(node, f"operands of widths {shape[adim]} and {width} on the channel dim")
        merged = np.full(width, -1, dtype=np.int64)
        # Positions where some full-width operand holds a channel no producer owns (the network
        # input, a barrier's output, such a tensor concatenated with tracked ones): the result
        # keeps that channel, so every unit combined with it there must be kept too.
        fixed = np.zeros(width, dtype=bool)
        untracked_full = False
        for a in tensors:
            shape = ir.tensor_shape(a) or ()
            adim = dim - (rank - len(shape))
            size = shape[adim] if 0 <= adim < len(shape) else 1
            lay = self.layout(a)
            if size == 1 and width > 1:
                if lay is not None:
                    self.uf.pin(lay.units, f"broadcast over the channels at {ir.where(node)}")
                continue
            if lay is None:
                untracked_full = True
                continue
            fixed |= lay.units < 0
            for i, s in enumerate(lay.units.tolist()):
                if s < 0:
                    continue
                if merged[i] < 0:
                    merged[i] = s
                else:
                    self.uf.union(int(merged[i]), s)
        if untracked_full:
            fixed[:] = True
        if fixed.any():
            self.uf.pin(merged[fixed], f"combined with a tensor of fixed channels at {ir.where(node)}")
            merged[fixed] = -1
        self.layouts[node.name] = Layout(dim, merged)
        return None

    def visit_reshape(self, node: fx.Node, lay: Layout | None) -> None:
        if lay is None:
            self.layouts[node.name] = None
            return None
        src = node.args[0] if node.args else None
        in_shape, out_shape = ir.tensor_shape(src), ir.tensor_shape(node)
        if in_shape is None or out_shape is None:
            return self.barrier(node, "shapes were not propagated")
        c = in_shape[lay.dim]
        prefix = ir.prod(in_shape[: lay.dim])
        suffix = ir.prod(in_shape[lay.dim + 1:])
        for d in range(len(out_shape)):
            if ir.prod(out_shape[:d]) != prefix:
                continue
            if (out_shape[d] in (c, c * suffix) or 1 < out_shape[d] < c) and self.foreign_width(node, d, lay):
                return self.barrier(node, f"the size of dim {d} is read at run time from another tensor's width "
                                          "(e.g. x.size(2)) and cannot follow these units; write it as a constant "
                                          "(e.g. self.heads * self.head_dim) to let them go")
            if out_shape[d] == c and ir.prod(out_shape[d + 1:]) == suffix:
                self.layouts[node.name] = Layout(d, lay.units)
                return None
            if out_shape[d] == c * suffix:
                # Flatten: channel k becomes the contiguous block of its `suffix` features.
                self.layouts[node.name] = Layout(d, np.repeat(lay.units, suffix))
                return None
            blocks = out_shape[d]
            if 1 < blocks < c and c % blocks == 0 and ir.prod(out_shape[d + 1:]) == c // blocks * suffix:
                return self.split_channels(node, lay, d, out_shape[d])
        merged = self.merged_layout(in_shape, out_shape, lay)
        if merged is not None:
            self.layouts[node.name] = merged
            return None
        return self.barrier(node, f"reshape {in_shape} -> {out_shape} splits or mixes the channel dim")

    def foreign_width(self, node: fx.Node, dim: int, lay: Layout) -> bool:
        """Whether output dim ``dim`` of a view/reshape gets a size computed at run time that is not
        the width of these very channels (``view(b, t, c)`` with ``c = x.size(2)`` of another
        tensor).  That size follows the other tensor's units, not ``lay``'s, so both keep theirs
        (the other tensor's units are pinned here; ``lay``'s by the caller's barrier)."""
        size = _runtime_size(node, dim)
        if size is None:
            return False
        read = self.widths_read.get(size.name)
        own = {int(u) for u in lay.units.tolist() if u >= 0}
        if read is not None and {int(u) for u in read.tolist() if u >= 0} == own:
            return False  # the width of these same channels: it follows the pruned width by itself
        if read is not None:
            self.uf.pin(read[read >= 0], f"its width sizes a reshape at {ir.where(node)}")
        return True

    @staticmethod
    def merged_layout(in_shape: tuple[int, ...], out_shape: tuple[int, ...], lay: Layout) -> Layout | None:
        """A reshape that merges dims before the channel dim into it, e.g. every token's channels
        into one feature vector: ``(B, T, C) -> (B, T * C)``.

        The merged dim holds the channels once per position of the dims merged in front of them
        (``T`` copies of the layout, each channel as its block of trailing positions), so every
        copy follows the kept channels.  The batch dim is never merged.  None: not such a reshape.
        """
        suffix = ir.prod(in_shape[lay.dim + 1:])
        for k in range(1, lay.dim):
            for d in range(1, len(out_shape)):
                if (len(out_shape) == d + 1 and ir.prod(out_shape[:d]) == ir.prod(in_shape[:k])
                        and out_shape[d] == ir.prod(in_shape[k:])):
                    copies = ir.prod(in_shape[k:lay.dim])
                    return Layout(d, np.tile(np.repeat(lay.units, suffix), copies))
        return None

    def split_channels(self, node: fx.Node, lay: Layout, dim: int, blocks: int) -> None:
        """A reshape that cuts the channel dim into ``blocks`` contiguous blocks on ``dim`` (heads).

        ``(B, L, H * d) -> (B, L, H, d)``: each block (a head's ``d`` channels) becomes one unit,
        so a head is removed whole and the reshape's ``H`` is the width that shrinks.  A block
        holding a channel no producer owns is kept whole.
        """
        per_block = len(lay.units) // blocks
        units = np.full(blocks, -1, dtype=np.int64)
        for b, block in enumerate(np.split(lay.units, blocks)):
            tracked = block[block >= 0]
            if len(tracked) < per_block:
                self.uf.pin(tracked, f"a head block with fixed channels at {ir.where(node)}")
                continue
            for s in tracked[1:].tolist():
                self.uf.union(int(tracked[0]), s)
            units[b] = tracked[0]
        self.layouts[node.name] = Layout(dim, units)
        return None

    def visit_permute(self, node: fx.Node, lay: Layout | None) -> None:
        """transpose/permute: the channel dim moves to its new place."""
        if lay is None:
            self.layouts[node.name] = None
            return None
        rank = len(ir.tensor_shape(node) or ())
        args = list(node.args[1:])
        if ir.op_name(node) == "permute":
            order = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            order = list(order or node.kwargs.get("dims", ()))
            if len(order) != rank or not all(isinstance(d, int) for d in order):
                return self.barrier(node, "permute with dims that are not constants")
            new_dim = [d % rank for d in order].index(lay.dim)
        else:
            d0, d1 = ir.arg_or_kwarg(node, 1, "dim0"), ir.arg_or_kwarg(node, 2, "dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return self.barrier(node, "transpose with dims that are not constants")
            d0, d1 = d0 % rank, d1 % rank
            new_dim = d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim
        self.layouts[node.name] = Layout(new_dim, lay.units)
        return None

    def visit_batched(self, node: fx.Node, kind: str) -> None:
        """matmul and scaled_dot_product_attention with channels (heads) on a batch dim.

        The batch dims of the operands are matched like the dims of an element-wise op: the head
        ``h`` of q, k, v (and of an attention mask with a head dim) is one unit, and the result
        keeps it on the same dim.  Channels on one of the two matrix dims are contracted or
        mixed: a barrier.
        """
        operands = [a for a in ir.iter_nodes((node.args, node.kwargs)) if ir.tensor_shape(a) is not None]
        for a in operands:
            lay, rank = self.layout(a), len(ir.tensor_shape(a) or ())
            if lay is not None and (rank < 3 or lay.dim >= rank - 2):
                return self.barrier(node, f"{ir.op_name(node)} over the channel dim")
        if kind == ir.ATTENTION and ir.arg_or_kwarg(node, 7, "enable_gqa", False):
            return self.barrier(node, "grouped-query attention (enable_gqa)")
        return self.visit_binary(node, operands)

    def visit_reduce(self, node: fx.Node, lay: Layout | None) -> None:
        if lay is None:
            self.layouts[node.name] = None
            return None
        in_shape = ir.tensor_shape(node.args[0]) or ()
        dims = ir.arg_or_kwarg(node, 1, "dim")
        keepdim = bool(ir.arg_or_kwarg(node, 2, "keepdim", False))
        if dims is None:
            return self.barrier(node, "reduces over every dimension, channels included")
        dims_list = [dims] if isinstance(dims, int) else list(dims)
        rank = len(in_shape)
        norm = sorted({d % rank for d in dims_list})
        if lay.dim in norm:
            if not node.users:  # an unused value (attention weights nobody reads) keeps nothing
                self.layouts[node.name] = None
                return None
            return self.barrier(node, "reduces over the channel dimension")
        new_dim = lay.dim if keepdim else lay.dim - sum(1 for d in norm if d < lay.dim)
        self.layouts[node.name] = Layout(new_dim, lay.units)
        return None

    def visit_softmax(self, node: fx.Node, lay: Layout | None, dim: Any) -> None:
        if lay is None:
            self.layouts[node.name] = None
            return None
        rank = len(ir.tensor_shape(node) or ())
        if not isinstance(dim, int) or dim % rank == lay.dim:
            return self.barrier(node, "normalises over the channel dimension")
        self.layouts[node.name] = lay
        return None

    def visit_cat(self, node: fx.Node) -> None:
        given = ir.arg_or_kwarg(node, 0, "tensors", ())
        # A tuple that the graph computes (``torch.cat(x.chunk(2, 1)[::-1])``) is one node, not a list.
        tensors = list(given) if isinstance(given, (list, tuple)) else []
        out_shape = ir.tensor_shape(node)
        if out_shape is None or not tensors or not all(isinstance(t, fx.Node) for t in tensors):
            return self.barrier(node, "cat of values that are not graph tensors")
        rank = len(out_shape)
        dim = int(ir.arg_or_kwarg(node, 1, "dim", 0)) % rank
        lays = [self.layout(t) for t in tensors]
        tracked_dims = {lay.dim for lay in lays if lay is not None}
        if not tracked_dims:
            self.layouts[node.name] = None
            return None
        if tracked_dims == {dim}:
            parts = [lay.units if lay is not None else self.untracked((ir.tensor_shape(t) or ())[dim], dim)
                     for t, lay in zip(tensors, lays)]
            # Every piece keeps a unit: a piece whose units all went would leave its producer (a conv
            # of one branch) with no output channel, while the coupled group as a whole still has some.
            self.cat_floors.extend(p for p in parts if len(p) and (p >= 0).all())
            self.layouts[node.name] = Layout(dim, np.concatenate(parts))
            return None
        if len(tracked_dims) == 1 and None not in lays:
            # Concatenated along another dim: channel i of every input is the same channel.
            return self.visit_binary_like(node, lays)
        return self.barrier(node, "cat along a dim that is not the channel dim of every input")

    def visit_binary_like(self, node: fx.Node, lays: list[Layout | None]) -> None:
        first = lays[0]
        assert first is not None
        for lay in lays[1:]:
            assert lay is not None
            for a, b in zip(first.units.tolist(), lay.units.tolist()):
                if a >= 0 and b >= 0:
                    self.uf.union(a, b)
                elif a >= 0 or b >= 0:
                    self.uf.pin(np.array([max(a, b)]), f"combined with fixed channels at {ir.where(node)}")
        self.layouts[node.name] = first
        return None

    def visit_split(self, node: fx.Node, lay: Layout | None) -> None:
        if lay is None:
            self.layouts[node.name] = None
            return None
        shapes = ir.tuple_shapes(node)
        if shapes is None:
            return self.barrier(node, "shapes of the split pieces were not propagated")
        rank = len(shapes[0])
        default_dim = 0
        dim = int(ir.arg_or_kwarg(node, 2, "dim", default_dim)) % rank
        if dim != lay.dim:
            self.layouts[node.name] = SplitLayout(tuple(lay for _ in shapes))
            return None
        pieces, start = [], 0
        for s in shapes:
            piece = lay.units[start:start + s[dim]]
            pieces.append(Layout(dim, piece))
            if (piece >= 0).all():  # a piece holding a fixed channel is never empty
                self.floors.append(piece)
            start += s[dim]
        self.layouts[node.name] = SplitLayout(tuple(pieces))
        return None

    def pin_widths_as_numbers(self, node: fx.Node) -> None:
        """Keep the units whose width an arithmetic op uses as a number (``h / h.size(1)``).

        Removing a unit would change that number, and with it the values of every channel, so
        the pruned network would no longer compute what the dense one does with the unit zeroed.
        Arithmetic on sizes alone (``x.shape[1] * x.shape[2]``, a Python value) is left to the
        reshape that reads it.
        """
        if ir.tensor_shape(node) is None:
            return
        for arg in ir.iter_nodes((node.args, node.kwargs)):
            read = self.widths_read.get(arg.name)
            if read is None:
                continue
            pinned = self.uf.pin(read[read >= 0], f"its width is used as a number at {ir.where(node)}")
            if pinned:
                self.barriers.append(Barrier(node.name, ir.op_name(node), "uses a channel width as a number", pinned))

    def follow_widths(self, node: fx.Node, kind: str | None) -> None:
        """Follow channel widths read as Python values; keep the units whose width ``torch._assert`` checks.

        ``torch._assert(h.shape[1] == 8, ...)`` would fail once ``h`` lost a unit, so the units of
        every width that reaches an assert are pinned (a barrier in the report).  Widths used in
        any other way (``view(n, x.size(1))``) follow the pruned width by themselves.
        """
        name = ir.op_name(node)
        src = node.args[0] if node.args else None
        lay = self.layout(src)
        if kind == ir.NON_TENSOR and lay is not None:
            rank = len(ir.tensor_shape(src) or ())
            if name in ("size", "sym_size") or (name == "getattr" and node.args[1:2] == ("shape",)):
                dim = ir.arg_or_kwarg(node, 1, "dim") if name != "getattr" else None
                if dim is None:
                    self.shapes_read[node.name] = (lay, rank)
                elif isinstance(dim, int) and rank and dim % rank == lay.dim:
                    self.widths_read[node.name] = lay.units
            elif name == "numel":
                self.widths_read[node.name] = lay.units
            return
        args = list(ir.iter_nodes((node.args, node.kwargs)))
        deps = [self.widths_read[a.name] for a in args if a.name in self.widths_read]
        deps += [self.shapes_read[a.name][0].units for a in args if a.name in self.shapes_read]
        if not deps:
            return
        units = np.concatenate(deps)
        if node.target is not torch._assert:
            self.widths_read[node.name] = units
            return
        pinned = self.uf.pin(units, f"its width is checked by torch._assert at {ir.where(node)}")
        if pinned:
            self.barriers.append(Barrier(node.name, name, "checks a channel width (torch._assert)", pinned))

    def visit_getitem(self, node: fx.Node) -> None:
        src, index = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and src.name in self.shapes_read:  # x.shape[i]: a channel width?
            lay, rank = self.shapes_read[src.name]
            if not isinstance(index, int) or (rank and index % rank == lay.dim):
                self.widths_read[node.name] = lay.units
        elif isinstance(src, fx.Node) and src.name in self.widths_read:
            self.widths_read[node.name] = self.widths_read[src.name]
        lay = self.layouts.get(src.name) if isinstance(src, fx.Node) else None
        if isinstance(lay, SplitLayout) and isinstance(index, int):
            self.layouts[node.name] = lay.pieces[index]
            return None
        if lay is None:
            self.layouts[node.name] = None
            return None
        if self.prune_embed:
            return self.visit_index(node, lay, index)
        return self.barrier(node, "indexes into a tensor with channels")

    # ----------------------------------------------------------------- the residual stream (prune_embed)
    def passive_units(self, target: str, n: int, dim: int) -> Layout:
        """Sources that follow the unit they are joined to (see :attr:`passive`)."""
        lay = self.new_units(target, n, dim)
        self.passive.update(lay.units.tolist())
        return lay

    def visit_parameter(self, node: fx.Node) -> None:
        """A parameter read by the graph (class token, positional embedding, layer scale): its last dim.

        Every read of one parameter shares the same sources, so the parameter is sliced one way.
        A parameter joined to the stream by an add or a cat is cut with the stream's channels; one
        that meets anything else pins what it meets, as an untracked tensor would.
        """
        target = str(node.target)
        try:
            value = _fetch_attr(self.gm, target)
        except AttributeError:
            value = None
        shape = ir.tensor_shape(node)
        if not isinstance(value, nn.Parameter) or shape is None or not shape or shape[-1] <= 1:
            self.layouts[node.name] = None
            return None
        if target not in self.param_layouts:
            self.param_layouts[target] = self.passive_units(target, shape[-1], len(shape) - 1)
        self.layouts[node.name] = self.param_layouts[target]
        return None

    def visit_embedding(self, node: fx.Node, target: str, mod: nn.Embedding) -> None:
        """``nn.Embedding``: its columns are the channels of its output's last dim."""
        shape = ir.tensor_shape(node)
        if shape is None:
            return self.barrier(node, "shapes were not propagated")
        if self.calls[node.target] > 1:
            return self.barrier(node, f"module is called {self.calls[node.target]} times (shared weights)")
        self.layouts[node.name] = self.passive_units(target, mod.embedding_dim, len(shape) - 1)
        return None

    def visit_expand(self, node: fx.Node, lay: Layout) -> None:
        """``expand`` (a class token broadcast over the batch): the channel dim keeps its size."""
        in_shape, out_shape = ir.tensor_shape(node.args[0]), ir.tensor_shape(node)
        if in_shape is None or out_shape is None:
            return self.barrier(node, "shapes were not propagated")
        dim = lay.dim + len(out_shape) - len(in_shape)
        if out_shape[dim] != in_shape[lay.dim]:
            return self.barrier(node, "expands the channel dim")
        self.layouts[node.name] = Layout(dim, lay.units)
        return None

    def visit_index(self, node: fx.Node, lay: Layout, index: Any) -> None:
        """Basic indexing that leaves the channel dim whole (``x[:, 0]``, the class token's row)."""
        items = list(index) if isinstance(index, tuple) else [index]
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
            return self.barrier(node, "indexes into a tensor with channels")
        rank = len(ir.tensor_shape(node.args[0]) or ())
        if Ellipsis in items:
            at = items.index(Ellipsis)
            consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
            items[at:at + 1] = [slice(None)] * (rank - consumed)
        in_dim = out_dim = 0
        new_dim: int | None = None
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if in_dim == lay.dim:
                if item != slice(None):
                    return self.barrier(node, "indexes into the channel dim")
                new_dim = out_dim
            in_dim += 1
            out_dim += 0 if isinstance(item, int) else 1
        if new_dim is None:
            new_dim = out_dim + lay.dim - in_dim
        out_shape = ir.tensor_shape(node)
        if out_shape is None or new_dim >= len(out_shape) or out_shape[new_dim] != len(lay.units):
            return self.barrier(node, "indexes into a tensor with channels")
        self.layouts[node.name] = Layout(new_dim, lay.units)
        return None


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tied_modules(gm: fx.GraphModule) -> dict[str, str]:
    """Parametric layers that share a parameter object with another layer: target -> the other's name.

    Pruning rebuilds each layer with its own slices, which would untie them (and, as their units
    differ, cannot keep them tied), so such layers are barriers, like a module called twice.
    """
    owners: dict[int, list[str]] = {}
    for name, mod in gm.named_modules():
        if isinstance(mod, (nn.Linear, *ir.CONV_MODULES, *ir.BATCHNORM_MODULES, nn.LayerNorm, nn.GroupNorm)):
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), [])
                if name not in owners[id(p)]:
                    owners[id(p)].append(name)
    tied: dict[str, str] = {}
    for names in owners.values():
        for name in names:
            if len(names) > 1:
                tied.setdefault(name, next(n for n in names if n != name))
    return tied


@register
@dataclass(frozen=True)
class UnitGroupAnalysis(Analysis[UnitGraph]):
    """Find the removable units of a traced, shape-propagated GraphModule and group them.

    ``leaf_modules`` are kept opaque: units feeding them are pinned and their outputs are not
    removable.  ``prune_embed`` makes a transformer's residual stream one prunable group: the
    columns of ``nn.Embedding`` layers and the parameters added or concatenated to the stream
    (class token, positional embedding) are cut with it, and indexing a token (``x[:, 0]``) or
    expanding over the batch keeps the channels.  Without it, the stream is kept (see
    :func:`_pin_streams`).
    """

    name: ClassVar[str] = "unit-groups"
    leaf_modules: tuple[str, ...] = ()
    prune_embed: bool = False

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> UnitGraph:
        walker = _Walker(gm, frozenset(self.leaf_modules), self.prune_embed)
        walker.run()
        graph = _resolve(walker)
        log.info("unit groups: %d units in %d groups (%d prunable), %d barriers", graph.n_units,
                 len(graph.groups), sum(g.prunable for g in graph.groups), len(graph.barriers))
        return graph


def _resolve(w: _Walker) -> UnitGraph:
    """Turn source ids into units (union-find components) and producers into groups."""
    uf = w.uf
    n_src = len(uf.parent)
    roots = np.array([uf.find(s) for s in range(n_src)], dtype=np.int64)
    # Units are numbered by their smallest source id: deterministic, graph order.  A set of passive
    # sources joined to no layer's output (an embedding nothing adds to) is not a unit.
    uniq_roots = sorted({int(roots[s]) for s in range(n_src) if s not in w.passive})
    unit_of_root = {r: i for i, r in enumerate(uniq_roots)}
    src_unit = np.array([unit_of_root.get(r, -1) for r in roots.tolist()], dtype=np.int64)
    n_units = len(uniq_roots)

    def to_units(ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids), -1, dtype=np.int64)
        tracked = ids >= 0
        out[tracked] = src_unit[ids[tracked]]
        return out

    members: dict[int, list[tuple[str, int]]] = {u: [] for u in range(n_units)}
    for s, (target, ch) in sorted(w.producers.items()):
        if s not in w.passive:
            members[int(src_unit[s])].append((target, ch))

    # Groups: producers linked through a shared unit.
    prod_parent: dict[str, str] = {}

    def pfind(p: str) -> str:
        while prod_parent.setdefault(p, p) != p:
            p = prod_parent[p]
        return p

    for u in range(n_units):
        targets = [t for t, _ in members[u]]
        for t in targets[1:]:
            a, b = pfind(targets[0]), pfind(t)
            if a != b:
                prod_parent[b] = a
    order: list[str] = []
    for s in range(n_src):
        t = w.producers[s][0]
        if s not in w.passive and t not in order:
            order.append(t)
    group_units: dict[str, list[int]] = {}
    group_producers: dict[str, list[str]] = {}
    for t in order:
        group_producers.setdefault(pfind(t), []).append(t)
    for u in range(n_units):
        root = pfind(members[u][0][0])
        group_units.setdefault(root, []).append(u)
    groups: list[UnitGroup] = []
    unit_group = np.zeros(n_units, dtype=np.int64)
    for root in sorted(group_units, key=lambda r: order.index(group_producers[r][0])):
        prods = group_producers[root]
        gid = len(groups)
        name = prods[0] if len(prods) == 1 else f"{prods[0]} (+{len(prods) - 1} coupled)"
        g = UnitGroup(gid, name, prods, sorted(group_units[root]))
        for u in g.units:
            unit_group[u] = gid
        groups.append(g)
    for s, reason in sorted(uf.pin_reason.items()):
        u = int(src_unit[s])
        if u >= 0:
            groups[unit_group[u]].pinned.setdefault(u, reason)
    if not w.prune_embed:
        _pin_streams(groups, unit_group, members, [to_units(r) for r in w.norm_reads])

    for blocks_src, why in w.blocks:
        blocks = [to_units(b) for b in blocks_src]
        flat = np.concatenate(blocks)
        gids = {int(unit_group[u]) for u in flat.tolist() if u >= 0}
        if (flat < 0).any() or len(gids) != 1:
            for u in flat.tolist():
                if u >= 0:
                    groups[unit_group[u]].pinned.setdefault(u, f"{why}: equal counts per group cannot be kept")
            continue
        g = groups[gids.pop()]
        block_lists = [sorted(set(b.tolist())) for b in blocks]
        if sum(len(b) for b in block_lists) != len(set(flat.tolist())) or set(flat.tolist()) != set(g.units):
            for u in g.units:
                g.pinned.setdefault(u, f"{why}: blocks overlap or do not cover the group")
        elif g.blocks is None or g.blocks == block_lists:
            g.blocks = block_lists
        elif _refines(block_lists, g.blocks):
            g.blocks = block_lists
        elif not _refines(g.blocks, block_lists):
            for u in g.units:
                g.pinned.setdefault(u, f"{why}: conflicting equal-count constraints")

    layouts: dict[str, Layout | SplitLayout] = {}
    for name, lay in w.layouts.items():
        if isinstance(lay, Layout):
            layouts[name] = Layout(lay.dim, to_units(lay.units))
        elif isinstance(lay, SplitLayout):
            layouts[name] = SplitLayout(tuple(Layout(p.dim, to_units(p.units)) if p is not None else None
                                              for p in lay.pieces))
    layers = [_layer_cost(w.gm, node, kind, to_units(i), to_units(o)) for node, kind, i, o in w.layers]
    floors = [u for u in (_tracked(to_units(f)) for f in w.floors) if len(u)]
    # A cat input that is one whole group (an Inception branch) needs no floor: the group's own
    # minimum width keeps it, and a floor would fix which unit stays.
    for f in w.cat_floors:
        units = _tracked(to_units(f))
        if not len(units):
            continue
        gids = {int(unit_group[u]) for u in units.tolist()}
        if len(gids) > 1 or len(units) < groups[gids.pop()].size:
            floors.append(units)
    return UnitGraph(n_units, groups, unit_group, layouts, layers, w.barriers, members, floors)


def _tracked(units: np.ndarray) -> np.ndarray:
    return np.unique(units[units >= 0])


def _pin_streams(groups: list[UnitGroup], unit_group: np.ndarray, members: dict[int, list[tuple[str, int]]],
                 norm_reads: list[np.ndarray]) -> None:
    """Keep the residual stream unless asked: a group that a LayerNorm normalises and that several
    layers write into the same channels (residual adds).  Removing its channels touches every block,
    and a LayerNorm computes its statistics over fewer channels afterwards (not an exact removal)."""
    done: set[int] = set()
    for units in norm_reads:
        for gid in sorted({int(unit_group[u]) for u in units.tolist() if u >= 0} - done):
            done.add(gid)
            g = groups[gid]
            if any(len({t for t, _ in members[u]}) > 1 for u in g.units):
                for u in g.units:
                    g.pinned.setdefault(u, STREAM_REASON)


def _refines(fine: list[list[int]], coarse: list[list[int]]) -> bool:
    """True when equal counts in every ``fine`` block imply equal counts in every ``coarse`` one."""
    inside = []
    for c in coarse:
        members = set(c)
        n = [f for f in fine if set(f) <= members]
        if sum(len(f) for f in n) != len(c):
            return False
        inside.append(len(n))
    return len(set(inside)) == 1 and len({len(f) for f in fine}) == 1


def _layer_cost(gm: fx.GraphModule, node: fx.Node, kind: str, in_units: np.ndarray,
                out_units: np.ndarray) -> LayerCost:
    """MACs/params per (kept input x kept output) of one Linear/Conv layer."""
    mod = ir.get_module(gm, str(node.target))
    out_shape = ir.tensor_shape(node) or ()
    n_out = len(out_units)
    positions = ir.prod(out_shape) / max(n_out, 1)  # spatial positions (or tokens) x batch
    batch = out_shape[0] if out_shape else 1
    positions /= max(batch, 1)  # MACs are reported per sample
    bias = 1.0 if getattr(mod, "bias", None) is not None else 0.0
    if kind == "linear":
        return LayerCost(node.name, str(node.target), kind, in_units, out_units,
                         positions, 0.0, 1.0, bias)
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    k = float(ir.prod(mod.kernel_size))
    if kind == "conv":
        return LayerCost(node.name, str(node.target), kind, in_units, out_units,
                         positions * k, 0.0, k, bias)
    per_out_in = mod.in_channels / mod.groups if kind == "grouped" else 1.0
    return LayerCost(node.name, str(node.target), kind, in_units, out_units,
                     0.0, positions * k * per_out_in, 0.0, k * per_out_in + bias)


__all__ = ["OUTPUT_REASON", "STREAM_REASON", "UnitGroupAnalysis"]


def _runtime_size(node: fx.Node, dim: int) -> fx.Node | None:
    """The value a view/reshape/expand gives output dim ``dim`` when it is computed at run time (an
    fx value such as ``x.size(2)``; the surgery cannot rewrite it), else None."""
    if node.op == "call_module":
        return None  # nn.Flatten and the like: no sizes
    sizes, _ = ir.size_args(node)
    return sizes[dim] if dim < len(sizes) and isinstance(sizes[dim], fx.Node) else None

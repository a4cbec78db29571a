"""Run a network under many keep masks at once, without building pruned copies.

The MILP analyses judge plans by real forward passes (held-out acceptance, per-unit toggle
effects for the joint stage).  Building a pruned copy per plan (deep copy + prune transform) costs
milliseconds to seconds; here a plan is a row of a keep matrix instead, and the network runs once
on a batch that pairs every sample with every plan.

Semantics are the encoder's (:mod:`.encoder`): removing unit ``u`` gives the same outputs as
zeroing the positions of ``u`` where Linear/Conv layers read them, so the fx graph is interpreted
as is and those inputs are multiplied by the plan's mask.  A test checks that this equals the
physically pruned network.  Normalisations across channels see every channel, so a removed one
would change the statistics of the others: LayerNorm over the channel dimension and GroupNorm are
therefore run with masked statistics (mean and variance over each plan's kept channels only,
which is what the pruned layer computes).  Other normalisations across channels that see
removable units (InstanceNorm, LocalResponseNorm, ...) are refused with the node named; units that
are pinned (a softmax over channels pins its inputs) need nothing.  :meth:`MaskedNetwork.verify`
checks the equivalence numerically on a real plan before a stage relies on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from oamipc import ir
from oamipc.errors import UnsupportedGraphError
from oamipc.units import Layout, UnitGraph

CHUNK_ELEMENTS = 1 << 24  # input elements per forward call (bounds memory on big batches)
_CROSS_CHANNEL_MODULES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
                          torch.nn.LocalResponseNorm, torch.nn.Softmax, torch.nn.LogSoftmax)
_CROSS_CHANNEL_OPS = {"group_norm", "layer_norm", "instance_norm", "local_response_norm", "softmax", "log_softmax",
                      "normalize"}


class _Masked(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, reading: dict[str, Layout], masks: torch.Tensor,
                 means: dict[str, torch.Tensor] | None = None, norms: dict[str, Layout] | None = None) -> None:
        super().__init__(gm)
        self.reading = reading
        self.masks = masks  # (batch, n_units), float
        self.means = means or {}
        self.norms = norms or {}  # LayerNorm/GroupNorm node -> layout of its input (removable units)

    def channel_mask(self, lay: Layout, x: torch.Tensor) -> torch.Tensor:
        """Each row's keep mask over ``lay``'s channels (fixed channels kept), shaped to broadcast on ``x``."""
        units = torch.from_numpy(lay.units)
        scale = torch.ones(x.shape[0], len(units), dtype=x.dtype)
        tracked = units >= 0
        scale[:, tracked] = self.masks[:, units[tracked]].to(x.dtype)
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[lay.dim] = len(units)
        return scale.reshape(shape)

    def masked_norm(self, n: fx.Node, lay: Layout) -> torch.Tensor:
        """LayerNorm over the channel dim, or GroupNorm, with statistics over the kept channels only."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        mod = self.module.get_submodule(str(n.target))
        m = self.channel_mask(lay, x)
        if isinstance(mod, torch.nn.LayerNorm):
            count = m.sum(dim=-1, keepdim=True).clamp(min=1.0)
            mean = (x * m).sum(dim=-1, keepdim=True) / count
            var = (((x - mean) ** 2) * m).sum(dim=-1, keepdim=True) / count
            y = (x - mean) / torch.sqrt(var + mod.eps)
        else:
            assert isinstance(mod, torch.nn.GroupNorm)
            b, c = x.shape[0], x.shape[1]
            shape = (b, mod.num_groups, c // mod.num_groups, *x.shape[2:])
            xg, mg = x.reshape(shape), m.expand_as(x).reshape(shape)
            dims = tuple(range(2, xg.dim()))
            count = mg.sum(dim=dims, keepdim=True).clamp(min=1.0)
            mean = (xg * mg).sum(dim=dims, keepdim=True) / count
            var = (((xg - mean) ** 2) * mg).sum(dim=dims, keepdim=True) / count
            y = ((xg - mean) / torch.sqrt(var + mod.eps)).reshape(x.shape)
            if mod.affine:
                per_channel = [1, c] + [1] * (x.dim() - 2)
                return y * mod.weight.reshape(per_channel) + mod.bias.reshape(per_channel)
            return y
        if mod.weight is not None:
            y = y * mod.weight
        if mod.bias is not None:
            y = y + mod.bias
        return y

    def run_node(self, n: fx.Node) -> Any:
        norm = self.norms.get(n.name)
        if norm is not None:
            return self.masked_norm(n, norm)
        lay = self.reading.get(n.name)
        if lay is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        scale = self.channel_mask(lay, x)
        mu = self.means.get(n.name)
        masked = x * scale if mu is None else x * scale + mu.to(x.dtype) * (1 - scale)
        args = (masked, *args[1:])
        return getattr(self, n.op)(n.target, args, kwargs)


class MaskedNetwork:
    """``logits(x, keep)``: the network's first output for every (plan, sample) pair."""

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, means: dict[str, torch.Tensor] | None = None) -> None:
        self.gm = gm
        self.graph = graph
        self.means = means  # mean replacement at Linear readers (:mod:`.means`)
        self.reading: dict[str, Layout] = {}  # reading layer node -> layout of its input
        self.norms: dict[str, Layout] = {}  # LayerNorm/GroupNorm node -> layout of its input
        self.removable = np.zeros(graph.n_units, dtype=bool)
        for g in graph.groups:
            if g.prunable:
                self.removable[[u for u in g.units if u not in g.pinned]] = True
        readers = {layer.node for layer in graph.layers}
        for node in gm.graph.nodes:
            if node.name in readers:
                arg = node.args[0]
                lay = graph.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
                if isinstance(lay, Layout):
                    self.reading[node.name] = lay
            self._refuse_cross_channel(node)

    def _refuse_cross_channel(self, node: fx.Node) -> None:
        mod = ir.get_module(self.gm, str(node.target)) if node.op == "call_module" else None
        functional = mod is None and node.op in ("call_function", "call_method")
        if not (isinstance(mod, _CROSS_CHANNEL_MODULES) or (functional and ir.op_name(node) in _CROSS_CHANNEL_OPS)):
            return
        for arg in node.all_input_nodes:
            lay = self.graph.layouts.get(arg.name)
            if not isinstance(lay, Layout):
                continue
            units = lay.units[lay.units >= 0]
            if not self.removable[units].any():
                continue  # pinned channels never change
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and arg is node.args[0]:
                self.norms[node.name] = lay  # the unit analysis let it through: over the channel dim
                continue
            raise UnsupportedGraphError(
                f"the MILP analysis cannot handle {ir.where(node)}: it normalises across channels that can be "
                "removed, so a removed unit changes the others; use a solver-free --importance for this model")

    def verify(self, x: torch.Tensor, kept: np.ndarray, pruned: torch.nn.Module) -> None:
        """Raise unless the masked logits under ``kept`` equal ``pruned``'s (the physically pruned net)."""
        with torch.no_grad():
            want = pruned(x.float())
        while isinstance(want, (tuple, list)):
            want = want[0]
        got = self.logits(x, kept[None, :])[0]
        err = float((got - want.double()).abs().max()) if want.numel() else 0.0
        scale = 1.0 + float(want.double().abs().max()) if want.numel() else 1.0
        if err > 1e-3 * scale:
            raise UnsupportedGraphError(
                f"the MILP analysis's masked evaluation differs from the pruned network by {err:.3g}: this graph "
                "mixes removable channels in a way it does not model; use a solver-free --importance")

    def logits(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """Shape (plans, samples, classes) for ``keep`` of shape (plans, n_units), float64."""
        keep = np.atleast_2d(keep)
        n_plans, n = keep.shape[0], x.shape[0]
        per_plan = max(1, CHUNK_ELEMENTS // max(1, x[0].numel() * n))
        out = []
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad():
                for start in range(0, n_plans, per_plan):
                    block = torch.from_numpy(keep[start:start + per_plan].astype(np.float32))
                    p = block.shape[0]
                    xs = x.float().repeat(p, *[1] * (x.dim() - 1))
                    masks = block.repeat_interleave(n, dim=0)
                    y = _Masked(self.gm, self.reading, masks, self.means, self.norms).run(xs)
                    while isinstance(y, (tuple, list)):
                        y = y[0]
                    out.append(y.double().reshape(p, n, -1))
        finally:
            self.gm.train(was_training)
        return torch.cat(out)


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{c != y} z_c`` along the last dimension (any leading shape)."""
    idx = y.expand(*logits.shape[:-1]).unsqueeze(-1)
    true = logits.gather(-1, idx).squeeze(-1)
    other = logits.scatter(-1, idx, float("-inf"))
    return true - other.amax(-1)

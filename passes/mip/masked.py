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

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from oamipc import ir
from oamipc.errors import UnsupportedGraphError
from oamipc.units import Layout, UnitGraph

CHUNK_ELEMENTS = 1 << 24  # input elements per forward call (bounds memory on big batches)
#: Samples per call where a pass on the CPU runs the network over many samples (held-out judgements,
#: the analysis's logits): a batch this small keeps its activations near the caches, and LeNet-5's
#: 4,800 held-out samples ran about twice as fast in batches of 512 as in one of 4,096.  The outputs
#: were bitwise the same either way on the shipped examples (benchmarks/RESULTS.md, issue 15).
CPU_BATCH = 512


@dataclass
class FlipShare:
    """One task's share of the flip batches of an :meth:`MaskedNetwork.each_flip` call.

    Every task of a call walks the same batches in the same order (the whole call's batches, so
    their logits are the same as in one call) and runs only those :meth:`mine` gives it.  Each
    batch goes to the part with the least cost so far (ties to the lowest index), by ``costs``
    (one per unit of the call): the same rule in every task, so the parts are disjoint and cover
    every batch.  The assignment is made batch by batch, not layer by layer: where most flips start
    at one layer (ResNet-18's second plan: 41 flips, about all in one run of layers), cutting at
    layers left one task with nearly all of them.
    """

    index: int
    parts: int
    costs: Sequence[float]
    loads: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.loads = [0.0] * self.parts

    def mine(self, slots: Sequence[int]) -> bool:
        """Whether the batch of the call's ``slots`` is this task's (and book its cost)."""
        part = min(range(self.parts), key=lambda k: (self.loads[k], k))
        self.loads[part] += float(sum(self.costs[s] for s in slots))
        return part == self.index
_CROSS_CHANNEL_MODULES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
                          torch.nn.LocalResponseNorm, torch.nn.Softmax, torch.nn.LogSoftmax)
_CROSS_CHANNEL_OPS = {"group_norm", "layer_norm", "instance_norm", "local_response_norm", "softmax", "log_softmax",
                      "normalize"}


class _Masked(fx.Interpreter):
    """The fx graph, with every Linear/Conv input multiplied by its units' keep values.

    ``masks`` is ``(batch, n_units)``, one row per batch row (plan x sample pairs); any float
    dtype and device.  Fractional or gradient-carrying masks are allowed: the screen of
    :meth:`MaskedNetwork.margin_gradients` differentiates through them.
    """

    def __init__(self, gm: fx.GraphModule, reading: dict[str, Layout], masks: torch.Tensor,
                 means: dict[str, torch.Tensor] | None = None, norms: dict[str, Layout] | None = None) -> None:
        super().__init__(gm)
        self.reading = reading
        self.masks = masks  # (batch, n_units), float
        self.means = means or {}
        self.norms = norms or {}  # LayerNorm/GroupNorm node -> layout of its input (removable units)
        # column n_units is a constant 1: untracked positions (units < 0) read it
        self.padded = torch.cat([masks, masks.new_ones(masks.shape[0], 1)], dim=1)
        self._index: dict[str, torch.Tensor] = {}

    def channel_mask(self, name: str, lay: Layout, x: torch.Tensor) -> torch.Tensor:
        """Each row's keep values over ``lay``'s channels (fixed channels kept), shaped to broadcast on ``x``."""
        index = self._index.get(name)
        if index is None:
            units = torch.from_numpy(lay.units).long()
            index = torch.where(units >= 0, units, self.masks.shape[1]).to(self.padded.device)
            self._index[name] = index
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[lay.dim] = len(index)
        return self.padded[:, index].to(x.dtype).reshape(shape)

    def masked_norm(self, n: fx.Node, lay: Layout) -> torch.Tensor:
        """LayerNorm over the channel dim, or GroupNorm, with statistics over the kept channels only."""
        args, _ = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        mod = self.module.get_submodule(str(n.target))
        m = self.channel_mask(n.name, lay, x)
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
        scale = self.channel_mask(n.name, lay, x)
        mu = self.means.get(n.name)
        masked = x * scale if mu is None else x * scale + mu.to(x.dtype) * (1 - scale)
        args = (masked, *args[1:])
        return getattr(self, n.op)(n.target, args, kwargs)

    def run_from(self, start: int, env: dict[fx.Node, Any], x: torch.Tensor | None = None) -> Any:
        """Run the graph's nodes from position ``start`` on, with ``env`` holding every earlier
        value they read (a prefix computed elsewhere); ``x`` feeds the placeholder when ``start``
        is 0.  Values are freed after their last use, as :meth:`run` does."""
        self.env = env
        self.args_iter = iter(() if x is None else (x,))
        for node in list(self.graph.nodes)[start:]:
            self.env[node] = self.run_node(node)
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]
            if node.op == "output":
                return self.env[node]
        raise AssertionError("the graph has no output node")


def _batched_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values carry the sample dimension first (they depend on the input)."""
    batched: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in batched for a in node.all_input_nodes):
            batched.add(node)
    return batched


class MaskedNetwork:
    """``logits(x, keep)``: the network's first output for every (plan, sample) pair.

    ``device`` (``cpu`` | ``cuda`` | ``cuda:N``) is where every forward pass runs; results come
    back as float64 CPU tensors, so callers do not depend on it.  On the CPU the graph module
    itself is run; elsewhere a copy of it.
    """

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, means: dict[str, torch.Tensor] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.gm = gm
        self.graph = graph
        self.means = means  # mean replacement at Linear readers (:mod:`.means`)
        self.device = torch.device(device)
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
        self.run_gm = gm if self.device.type == "cpu" else copy.deepcopy(gm).to(self.device)
        self.run_means = {k: v.to(self.device) for k, v in (means or {}).items()} or None
        # inputs and keep values in the network's own precision (float32 unless it was converted)
        self.dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
        nodes = list(self.run_gm.graph.nodes)
        # where a flip of each unit first changes anything: its first reader (len(nodes): nowhere)
        self.first_reader = np.full(graph.n_units, len(nodes), dtype=np.int64)
        for i, node in enumerate(nodes):  # a masked normalisation is where a flip first shows, too
            lay = self.reading.get(node.name) or self.norms.get(node.name)
            if lay is not None:
                u = lay.units[lay.units >= 0]
                self.first_reader[u] = np.minimum(self.first_reader[u], i)
        self.batched = _batched_nodes(self.run_gm)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the graph's nodes (a Ray worker rebuilds them from the GraphModule)."""
        state = self.__dict__.copy()
        del state["batched"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.batched = _batched_nodes(self.run_gm)

    def flip_costs(self, current: np.ndarray) -> np.ndarray:
        """Each unit's cost in :meth:`flip_logits`: the MACs (at ``current``) of the Linear/Conv
        layers from its first reader on, as a fraction of the whole network's; (n_units,).
        A machine-independent measure of work, so a budget of it gives the same choice anywhere."""
        position = {node.name: i for i, node in enumerate(self.run_gm.graph.nodes)}
        layers = sorted((position.get(layer.node, 0), layer.macs(current)) for layer in self.graph.layers)
        total = sum(m for _, m in layers) or 1.0
        suffix = {start: sum(m for pos, m in layers if pos >= start) / total
                  for start in np.unique(self.first_reader).tolist()}
        return np.array([suffix[int(s)] for s in self.first_reader])

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

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The network in eval mode (each sample on its own), its parameters out of autograd."""
        was_training = self.run_gm.training
        grads = [(p, p.requires_grad) for p in self.run_gm.parameters()]
        self.run_gm.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield
        finally:
            self.run_gm.train(was_training)
            for p, flag in grads:
                p.requires_grad_(flag)

    def _run(self, masks: torch.Tensor, x: torch.Tensor | None = None, start: int = 0,
             env: dict[fx.Node, Any] | None = None) -> torch.Tensor:
        interp = _Masked(self.run_gm, self.reading, masks, self.run_means, self.norms)
        return ir.first_output(interp.run_from(start, {} if env is None else env, x))

    def logits(self, x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
        """Shape (plans, samples, classes) for ``keep`` of shape (plans, n_units), float64 on the CPU."""
        keep = np.atleast_2d(keep)
        n_plans, n = keep.shape[0], x.shape[0]
        per_plan = max(1, CHUNK_ELEMENTS // max(1, x[0].numel() * n))
        out = []
        xd = x.to(self.device, self.dtype)
        with self._evaluating(), torch.no_grad():
            for start in range(0, n_plans, per_plan):
                block = torch.from_numpy(keep[start:start + per_plan]).to(self.device, self.dtype)
                p = block.shape[0]
                xs = xd.repeat(p, *[1] * (x.dim() - 1))
                masks = block.repeat_interleave(n, dim=0)
                out.append(self._run(masks, xs).double().reshape(p, n, -1).cpu())
        return torch.cat(out)

    def flip_logits(self, x: torch.Tensor, current: np.ndarray, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at ``current`` (samples, classes) and the change of them when each of ``units``
        is flipped alone (kept <-> removed): (len(units), samples, classes), float64 on the CPU.
        Equal to :meth:`logits` on the flipped plans minus the current one (see :meth:`each_flip`)."""
        out: list[torch.Tensor | None] = [None] * len(units)

        def keep(block: torch.Tensor, slots: list[int]) -> None:
            for j, slot in enumerate(slots):
                out[slot] = block[j]

        z0 = self.each_flip(x, current, units, keep)
        assert z0 is not None
        d = torch.stack([z0 if o is None else o for o in out]) - z0 if units else z0.new_zeros(0, *z0.shape)
        return z0, d

    def each_flip(self, x: torch.Tensor, current: np.ndarray, units: list[int],
                  take: Callable[[torch.Tensor, list[int]], None], stop: Callable[[], bool] | None = None,
                  share: FlipShare | None = None) -> torch.Tensor | None:
        """Run the network with each of ``units`` flipped alone; return the logits at ``current``.

        ``take(block, slots)`` receives the logits of a batch of flips, (len(slots), samples,
        classes) float64 on the CPU, ``slots`` their positions in ``units``; a unit no layer reads
        changes nothing and is handed over with the current logits.  ``stop()`` is asked between
        batches: when it says so, the remaining flips are not run (the caller sees which slots it
        got).  A flip changes the network only from its unit's first reading layer on, so the
        pass at ``current`` is run once and kept at each such layer, and every flip runs only the
        rest of the network from there (many flips in one batch).  Where a value held across
        that point does not carry the samples first (a shape read off the input, say), those
        flips run the whole network.  With ``share`` only that share's batches are run, the pass at
        ``current`` stops after the last layer a flip starts at, and nothing is returned (a Ray task
        measuring a share of the flips, :mod:`.joint`): the flips' batches are the same as in a whole
        call, so are their logits.
        """
        n = x.shape[0]
        base = torch.from_numpy(current).to(self.device, self.dtype)
        xd = x.to(self.device, self.dtype)
        nodes = list(self.run_gm.graph.nodes)
        by_start: dict[int, list[int]] = {}
        for i, u in enumerate(units):
            by_start.setdefault(int(self.first_reader[u]), []).append(i)
        last = max(by_start, default=-1)
        z0: torch.Tensor | None = None
        with self._evaluating(), torch.no_grad():
            interp = _Masked(self.run_gm, self.reading, base.expand(n, -1), self.run_means, self.norms)
            interp.env, interp.args_iter = {}, iter((xd,))
            for i, node in enumerate(nodes):
                if i in by_start:
                    self._flips_from(i, interp.env, xd, base, [units[j] for j in by_start[i]], by_start[i], take,
                                     stop, share)
                if share is not None and i >= last:
                    return None
                interp.env[node] = interp.run_node(node)
                for dead in interp.user_to_last_uses.get(node, []):
                    del interp.env[dead]
                if node.op == "output":
                    z0 = ir.first_output(interp.env[node]).double().cpu()
                    break
        assert z0 is not None
        unread = by_start.get(len(nodes), [])
        if unread:
            take(z0.expand(len(unread), *z0.shape), unread)
        return z0

    def _flips_from(self, start: int, env: dict[fx.Node, Any], x: torch.Tensor, base: torch.Tensor,
                    units: list[int], slots: list[int], take: Callable[[torch.Tensor, list[int]], None],
                    stop: Callable[[], bool] | None, share: FlipShare | None = None) -> None:
        """Run each flip of ``units`` from node ``start`` on, with ``env`` the base pass's live values
        (only the batches of ``share``, when given)."""
        n = x.shape[0]
        live = {node: v for node, v in env.items() if node in self.batched}
        resumable = all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n for v in live.values())
        if not resumable:
            start, live = 0, {}
        per_sample = max([x[0].numel()] + [v[0].numel() for v in live.values()])
        per_plan = max(1, CHUNK_ELEMENTS // max(1, per_sample * n))
        for lo in range(0, len(units), per_plan):
            if stop is not None and stop():
                return
            chunk = units[lo:lo + per_plan]
            p = len(chunk)
            if share is not None and not share.mine(slots[lo:lo + p]):
                continue
            masks = base.repeat(p * n, 1)
            for j, u in enumerate(chunk):
                masks[j * n:(j + 1) * n, u] = 1.0 - base[u]
            if start == 0:
                y = self._run(masks, x.repeat(p, *[1] * (x.dim() - 1)))
            else:
                run_env = {node: (v.repeat(p, *[1] * (v.dim() - 1)) if node in live else v) for node, v in env.items()}
                y = self._run(masks, start=start, env=run_env)
            take(y.double().reshape(p, n, -1).cpu(), slots[lo:lo + p])

    def margin_gradients(self, x: torch.Tensor, current: np.ndarray, y: torch.Tensor,
                         rivals: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``z`` at ``current`` (samples, classes), each sample's ``rivals`` strongest other
        classes ``c`` (samples, rivals) and ``g[k, r, u]``: the derivative of ``z_y - z_c``
        (``c = c[k, r]``) of sample ``k`` with respect to unit ``u``'s keep value, at ``current``:
        (samples, rivals, n_units).  All float64 (classes int64) on the CPU.

        Each sample gets its own row of keep values, so one backward pass per rival rank gives
        every sample's gradient (in eval mode a sample's output depends on its own row only).
        A flip's first-order effect on that margin is ``g * (1 - 2 current[u])``.  Samples go in
        chunks that bound the memory autograd holds.
        """
        n = x.shape[0]
        per = max(1, (CHUNK_ELEMENTS // 16) // max(1, x[0].numel()))
        base = torch.from_numpy(current).to(self.device, self.dtype)
        out = torch.zeros(n, rivals, len(current), dtype=torch.float64)
        logits, classes = [], []
        with self._evaluating(), torch.enable_grad():
            for lo in range(0, n, per):
                xs = x[lo:lo + per].to(self.device, self.dtype)
                masks = base.repeat(len(xs), 1).requires_grad_(True)
                z = self._run(masks, xs)
                yk = y[lo:lo + per, None].to(self.device)
                zd = z.detach().double()
                top = torch.argsort(zd.scatter(1, yk, float("-inf")), dim=1, descending=True, stable=True)[:, :rivals]
                zy = z.gather(1, yk)[:, 0]
                for r in range(top.shape[1]):
                    zc = z.gather(1, top[:, r:r + 1])[:, 0]
                    (g,) = torch.autograd.grad((zy - zc).sum(), masks, retain_graph=r + 1 < top.shape[1])
                    out[lo:lo + per, r] = g.double().cpu()
                logits.append(zd.cpu())
                classes.append(top.cpu())
        return torch.cat(logits), torch.cat(classes), out[:, :classes[0].shape[1]] if classes else out


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{c != y} z_c`` along the last dimension (any leading shape)."""
    idx = y.expand(*logits.shape[:-1]).unsqueeze(-1)
    true = logits.gather(-1, idx).squeeze(-1)
    other = logits.scatter(-1, idx, float("-inf"))
    return true - other.amax(-1)

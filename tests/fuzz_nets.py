"""Random small networks for property-based tests: a spec language, its module, and an oracle model.

A network is a :class:`NetSpec`: an input shape and a list of :class:`OpSpec` in SSA form (each op
reads earlier values by index and appends its outputs to the value list).  :class:`FuzzNet` runs a
spec as an ``nn.Module`` whose forward is a plain loop over the ops, so ``torch.fx`` unrolls it into
the graph the spec describes; every layer is a real ``nn.Linear``/``nn.Conv*``/``nn.BatchNorm*``
under ``layers.op<i>`` (``layers.op<i>_fc1``/``_fc2`` for a squeeze-excitation gate).

The vocabulary is what the unit analysis claims to support: Linear; Conv1d/Conv2d with random
kernel, stride, padding (and padding mode), dilation and groups (depthwise with a channel
multiplier, grouped); BatchNorm1d/2d with random eval statistics and per-channel GroupNorm;
activations as modules (some in place), functions and tensor methods; max/avg/adaptive pooling;
residual ``+``/``-``/``*``/``maximum`` between same-shaped values (which couples their units);
``cat`` along the channel dim (also of a value with itself or with the network input) and along a
spatial dim (which couples like an add); two branches concatenated into a residual add (one group
fed by two producers); ``chunk``/``split``; ``unsqueeze`` from features to a
1-D signal; flatten in eight spellings, three of which hard-code a width; conv and
squeeze-excitation sigmoid gates (the SE view hard-codes the channel count); barriers the
analysis cannot see through (channel roll, softmax over channels, flip, channel permutation by
indexing); a Linear head, sometimes with a second, intermediate output.  Every activation maps 0
to 0 and sigmoid appears only inside a gate that multiplies, so a unit whose producers output
exactly 0 contributes nothing downstream: that is the exact oracle of pruning (see :func:`zeroed_oracle`).

:func:`expected_units` is an independent model of the unit analysis on this vocabulary (written
from the spec, not from the graph): which producer channels are coupled, which must be kept, and
the width of every layer under a plan.  Strategies: :func:`net_specs` (networks) and
:func:`plans` (random keep masks of a unit graph that respect pinned units, equal-count blocks,
split and cat floors and min-keep 1).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from oamipc.units import UnitGraph

__all__ = ["ExpectedUnits", "FuzzNet", "NetSpec", "OpSpec", "build", "expected_units", "inputs_for",
           "net_specs", "plans", "zeroed_oracle"]

Shape = tuple[int, ...]  # per-sample shape: (C,), (C, L) or (C, H, W)

# Activations with f(0) == 0: module factory, functional spelling (None: module only).
_ACTS: dict[str, tuple[Callable[[bool], nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "relu": (lambda inplace: nn.ReLU(inplace=inplace), F.relu),
    "relu6": (lambda inplace: nn.ReLU6(inplace=inplace), F.relu6),
    "leaky_relu": (lambda inplace: nn.LeakyReLU(0.1, inplace=inplace), lambda x: F.leaky_relu(x, 0.1)),
    "tanh": (lambda inplace: nn.Tanh(), torch.tanh),
    "gelu": (lambda inplace: nn.GELU(), F.gelu),
    "silu": (lambda inplace: nn.SiLU(inplace=inplace), F.silu),
    "hardswish": (lambda inplace: nn.Hardswish(inplace=inplace), F.hardswish),
    "elu": (lambda inplace: nn.ELU(inplace=inplace), F.elu),
    "mish": (lambda inplace: nn.Mish(), F.mish),
    "hardtanh": (lambda inplace: nn.Hardtanh(inplace=inplace), F.hardtanh),
    "selu": (lambda inplace: nn.SELU(), F.selu),
    "identity": (lambda inplace: nn.Identity(), None),
    "dropout": (lambda inplace: nn.Dropout(0.3), None),
}
_INPLACE_OK = {"relu", "relu6", "leaky_relu", "silu", "hardswish", "elu", "hardtanh"}
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "torch.add": torch.add,
    "torch.mul": torch.mul, "maximum": torch.maximum,
}


@dataclass(frozen=True)
class OpSpec:
    """One op: ``kind``, the value indices it reads, its parameters (sorted key/value pairs)."""

    kind: str
    inputs: tuple[int, ...]
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.kind}({', '.join(f'v{i}' for i in self.inputs)}{'; ' if args else ''}{args})"


@dataclass(frozen=True)
class NetSpec:
    """A network: per-sample input shape, ops, output value indices, weight seed."""

    input_shape: Shape
    ops: tuple[OpSpec, ...]
    outputs: tuple[int, ...]
    seed: int = 0

    @property
    def rank(self) -> int:
        return len(self.input_shape) - 1  # spatial dims of the input (0: feature vectors)

    def __repr__(self) -> str:
        lines = [f"NetSpec(input {self.input_shape}, seed {self.seed})"]
        value = 1
        for i, op in enumerate(self.ops):
            n = op_value_count(op)
            lines.append(f"  op{i}: {', '.join(f'v{value + k}' for k in range(n))} = {op!r}")
            value += n
        lines.append(f"  return {', '.join(f'v{i}' for i in self.outputs)}")
        return "\n".join(lines)


def _op(kind: str, inputs: Sequence[int], **params: Any) -> OpSpec:
    return OpSpec(kind, tuple(inputs), tuple(sorted(params.items())))


def op_value_count(op: OpSpec) -> int:
    """How many values an op appends (split pieces; 1 for everything else)."""
    return len(op.get("sizes")) if op.kind == "split" else 1


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def _conv_cls(rank: int) -> type[nn.Conv1d | nn.Conv2d]:
    return nn.Conv1d if rank == 1 else nn.Conv2d


def _bn_cls(rank: int) -> type[nn.BatchNorm1d | nn.BatchNorm2d]:
    return nn.BatchNorm2d if rank == 2 else nn.BatchNorm1d


class FuzzNet(nn.Module):
    """Runs a :class:`NetSpec`; traceable by torch.fx (the op loop runs on Python data)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        shapes = value_shapes(spec)
        self.dims = [len(s) + 1 for s in shapes]  # tensor rank of every value (batch included)
        for i, op in enumerate(spec.ops):
            self._make_modules(i, op, [shapes[j] for j in op.inputs])

    def _make_modules(self, i: int, op: OpSpec, in_shapes: list[Shape]) -> None:
        name, c = f"op{i}", in_shapes[0][0]
        rank = len(in_shapes[0]) - 1
        if op.kind == "conv":
            self.layers[name] = _conv_cls(rank)(
                c, op.get("cout"), op.get("k"), stride=op.get("stride"), padding=op.get("padding"),
                dilation=op.get("dilation"), groups=op.get("groups"), bias=op.get("bias"),
                padding_mode=op.get("padding_mode"))
        elif op.kind == "linear":
            self.layers[name] = nn.Linear(c, op.get("fout"), bias=op.get("bias"))
        elif op.kind == "bn":
            self.layers[name] = _bn_cls(rank)(c, eps=op.get("eps"), affine=op.get("affine"))
        elif op.kind == "gn":  # one group per channel: channels stay independent
            self.layers[name] = nn.GroupNorm(c, c, affine=op.get("affine"))
        elif op.kind == "act" and op.get("spelling") == "module":
            self.layers[name] = _ACTS[op.get("fn")][0](op.get("inplace"))
        elif op.kind == "pool" and op.get("spelling") == "module":
            self.layers[name] = _pool_module(op, rank)
        elif op.kind == "flatten" and op.get("spelling") == "module":
            self.layers[name] = nn.Flatten()
        elif op.kind == "gate" and op.get("how") == "conv":
            self.layers[name] = _conv_cls(rank)(c, op.get("cout"), 1)
        elif op.kind == "gate":  # squeeze-excitation
            self.layers[name + "_fc1"] = nn.Linear(c, op.get("hidden"))
            self.layers[name + "_fc2"] = nn.Linear(op.get("hidden"), c)
        elif op.kind == "head":
            self.layers[name] = nn.Linear(c, op.get("fout"))

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for i, op in enumerate(self.spec.ops):
            out = self._run(i, op, [values[j] for j in op.inputs], self.dims[op.inputs[0]])
            if op.kind == "split":  # index the pieces: a traced split is one proxy, not a tuple
                values.extend(out[k] for k in range(op_value_count(op)))
            else:
                values.append(out)
        if len(self.spec.outputs) == 1:
            return values[self.spec.outputs[0]]
        return tuple(values[j] for j in self.spec.outputs)

    def _run(self, i: int, op: OpSpec, args: list[torch.Tensor], dim: int) -> Any:
        name, x = f"op{i}", args[0]
        kind, spelling = op.kind, op.get("spelling")
        if kind in ("conv", "linear", "bn", "gn", "head"):
            return self.layers[name](x)
        if kind == "unsqueeze":
            return x.unsqueeze(-1)
        if kind == "act":
            if spelling == "module":
                return self.layers[name](x)
            if spelling == "method":
                return x.relu()
            fn = _ACTS[op.get("fn")][1]
            assert fn is not None
            return fn(x)
        if kind == "pool":
            return self.layers[name](x) if spelling == "module" else _pool_function(op, x, dim - 2)
        if kind == "binary":
            return _BINARY[op.get("op")](x, args[1])
        if kind == "scale":
            return x * op.get("factor")
        if kind == "cat":
            return (torch.cat if op.get("fn") == "cat" else torch.concat)(args, dim=op.get("dim"))
        if kind == "cat_spatial":  # along the first spatial dim: channel i of every input is one channel
            return torch.cat(args, dim=2)
        if kind == "split":
            if spelling == "chunk":
                return x.chunk(op.get("chunks"), dim=1)
            if spelling == "split_int":
                return x.split(op.get("size"), dim=1)
            return torch.split(x, list(op.get("sizes")), dim=1)
        if kind == "flatten":
            return _flatten(self, name, op, x, dim)
        if kind == "gate":
            return _gate(self, name, op, x, dim)
        if kind == "barrier":
            return _barrier(op, x)
        raise AssertionError(f"unknown op kind {kind}")


def _pool_module(op: OpSpec, rank: int) -> nn.Module:
    how = op.get("how")
    if how == "max":
        return (nn.MaxPool1d if rank == 1 else nn.MaxPool2d)(op.get("k"), op.get("stride"), op.get("padding"))
    if how == "avg":
        return (nn.AvgPool1d if rank == 1 else nn.AvgPool2d)(op.get("k"), op.get("stride"), op.get("padding"))
    if how == "adaptive_avg":
        return (nn.AdaptiveAvgPool1d if rank == 1 else nn.AdaptiveAvgPool2d)(op.get("out"))
    return (nn.AdaptiveMaxPool1d if rank == 1 else nn.AdaptiveMaxPool2d)(op.get("out"))


def _pool_function(op: OpSpec, x: torch.Tensor, rank: int) -> torch.Tensor:
    how = op.get("how")
    if how == "max":
        return (F.max_pool1d if rank == 1 else F.max_pool2d)(x, op.get("k"), op.get("stride"), op.get("padding"))
    if how == "avg":
        return (F.avg_pool1d if rank == 1 else F.avg_pool2d)(x, op.get("k"), op.get("stride"), op.get("padding"))
    if how == "adaptive_avg":
        return (F.adaptive_avg_pool1d if rank == 1 else F.adaptive_avg_pool2d)(x, op.get("out"))
    return (F.adaptive_max_pool1d if rank == 1 else F.adaptive_max_pool2d)(x, op.get("out"))


def _flatten(net: FuzzNet, name: str, op: OpSpec, x: torch.Tensor, dim: int) -> torch.Tensor:
    spelling, width = op.get("spelling"), op.get("width")
    if spelling == "module":
        return net.layers[name](x)
    if spelling == "torch":
        return torch.flatten(x, 1)
    if spelling == "view_size":
        return x.view(x.size(0), -1)
    if spelling == "view_const":  # the flattened width baked into the graph
        return x.view(-1, width)
    if spelling == "reshape_const":
        return x.reshape(x.size(0), width)
    if spelling == "view_keep":  # (N, C, ...) -> (N, C, positions) with C baked in, then a mean
        return x.view(x.size(0), op.get("channels"), -1).mean(2)
    dims = tuple(range(2, dim))
    return x.mean(dims) if spelling == "mean" else x.amax(dims)


def _gate(net: FuzzNet, name: str, op: OpSpec, x: torch.Tensor, dim: int) -> torch.Tensor:
    if op.get("how") == "conv":
        return x * torch.sigmoid(net.layers[name](x))
    c = op.get("channels")
    s = x.mean(tuple(range(2, dim))) if dim > 2 else x
    s = torch.sigmoid(net.layers[name + "_fc2"](F.relu(net.layers[name + "_fc1"](s))))
    if dim > 2:
        ones = [1] * (dim - 2)
        s = s.view(-1, c, *ones) if op.get("view") == "view" else s.reshape(x.size(0), c, *ones)
    return x * s


def _barrier(op: OpSpec, x: torch.Tensor) -> torch.Tensor:
    how = op.get("how")
    if how == "roll":
        return torch.roll(x, 1, 1)
    if how == "softmax":
        return F.softmax(x, dim=1)
    if how == "flip":
        return torch.flip(x, [1])
    return x[:, list(op.get("perm"))]


def value_shapes(spec: NetSpec) -> list[Shape]:
    """Per-sample shape of every value (value 0 is the input)."""
    shapes: list[Shape] = [spec.input_shape]
    for op in spec.ops:
        shapes.extend(_out_shapes(op, [shapes[j] for j in op.inputs]))
    return shapes


def _conv_out(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _out_shapes(op: OpSpec, ins: list[Shape]) -> list[Shape]:
    s = ins[0]
    kind = op.kind
    if kind == "conv":
        return [(op.get("cout"), *(_conv_out(d, op.get("k"), op.get("stride"), op.get("padding"),
                                             op.get("dilation")) for d in s[1:]))]
    if kind in ("linear", "head"):
        return [(op.get("fout"),)]
    if kind == "pool":
        if op.get("how") in ("max", "avg"):
            return [(s[0], *(_conv_out(d, op.get("k"), op.get("stride"), op.get("padding"), 1) for d in s[1:]))]
        return [(s[0], *([op.get("out")] * (len(s) - 1)))]
    if kind == "cat":
        return [(sum(i[0] for i in ins), *s[1:])]
    if kind == "cat_spatial":
        return [(s[0], sum(i[1] for i in ins), *s[2:])]
    if kind == "unsqueeze":
        return [(*s, 1)]
    if kind == "split":
        return [(n, *s[1:]) for n in op.get("sizes")]
    if kind == "flatten":
        return [(math.prod(s),)] if op.get("spelling") not in ("mean", "amax", "view_keep") else [(s[0],)]
    return [s]  # act, bn, binary, scale, gate, barrier keep the shape


# --------------------------------------------------------------------------------------------
# Building and inputs
# --------------------------------------------------------------------------------------------


def build(spec: NetSpec) -> FuzzNet:
    """The module of ``spec`` in eval mode, weights and BatchNorm statistics drawn from ``spec.seed``.

    BatchNorm gets affine parameters and running statistics away from the identity (a fresh
    BatchNorm is the identity in eval mode, which would hide a mistake in pruning it).  Leaves
    torch's global random state as it found it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = FuzzNet(spec)
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    if mod.affine:
                        mod.weight.uniform_(0.5, 1.5)
                        mod.bias.uniform_(-0.5, 0.5)
    return net.eval()


def inputs_for(spec: NetSpec, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """A standard-normal input batch for ``spec``."""
    return torch.randn((batch, *spec.input_shape), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# The independent model of the unit analysis
# --------------------------------------------------------------------------------------------


@dataclass
class ExpectedUnits:
    """What the unit analysis must find, derived from the spec alone.

    Sources are the output channels of Linear layers and of convolutions that are not depthwise,
    as ``(module target, channel)``.  ``parent`` is a union-find over them (coupled channels);
    ``pinned`` the sources that must be kept (they reach an output, feed a grouped conv, a
    barrier, a broadcast, or share a position with a channel of the network input).
    ``provenance`` gives, per value, the source behind each channel index (-1: none), and
    ``modules`` per layer target: its kind, the provenance of its input and output channels, its
    output positions per sample and its settings, to predict widths, parameters and MACs.
    """

    sources: list[tuple[str, int]] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)
    provenance: list[np.ndarray] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def new(self, target: str, n: int) -> np.ndarray:
        start = len(self.sources)
        self.sources.extend((target, c) for c in range(n))
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def pin(self, ids: np.ndarray) -> None:
        self.pinned.update(int(i) for i in ids if i >= 0)

    def partition(self) -> set[frozenset[tuple[str, int]]]:
        """The coupled source sets, by (target, channel)."""
        classes: dict[int, set[tuple[str, int]]] = {}
        for s, src in enumerate(self.sources):
            classes.setdefault(self.find(s), set()).add(src)
        return {frozenset(c) for c in classes.values()}

    def pinned_classes(self) -> set[frozenset[tuple[str, int]]]:
        roots = {self.find(s) for s in self.pinned}
        return {frozenset(src for s, src in enumerate(self.sources) if self.find(s) == r) for r in roots}

    def kept_sources(self, removed: set[tuple[str, int]]) -> np.ndarray:
        """Per source: kept, when ``removed`` lists removed (target, channel) pairs."""
        removed_roots = {self.find(self.sources.index(r)) for r in removed}
        return np.array([self.find(s) not in removed_roots for s in range(len(self.sources))], dtype=bool)

    def widths(self, kept: np.ndarray) -> dict[str, dict[str, int]]:
        """Expected in/out width (and groups) of every layer when sources ``kept`` survive."""

        def count(prov: np.ndarray) -> int:
            return int(sum(1 for s in prov.tolist() if s < 0 or kept[s]))

        out: dict[str, dict[str, int]] = {}
        for target, m in self.modules.items():
            n_in, n_out = count(m["in"]), count(m["out"])
            groups = m.get("groups", 1)
            if m["kind"] == "depthwise":
                groups = n_in
            elif m["kind"] == "grouped":
                n_in = len(m["in"])
            out[target] = {"in": n_in, "out": n_out, "groups": groups}
        return out

    def costs(self, kept: np.ndarray) -> tuple[int, int]:
        """(MACs per sample, parameters) of the network when sources ``kept`` survive."""
        macs = params = 0
        for target, w in self.widths(kept).items():
            m = self.modules[target]
            if m["kind"] in ("bn", "gn"):
                params += 2 * w["out"] if m["affine"] else 0
                continue
            per_out = (w["in"] // w["groups"]) * m["kernel"]
            macs += m["positions"] * w["out"] * per_out
            params += w["out"] * per_out + (w["out"] if m["bias"] else 0)
        return macs, params


def expected_units(spec: NetSpec) -> ExpectedUnits:
    """Walk the spec and predict the unit analysis's result (see :class:`ExpectedUnits`)."""
    e = ExpectedUnits()
    shapes = value_shapes(spec)
    e.provenance.append(np.full(spec.input_shape[0], -1, dtype=np.int64))
    value = 1
    for i, op in enumerate(spec.ops):
        target = f"layers.op{i}"
        ins = [e.provenance[j] for j in op.inputs]
        outs = _expect_op(e, op, target, ins, shapes[op.inputs[0]], shapes[value])
        e.provenance.extend(outs)
        value += len(outs)
    for j in spec.outputs:
        e.pin(e.provenance[j])
    return e


def _expect_op(e: ExpectedUnits, op: OpSpec, target: str, ins: list[np.ndarray], in_shape: Shape,
               out_shape: Shape) -> list[np.ndarray]:
    x = ins[0]
    kind = op.kind
    positions = math.prod(out_shape[1:])
    if kind in ("linear", "head"):
        out = e.new(target, op.get("fout"))
        e.modules[target] = {"kind": "linear", "in": x, "out": out, "positions": 1, "kernel": 1, "bias":
                             op.get("bias", True)}
        return [out]
    if kind == "conv":
        cin, cout, groups = in_shape[0], op.get("cout"), op.get("groups")
        kernel = op.get("k") ** (len(in_shape) - 1)
        if groups == 1:
            out, mkind = e.new(target, cout), "conv"
        elif groups == cin:  # depthwise (cin > 1): output o is input o // multiplier's unit
            out, mkind = np.repeat(x, cout // cin), "depthwise"
        else:
            e.pin(x)
            out, mkind = e.new(target, cout), "grouped"
        e.modules[target] = {"kind": mkind, "in": x, "out": out, "positions": positions, "kernel": kernel,
                             "bias": op.get("bias"), "groups": groups}
        return [out]
    if kind in ("bn", "gn"):
        e.modules[target] = {"kind": kind, "in": x, "out": x, "affine": op.get("affine")}
        return [x]
    if kind in ("act", "pool", "scale", "unsqueeze"):
        return [x]
    if kind == "cat_spatial":
        return [_expect_binary(e, ins)]
    if kind == "binary":
        return [_expect_binary(e, ins)]
    if kind == "cat":
        return [np.concatenate(ins)]
    if kind == "split":
        pieces, start = [], 0
        for n in op.get("sizes"):
            pieces.append(x[start:start + n])
            start += n
        return pieces
    if kind == "flatten":
        spatial = math.prod(in_shape[1:])
        return [x if op.get("spelling") in ("mean", "amax", "view_keep") else np.repeat(x, spatial)]
    if kind == "gate":
        if op.get("how") == "conv":
            g = e.new(target, op.get("cout"))
            e.modules[target] = {"kind": "conv", "in": x, "out": g, "positions": positions, "kernel": 1,
                                 "bias": True}
            return [_expect_binary(e, [x, g])]
        hidden = e.new(target + "_fc1", op.get("hidden"))
        e.modules[target + "_fc1"] = {"kind": "linear", "in": x, "out": hidden, "positions": 1, "kernel": 1,
                                      "bias": True}
        s = e.new(target + "_fc2", len(x))
        e.modules[target + "_fc2"] = {"kind": "linear", "in": hidden, "out": s, "positions": 1, "kernel": 1,
                                      "bias": True}
        return [_expect_binary(e, [x, s])]
    if kind == "barrier":
        e.pin(x)
        return [np.full(len(x), -1, dtype=np.int64)]
    raise AssertionError(f"unknown op kind {kind}")


def _expect_binary(e: ExpectedUnits, ins: list[np.ndarray]) -> np.ndarray:
    """Element-wise op: equal positions couple; a broadcast operand and input channels pin."""
    width = max(len(p) for p in ins)
    full = [p for p in ins if len(p) == width]
    for p in ins:
        if len(p) != width:  # broadcast over the channels
            e.pin(p)
    out = np.full(width, -1, dtype=np.int64)
    for i in range(width):
        ids = [int(p[i]) for p in full]
        if any(s < 0 for s in ids):
            e.pin(np.array(ids))
            continue
        for s in ids[1:]:
            e.union(ids[0], s)
        out[i] = ids[0]
    return out


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def zeroed_oracle(net: nn.Module, expected: ExpectedUnits, kept_sources: np.ndarray) -> nn.Module:
    """A copy of ``net`` where every removed unit outputs exactly 0 wherever it appears.

    Zeroes, per layer, the weight rows and bias entries of output channels whose source is
    removed (for BatchNorm also the running mean, so that it outputs ``0`` there).  Every other
    op of the vocabulary maps zeros to zeros (activations with f(0) = 0, pooling, adds of coupled
    zeros, products with a zero), so removed units contribute nothing downstream: removing them
    physically must give the same outputs.
    """
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for target, m in expected.modules.items():
            mod = ref.get_submodule(target)
            rows = [o for o, s in enumerate(m["out"].tolist()) if s >= 0 and not kept_sources[s]]
            if not rows:
                continue
            for p in (getattr(mod, "weight", None), getattr(mod, "bias", None), getattr(mod, "running_mean", None)):
                if p is not None:
                    p[rows] = 0.0
    return ref


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

_MAX_C = 8  # widest channel count a body op creates


class _Draw:
    """Shorthands over hypothesis's ``draw`` for the network strategy."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, max(lo, hi)))

    def pick(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(list(options)))

    def flag(self, p_true: float = 0.5) -> bool:
        """True with probability ``p_true`` rounded to quarters (few draws per outcome: fewer repeats)."""
        return self.draw(st.integers(0, 3)) < max(1, min(3, round(p_true * 4)))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    cin, spatial = s[0], s[1:]
    same = d.flag(0.5)  # shape-preserving, so that residual adds find partners
    groups_kind = d.pick(["dense", "dense", "dense", "depthwise", "grouped"])
    groups = 1
    if groups_kind == "depthwise" and cin > 1:
        groups = cin
        cout = cin * (1 if same else d.int(1, max(1, _MAX_C // cin)))
    elif groups_kind == "grouped" and len(_divisors(cin)) > 2:
        groups = d.pick([g for g in _divisors(cin) if 1 < g < cin])
        cout = cin if same else groups * d.int(1, max(1, _MAX_C // groups))
    else:
        cout = cin if same else d.int(1, _MAX_C)
    if same:
        k, dilation = d.pick([1, 3]), d.int(1, 2)
        stride, padding = 1, dilation * (k - 1) // 2
    else:
        k, stride, dilation = d.int(1, 3), d.int(1, 2), d.int(1, 2)
        padding = d.int(0, dilation * (k - 1) // 2 + 1)
    if any(_conv_out(n, k, stride, padding, dilation) < 1 for n in spatial):
        return None
    mode = "zeros"
    if padding and d.flag(0.25):
        mode = d.pick(["reflect", "replicate", "circular"])
        if any(padding >= n for n in spatial):
            mode = "zeros"
    return _op("conv", [cur], cout=cout, k=k, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=d.flag(0.7), padding_mode=mode)


def _pool(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    how = d.pick(["max", "avg", "adaptive_avg", "adaptive_max"])
    spelling = d.pick(["module", "function"])
    if how in ("max", "avg"):
        k = d.int(1, min(3, min(s[1:])))
        stride, padding = d.int(1, k), d.int(0, k // 2)
        return _op("pool", [cur], how=how, k=k, stride=stride, padding=padding, spelling=spelling)
    return _op("pool", [cur], how=how, out=d.int(1, min(s[1:])), spelling=spelling)


def _act(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    spelling = d.pick(["module", "module", "function", "method"])
    if spelling == "method":
        return _op("act", [cur], fn="relu", spelling="method")
    names = sorted(_ACTS) if spelling == "module" else sorted(n for n, (_, f) in _ACTS.items() if f is not None)
    fn = d.pick(names)
    inplace = spelling == "module" and fn in _INPLACE_OK and cur != 0 and d.flag(0.3)
    return _op("act", [cur], fn=fn, spelling=spelling, inplace=inplace)


def _binary(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    partners = [j for j, t in enumerate(shapes) if t == s]
    other = d.pick(partners)  # may be cur itself (x + x) or the network input
    return _op("binary", [cur, other] if d.flag() else [other, cur], op=d.pick(sorted(_BINARY)))


def _cat(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    partners = [j for j, t in enumerate(shapes) if t[1:] == s[1:]]
    others = [d.pick(partners) for _ in range(d.int(1, 2))]
    inputs = [cur, *others]
    if sum(shapes[j][0] for j in inputs) > 3 * _MAX_C:
        return None
    order = d.draw(st.permutations(inputs))
    return _op("cat", order, dim=d.pick([1, -len(s)]), fn=d.pick(["cat", "concat"]))


def _split(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    c = s[0]
    if c < 2:
        return None
    spelling = d.pick(["chunk", "split_int", "split_list"])
    if spelling == "chunk":
        chunks = d.int(2, min(3, c))
        size = math.ceil(c / chunks)
        sizes = [min(size, c - i) for i in range(0, c, size)]
        return _op("split", [cur], spelling="chunk", chunks=chunks, sizes=tuple(sizes))
    if spelling == "split_int":
        size = d.int(1, c - 1)
        sizes = [min(size, c - i) for i in range(0, c, size)]
        if len(sizes) > 4:
            return None
        return _op("split", [cur], spelling="split_int", size=size, sizes=tuple(sizes))
    first = d.int(1, c - 1)
    return _op("split", [cur], spelling="split_list", sizes=(first, c - first))


def _flatten_op(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    spelling = d.pick(["module", "torch", "view_size", "view_const", "reshape_const", "mean", "amax", "view_keep"])
    return _op("flatten", [cur], spelling=spelling, width=math.prod(s), channels=s[0])


def _gate_op(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    if len(s) > 1 and d.flag():
        return _op("gate", [cur], how="conv", cout=d.pick([1, s[0]]))
    return _op("gate", [cur], how="se", hidden=d.int(1, 4), channels=s[0], view=d.pick(["view", "reshape"]))


def _barrier_op(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    how = d.pick(["roll", "softmax", "flip", "perm"])
    perm = tuple(d.draw(st.permutations(list(range(s[0]))))) if how == "perm" else None
    return _op("barrier", [cur], how=how, perm=perm)


def _linear(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    return _op("linear", [cur], fout=d.int(1, 2 * _MAX_C), bias=d.flag(0.7))


def _bn(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    return _op("bn", [cur], eps=d.pick([1e-5, 1e-3]), affine=d.flag(0.8))


def _gn(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    if math.prod(s[1:]) < 2:  # torch refuses to normalise a single value (at batch size 1)
        return None
    return _op("gn", [cur], affine=d.flag(0.8))


def _cat_spatial(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    partners = [j for j, t in enumerate(shapes) if len(t) == len(s) and t[0] == s[0] and t[2:] == s[2:]]
    inputs = [cur, d.pick(partners)]
    if sum(shapes[j][1] for j in inputs) > 24:
        return None
    return _op("cat_spatial", d.draw(st.permutations(inputs)))


def _cat_residual(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> list[OpSpec]:
    """Two branches (a conv or Linear each) concatenated and added to a third layer of the summed
    width, all reading ``cur``: one coupled group whose units come from three producers, so a plan
    that keeps units of one branch only would leave the other with no output (each cat input keeps
    a unit)."""
    widths = [d.int(1, 4), d.int(1, 4)]
    n = len(shapes)
    if len(s) == 1:
        layers = [_op("linear", [cur], fout=w, bias=d.flag(0.7)) for w in (*widths, sum(widths))]
    else:
        layers = [_op("conv", [cur], cout=w, k=k, stride=1, padding=k // 2, dilation=1, groups=1,
                      bias=d.flag(0.7), padding_mode="zeros")
                  for w, k in ((w, d.pick([1, 3])) for w in (*widths, sum(widths)))]
    cat = _op("cat", [n, n + 1], dim=1, fn="cat")
    add = _op("binary", [n + 3, n + 2] if d.flag() else [n + 2, n + 3], op=d.pick(["add", "sub", "torch.add"]))
    return [*layers, cat, add]


def _unsqueeze(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    return _op("unsqueeze", [cur])


def _scale(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    return _op("scale", [cur], factor=d.pick([0.5, 2.0, -1.0]))


_SPATIAL_OPS: dict[str, tuple[int, Callable[..., OpSpec | list[OpSpec] | None]]] = {
    "conv": (6, _conv), "bn": (3, _bn), "act": (4, _act), "pool": (2, _pool), "binary": (3, _binary),
    "cat": (2, _cat), "split": (1, _split), "gate": (1, _gate_op), "barrier": (1, _barrier_op),
    "scale": (1, _scale), "flatten": (1, _flatten_op), "gn": (1, _gn), "cat_spatial": (1, _cat_spatial),
    "cat_residual": (1, _cat_residual),
}
_FLAT_OPS: dict[str, tuple[int, Callable[..., OpSpec | list[OpSpec] | None]]] = {
    "linear": (6, _linear), "bn": (2, _bn), "act": (4, _act), "binary": (3, _binary), "cat": (2, _cat),
    "split": (1, _split), "gate": (1, _gate_op), "barrier": (1, _barrier_op), "scale": (1, _scale),
    "unsqueeze": (1, _unsqueeze), "cat_residual": (1, _cat_residual),
}


@st.composite
def net_specs(draw: Callable[[st.SearchStrategy[Any]], Any], max_ops: int = 8,
              ranks: Sequence[int] = (0, 1, 2, 2)) -> NetSpec:
    """A random :class:`NetSpec` of at most ``max_ops`` body ops plus its head (see the module docstring)."""
    d = _Draw(draw)
    rank = d.pick(ranks)
    c = d.int(1, 4)
    input_shape: Shape = (c,) if rank == 0 else (c, *(d.int(1, 9 if rank == 2 else 16) for _ in range(rank)))
    shapes: list[Shape] = [input_shape]
    ops: list[OpSpec] = []
    for _ in range(d.int(1, max_ops)):
        cur = len(shapes) - 1 if d.flag(0.75) else d.int(0, len(shapes) - 1)
        s = shapes[cur]
        table = _FLAT_OPS if len(s) == 1 else _SPATIAL_OPS
        kinds = [k for k, (w, _) in table.items() for _ in range(w)]
        drawn = table[d.pick(kinds)][1](d, cur, s, shapes)
        if drawn is None:
            continue
        for op in drawn if isinstance(drawn, list) else [drawn]:  # a block is several ops
            ops.append(op)
            shapes.extend(_out_shapes(op, [shapes[j] for j in op.inputs]))
    last = len(shapes) - 1
    if len(shapes[last]) > 1:
        op = _flatten_op(d, last, shapes[last], shapes)
        assert op is not None
        ops.append(op)
        shapes.extend(_out_shapes(op, [shapes[last]]))
        last = len(shapes) - 1
    ops.append(_op("head", [last], fout=d.int(1, 5)))
    shapes.append((ops[-1].get("fout"),))
    outputs: tuple[int, ...] = (len(shapes) - 1,)
    if len(shapes) > 2 and d.flag(0.15):
        outputs = (*outputs, d.int(1, len(shapes) - 2))
    return NetSpec(input_shape, tuple(ops), outputs, seed=d.int(0, 2**16))


@st.composite
def plans(draw: Callable[[st.SearchStrategy[Any]], Any], graph: UnitGraph) -> np.ndarray:
    """A random keep mask over ``graph``'s units that a plan may hold.

    Per prunable group: a random number of units (at least 1, at least the pinned ones, the same
    in every equal-count block) chosen at random, pinned units always among them; every split
    piece and cat input keeps at least one unit.  Keep-one and keep-all are drawn often: the edges.
    """
    d = _Draw(draw)
    kept = graph.all_kept()
    for g in graph.groups:
        if not g.prunable:
            continue
        blocks = g.blocks or [list(g.units)]
        size = len(blocks[0])
        low = max(1, max(sum(u in g.pinned for u in b) for b in blocks))
        n = d.pick([low, size, low, d.int(low, size)])
        for b in blocks:
            pinned = [u for u in b if u in g.pinned]
            free = [u for u in b if u not in g.pinned]
            chosen = set(pinned) | set(d.draw(st.permutations(free))[: n - len(pinned)])
            for u in b:
                kept[u] = u in chosen
    for piece in graph.floors:
        units = piece.tolist()
        if units and not kept[units].any():  # an emptied split or cat piece: keep its whole group
            kept[graph.groups[int(graph.unit_group[units[0]])].units] = True
    return kept

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

Sequence networks (``NetSpec.tokens``, rank ``"seq"``, drawn by :func:`seq_net_specs`) keep
(tokens, width) values with the channels last: token-wise Linear, activations, LayerNorm,
residual ops, ``nn.MultiheadAttention`` (packed or separate q/k/v weights, ``batch_first`` both
ways, ``need_weights`` both ways, masks), hand-written attention (SDPA or ``softmax(QK^T)V``, masks),
pre-/post-norm attention blocks, GELU FFN blocks, width concats and concat-into-residual blocks,
then a pooling over the tokens (see the section "Sequence networks" below).  An attention head is
one unit; the oracle zeroes its q, k and v rows and normalises LayerNorms over the kept channels.

:func:`expected_units` is an independent model of the unit analysis on this vocabulary (written
from the spec, not from the graph): which producer channels are coupled, which must be kept, and
the width of every layer under a plan.  Strategies: :func:`net_specs` (networks; the default
ranks draw exactly the networks drawn before sequence networks existed), :func:`seq_net_specs`
(sequence networks) and :func:`plans` (random keep masks of a unit graph that respect pinned
units, equal-count blocks, split and cat floors and min-keep 1).
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

__all__ = ["ExpectedUnits", "FuzzNet", "KeptLayerNorm", "NetSpec", "OpSpec", "build", "expected_units",
           "inputs_for", "net_specs", "plans", "seq_net_specs", "zeroed_oracle"]

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
    tokens: bool = False  # a sequence network: values are (tokens, width), channels last

    @property
    def rank(self) -> int | str:
        """Spatial dims of the input (0: feature vectors), or ``"seq"`` for a sequence network."""
        return "seq" if self.tokens else len(self.input_shape) - 1

    def width_changed(self, extra: int = 1) -> Shape:
        """The per-sample input shape with ``extra`` more channels (a wrong input)."""
        if self.tokens:
            return (*self.input_shape[:-1], self.input_shape[-1] + extra)
        return (self.input_shape[0] + extra, *self.input_shape[1:])

    def __repr__(self) -> str:
        where = "tokens x width " if self.tokens else ""
        lines = [f"NetSpec(input {where}{self.input_shape}, seed {self.seed})"]
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
        elif op.kind == "linear":  # over the last dim: features, or the width of every token
            self.layers[name] = nn.Linear(in_shapes[0][-1], op.get("fout"), bias=op.get("bias"))
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
        elif op.kind in _SEQ_KINDS:
            _make_seq_modules(self, i, op, in_shapes)

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
        if kind in _SEQ_KINDS:
            return _run_seq(self, i, op, args)
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
        return [(*s[:-1], op.get("fout"))]
    if kind in _SEQ_KINDS:
        return _seq_out_shapes(op, ins)
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
            if m["kind"] == "ln":
                params += w["out"] * (int(m["affine"]) + int(m["affine"] and m["bias"]))
                continue
            per_out = (w["in"] // w["groups"]) * m["kernel"]
            macs += m["positions"] * w["out"] * per_out
            params += w["out"] * per_out + (w["out"] if m["bias"] else 0)
        return macs, params


def expected_units(spec: NetSpec) -> ExpectedUnits:
    """Walk the spec and predict the unit analysis's result (see :class:`ExpectedUnits`)."""
    e = ExpectedUnits()
    shapes = value_shapes(spec)
    e.provenance.append(np.full(spec.input_shape[-1 if spec.tokens else 0], -1, dtype=np.int64))
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
        e.modules[target] = {"kind": "linear", "in": x, "out": out, "positions": math.prod(out_shape[:-1]),
                             "kernel": 1, "bias": op.get("bias", True)}
        return [out]
    if kind in _SEQ_KINDS:
        return _expect_seq_op(e, op, target, ins, in_shape, out_shape)
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


class KeptLayerNorm(nn.Module):
    """A LayerNorm whose statistics run over the ``kept`` channels only; the others output 0.

    That is what a LayerNorm computes once the removed channels are gone, written on the full
    width so that it can stand in the oracle's copy of the network.
    """

    def __init__(self, norm: nn.LayerNorm, kept: np.ndarray) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("index", torch.as_tensor(np.flatnonzero(kept), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.index
        w = None if self.norm.weight is None else self.norm.weight[idx]
        b = None if self.norm.bias is None else self.norm.bias[idx]
        out = torch.zeros_like(x)
        out[..., idx] = F.layer_norm(x[..., idx], (len(idx),), w, b, self.norm.eps)
        return out


def _zero_rows(ref: nn.Module, target: str, rows: list[int]) -> None:
    """Zero output rows ``rows`` of the layer ``target`` (a projection inside ``nn.MultiheadAttention`` too)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = ref.get_submodule(parent_name) if parent_name else ref
    if isinstance(parent, nn.MultiheadAttention) and leaf in ("q_proj", "k_proj", "v_proj"):
        which = ("q_proj", "k_proj", "v_proj").index(leaf)
        offset = which * parent.embed_dim
        weight = parent.in_proj_weight if parent._qkv_same_embed_dim else getattr(parent, f"{leaf}_weight")
        weight[[offset + r for r in rows] if parent._qkv_same_embed_dim else rows] = 0.0
        if parent.in_proj_bias is not None:
            parent.in_proj_bias[[offset + r for r in rows]] = 0.0
        return
    mod = ref.get_submodule(target)
    for p in (getattr(mod, "weight", None), getattr(mod, "bias", None), getattr(mod, "running_mean", None)):
        if p is not None:
            p[rows] = 0.0


def zeroed_oracle(net: nn.Module, expected: ExpectedUnits, kept_sources: np.ndarray) -> nn.Module:
    """A copy of ``net`` where every removed unit outputs exactly 0 wherever it appears.

    Zeroes, per layer, the weight rows and bias entries of output channels whose source is
    removed (for BatchNorm also the running mean, so that it outputs ``0`` there; for the q, k and
    v projections of ``nn.MultiheadAttention`` the rows of ``in_proj_weight``/``in_proj_bias``).
    Every other op of the vocabulary maps zeros to zeros (activations with f(0) = 0, pooling, adds
    of coupled zeros, products with a zero; an attention head whose q, k and v are 0 outputs 0),
    so removed units contribute nothing downstream: removing them physically must give the same
    outputs.  A LayerNorm fed removed channels is replaced by :class:`KeptLayerNorm`: its
    statistics change with the width, and the pruned one normalises over the kept channels.
    """
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for target, m in expected.modules.items():
            if m["kind"] == "ln":
                kept = np.array([s < 0 or bool(kept_sources[s]) for s in m["in"].tolist()])
                if not kept.all():
                    ref.set_submodule(target, KeptLayerNorm(ref.get_submodule(target), kept))
                continue
            rows = [o for o, s in enumerate(m["out"].tolist()) if s >= 0 and not kept_sources[s]]
            if rows:
                _zero_rows(ref, target, rows)
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


def _seq_partners(shapes: list[Shape], s: Shape) -> list[int]:
    return [j for j, t in enumerate(shapes) if len(t) == 2 and t[0] == s[0]]


def _seq_ln(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    affine = d.flag(0.8)
    return _op("ln", [cur], eps=d.pick([1e-5, 1e-3]), affine=affine, bias=affine and d.flag(0.8))


def _seq_mha(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    """``nn.MultiheadAttention`` on ``cur``: self-attention, or key/value from other values (other
    widths: the separate-weights form)."""
    width = s[-1]
    partners = _seq_partners(shapes, s)
    key = cur if d.flag(0.6) else d.pick(partners)
    value = key if d.flag(0.7) else d.pick(partners)
    return _op("mha", [cur, key, value], heads=d.pick(_divisors(width)), bias=d.flag(0.7),
               batch_first=d.flag(), need_weights=d.flag(), mask=d.pick(_MASKS_MHA))


def _seq_attn(d: _Draw, cur: int, s: Shape, shapes: list[Shape], fout: int | None = None) -> OpSpec:
    """Hand-written attention on ``cur`` (key/value from ``cur`` or other values)."""
    partners = _seq_partners(shapes, s)
    key = cur if d.flag(0.6) else d.pick(partners)
    value = key if d.flag(0.7) else d.pick(partners)
    heads, head_dim = d.int(1, 4), d.int(1, 3)
    dv = head_dim if d.flag(0.7) else d.int(1, 3)
    return _op("attn", [cur, key, value], heads=heads, d=head_dim, dv=dv,
               fout=fout if fout is not None else d.int(1, _MAX_C), bias=d.flag(0.7), fn=d.pick(["sdpa", "manual"]),
               mask=d.pick(_MASKS_ATTN), causal_flag=d.flag(), split=d.pick(["const", "neg_heads", "neg_dim"]),
               perm=d.pick(["transpose", "permute"]), merge=d.pick(["const", "neg", "flatten"]),
               batch=d.pick(["size", "shape"]))


def _seq_attn_block(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> list[OpSpec]:
    """A residual attention block: ``cur + attention(norm(cur))`` (pre-norm) or ``norm(cur + attention(cur))``."""
    n, pre = len(shapes), d.flag()
    ops = [_seq_ln(d, cur, s, shapes)] if pre else []
    src = n if pre else cur
    grown = [*shapes, s] if pre else shapes
    attn = (_seq_mha(d, src, s, grown) if d.flag() else _seq_attn(d, src, s, grown, fout=s[-1]))
    ops.append(attn)
    out = n + len(ops) - 1
    ops.append(_op("binary", [cur, out], op="add"))
    if not pre:
        ops.append(_seq_ln(d, out + 1, s, [*grown, s, s]))
    return ops


def _seq_ffn(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> list[OpSpec]:
    """A transformer FFN block: ``cur + fc2(act(fc1(norm(cur))))``, GELU most of the time."""
    n = len(shapes)
    ops = [_seq_ln(d, cur, s, shapes),
           _op("linear", [n], fout=d.int(1, 2 * _MAX_C), bias=d.flag(0.8)),
           _op("act", [n + 1], fn="gelu" if d.flag(0.75) else d.pick(["relu", "silu"]), spelling=d.pick(
               ["module", "function"]), inplace=False),
           _op("linear", [n + 2], fout=s[-1], bias=d.flag(0.8))]
    return [*ops, _op("binary", [cur, n + 3] if d.flag() else [n + 3, cur], op=d.pick(["add", "torch.add"]))]


def _seq_cat(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec | None:
    partners = _seq_partners(shapes, s)
    inputs = [cur, *(d.pick(partners) for _ in range(d.int(1, 2)))]
    if sum(shapes[j][-1] for j in inputs) > 3 * _MAX_C:
        return None
    return _op("cat_last", d.draw(st.permutations(inputs)), dim=d.pick([2, -1]), fn=d.pick(["cat", "concat"]))


def _seq_cat_residual(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> list[OpSpec]:
    """Two token-wise Linear branches concatenated along the width and added to a third (see
    :func:`_cat_residual`)."""
    widths = [d.int(1, 4), d.int(1, 4)]
    n = len(shapes)
    layers = [_op("linear", [cur], fout=w, bias=d.flag(0.7)) for w in (*widths, sum(widths))]
    add = _op("binary", [n + 3, n + 2] if d.flag() else [n + 2, n + 3], op=d.pick(["add", "sub", "torch.add"]))
    return [*layers, _op("cat_last", [n, n + 1], dim=-1, fn="cat"), add]


def _seq_linear(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    return _op("linear", [cur], fout=d.int(1, _MAX_C), bias=d.flag(0.7))


def _seq_act(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    op = _act(d, cur, s, shapes)
    return op if op.get("fn") != "dropout" else _op("act", [cur], fn="gelu", spelling="module", inplace=False)


def _seq_binary(d: _Draw, cur: int, s: Shape, shapes: list[Shape]) -> OpSpec:
    other = d.pick([j for j, t in enumerate(shapes) if t == s])
    return _op("binary", [cur, other] if d.flag() else [other, cur], op=d.pick(["add", "sub", "mul", "torch.add"]))


_SEQ_OPS: dict[str, tuple[int, Callable[..., OpSpec | list[OpSpec] | None]]] = {
    "linear": (4, _seq_linear), "act": (3, _seq_act), "ln": (3, _seq_ln), "binary": (2, _seq_binary),
    "scale": (1, _scale), "mha": (3, _seq_mha), "attn": (3, _seq_attn), "attn_block": (3, _seq_attn_block),
    "ffn": (2, _seq_ffn), "cat": (2, _seq_cat), "cat_residual": (1, _seq_cat_residual),
}


def _seq_body(d: _Draw, max_ops: int) -> tuple[Shape, list[OpSpec], list[Shape]]:
    """The input shape (T, W), the body's ops (every value (T, width)) and the shapes of all values."""
    input_shape: Shape = (d.int(2, 6), d.int(1, 8))
    shapes: list[Shape] = [input_shape]
    ops: list[OpSpec] = []
    kinds = [k for k, (w, _) in _SEQ_OPS.items() for _ in range(w)]
    for _ in range(d.int(1, max_ops)):
        cur = len(shapes) - 1 if d.flag(0.75) else d.int(0, len(shapes) - 1)
        drawn = _SEQ_OPS[d.pick(kinds)][1](d, cur, shapes[cur], shapes)
        if drawn is None:
            continue
        for op in drawn if isinstance(drawn, list) else [drawn]:
            ops.append(op)
            shapes.extend(_out_shapes(op, [shapes[j] for j in op.inputs]))
    last = len(shapes) - 1
    how = d.pick(["mean", "mean", "amax", "sum", "first", "flatten", "flatten_view"])
    ops.append(_op("pool_tokens", [last], how=how, size=d.pick(["shape", "const"]), width=math.prod(shapes[last])))
    shapes.extend(_out_shapes(ops[-1], [shapes[last]]))
    return input_shape, ops, shapes


@st.composite
def net_specs(draw: Callable[[st.SearchStrategy[Any]], Any], max_ops: int = 8,
              ranks: Sequence[int | str] = (0, 1, 2, 2)) -> NetSpec:
    """A random :class:`NetSpec` of at most ``max_ops`` body ops plus its head (see the module docstring).

    ``ranks``: the input ranks to draw from, 0 to 2 spatial dims or ``"seq"`` for a sequence
    network (:func:`seq_net_specs`).  The default draws no sequence network, so that it generates
    the same networks as before they existed.
    """
    d = _Draw(draw)
    rank = d.pick(ranks)
    if rank == "seq":
        input_shape, ops, shapes = _seq_body(d, max_ops)
        ops.append(_op("head", [len(shapes) - 1], fout=d.int(1, 5)))
        shapes.append((ops[-1].get("fout"),))
        outputs = (len(shapes) - 1,)
        if d.flag(0.15):
            outputs = (*outputs, d.int(1, len(shapes) - 2))
        return NetSpec(input_shape, tuple(ops), outputs, seed=d.int(0, 2**16), tokens=True)
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


def seq_net_specs(max_ops: int = 6) -> st.SearchStrategy[NetSpec]:
    """Random sequence networks: attention, LayerNorm/GELU and concat blocks on (tokens, width) values."""
    return net_specs(max_ops=max_ops, ranks=("seq",))


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


# --------------------------------------------------------------------------------------------
# Sequence networks: values (batch, tokens, width), channels last
# --------------------------------------------------------------------------------------------
#
# A spec with ``tokens=True`` reads an input of per-sample shape (T, W) and keeps T tokens
# throughout; every value of its body is (T, width) and its channels are the width (the last dim).
# ``linear``, ``act``, ``binary`` and ``scale`` work on it as they are; the kinds below are only
# drawn there.  ``pool_tokens`` ends the body with a (width,) vector for the head.
#
# * ``ln``: ``nn.LayerNorm(width)``.  Its statistics run over the kept channels once some are
#   removed, so the oracle replaces it by a LayerNorm over the kept channels (:class:`KeptLayerNorm`).
# * ``mha``: ``nn.MultiheadAttention`` reading query, key and value values (the same one for
#   self-attention; other widths give the separate ``q/k/v_proj_weight`` form), ``batch_first``
#   either way (the value is transposed around it when False), ``need_weights`` either way (the
#   weights are dropped), masks: none, a bool or float ``attn_mask``, causal (``attn_mask`` and
#   ``is_causal``), a key padding mask, or a bool ``attn_mask`` and a key padding mask.
# * ``attn``: attention written by hand: Linear q/k/v (``op<i>_q``/``_k``/``_v``), a reshape to
#   heads in three spellings (constants, ``-1`` heads, ``-1`` head dim), ``transpose`` or
#   ``permute``, ``scaled_dot_product_attention`` or ``softmax(QK^T / sqrt(d))V``, the merge back
#   in three spellings and an output Linear (``op<i>_o``); masks: none, bool, float, causal
#   (``is_causal`` / a ``-inf`` triangle) or key padding.  Every mask lets each query see token 0,
#   so no row is masked whole.
# * ``cat_last``: ``cat`` along the width; ``pool_tokens``: mean, amax, sum over the tokens, the
#   first token (a class-token readout: indexing a tensor with channels is a barrier) or a
#   flatten of every token (``flatten(1)``, or ``reshape`` to a constant ``T * width``: the channels
#   repeated ``T`` times).
#
# A head of an attention block is one unit: its q, k and v rows and its slice of the output
# projection's input, so :func:`zeroed_oracle` zeroes the head's q, k and v rows (in the packed
# ``in_proj_weight`` for ``nn.MultiheadAttention``) and the head outputs exactly 0.

_SEQ_KINDS = frozenset({"ln", "mha", "attn", "cat_last", "pool_tokens"})
_MASKS_MHA = ("none", "none", "bool", "float", "causal", "padding", "bool_padding")
_MASKS_ATTN = ("none", "none", "bool", "float", "causal", "padding")


def _mask_buffers(net: FuzzNet, name: str, op: OpSpec, tokens: int, heads: int) -> None:
    """The constant masks of an attention op, as buffers (drawn from the module's seed)."""
    mask = op.get("mask")
    if mask in ("bool", "bool_padding"):  # True: may not attend (torch's MHA convention)
        blocked = torch.rand(tokens, tokens) < 0.4
        blocked[:, 0] = False
        net.register_buffer(name + "_mask", blocked)
    elif mask == "float":
        additive = -2.0 * torch.rand(tokens, tokens)
        net.register_buffer(name + "_mask", additive)
    elif mask == "causal":
        net.register_buffer(name + "_mask", torch.ones(tokens, tokens, dtype=torch.bool).triu(1))
    if mask in ("padding", "bool_padding"):
        pad = torch.zeros(1, tokens, dtype=torch.bool)
        pad[0, 1:] = torch.rand(tokens - 1) < 0.4
        net.register_buffer(name + "_pad", pad)
        if op.kind == "attn":  # the same as an additive mask over the keys, for SDPA
            net.register_buffer(name + "_padf", torch.zeros(1, 1, 1, tokens).masked_fill(pad.view(1, 1, 1, -1),
                                                                                          float("-inf")))


def _make_seq_modules(net: FuzzNet, i: int, op: OpSpec, in_shapes: list[Shape]) -> None:
    name, width = f"op{i}", in_shapes[0][-1]
    tokens = in_shapes[0][0] if len(in_shapes[0]) == 2 else 1
    if op.kind == "ln":
        net.layers[name] = nn.LayerNorm(width, eps=op.get("eps"), elementwise_affine=op.get("affine"),
                                        bias=op.get("bias"))
    elif op.kind == "mha":
        kdim, vdim = in_shapes[1][-1], in_shapes[2][-1]
        net.layers[name] = nn.MultiheadAttention(width, op.get("heads"), bias=op.get("bias"), kdim=kdim, vdim=vdim,
                                                 batch_first=op.get("batch_first"))
        _mask_buffers(net, name, op, tokens, op.get("heads"))
    elif op.kind == "attn":
        heads, d, dv = op.get("heads"), op.get("d"), op.get("dv")
        net.layers[name + "_q"] = nn.Linear(width, heads * d, bias=op.get("bias"))
        net.layers[name + "_k"] = nn.Linear(in_shapes[1][-1], heads * d, bias=op.get("bias"))
        net.layers[name + "_v"] = nn.Linear(in_shapes[2][-1], heads * dv, bias=op.get("bias"))
        net.layers[name + "_o"] = nn.Linear(heads * dv, op.get("fout"), bias=op.get("bias"))
        _mask_buffers(net, name, op, tokens, heads)


def _run_seq(net: FuzzNet, i: int, op: OpSpec, args: list[torch.Tensor]) -> torch.Tensor:
    name, x = f"op{i}", args[0]
    if op.kind == "ln":
        return net.layers[name](x)
    if op.kind == "cat_last":
        return (torch.cat if op.get("fn") == "cat" else torch.concat)(args, dim=op.get("dim"))
    if op.kind == "pool_tokens":
        how = op.get("how")
        if how == "mean":
            return x.mean(1)
        if how == "amax":
            return x.amax(dim=1)
        if how == "sum":
            return torch.sum(x, 1)
        if how == "first":
            return x[:, 0]
        if how == "flatten_view":
            if op.get("size") == "shape":
                return x.reshape(x.size(0), x.shape[1] * x.shape[2])
            return x.reshape(-1, op.get("width"))  # the flattened width baked into the graph
        return x.flatten(1)
    if op.kind == "mha":
        return _run_mha(net, name, op, args)
    return _run_attn(net, name, op, args)


def _run_mha(net: FuzzNet, name: str, op: OpSpec, args: list[torch.Tensor]) -> torch.Tensor:
    q, k, v = args
    if not op.get("batch_first"):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = op.get("mask")
    attn_mask = getattr(net, name + "_mask") if mask in ("bool", "float", "causal", "bool_padding") else None
    padding = getattr(net, name + "_pad").expand(args[0].size(0), -1) if "padding" in mask else None
    out, _ = net.layers[name](q, k, v, key_padding_mask=padding, need_weights=op.get("need_weights"),
                              attn_mask=attn_mask, is_causal=mask == "causal")
    return out if op.get("batch_first") else out.transpose(0, 1)


def _to_heads(op: OpSpec, x: torch.Tensor, batch: Any, head_dim: int) -> torch.Tensor:
    tokens, heads, spelling = x.shape[1], op.get("heads"), op.get("split")
    if spelling == "const":
        x = x.view(batch, tokens, heads, head_dim)
    elif spelling == "neg_heads":
        x = x.view(batch, tokens, -1, head_dim)
    else:
        x = x.reshape(batch, tokens, heads, -1)
    return x.transpose(1, 2) if op.get("perm") == "transpose" else x.permute(0, 2, 1, 3)


def _run_attn(net: FuzzNet, name: str, op: OpSpec, args: list[torch.Tensor]) -> torch.Tensor:
    x = args[0]
    batch = x.size(0) if op.get("batch") == "size" else x.shape[0]
    d, dv, mask = op.get("d"), op.get("dv"), op.get("mask")
    q = _to_heads(op, net.layers[name + "_q"](x), batch, d)
    k = _to_heads(op, net.layers[name + "_k"](args[1]), batch, d)
    v = _to_heads(op, net.layers[name + "_v"](args[2]), batch, dv)
    buf = getattr(net, name + "_mask") if mask in ("bool", "float", "causal") else None
    pad = getattr(net, name + "_pad") if mask == "padding" else None
    if op.get("fn") == "sdpa":
        attn_mask: torch.Tensor | None = None
        if mask in ("bool", "causal") and not (mask == "causal" and op.get("causal_flag")):
            attn_mask = ~buf  # SDPA's bool masks say where attention is allowed
        elif mask == "float":
            attn_mask = buf
        elif mask == "padding":
            attn_mask = getattr(net, name + "_padf")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=mask == "causal" and bool(op.get("causal_flag")))
    else:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        if mask in ("bool", "causal"):
            scores = scores.masked_fill(buf, float("-inf"))
        elif mask == "float":
            scores = scores + buf
        elif mask == "padding":
            scores = scores.masked_fill(pad.view(1, 1, 1, -1), float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
    o = o.transpose(1, 2) if op.get("perm") == "transpose" else o.permute(0, 2, 1, 3)
    merge = op.get("merge")
    if merge == "const":
        o = o.reshape(batch, x.shape[1], op.get("heads") * dv)
    elif merge == "neg":
        o = o.reshape(batch, x.shape[1], -1)
    else:
        o = o.flatten(2)
    return net.layers[name + "_o"](o)


def _seq_out_shapes(op: OpSpec, ins: list[Shape]) -> list[Shape]:
    s = ins[0]
    if op.kind == "cat_last":
        return [(*s[:-1], sum(i[-1] for i in ins))]
    if op.kind == "pool_tokens":
        return [(math.prod(s),)] if op.get("how").startswith("flatten") else [(s[-1],)]
    if op.kind == "attn":
        return [(*s[:-1], op.get("fout"))]
    return [s]  # ln, mha


def _expect_seq_op(e: ExpectedUnits, op: OpSpec, target: str, ins: list[np.ndarray], in_shape: Shape,
                   out_shape: Shape) -> list[np.ndarray]:
    x, kind = ins[0], op.kind
    tokens = in_shape[0] if len(in_shape) == 2 else 1
    if kind == "ln":
        e.modules[target] = {"kind": "ln", "in": x, "out": x, "affine": op.get("affine"), "bias": op.get("bias")}
        return [x]
    if kind == "cat_last":
        return [np.concatenate(ins)]
    if kind == "pool_tokens":
        how = op.get("how")
        if how == "first":  # indexing a tensor with channels: a barrier, the width reaching it is kept
            e.pin(x)
            return [np.full(len(x), -1, dtype=np.int64)]
        return [np.tile(x, tokens)] if how.startswith("flatten") else [x]
    heads, bias = op.get("heads"), op.get("bias")
    if kind == "mha":
        width = len(x)
        d = dv = width // heads
        names = [f"{target}.{p}_proj" for p in ("q", "k", "v")] + [f"{target}.out_proj"]
        masked = op.get("mask") != "none"
    else:
        d, dv = op.get("d"), op.get("dv")
        names = [f"{target}_{p}" for p in ("q", "k", "v", "o")]
        masked = op.get("mask") != "none" and not (op.get("fn") == "sdpa" and op.get("mask") == "causal"
                                                    and op.get("causal_flag"))
    projections = []
    for name, inp, per_head in zip(names[:3], ins, (d, d, dv)):
        out = e.new(name, heads * per_head)
        e.modules[name] = {"kind": "linear", "in": inp, "out": out, "positions": tokens, "kernel": 1, "bias": bias}
        projections.append(out)
    manual = op.get("fn") == "manual" if kind == "attn" else op.get("need_weights")  # softmax(QK^T)V
    if heads == 1 and (d > 1 or dv > 1 or (masked and manual)):
        # One head of several channels: the reshape to heads leaves the channels on the head dim,
        # which QK^T contracts (and attention @ V mixes over tokens): a barrier keeps q, k and v.
        # softmax(QK^T)V with one channel per q/k head matches q with k before V's barrier (or,
        # one channel each, before the mask keeps that head and V meets scores of a kept channel).
        if manual and d == 1:
            e.union(int(projections[0][0]), int(projections[1][0]))
        for proj in projections:
            e.pin(proj)
    else:
        for h in range(heads):  # a head: its q, k and v rows are one unit
            members = [*projections[0][h * d:(h + 1) * d], *projections[1][h * d:(h + 1) * d],
                       *projections[2][h * dv:(h + 1) * dv]]
            for m in members[1:]:
                e.union(int(members[0]), int(m))
    if heads == 1 and masked:
        # One head next to a mask tensor: the mask's size-1 head dim reads as a fixed channel
        # (as a network input's channel would), so the lone head is kept.
        e.pin(projections[0])
    out = e.new(names[3], len(x) if kind == "mha" else op.get("fout"))
    e.modules[names[3]] = {"kind": "linear", "in": projections[2], "out": out, "positions": tokens, "kernel": 1,
                           "bias": bias}
    return [out]

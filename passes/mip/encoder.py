"""Encode a traced network on fixed calibration samples as mixed-integer linear rows (PuLP).

The MILP analyses (:mod:`.budget`, :mod:`.paper`) need, for every calibration sample,
the logits of the network as functions of *keep variables* ``m_u`` (one per free unit, shared by
all samples and all positions of a channel).  This module builds them from the fx graph.

Semantics.  Removing unit ``u`` from the real network (the prune transform) gives the same
outputs as zeroing the positions of ``u`` wherever a Linear/Conv layer *reads* them: the
producer's BatchNorm, activation and pooling entries of ``u`` are only ever seen through those
reads (the unit-group analysis pins units that reach anything else).  So the encoder keeps the
original graph and applies ``m_u`` at the inputs of Linear/Conv layers: ``x -> m_u * x``.  Units
that are not free are fixed to the current plan (removed ones are zeroed).

Representation.  A value is either a constant batch (a tensor over all samples, computed by
torch itself, so anything upstream of the free units runs at full speed with any op) or, per
sample, a :class:`Sym`: ``const + sum_i coef[i] * var[i]`` with element-wise bounds ``lo, hi``
valid for every value of the variables.  Affine ops (Linear, Conv with any stride/padding/
dilation/groups, BatchNorm in eval mode, average pooling, flatten/reshape, add/sub, cat, split,
multiplication by constants) are applied by torch to the coefficient tensor (the variables act as
a batch), so a convolution's row for each output position comes from its kernel window alone:
no dense Toeplitz matrix is ever formed.  Bounds of an affine expression are exact over the box
of its variables (sum of positive and negative contributions), which is exact for expressions in
the keep variables alone.

Non-linear ops introduce variables (*materialisation*):

* ReLU on an element with ``lo >= 0`` is the identity, with ``hi <= 0`` zero; otherwise a new
  ``h in [0, hi]`` and one binary ``v`` with ``h >= a``, ``h <= a - lo (1 - v)``, ``h <= hi v``
  (big-M with the element's own bounds: one binary per unstable (sample, unit) only).  Stable
  active outputs become a fresh continuous variable equal to the expression when the expression is
  not constant, which keeps rows short downstream.
* Max pooling: window elements dominated by another element's lower bound are dropped; one
  remaining element is copied; otherwise ``y >= x_i`` for all remaining ``i``, one binary per
  remaining element, ``sum d = 1`` and ``y <= x_i + (U - lo_i)(1 - d_i)``.
* ``m_u * x`` with a non-constant ``x``: the exact product of a binary and a bounded continuous
  value (four inequalities); with a constant ``x`` it is simply a coefficient on ``m_u``.
* ``paper`` scores: a continuous ``s_u`` in [0, 1] enters as the thesis does it,
  ``relu(x - (1 - s_u) U+)`` at the reading layer (``x`` is a post-activation value, ``U+`` its
  upper bound), encoded with the ReLU rule above.

Anything else that depends on a variable raises :class:`~oamipc.errors.UnsupportedGraphError`
naming the node (LayerNorm/GroupNorm, sigmoid gates, softmax, ...); the solver-free criteria still
work on such models.

Division of labour.  This module owns the walk over the graph and the rows; the bounds that go
into the rows (interval and CROWN bounds, sample phases, the margins that keep them sound, the
threshold below which coefficients are not kept) belong to :mod:`.bounds`.  Every value is built
by :meth:`Encoder._sym`, which truncates its coefficients (``|w| < 1e-9``) and then bounds it, so a
row never contains a different expression from the one its bounds were computed for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch
import torch.nn.functional as F
from torch import fx, nn

from oamipc import ir
from oamipc.errors import UnsupportedGraphError
from oamipc.units import Layout, UnitGraph

from .bounds import (
    BOUNDS,
    EPS_COEF,
    Relaxation,
    box_bounds,
    crown_bounds,
    identity_relaxation,
    may_be_negative,
    relu_relaxation,
    sample_phases,
    truncate,
)

log = logging.getLogger(__name__)

# Ops that are affine in their tensor arguments (given the constant ones).
_AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                   nn.Dropout2d, nn.Unflatten)
_AFFINE_OPS = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "neg", "cat", "concat", "concatenate", "flatten",
    "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "dropout", "dropout1d", "dropout2d", "feature_dropout", "alpha_dropout", "clone", "contiguous",
    "detach", "identity", "linear", "conv1d", "conv2d", "unsqueeze", "squeeze", "permute", "transpose",
    "mean", "sum", "getitem", "split", "chunk", "split_with_sizes", "to", "float", "batch_norm",
}
_MULTIPLICATIVE = {"mul", "mul_", "imul", "div", "div_", "truediv", "itruediv"}  # affine if one side is constant
_RELU = {"relu", "relu_"}
_MAXPOOL = {"max_pool1d", "max_pool2d"}
_RESHAPE = {"view", "reshape", "_unsafe_view"}
_NON_TENSOR = {"size", "dim", "numel", "getattr", "sym_size"}


@dataclass
class Sym:
    """One sample's tensor: ``const + sum_i coef[i] * vars[i]`` with bounds ``lo <= value <= hi``."""

    const: torch.Tensor  # shape S, float64
    vars: list[int]  # indices into Encoder.variables
    coef: torch.Tensor  # shape (len(vars), *S)
    lo: torch.Tensor
    hi: torch.Tensor


Affine = tuple[list[tuple[int, float]], float]  # (terms over variable indices, constant)


@dataclass(frozen=True)
class Definition:
    """How a materialised variable's value follows from earlier variables, in the network's own
    arithmetic (see :meth:`Encoder.reference_values`).

    ``kind``: ``relu`` (``max(a, 0)``), ``phase`` (the ReLU's binary: ``1`` when ``a > 0``),
    ``affine`` (``a``), ``product`` (``x[ref] * a``), ``max`` (the largest of ``inputs``) or
    ``argmax`` (the binary that selects ``inputs[index]`` of the max variable ``ref``).
    """

    kind: str
    inputs: tuple[Affine, ...] = ()
    ref: int = -1
    index: int = 0


@dataclass
class EncodingStats:
    """Size of an encoding, for the report."""

    samples: int = 0
    keep_variables: int = 0
    relu_binaries: int = 0
    relu_stable: int = 0
    maxpool_binaries: int = 0
    product_variables: int = 0
    continuous: int = 0
    rows: int = 0
    width_per_layer: dict[str, float] = field(default_factory=dict)  # mean interval width at each ReLU
    # The same before CROWN's tightening (interval arithmetic from the earlier layers' final bounds).
    interval_width_per_layer: dict[str, float] = field(default_factory=dict)
    bounds: str = "crown"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Encoder:
    """Builds the rows of one MILP into ``prob`` (see the module docstring).

    ``kept`` fixes every unit that is not in ``free``; ``free`` maps unit -> its PuLP variable
    (binary keep variable, or continuous score in ``mode="paper"``).  :meth:`logits` returns one
    :class:`Sym` per sample for the network's (first) output.
    """

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, x: torch.Tensor, kept: np.ndarray,
                 free: dict[int, pulp.LpVariable], prob: pulp.LpProblem, *, mode: str = "keep",
                 name: str = "e", bounds: str = "crown", means: dict[str, torch.Tensor] | None = None) -> None:
        if mode not in ("keep", "paper"):
            raise ValueError(f"unknown encoding mode {mode!r}")
        if bounds not in BOUNDS:
            raise ValueError(f"unknown bounds {bounds!r}: use one of {', '.join(BOUNDS)}")
        self.bounds = bounds
        self.means = means or {}  # reading node -> per-position mean: removed units read as it (not 0)
        # Linear relaxations of ReLU outputs for back-substitution (CROWN), by output variable.
        self._relax: dict[int, Relaxation] = {}
        self._phase: dict[str, torch.Tensor] = {}
        self.record_bounds = False  # tests: keep every ReLU input's bounds in relu_bounds
        self.relu_bounds: dict[str, list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]] = {}
        self.gm = gm
        self.graph = graph
        self.x = x.detach().to(torch.float64)
        self.n = int(self.x.shape[0])
        self.kept = kept
        self.prob = prob
        self.mode = mode
        self.prefix = name
        self.variables: list[pulp.LpVariable] = []
        self.var_lo: list[float] = []
        self.var_hi: list[float] = []
        self.definitions: dict[int, Definition] = {}  # every materialised variable's definition
        self.free_index: dict[int, int] = {}
        for u, var in sorted(free.items()):
            self.free_index[u] = self._add_var(var, 0.0, 1.0)
        self.stats = EncodingStats(samples=self.n, keep_variables=len(free), bounds=bounds)
        self.reading_layers = {layer.node for layer in graph.layers}
        self._count = 0
        self._module_cache: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ variables and rows
    def _add_var(self, var: pulp.LpVariable, lo: float, hi: float) -> int:
        self.variables.append(var)
        self.var_lo.append(lo)
        self.var_hi.append(hi)
        return len(self.variables) - 1

    def _new(self, kind: str, lo: float, hi: float, definition: Definition,
             cat: str = pulp.LpContinuous) -> int:
        self._count += 1
        var = pulp.LpVariable(f"{self.prefix}_{kind}{self._count}", lowBound=lo, upBound=hi, cat=cat)
        index = self._add_var(var, lo, hi)
        self.definitions[index] = definition
        return index

    def _name(self, var: int, role: str) -> str:
        """A row's name: the variable it defines and its role (``e_h12_off``), for diagnostics."""
        return f"{self.variables[var].name}_{role}"

    def reference_values(self, kept: np.ndarray) -> np.ndarray:
        """Every variable's value when the free units are fixed to ``kept`` (per unit, 0/1 or a score).

        Computed from :attr:`definitions` in creation order (each refers to earlier variables
        only), with exactly rounded sums: the point the rows describe, evaluated the way the network
        computes it.  Every row holds there by construction when the bounds are sound, so a fixed
        plan that a solver calls infeasible can be checked row by row at this point.
        """
        values = np.full(len(self.variables), np.nan)
        for u, i in self.free_index.items():
            values[i] = float(kept[u])
        for i in range(len(self.variables)):
            if np.isnan(values[i]):
                values[i] = _evaluate_definition(self.definitions[i], values)
        return values

    def reference_start(self, kept: np.ndarray) -> dict[pulp.LpVariable, float]:
        """:meth:`reference_values` by variable: a MIP start that satisfies every row exactly."""
        return dict(zip(self.variables, self.reference_values(kept).tolist()))

    def reference_phases(self, kept: np.ndarray) -> dict[pulp.LpVariable, float]:
        """The free variables and every binary of the encoding (ReLU phases, max-pool choices) at
        :meth:`reference_values`: fixing these leaves an LP whose solution is the plan's point.

        The way to complete a plan into a MIP start.  Solving the MILP with only the free variables
        fixed asks the solver to rediscover every phase, and HiGHS's root conflict analysis and
        restart presolve call some of these fully determined problems infeasible (measured: 2 of 48
        seeds on the zoo VGG's paper problem, no row within 1e-5 of violation at this point); the
        LP has never failed there.
        """
        values = self.reference_values(kept)
        free = set(self.free_index.values())
        return {var: float(values[i]) for i, var in enumerate(self.variables)
                if i in free or var.cat == pulp.LpInteger}

    def _row(self, terms: list[tuple[int, float]], const: float, sense: int, rhs_terms: list[tuple[int, float]]
             = (), name: str | None = None) -> None:
        """Add ``sum terms + const  (sense)  sum rhs_terms`` as a constraint.

        A merged coefficient below :data:`~.bounds.EPS_COEF` is not handed to the solver; the row is
        loosened by that term's worst case over its variable's box instead, so that it still holds
        wherever the exact row does (an equality loosened this way becomes two inequalities).
        Values reach rows already truncated (:func:`~.bounds.truncate`), so this only happens when
        terms of the same variable cancel, or a big-M constant is itself below the threshold.
        """
        merged: dict[int, float] = {}
        for i, c in terms:
            merged[i] = merged.get(i, 0.0) + c
        for i, c in rhs_terms:
            merged[i] = merged.get(i, 0.0) - c
        kept = [(self.variables[i], c) for i, c in merged.items() if abs(c) >= EPS_COEF]
        slack = math.fsum(abs(c) * max(abs(self.var_lo[i]), abs(self.var_hi[i]))
                          for i, c in merged.items() if 0.0 < abs(c) < EPS_COEF)
        if slack > 0.0 and sense == pulp.LpConstraintEQ:
            self._add_row(kept, const + slack, pulp.LpConstraintGE, name and f"{name}_ge")
            self._add_row(kept, const - slack, pulp.LpConstraintLE, name and f"{name}_le")
            return
        self._add_row(kept, const + slack if sense == pulp.LpConstraintGE else const - slack, sense, name)

    def _add_row(self, kept: list[tuple[pulp.LpVariable, float]], const: float, sense: int, name: str | None) -> None:
        self.prob += pulp.LpConstraint(pulp.LpAffineExpression(kept, constant=const), sense, rhs=0.0, name=name)
        self.stats.rows += 1

    def expression(self, s: Sym, flat_index: int) -> pulp.LpAffineExpression:
        """The PuLP expression of one element of ``s``."""
        col = s.coef.reshape(len(s.vars), -1)[:, flat_index] if s.vars else torch.zeros(0)
        terms = [(self.variables[s.vars[i]], float(c)) for i, c in enumerate(col.tolist()) if abs(c) >= EPS_COEF]
        return pulp.LpAffineExpression(terms, constant=float(s.const.reshape(-1)[flat_index]))

    def _terms(self, s: Sym, flat_coef: np.ndarray, e: int) -> list[tuple[int, float]]:
        col = flat_coef[:, e]
        nz = np.nonzero(np.abs(col) >= EPS_COEF)[0]
        return [(s.vars[i], float(col[i])) for i in nz]

    # ------------------------------------------------------------------ Sym helpers
    def _bounds(self, const: torch.Tensor, vars_: list[int], coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval bounds of a value over its variables' boxes (see :func:`.bounds.box_bounds`)."""
        lo_v = torch.tensor([self.var_lo[i] for i in vars_], dtype=torch.float64)
        hi_v = torch.tensor([self.var_hi[i] for i in vars_], dtype=torch.float64)
        return box_bounds(const, coef, lo_v, hi_v)

    def _sym(self, const: torch.Tensor, vars_: list[int], coef: torch.Tensor) -> Sym:
        """The value ``const + coef . vars`` with its bounds; every value is built here.

        Coefficients below :data:`~.bounds.EPS_COEF` are removed first (:func:`~.bounds.truncate`),
        so the bounds are those of exactly the expression that rows are later written from.
        """
        if vars_:
            coef = truncate(coef)
            # Drop variables that no longer appear (e.g. sliced away by a split, or truncated).
            used = coef.reshape(len(vars_), -1).abs().amax(dim=1) > 0.0
            if not bool(used.all()):
                keep = torch.nonzero(used).flatten().tolist()
                vars_ = [vars_[i] for i in keep]
                coef = coef[keep]
        lo, hi = self._bounds(const, vars_, coef)
        return Sym(const, vars_, coef, lo, hi)

    @staticmethod
    def _is_const(value: Any) -> bool:
        return not (isinstance(value, list) and value and isinstance(value[0], Sym))

    # ------------------------------------------------------------------ the walk
    def logits(self) -> list[Sym]:
        """Walk the graph; return the first output as one Sym per sample (constants included).

        A value is dropped as soon as the last node that reads it has been visited: the constant
        part runs on every MILP sample at once, so keeping every activation of the walk held all
        of them together (MobileNetV2 at 224x224: dozens of activations of 64 samples in float64).
        """
        env: dict[str, Any] = {}
        last_reader = _last_readers(self.gm.graph)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise UnsupportedGraphError(f"the MILP encoding supports one input; {node.name} is another")
                env[node.name] = self.x
            elif node.op == "get_attr":
                env[node.name] = _fetch_attr(self.gm, str(node.target))
            elif node.op == "output":
                out = ir.first_output(node.args[0])
                value = env[out.name] if isinstance(out, fx.Node) else out
                return self._as_syms(value)
            else:
                env[node.name] = self._visit(node, env)
            for name in last_reader.pop(node.name, ()):
                env.pop(name, None)
        raise UnsupportedGraphError("the graph has no output node")

    def _as_syms(self, value: Any) -> list[Sym]:
        if not self._is_const(value):
            return value
        t = torch.as_tensor(value, dtype=torch.float64)
        return [self._sym(t[k], [], torch.zeros(0, *t.shape[1:], dtype=torch.float64)) for k in range(self.n)]

    def _visit(self, node: fx.Node, env: dict[str, Any]) -> Any:
        args = _map(node.args, env)
        kwargs = _map(node.kwargs, env)
        mod = self._module(node) if node.op == "call_module" else None
        name = type(mod).__name__ if mod is not None else ir.op_name(node)
        if node.name in self.reading_layers:
            args = (self._mask_input(node, args[0]), *args[1:])
        symbolic = [a for a in ir_values(args, kwargs) if not self._is_const(a)]
        if not symbolic:
            return self._call(node, mod, args, kwargs)
        if isinstance(mod, nn.ReLU) or (mod is None and name in _RELU):
            return self._relu_all(node, args[0])
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) or (mod is None and name in _MAXPOOL):
            return self._maxpool(node, mod, args, kwargs)
        if mod is None and name in _RESHAPE:
            shape = ir.tensor_shape(node)
            assert shape is not None
            return [self._sym(s.const.reshape(shape[1:]), s.vars, s.coef.reshape(len(s.vars), *shape[1:]))
                    for s in args[0]]
        if mod is None and name in _NON_TENSOR:
            def stand_in_for(v: Any) -> Any:
                return torch.zeros(self.n, *v[0].const.shape) if not self._is_const(v) else v

            stand_in = _map_values(args, stand_in_for)
            return self._call(node, None, stand_in, kwargs)
        affine = isinstance(mod, _AFFINE_MODULES) or (mod is None and name in _AFFINE_OPS)
        if mod is None and name in _MULTIPLICATIVE:
            # x * c and c * x are affine in x; x / c too; x * y and c / x are not.
            affine = len(symbolic) == 1 and (name.startswith("mul") or name == "imul" or self._is_const(args[1]))
        if not affine:
            raise UnsupportedGraphError(
                f"the MILP encoding cannot handle {ir.where(node)} ({name}) on values that depend on the pruned "
                "units; it supports Linear, Conv1d/2d, BatchNorm (eval), ReLU, max/avg pooling, flatten/reshape, "
                "add/sub, cat/split and scaling by constants; use a solver-free --importance for this model")
        return self._affine(node, mod, args, kwargs)

    def _module(self, node: fx.Node) -> nn.Module:
        target = str(node.target)
        if target not in self._module_cache:
            import copy

            mod = copy.deepcopy(ir.get_module(self.gm, target)).to(torch.float64).eval()
            self._module_cache[target] = mod
        return self._module_cache[target]

    def _call(self, node: fx.Node, mod: nn.Module | None, args: Any, kwargs: Any) -> Any:
        """Run a node on constant (batched) values with torch."""
        args, kwargs = _cast(args), _cast(kwargs)
        with torch.no_grad():
            if mod is not None:
                return mod(*args, **kwargs)
            if node.op == "call_method":
                self_arg, *rest = args
                return getattr(self_arg, str(node.target))(*rest, **kwargs)
            return node.target(*args, **kwargs)  # type: ignore[operator]

    # ------------------------------------------------------------------ affine ops
    def _affine(self, node: fx.Node, mod: nn.Module | None, args: Any, kwargs: Any) -> Any:
        out: list[Any] = []
        for k in range(self.n):
            syms = [a[k] for a in ir_values(args, kwargs) if not self._is_const(a)]
            union: list[int] = sorted({v for s in syms for v in s.vars})
            pos = {v: i for i, v in enumerate(union)}
            n_v = len(union)

            # Bound to this sample's k, pos and n_v (called only within this iteration).
            def part(value: Any, which: str, k: int = k, pos: dict[int, int] = pos, n_v: int = n_v) -> Any:
                if isinstance(value, list) and value and isinstance(value[0], Sym):
                    s = value[k]
                    if which == "const":
                        return s.const.unsqueeze(0)
                    full = torch.zeros(n_v, *s.const.shape, dtype=torch.float64)
                    if which == "coef" and s.vars:
                        full[[pos[v] for v in s.vars]] = s.coef
                    return full
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.n \
                        and value.dtype.is_floating_point:
                    row = value[k:k + 1].to(torch.float64)
                    return row if which == "const" else row.expand(n_v, *row.shape[1:])
                return value

            const_args, const_kwargs = _map_values((args, kwargs), lambda v: part(v, "const"))
            const = self._call(node, mod, const_args, const_kwargs)
            if n_v:
                coef_args, coef_kwargs = _map_values((args, kwargs), lambda v: part(v, "coef"))
                zero_args, zero_kwargs = _map_values((args, kwargs), lambda v: part(v, "zero"))
                coef = _sub(self._call(node, mod, coef_args, coef_kwargs),
                            self._call(node, mod, zero_args, zero_kwargs))
            else:
                coef = _sub(const, const)  # shape holder
                coef = _map_tensors(coef, lambda t: t[:0])
            out.append(_zip_syms(self, const, union, coef))
        return _unzip(out)

    # ------------------------------------------------------------------ masks at reading layers
    def _mask_input(self, node: fx.Node, value: Any) -> Any:
        arg = node.args[0]
        lay = self.graph.layouts.get(arg.name) if isinstance(arg, fx.Node) else None
        if not isinstance(lay, Layout):
            return value
        units = lay.units
        tracked = units >= 0
        removed = np.zeros(len(units), dtype=bool)
        removed[tracked] = ~self.kept[units[tracked]]
        free_pos: dict[int, list[int]] = {}
        for p, u in enumerate(units.tolist()):
            if u >= 0 and u in self.free_index:
                removed[p] = False
                free_pos.setdefault(u, []).append(p)
        dim = lay.dim
        if not removed.any() and not free_pos:
            return value
        mu = self.means.get(node.name)
        if self._is_const(value):
            value = value.to(torch.float64).clone()
            idx = [slice(None)] * value.dim()
            idx[dim] = torch.from_numpy(np.nonzero(removed)[0])
            value[tuple(idx)] = 0.0 if mu is None else mu[idx[dim]]
            if not free_pos:
                return value
            return [self._mask_sym(self._sym(value[k], [], torch.zeros(0, *value.shape[1:], dtype=torch.float64)),
                                   dim - 1, free_pos, removed, node, mu) for k in range(self.n)]
        return [self._mask_sym(s, dim - 1, free_pos, removed, node, mu) for s in value]

    def _mask_sym(self, s: Sym, dim: int, free_pos: dict[int, list[int]], removed: np.ndarray,
                  node: fx.Node, mu: torch.Tensor | None = None) -> Sym:
        """Positions of removed units read 0 (or ``mu``, 1-D inputs only); free ones ``m x + (1 - m) mu``."""
        const, coef = s.const.clone(), s.coef.clone()
        sel = [slice(None)] * const.dim()
        sel[dim] = torch.from_numpy(np.nonzero(removed)[0])
        const[tuple(sel)] = 0.0 if mu is None else mu[sel[dim]]
        coef[(slice(None), *sel)] = 0.0
        flat_mu = mu.reshape(-1) if mu is not None else None
        vars_ = list(s.vars)
        extra: list[torch.Tensor] = []
        for u, positions in sorted(free_pos.items()):
            m = self.free_index[u]
            sel = [slice(None)] * const.dim()
            sel[dim] = torch.tensor(positions)
            mask = torch.zeros_like(const, dtype=torch.bool)
            mask[tuple(sel)] = True
            n_old = len(s.vars)
            dependent = coef.reshape(n_old, -1)[:, mask.reshape(-1)].abs().amax(dim=0) >= EPS_COEF \
                if n_old else torch.zeros(int(mask.sum()), dtype=torch.bool)
            if self.mode == "paper":
                const, coef, vars_, extra = self._paper_gate(s, const, coef, vars_, extra, mask, m, node)
                continue
            flat_idx = torch.nonzero(mask.reshape(-1)).flatten()
            # Constant elements: value * m_u (+ (1 - m_u) mu with mean replacement).
            row = torch.zeros_like(const).reshape(-1)
            const_idx = flat_idx[~dependent]
            row[const_idx] = const.reshape(-1)[const_idx]
            const.reshape(-1)[const_idx] = 0.0
            if flat_mu is not None:
                row[flat_idx] -= flat_mu[flat_idx]
                const.reshape(-1)[flat_idx] += flat_mu[flat_idx]
            vars_.append(m)
            extra.append(row.reshape(const.shape))
            # Non-constant elements: the exact product m_u * x with a new variable each.
            for e in flat_idx[dependent].tolist():
                y = self._product(s, e, m)
                const.reshape(-1)[e] = 0.0 if flat_mu is None else float(flat_mu[e])
                coef.reshape(len(s.vars), -1)[:, e] = 0.0
                vars_.append(y)
                onehot = torch.zeros_like(const).reshape(-1)
                onehot[e] = 1.0
                extra.append(onehot.reshape(const.shape))
        if extra:
            coef = torch.cat([coef, torch.stack(extra)]) if len(s.vars) else torch.stack(extra)
            # coef rows beyond the original s.vars match the appended vars_ entries
        return self._merge_duplicates(const, vars_, coef)

    def _merge_duplicates(self, const: torch.Tensor, vars_: list[int], coef: torch.Tensor) -> Sym:
        seen: dict[int, int] = {}
        rows: list[torch.Tensor] = []
        order: list[int] = []
        for i, v in enumerate(vars_):
            if v in seen:
                rows[seen[v]] = rows[seen[v]] + coef[i]
            else:
                seen[v] = len(rows)
                rows.append(coef[i])
                order.append(v)
        stacked = torch.stack(rows) if rows else torch.zeros(0, *const.shape, dtype=torch.float64)
        return self._sym(const, order, stacked)

    def _product(self, s: Sym, e: int, m: int) -> int:
        """A new variable equal to ``m * x_e`` (m binary, x_e bounded): four inequalities."""
        lo, hi = float(s.lo.reshape(-1)[e]), float(s.hi.reshape(-1)[e])
        flat = s.coef.reshape(len(s.vars), -1).numpy()
        x_terms = self._terms(s, flat, e)
        c = float(s.const.reshape(-1)[e])
        y = self._new("p", min(lo, 0.0), max(hi, 0.0), Definition("product", ((x_terms, c),), ref=m))
        self.stats.product_variables += 1
        self._row([(y, 1.0), (m, -hi)], 0.0, pulp.LpConstraintLE, name=self._name(y, "hi"))     # y <= hi m
        self._row([(y, 1.0), (m, -lo)], 0.0, pulp.LpConstraintGE, name=self._name(y, "lo"))     # y >= lo m
        # y <= x - lo (1 - m)  <=>  y - x - lo m <= c - lo  ;  y >= x - hi (1 - m)
        self._row([(y, 1.0), (m, -lo)] + [(i, -w) for i, w in x_terms], -c + lo, pulp.LpConstraintLE,
                  name=self._name(y, "xlo"))
        self._row([(y, 1.0), (m, -hi)] + [(i, -w) for i, w in x_terms], -c + hi, pulp.LpConstraintGE,
                  name=self._name(y, "xhi"))
        return y

    def _paper_gate(self, s: Sym, const: torch.Tensor, coef: torch.Tensor, vars_: list[int],
                    extra: list[torch.Tensor], mask: torch.Tensor, m: int, node: fx.Node
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[torch.Tensor]]:
        """relu(x - (1 - s) U+) on the positions of one unit (the thesis's shifted ReLU)."""
        n_old = len(s.vars)
        flat_const = const.reshape(-1)
        flat_coef = coef.reshape(n_old, -1).numpy() if n_old else np.zeros((0, flat_const.numel()))
        hi_all = s.hi.reshape(-1)
        lo_all = s.lo.reshape(-1)
        for e in torch.nonzero(mask.reshape(-1)).flatten().tolist():
            x_terms = self._terms(s, flat_coef, e)
            if may_be_negative(float(lo_all[e]), float(hi_all[e])):
                raise UnsupportedGraphError(
                    f"the paper formulation gates a unit with relu(x - (1 - s) U+), which needs x >= 0 (a value "
                    f"after a ReLU); {ir.where(node)} reads values that can be negative; use --formulation budget")
            if not x_terms:
                # A constant x: U+ = max(x, 0), so relu(x - (1 - s) U+) = s * max(x, 0) exactly.
                value = max(float(flat_const[e]), 0.0)
                flat_const[e] = 0.0
                if n_old:
                    coef.reshape(n_old, -1)[:, e] = 0.0
                if value > 0.0:
                    onehot = torch.zeros_like(const).reshape(-1)
                    onehot[e] = value
                    vars_.append(m)
                    extra.append(onehot.reshape(const.shape))
                continue
            u_plus = max(float(hi_all[e]), 0.0)
            terms = x_terms + [(m, u_plus)]
            c = float(flat_const[e]) - u_plus
            lo, hi = float(lo_all[e]) - u_plus, float(hi_all[e])
            h = self._relu_element(terms, c, lo, hi)
            flat_const[e] = 0.0
            if n_old:
                coef.reshape(n_old, -1)[:, e] = 0.0
            onehot = torch.zeros_like(const).reshape(-1)
            if h is None:
                continue
            onehot[e] = 1.0
            vars_.append(h)
            extra.append(onehot.reshape(const.shape))
        return const, coef, vars_, extra

    # ------------------------------------------------------------------ ReLU and max pooling
    def _relu_element(self, terms: list[tuple[int, float]], c: float, lo: float, hi: float) -> int | None:
        """Encode relu(sum terms + c) with bounds [lo, hi]; return the variable, None when it is 0."""
        if hi <= 0.0:
            self.stats.relu_stable += 1
            return None
        vars_ = [i for i, _ in terms]
        coefs = np.array([w for _, w in terms])
        if lo >= 0.0:
            self.stats.relu_stable += 1
            h = self._new("a", lo, hi, Definition("affine", ((terms, c),)))
            self.stats.continuous += 1
            self._row([(h, 1.0)] + [(i, -w) for i, w in terms], -c, pulp.LpConstraintEQ, name=self._name(h, "eq"))
            self._relax[h] = identity_relaxation(vars_, coefs, c)
            return h
        h = self._new("h", 0.0, hi, Definition("relu", ((terms, c),)))
        self._relax[h] = relu_relaxation(vars_, coefs, c, lo, hi)
        v = self._new("v", 0.0, 1.0, Definition("phase", ((terms, c),)), pulp.LpBinary)
        self.stats.relu_binaries += 1
        neg = [(i, -w) for i, w in terms]
        self._row([(h, 1.0)] + neg, -c, pulp.LpConstraintGE, name=self._name(h, "ge"))        # h >= a
        self._row([(h, 1.0), (v, -lo)] + neg, -c + lo, pulp.LpConstraintLE,                  # h <= a - lo (1 - v)
                  name=self._name(h, "off"))
        self._row([(h, 1.0), (v, -hi)], 0.0, pulp.LpConstraintLE, name=self._name(h, "on"))  # h <= hi v
        return h

    def _relu_all(self, node: fx.Node, value: list[Sym]) -> list[Sym]:
        out = []
        widths = []
        ibp_widths = []
        phases = self._sample_phases(node) if self.bounds == "sample" else None
        for k, s in enumerate(value):
            flat_const = s.const.reshape(-1)
            n_old = len(s.vars)
            flat_coef = s.coef.reshape(n_old, -1).numpy() if n_old else np.zeros((0, flat_const.numel()))
            dependent = (np.abs(flat_coef) >= EPS_COEF).any(axis=0) if n_old else np.zeros(flat_const.numel(), bool)
            lo, hi = s.lo.reshape(-1).clone(), s.hi.reshape(-1).clone()
            ibp_widths += (hi - lo)[torch.from_numpy(dependent)].tolist()
            if self.bounds == "crown" and n_old and any(v in self._relax for v in s.vars):
                c_lo, c_hi = crown_bounds(s.const, s.vars, s.coef, self._relax, self.var_lo, self.var_hi)
                lo, hi = torch.maximum(lo, c_lo), torch.minimum(hi, c_hi)
            if self.record_bounds:
                self.relu_bounds.setdefault(node.name, []).append((lo.clone(), hi.clone(), dependent.copy()))
            const = torch.relu(flat_const.clone())
            const[torch.from_numpy(dependent)] = 0.0
            new_vars: list[int] = []
            rows: list[int] = []
            for e in np.nonzero(dependent)[0].tolist():
                widths.append(float(hi[e] - lo[e]))
                terms = self._terms(s, flat_coef, e)
                if phases is not None:
                    # The thesis's per-sample bounds: the phase the unpruned network has on this sample.
                    h = self._fixed_phase(terms, float(flat_const[e]), bool(phases[k].reshape(-1)[e] > 0),
                                          float(lo[e]), float(hi[e]))
                else:
                    h = self._relu_element(terms, float(flat_const[e]), float(lo[e]), float(hi[e]))
                if h is not None:
                    new_vars.append(h)
                    rows.append(e)
            coef = torch.zeros(len(new_vars), flat_const.numel(), dtype=torch.float64)
            if new_vars:
                coef[torch.arange(len(new_vars)), torch.tensor(rows)] = 1.0
            out.append(self._sym(const.reshape(s.const.shape), new_vars, coef.reshape(len(new_vars), *s.const.shape)))
        if widths:
            self.stats.width_per_layer[node.name] = float(np.mean(widths))
            self.stats.interval_width_per_layer[node.name] = float(np.mean(ibp_widths))
        return out

    def _sample_phases(self, node: fx.Node) -> torch.Tensor:
        """Pre-activation of ``node`` (a ReLU) in the unpruned network on every sample."""
        if not self._phase:
            self._phase = sample_phases(self.gm, self.x)
        return self._phase[node.name].double()

    def _fixed_phase(self, terms: list[tuple[int, float]], c: float, active: bool, lo: float,
                     hi: float) -> int | None:
        """``--bounds sample``: relu(a) as ``a`` or ``0`` by the unpruned network's phase (no binary).

        Not valid once units are removed (a phase can flip); the thesis's bounds behave the same.
        """
        self.stats.relu_stable += 1
        if not active:
            return None
        # h = a >= 0: the phase stays active (feasible at the unpruned network, where a > 0).
        h = self._new("a", max(lo, 0.0), max(hi, 0.0), Definition("affine", ((terms, c),)))
        self.stats.continuous += 1
        self._row([(h, 1.0)] + [(i, -w) for i, w in terms], -c, pulp.LpConstraintEQ, name=self._name(h, "eq"))
        return h

    def _maxpool(self, node: fx.Node, mod: nn.Module | None, args: Any, kwargs: Any) -> list[Sym]:
        shape_in = tuple(args[0][0].const.shape)
        shape_out = ir.tensor_shape(node)
        assert shape_out is not None
        windows = _pool_windows(node, mod, args, kwargs, shape_in, tuple(shape_out[1:]))
        out = []
        for s in args[0]:
            flat_const = s.const.reshape(-1)
            n_old = len(s.vars)
            flat_coef = s.coef.reshape(n_old, -1).numpy() if n_old else np.zeros((0, flat_const.numel()))
            dependent = (np.abs(flat_coef) >= EPS_COEF).any(axis=0) if n_old else np.zeros(flat_const.numel(), bool)
            lo, hi = s.lo.reshape(-1).numpy(), s.hi.reshape(-1).numpy()
            n_out = windows.shape[0]
            const = torch.zeros(n_out, dtype=torch.float64)
            new_vars: list[int] = []
            rows: list[int] = []
            copies: list[tuple[int, int]] = []
            for o in range(n_out):
                cand = [int(i) for i in windows[o] if i >= 0]
                if not any(dependent[i] for i in cand):
                    const[o] = max(float(flat_const[i]) for i in cand)
                    continue
                floor = max(lo[i] for i in cand)
                alive = [i for i in cand if hi[i] >= floor]
                if len(alive) == 1:
                    copies.append((o, alive[0]))
                    continue
                top = max(hi[i] for i in alive)
                terms = {i: self._terms(s, flat_coef, i) for i in alive}
                inputs = tuple((terms[i], float(flat_const[i])) for i in alive)
                y = self._new("y", floor, top, Definition("max", inputs))
                ds = []
                for k, i in enumerate(alive):
                    self._row([(y, 1.0)] + [(j, -w) for j, w in terms[i]], -float(flat_const[i]), pulp.LpConstraintGE,
                              name=self._name(y, f"ge{k}"))
                    d = self._new("d", 0.0, 1.0, Definition("argmax", inputs, ref=y, index=k), pulp.LpBinary)
                    self.stats.maxpool_binaries += 1
                    ds.append(d)
                    big = top - lo[i]
                    # y <= x_i + big (1 - d)
                    self._row([(y, 1.0), (d, big)] + [(j, -w) for j, w in terms[i]], -float(flat_const[i]) - big,
                              pulp.LpConstraintLE, name=self._name(y, f"le{k}"))
                self._row([(d, 1.0) for d in ds], -1.0, pulp.LpConstraintEQ, name=self._name(y, "one"))
                new_vars.append(y)
                rows.append(o)
            # Copies keep the element's own expression.
            coef_copy = torch.zeros(n_old, n_out, dtype=torch.float64)
            for o, i in copies:
                const[o] = flat_const[i]
                if n_old:
                    coef_copy[:, o] = torch.from_numpy(flat_coef[:, i])
            coef_new = torch.zeros(len(new_vars), n_out, dtype=torch.float64)
            if new_vars:
                coef_new[torch.arange(len(new_vars)), torch.tensor(rows)] = 1.0
            vars_ = list(s.vars) + new_vars
            coef = torch.cat([coef_copy, coef_new]).reshape(len(vars_), *shape_out[1:])
            out.append(self._sym(const.reshape(shape_out[1:]), vars_, coef))
        return out


# ---------------------------------------------------------------------- helpers
def _last_readers(graph: fx.Graph) -> dict[str, list[str]]:
    """For each node, the values whose last reader it is (the output node reads nothing here:
    the walk returns before it would free anything)."""
    last: dict[str, str] = {}
    for node in graph.nodes:
        for read in node.all_input_nodes:
            last[read.name] = node.name
    out: dict[str, list[str]] = {}
    for value, reader in last.items():
        out.setdefault(reader, []).append(value)
    return out


def _affine_value(expr: Affine, values: np.ndarray) -> float:
    terms, const = expr
    return math.fsum([const, *(w * values[i] for i, w in terms)])


def _evaluate_definition(d: Definition, values: np.ndarray) -> float:
    """The value of a variable defined by ``d`` from the (earlier) ``values``."""
    if d.kind in ("max", "argmax"):
        candidates = [_affine_value(e, values) for e in d.inputs]
        if d.kind == "max":
            return max(candidates)
        return 1.0 if int(np.argmax(candidates)) == d.index else 0.0
    a = _affine_value(d.inputs[0], values)
    if d.kind == "relu":
        return max(a, 0.0)
    if d.kind == "phase":
        return 1.0 if a > 0.0 else 0.0
    if d.kind == "product":
        return values[d.ref] * a
    if d.kind == "affine":
        return a
    raise ValueError(f"unknown definition kind {d.kind!r}")


def ir_values(args: Any, kwargs: Any) -> list[Any]:
    """Tensor-ish values among (nested) args and kwargs, Sym lists counted as one value."""
    found: list[Any] = []

    def walk(v: Any) -> None:
        if isinstance(v, list) and v and isinstance(v[0], Sym):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for a in v:
                walk(a)
        elif isinstance(v, dict):
            for a in v.values():
                walk(a)
        elif isinstance(v, torch.Tensor):
            found.append(v)

    walk(args)
    walk(kwargs)
    return found


def _map(arg: Any, env: dict[str, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: env[n.name])


def _map_values(value: Any, fn: Any) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], Sym):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_values(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_values(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_values(v, fn) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return fn(value)
    return value


def _cast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        return value.to(torch.float64)
    if isinstance(value, tuple):
        return tuple(_cast(v) for v in value)
    if isinstance(value, list):
        return [_cast(v) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v) for k, v in value.items()}
    return value


def _sub(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a - b
    return type(a)(_sub(x, y) for x, y in zip(a, b))


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    return type(value)(_map_tensors(v, fn) for v in value)


def _zip_syms(enc: Encoder, const: Any, union: list[int], coef: Any) -> Any:
    """Pair a (possibly tuple-valued) constant result (batch 1) with its coefficient result."""
    if isinstance(const, torch.Tensor):
        return enc._sym(const[0], list(union), coef)
    return tuple(_zip_syms(enc, c, union, k) for c, k in zip(const, coef))


def _unzip(per_sample: list[Any]) -> Any:
    """[sample][...] -> [...][sample]: a list of Syms, or a tuple of such lists for split/chunk."""
    first = per_sample[0]
    if isinstance(first, Sym):
        return per_sample
    return tuple(_unzip([s[i] for s in per_sample]) for i in range(len(first)))


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach().to(torch.float64) if isinstance(obj, torch.Tensor) else obj


def _pool_windows(node: fx.Node, mod: nn.Module | None, args: Any, kwargs: Any, shape_in: tuple[int, ...],
                  shape_out: tuple[int, ...]) -> np.ndarray:
    """Flat input indices of every output element's window (-1 for padding), by running the pool
    on an index image: exact for any kernel, stride, padding and dilation."""
    n_in = math.prod(shape_in)
    if mod is not None:
        k, st, pad, dil, ceil = mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode
    else:
        k = ir.arg_or_kwarg(node, 1, "kernel_size")
        st = ir.arg_or_kwarg(node, 2, "stride") or k
        pad = ir.arg_or_kwarg(node, 3, "padding", 0)
        dil = ir.arg_or_kwarg(node, 4, "dilation", 1)
        ceil = ir.arg_or_kwarg(node, 5, "ceil_mode", False)
    spatial = len(shape_in) - 1
    def tup(v: Any) -> tuple[Any, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial

    k, st, pad, dil = tup(k), tup(st), tup(pad), tup(dil)
    idx = torch.arange(n_in, dtype=torch.float64).reshape(1, *shape_in) + 1.0  # 0 marks padding
    if spatial == 1:
        idx = idx.unsqueeze(-2)
        k, st, pad, dil = (1, *k), (1, *st), (0, *pad), (1, *dil)
    cols = F.unfold(idx, kernel_size=k, dilation=dil, padding=pad, stride=st)  # (1, C*kh*kw, L)
    c = shape_in[0]
    cols = cols.reshape(c, math.prod(k), -1).permute(0, 2, 1).reshape(-1, math.prod(k))
    if cols.shape[0] != math.prod(shape_out):
        raise UnsupportedGraphError(f"{ir.where(node)}: max pooling with ceil_mode={ceil} and this padding cannot "
                                    "be encoded; use ceil_mode=False")
    return (cols.long() - 1).numpy()


def margin_hinge(prob: pulp.LpProblem, enc: Encoder, logits: list[Sym], y: torch.Tensor,
                 target: torch.Tensor) -> list[pulp.LpVariable]:
    """Slack ``xi_k >= target_k - (z_y - z_c)`` for every class ``c != y_k``, ``xi_k >= 0``, per sample.

    The linear surrogate of the loss both formulations minimise: each sample should keep the
    logit margin ``target_k`` (usually the original network's).  Returns the slacks.

    Each row is written as one expression from the logits' coefficient columns, with the terms,
    their order and their float arithmetic of ``xi - target + z_y - z_c`` in PuLP (so the same
    problem, variable order included), without the three intermediate copies that PuLP's
    operators make of every row: on a 1000-class head read by 1280 keep variables that was most
    of the time of building the sub-problem.
    """
    xi = []
    for k, s in enumerate(logits):
        yk = int(y[k])
        v = pulp.LpVariable(f"xi{k}", lowBound=0.0)
        xi.append(v)
        flat_const = s.const.reshape(-1).tolist()
        n_out = len(flat_const)
        cols = s.coef.reshape(len(s.vars), n_out).numpy() if s.vars else np.zeros((0, n_out))
        kept = np.abs(cols) >= EPS_COEF  # the terms expression() keeps, per column
        variables = [enc.variables[i] for i in s.vars]
        in_y = kept[:, yk]
        y_rows = np.nonzero(in_y)[0]
        y_vars = [variables[i] for i in y_rows]
        y_coef = cols[y_rows, yk]
        base = 0 + float(target[k]) * -1 + flat_const[yk]  # (v - target) + z_y: PuLP's constant, in its order
        for c in range(n_out):
            if c == yk:
                continue
            both = kept[y_rows, c]
            merged = np.where(both, y_coef + -cols[y_rows, c], y_coef)  # z_y's term, less z_c's where both have one
            extra = np.nonzero(kept[:, c] & ~in_y)[0]  # z_c's terms on variables z_y does not have, after them
            terms = [(v, 1), *zip(y_vars, merged.tolist()),
                     *zip([variables[i] for i in extra], (-cols[extra, c]).tolist())]
            prob += pulp.LpConstraint(pulp.LpAffineExpression(terms, constant=base + -flat_const[c]),
                                      pulp.LpConstraintGE, rhs=0)
    return xi


def evaluate(enc: Encoder, syms: list[Sym]) -> np.ndarray:
    """The values of ``syms`` at the solver's solution (rows: samples)."""
    values = np.array([v.varValue if v.varValue is not None else 0.0 for v in enc.variables])
    out = []
    for s in syms:
        flat = s.const.reshape(-1).numpy().copy()
        if s.vars:
            flat += values[s.vars] @ s.coef.reshape(len(s.vars), -1).numpy()
        out.append(flat)
    return np.stack(out)


__all__ = ["Definition", "Encoder", "EncodingStats", "Sym", "evaluate", "margin_hinge"]

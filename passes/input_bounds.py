"""Bounds of every value of a network over a box of inputs, and which values are constant on it.

The lossless removal (:mod:`.dead_units`) must prove that a unit's output takes one value for
every input in a box (the data's range); this module computes, for each tensor node of a traced
graph and each element of it (batch of one sample):

* ``lo``/``hi``: sound bounds that contain both the value in exact arithmetic and the value the
  network computes in its own floating-point type (float32 as a rule), for every input in the box;
* ``const``: whether the element takes one and the same value, bit for bit, on the whole box
  (an input feature whose range is a single value, a ReLU whose input is below zero everywhere,
  and whatever only such values feed);
* ``ref``: the value the network computes on one point of the box (its midpoint), which is the
  value of every constant element.

How.  Interval arithmetic (IBP), intersected with *forward linear bounds*: every value carries a
lower and an upper affine function of the input features, ``c + a . x``, pushed through affine
ops exactly (Linear and Conv split their weights into positive and negative parts, so the upper
function of the output takes the upper function of the input where a weight is positive and the
lower where negative) and through a ReLU by its linear relaxation (the chord above, ``0`` or the
identity below, as in CROWN).  Coefficients are applied by torch with the input features as the
batch, so a convolution never becomes a dense matrix; where ``features x elements`` of a value
would exceed ``linear_limit``, that value and everything after it fall back to interval bounds
(``concretised``).  Other non-linear ops (max pooling, monotone activations, products) take
interval bounds and restart the linear functions from them.

Soundness in floating point.  Two rounding effects are bounded, both with the classical bound
``gamma_n * sum |terms|`` (``gamma_n = n u / (1 - n u)``, valid for any summation order):

* the network's own rounding: each op widens its interval bounds by ``gamma`` of its fan-in
  times the magnitude of its terms, so the bounds contain the *computed* values, op after op;
  the linear functions describe exact arithmetic, so they carry ``err``, a bound on how far the
  computed value has drifted from them since they were last restarted, which widens them when
  they are turned into bounds;
* this module's own float64 arithmetic: ``u`` is the network type's unit roundoff plus float64's,
  and the decision that a ReLU input is below zero (:func:`below_zero`) first widens its bound by
  :func:`.mip.bounds.margin` (1e-5 absolute and relative, plus float64 rounding of the sum), the
  margin the MILP bounds use.

Ops it does not know give unbounded values (``-inf``/``inf``, never constant), so a graph with
such ops is still analysed soundly, only less tightly after them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from oamipc import ir

from .mip.bounds import margin

log = logging.getLogger(__name__)

LINEAR_LIMIT = 1 << 24
"""Largest ``input features x elements`` of one value's linear coefficients (each of its two
coefficient tensors then takes at most 128 MiB in float64); larger values use interval bounds."""

_F64_ROUNDOFF = 2.0 ** -53
_RELAX_SLACK = 1e-12  # the ReLU chord's slope is raised by this (relative) so that its rounding stays above the chord

# Flat regions of clamp-like activations: (name -> (low flat value or None, high flat value or None)).
_MONOTONE = {"sigmoid", "tanh", "relu6", "hardtanh", "hardsigmoid", "leaky_relu", "elu", "softplus", "celu",
             "selu", "logsigmoid"}
# Non-monotone activations with a global minimum (value) below which they never go; their maximum
# over an interval is at one of its ends.
_DIP = {"gelu": -0.17005, "silu": -0.27847, "mish": -0.30885, "hardswish": -0.375}
_PASS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout", "clone",
         "contiguous", "detach", "identity", "to", "float", "_to_copy", "native_dropout"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "squeeze_", "unflatten"}
_SPLIT = {"split", "split_with_sizes", "chunk"}
_NON_TENSOR = {"size", "dim", "sym_size", "numel", "getattr"}
_SUM = {"mean", "sum"}


@dataclass
class Val:
    """One tensor node over the box (see the module docstring); every tensor has batch size 1.

    ``a_lo``/``a_hi`` (shape ``(n_vars, *S)``; None stands for zero) and ``c_lo``/``c_hi`` are the
    lower and upper linear functions ``c + a . x`` of the input features ``x``; ``err`` bounds how
    far the computed value is from them; ``mag`` bounds the magnitude of the value (``max(|lo|,
    |hi|)``, kept so that rounding bounds need no recomputation).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    const: torch.Tensor
    err: torch.Tensor
    c_lo: torch.Tensor
    c_hi: torch.Tensor
    a_lo: torch.Tensor | None = None
    a_hi: torch.Tensor | None = None

    @property
    def mag(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())


@dataclass
class ReluStats:
    """How the elements of one ReLU's input lie over the box."""

    elements: int = 0
    dead: int = 0  # below zero everywhere: the output is exactly 0
    active: int = 0  # above zero everywhere: the ReLU is the identity

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BoxBounds:
    """The result: every tensor node's :class:`Val` (or tuple of them), the network's values on
    the reference point, the ReLU statistics, and which nodes had to give up linear bounds."""

    values: dict[str, Any]
    ref: dict[str, Any]
    relus: dict[str, ReluStats] = field(default_factory=dict)
    relu_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # tightest bounds
    concretised: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # nodes whose values could not be bounded
    n_vars: int = 0


def gamma(n: int, u: float) -> float:
    """``n u / (1 - n u)``: the relative rounding bound of a sum of ``n`` terms at unit roundoff ``u``."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def below_zero(lo: torch.Tensor, hi: torch.Tensor, n_ops: int) -> torch.Tensor:
    """Elements whose upper bound, widened by :func:`.mip.bounds.margin`, is still at most 0."""
    return hi + margin(lo, hi, torch.maximum(lo.abs(), hi.abs()), n_ops) <= 0.0


def above_zero(lo: torch.Tensor, hi: torch.Tensor, n_ops: int) -> torch.Tensor:
    """Elements whose lower bound, widened by :func:`.mip.bounds.margin`, is still at least 0."""
    return lo - margin(lo, hi, torch.maximum(lo.abs(), hi.abs()), n_ops) >= 0.0


class _Recorder(fx.Interpreter):
    """Runs the network once and keeps every node's output (the reference point's values)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


class _Opaque:
    """A non-float value that depends on the input (an index, a mask): anything computed from it is unbounded."""


def _has_val(x: Any) -> bool:
    if isinstance(x, (Val, _Opaque)):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_val(v) for v in x)
    if isinstance(x, dict):
        return any(_has_val(v) for v in x.values())
    return False


def _has_opaque(x: Any) -> bool:
    if isinstance(x, _Opaque):
        return True
    if isinstance(x, (list, tuple)):
        return any(_has_opaque(v) for v in x)
    if isinstance(x, dict):
        return any(_has_opaque(v) for v in x.values())
    return False


class BoxPropagation:
    """Walks the graph once in topological order (see the module docstring).

    ``lo``/``hi``: the input box, shape of one sample with a batch dimension of 1 (any float
    type; it is read in float64).  ``linear``: track linear bounds (else intervals only).
    """

    def __init__(self, gm: fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, *, linear: bool = True,
                 linear_limit: int = LINEAR_LIMIT) -> None:
        self.gm = gm
        self.box_lo = lo.detach().to(torch.float64)
        self.box_hi = hi.detach().to(torch.float64)
        self.linear = linear
        self.linear_limit = linear_limit
        params = list(gm.parameters())
        self.dtype = params[0].dtype if params else torch.float32
        # Rounding unit: the network's, plus float64's for this module's own arithmetic.
        self.u = float(torch.finfo(self.dtype).eps) / 2.0 + _F64_ROUNDOFF
        var = (self.box_hi > self.box_lo).reshape(-1)
        self.var_index = torch.nonzero(var).flatten()
        self.n_vars = int(self.var_index.numel())
        self.x_lo = self.box_lo.reshape(-1)[self.var_index]
        self.x_hi = self.box_hi.reshape(-1)[self.var_index]
        self._f64: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------------------------ walk
    def run(self) -> BoxBounds:
        mid = (self.box_lo + (self.box_hi - self.box_lo) / 2).to(self.dtype)
        mid = torch.minimum(torch.maximum(mid, self.box_lo.to(self.dtype)), self.box_hi.to(self.dtype))
        recorder = _Recorder(self.gm)
        with torch.no_grad():
            recorder.run(mid)
        self.ref = recorder.values
        result = BoxBounds({}, self.ref, n_vars=self.n_vars)
        self.result = result
        env: dict[str, Any] = {}
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    env[node.name] = self._input()
                elif node.op in ("get_attr", "output"):
                    env[node.name] = self.ref.get(node.name)
                else:
                    env[node.name] = self._visit(node, env)
                value = env[node.name]
                if isinstance(value, Val) or (isinstance(value, tuple) and value
                                              and all(isinstance(v, Val) for v in value)):
                    result.values[node.name] = value
        return result

    def _input(self) -> Val:
        lo, hi = self.box_lo, self.box_hi
        shape = lo.shape
        const = lo == hi
        c = torch.where(const, lo, torch.zeros((), dtype=torch.float64))
        a = None
        if self.linear and self.n_vars and self.n_vars * lo.numel() <= self.linear_limit:
            a = torch.zeros(self.n_vars, lo.numel(), dtype=torch.float64)
            a[torch.arange(self.n_vars), self.var_index] = 1.0
            a = a.reshape(self.n_vars, *shape[1:])
        if a is None:
            return Val(lo, hi, const, torch.zeros_like(lo), lo, hi)
        return Val(lo, hi, const, torch.zeros_like(lo), c, c, a, a)

    def _visit(self, node: fx.Node, env: dict[str, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if not _has_val((args, kwargs)):
            return self.ref.get(node.name)  # the same on every input of the box
        mod = ir.get_module(self.gm, str(node.target)) if node.op == "call_module" else None
        name = type(mod).__name__ if mod is not None else ir.op_name(node)
        if mod is None and name in _NON_TENSOR:
            return self.ref.get(node.name)  # shapes do not depend on the values
        try:
            if _has_opaque((args, kwargs)):
                raise _UnsupportedError("an argument is an unbounded non-float value")
            out = self._dispatch(node, mod, name, args, kwargs)
        except _UnsupportedError as exc:
            log.debug("box bounds: %s at %s; its value is unbounded", exc, ir.where(node))
            out = None
        if out is None:
            self.result.unknown.append(node.name)
            return self._unknown(node)
        return out

    def _unknown(self, node: fx.Node) -> Any:
        ref = self.ref.get(node.name)
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            return _unbounded(ref)
        if isinstance(ref, (tuple, list)) and ref and all(isinstance(r, torch.Tensor) and r.is_floating_point()
                                                          for r in ref):
            return tuple(_unbounded(r) for r in ref)
        return _Opaque()

    # ------------------------------------------------------------------------------------ dispatch
    def _dispatch(self, node: fx.Node, mod: nn.Module | None, name: str, args: Any, kwargs: Any) -> Any:
        ref = self.ref.get(node.name)
        x = args[0] if args else None
        if mod is not None:
            return self._module(node, mod, x, ref)
        op = name
        if not isinstance(x, Val) and op not in ("add", "iadd", "sub", "rsub", "isub", "mul", "imul", "cat",
                                                  "concat", "concatenate", "getitem"):
            raise _UnsupportedError(f"{op} with a first argument that does not depend on the input")
        if op in ("relu", "relu_"):
            return self._relu(node, x)
        if op in _PASS:
            return x
        if op in _RESHAPE:
            return self._reshape(x, ref)
        if op in ("permute", "transpose", "t"):
            return self._permute(node, op, x, args, ref)
        if op in ("add", "iadd", "sub", "isub", "rsub"):
            if "alpha" in kwargs:
                raise _UnsupportedError("add/sub with alpha")
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if op == "rsub":
                a, b = b, a
            return self._add(self._lift(a, ref), self._lift(b, ref), ref, sign=-1.0 if "sub" in op else 1.0)
        if op in ("mul", "imul", "mul_"):
            return self._mul(args[0], args[1], ref)
        if op in ("truediv", "div", "div_", "itruediv"):
            if _has_val(args[1]) or kwargs:
                raise _UnsupportedError("division by a value that depends on the input")
            return self._scale(args[0], 1.0 / torch.as_tensor(args[1], dtype=torch.float64), ref, ops=2)
        if op == "neg":
            return self._scale(x, torch.tensor(-1.0, dtype=torch.float64), ref, ops=1)
        if op in ("cat", "concat", "concatenate"):
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self._cat([self._lift(t, r) for t, r in zip(tensors, self._refs(node, 0))], dim, ref)
        if op in _SPLIT:
            return self._split(x, ref, args, kwargs, op)
        if op == "getitem":
            if isinstance(args[0], tuple) and isinstance(args[1], int):
                return args[0][args[1]]
            raise _UnsupportedError("indexing into a tensor")
        if op in _SUM:
            return self._sum(node, op, x, args, kwargs, ref)
        if op in ("max_pool1d", "max_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d"):
            fn = getattr(F, op)
            return self._maxpool(x, lambda t: fn(t, *args[1:], **kwargs), ref)
        if op in ("avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"):
            fn = getattr(F, op)
            return self._avgpool(x, lambda t: fn(t, *args[1:], **kwargs), ref, op, args, kwargs)
        if op.rstrip("_") in _MONOTONE or op.rstrip("_") in _DIP:
            fn64 = _function(node, op.rstrip("_"), args, kwargs)
            return self._elementwise(x, op.rstrip("_"), fn64, ref)
        raise _UnsupportedError(f"op {op}")

    def _refs(self, node: fx.Node, index: int) -> list[Any]:
        seq = node.args[index] if len(node.args) > index else node.kwargs.get("tensors", ())
        return [self.ref.get(a.name) if isinstance(a, fx.Node) else a for a in seq]

    def _module(self, node: fx.Node, mod: nn.Module, x: Any, ref: Any) -> Any:
        if not isinstance(x, Val):
            raise _UnsupportedError(f"module {type(mod).__name__} on a value that is not a tensor")
        if isinstance(mod, nn.Linear):
            return self._linear(node, mod, x, ref)
        if isinstance(mod, ir.CONV_MODULES):
            return self._conv(node, mod, x, ref)
        if isinstance(mod, ir.BATCHNORM_MODULES):
            return self._batchnorm(mod, x, ref)
        if isinstance(mod, nn.ReLU):
            return self._relu(node, x)
        if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            return x
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._reshape(x, ref)
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            if getattr(mod, "return_indices", False):
                raise _UnsupportedError("max pooling that returns indices")
            return self._maxpool(x, mod, ref)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            return self._avgpool(x, mod, ref, type(mod).__name__, (), {})
        name = _MODULE_FUNCTIONS.get(type(mod))
        if name is not None:
            return self._elementwise(x, name, _module_function(mod), ref)
        raise _UnsupportedError(f"module {type(mod).__name__}")

    # ------------------------------------------------------------------------------------ helpers
    def _lift(self, v: Any, ref: Any) -> Val:
        """A value that does not depend on the input as an exact :class:`Val`."""
        if isinstance(v, Val):
            return v
        t = torch.as_tensor(v, dtype=torch.float64)
        return Val(t, t.clone(), torch.ones(t.shape, dtype=torch.bool), torch.zeros_like(t), t, t.clone())

    def _fits(self, numel: int) -> bool:
        return self.linear and self.n_vars > 0 and self.n_vars * numel <= self.linear_limit

    def _bounded(self, v: Val) -> Val:
        """``v`` with its interval bounds intersected with its linear functions (widened by ``err``).

        Done where bounds are used (the inputs of ReLUs and other non-linear ops), not after every
        op: between them the linear functions carry the information."""
        if v.a_lo is None or v.a_hi is None:
            lo, hi = torch.maximum(v.lo, v.c_lo - v.err), torch.minimum(v.hi, v.c_hi + v.err)
            return replace(v, lo=lo, hi=torch.maximum(hi, lo))
        flat_shape = (self.n_vars, -1)
        x_mid, x_rad = (self.x_lo + self.x_hi) / 2, (self.x_hi - self.x_lo) / 2  # exact: halves of float32 values
        x_mag = torch.maximum(self.x_lo.abs(), self.x_hi.abs())

        def span(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            flat = a.reshape(flat_shape)
            mag = flat.abs()
            shape = v.lo.shape
            return (x_mid @ flat).reshape(shape), (x_rad @ mag).reshape(shape), (x_mag @ mag).reshape(shape)

        mid_lo, rad_lo, scale_lo = span(v.a_lo)
        mid_hi, rad_hi, scale_hi = (mid_lo, rad_lo, scale_lo) if v.a_hi is v.a_lo else span(v.a_hi)
        pad = gamma(self.n_vars + 4, _F64_ROUNDOFF)  # this sum's own rounding
        lin_lo = v.c_lo + mid_lo - rad_lo - pad * (v.c_lo.abs() + scale_lo)
        lin_hi = v.c_hi + mid_hi + rad_hi + pad * (v.c_hi.abs() + scale_hi)
        lo = torch.maximum(v.lo, lin_lo - v.err)
        hi = torch.minimum(v.hi, lin_hi + v.err)
        return replace(v, lo=lo, hi=torch.maximum(hi, lo))

    def _f64_module(self, target: str, mod: nn.Module) -> nn.Module:
        if target not in self._f64:
            import copy

            self._f64[target] = copy.deepcopy(mod).to(torch.float64).eval()
        return self._f64[target]

    # ------------------------------------------------------------------------------------ affine layers
    def _affine(self, node: fx.Node, x: Val, ref: torch.Tensor, lin: Callable[[torch.Tensor, torch.Tensor],
                torch.Tensor], weight: torch.Tensor, b_out: torch.Tensor, fan_in: int) -> Val:
        """A Linear or Conv layer over the box: ``lin(input, weight)`` applies it without its bias,
        ``b_out`` is the bias broadcast to the output's shape (see the module docstring).

        Upper functions take ``W+`` times the input's upper and ``W-`` times its lower function,
        computed as ``W mid + |W| rad`` (two products instead of four); the constants ride in the
        same batch as the coefficients."""
        if not x.finite:
            return _unbounded(ref)
        w_abs = weight.abs()
        mid, rad = (x.lo + x.hi) / 2, (x.hi - x.lo) / 2
        rad_mag = lin(torch.cat([rad, x.mag]), w_abs)
        out_mid, out_rad, local = lin(mid, weight) + b_out, rad_mag[:1], rad_mag[1:] + b_out.abs()
        # The network's rounding (its terms' magnitude ``local``) and this module's own.
        round_out = gamma(fan_in + 2, self.u) * local + gamma(4, self.u) * (out_mid.abs() + out_rad)
        ibp_lo, ibp_hi = out_mid - out_rad - round_out, out_mid + out_rad + round_out
        const = ~(lin((~x.const).to(torch.float64), (weight != 0).to(torch.float64)) > 0)
        tracked = x.a_lo is not None and x.a_hi is not None
        if not (tracked and self._fits(ref.numel())):
            if tracked:
                self.result.concretised.append(node.name)
            # Interval bounds contain the computed values: the functions restart from them.
            return Val(ibp_lo, ibp_hi, const, torch.zeros_like(ibp_lo), ibp_lo, ibp_hi)
        assert x.a_lo is not None and x.a_hi is not None
        err = lin(x.err, w_abs) + round_out
        if x.a_lo is x.a_hi and x.c_lo is x.c_hi:  # one function: W+ f + W- f = W f
            both = lin(torch.cat([x.a_lo, x.c_lo]), weight)
            a, c = both[:-1], both[-1:] + b_out
            return Val(ibp_lo, ibp_hi, const, err, c, c, a, a)
        mids = lin(torch.cat([(x.a_hi + x.a_lo) / 2, (x.c_hi + x.c_lo) / 2]), weight)
        rads = lin(torch.cat([(x.a_hi - x.a_lo) / 2, (x.c_hi - x.c_lo) / 2]), w_abs)
        lo_f, hi_f = mids - rads, mids + rads
        return Val(ibp_lo, ibp_hi, const, err, lo_f[-1:] + b_out, hi_f[-1:] + b_out, lo_f[:-1], hi_f[:-1])

    def _linear(self, node: fx.Node, mod: nn.Linear, x: Val, ref: torch.Tensor) -> Val:
        m = self._f64_module(str(node.target), mod)
        assert isinstance(m, nn.Linear)
        b_out = torch.zeros(ref.shape, dtype=torch.float64) if m.bias is None else m.bias.expand(ref.shape)
        return self._affine(node, x, ref, lambda t, w: F.linear(t, w), m.weight, b_out, mod.in_features)

    def _conv(self, node: fx.Node, mod: nn.Module, x: Val, ref: torch.Tensor) -> Val:
        m = self._f64_module(str(node.target), mod)
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        shape = (1, -1, *[1] * (ref.dim() - 2))
        b_out = torch.zeros(ref.shape, dtype=torch.float64) if m.bias is None else m.bias.reshape(shape).expand(
            ref.shape)
        fan_in = (m.in_channels // m.groups) * ir.prod(m.kernel_size)
        return self._affine(node, x, ref, lambda t, w: m._conv_forward(t, w, None), m.weight, b_out, fan_in)

    def _batchnorm(self, mod: nn.Module, x: Val, ref: torch.Tensor) -> Val:
        if mod.training or mod.running_mean is None or mod.running_var is None:
            raise _UnsupportedError("BatchNorm in training mode or without running statistics")
        mean = mod.running_mean.detach().to(torch.float64)
        var = mod.running_var.detach().to(torch.float64)
        scale = 1.0 / torch.sqrt(var + mod.eps)
        shift_b = torch.zeros_like(mean)
        if mod.affine:
            scale = scale * mod.weight.detach().to(torch.float64)
            shift_b = mod.bias.detach().to(torch.float64)
        shape = (1, -1, *[1] * (x.lo.dim() - 2))
        s, t = scale.reshape(shape), (shift_b - mean * scale).reshape(shape)
        local = s.abs() * (x.mag + mean.abs().reshape(shape)) + shift_b.abs().reshape(shape)
        return self._channel_affine(x, s, t, local, ops=8)

    def _channel_affine(self, x: Val, s: torch.Tensor, t: torch.Tensor, local: torch.Tensor, ops: int) -> Val:
        """``s * x + t`` with ``s`` and ``t`` broadcast (a scale, a BatchNorm, a constant factor)."""
        if not x.finite:
            return _unbounded(x.lo * s + t)
        s_pos, s_neg = s.clamp(min=0), s.clamp(max=0)
        round_out = gamma(ops, self.u) * local
        ibp_lo = s_pos * x.lo + s_neg * x.hi + t - round_out
        ibp_hi = s_pos * x.hi + s_neg * x.lo + t + round_out
        const = x.const.expand_as(ibp_lo) if x.const.shape != ibp_lo.shape else x.const
        if x.c_lo is x.c_hi and x.a_lo is x.a_hi:  # one function stays one
            c_lo = c_hi = s * x.c_lo + t
            a_lo = a_hi = _mul_opt(x.a_lo, s)
        else:
            c_hi = s_pos * x.c_hi + s_neg * x.c_lo + t
            c_lo = s_pos * x.c_lo + s_neg * x.c_hi + t
            a_hi = _add_opt(_mul_opt(x.a_hi, s_pos), _mul_opt(x.a_lo, s_neg))
            a_lo = _add_opt(_mul_opt(x.a_lo, s_pos), _mul_opt(x.a_hi, s_neg))
        out = Val(ibp_lo, ibp_hi, const, s.abs() * x.err + round_out, c_lo, c_hi, a_lo, a_hi)
        return out

    def _scale(self, x: Any, factor: torch.Tensor, ref: torch.Tensor, ops: int) -> Val:
        if not isinstance(x, Val):
            raise _UnsupportedError("scaling a value that does not depend on the input")
        zero = torch.zeros((), dtype=torch.float64)
        return self._channel_affine(x, factor, zero, factor.abs() * x.mag, ops)

    # ------------------------------------------------------------------------------------ ReLU
    def _relu(self, node: fx.Node, x: Val) -> Val:
        stats = self.result.relus.setdefault(node.name, ReluStats())
        x = self._bounded(x)
        self.result.relu_inputs[node.name] = (x.lo, x.hi)
        if not x.finite:
            dead = torch.zeros_like(x.const)
            stats.elements += int(x.lo.numel())
            return Val(x.lo.clamp(min=0), x.hi.clamp(min=0), x.const, torch.zeros_like(x.lo),
                       x.lo.clamp(min=0), x.hi.clamp(min=0))
        n_ops = self.n_vars + 2
        dead = below_zero(x.lo, x.hi, n_ops)
        active = above_zero(x.lo, x.hi, n_ops) & ~dead
        stats.elements += int(x.lo.numel())
        stats.dead += int(dead.sum())
        stats.active += int(active.sum())
        unstable = ~dead & ~active
        lo, hi = x.lo, x.hi
        zero = torch.zeros((), dtype=torch.float64)
        one = torch.ones((), dtype=torch.float64)
        # The chord over [min(lo, 0), max(hi, 0)] (an upper bound of exactly -0.0 gives slope 0).
        lo_c, hi_c = lo.clamp(max=0), hi.clamp(min=0)
        width = hi_c - lo_c
        chord = torch.where(width > 0, hi_c / torch.where(width > 0, width, one), zero) * (1.0 + _RELAX_SLACK)
        slope = torch.where(unstable, chord, torch.where(active, one, zero))
        intercept = torch.where(unstable, -slope * lo_c, zero)
        lower = torch.where(unstable, (hi_c >= -lo_c).to(torch.float64), torch.where(active, one, zero))
        c_hi = slope * x.c_hi + intercept
        c_lo = lower * x.c_lo
        a_hi, a_lo = _mul_opt(x.a_hi, slope), _mul_opt(x.a_lo, lower)
        out_lo = torch.where(active, lo, zero)
        out_hi = torch.where(dead, zero, hi.clamp(min=0))
        err = torch.where(dead, zero, x.err)
        const = x.const | dead
        out = Val(out_lo, out_hi, const, err, c_lo, c_hi, a_lo, a_hi)
        return out

    # ------------------------------------------------------------------------------------ other ops
    def _elementwise(self, x: Val, name: str, fn: Callable[[torch.Tensor], torch.Tensor], ref: Any) -> Val:
        """A monotone (or dipping, see ``_DIP``) element-wise activation, by interval bounds."""
        if not x.finite:
            return _unbounded(ref)
        x = self._bounded(x)
        f_lo, f_hi = fn(x.lo), fn(x.hi)
        if name in _DIP:
            lo = torch.full_like(f_lo, _DIP[name])
            hi = torch.maximum(f_lo, f_hi)
        else:
            lo, hi = torch.minimum(f_lo, f_hi), torch.maximum(f_lo, f_hi)
        pad = gamma(16, self.u) * torch.maximum(lo.abs(), hi.abs()) + 1e-30
        lo, hi = lo - pad, hi + pad
        flat = _flat_value(name, x, fn)
        const = x.const | flat
        return Val(lo, hi, const, torch.zeros_like(lo), lo.clone(), hi.clone())

    def _reshape(self, x: Any, ref: torch.Tensor) -> Val:
        if not isinstance(x, Val) or not isinstance(ref, torch.Tensor):
            raise _UnsupportedError("reshape of a value that is not one tensor")
        if ref.dim() == 0 or ref.shape[0] != x.lo.shape[0]:
            raise _UnsupportedError("reshape that moves the batch dimension")
        shape = ref.shape
        return _map_val(x, lambda t: t.reshape(shape), lambda a: a.reshape(a.shape[0], *shape[1:]))

    def _permute(self, node: fx.Node, op: str, x: Val, args: Any, ref: torch.Tensor) -> Val:
        if op == "permute":
            dims = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            rank = x.lo.dim()
            dims = [d % rank for d in dims]
            if dims[0] != 0:
                raise _UnsupportedError("permute that moves the batch dimension")
            return _map_val(x, lambda t: t.permute(dims), lambda a: a.permute(dims))
        if op == "transpose":
            d0, d1 = (int(d) % x.lo.dim() for d in args[1:3])
            if 0 in (d0, d1):
                raise _UnsupportedError("transpose of the batch dimension")
            return _map_val(x, lambda t: t.transpose(d0, d1), lambda a: a.transpose(d0, d1))
        raise _UnsupportedError(op)

    def _add(self, x: Val, y: Val, ref: Any, sign: float) -> Val:
        if not isinstance(ref, torch.Tensor):
            raise _UnsupportedError("add of values that are not tensors")
        shape = ref.shape
        if not (x.finite and y.finite):
            return _unbounded(ref)
        if sign > 0:
            lo, hi = x.lo + y.lo, x.hi + y.hi
            c_lo, c_hi = x.c_lo + y.c_lo, x.c_hi + y.c_hi
            a_lo, a_hi = _add_opt(x.a_lo, y.a_lo), _add_opt(x.a_hi, y.a_hi)
        else:
            lo, hi = x.lo - y.hi, x.hi - y.lo
            c_lo, c_hi = x.c_lo - y.c_hi, x.c_hi - y.c_lo
            a_lo, a_hi = _add_opt(x.a_lo, _neg_opt(y.a_hi)), _add_opt(x.a_hi, _neg_opt(y.a_lo))
        round_out = gamma(2, self.u) * (x.mag + y.mag)
        lo, hi = (lo - round_out).expand(shape), (hi + round_out).expand(shape)
        const = (x.const & y.const).expand(shape)
        err = (x.err + y.err + round_out).expand(shape)
        n = self.n_vars
        out = Val(lo, hi, const, err, c_lo.expand(shape), c_hi.expand(shape),
                  None if a_lo is None else a_lo.expand(n, *shape[1:]),
                  None if a_hi is None else a_hi.expand(n, *shape[1:]))
        return out

    def _mul(self, x: Any, y: Any, ref: Any) -> Val:
        if isinstance(x, Val) and isinstance(y, Val):
            if not (x.finite and y.finite):
                return _unbounded(ref)
            x, y = self._bounded(x), self._bounded(y)
            prods = torch.stack([x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi])
            lo, hi = prods.amin(0), prods.amax(0)
            pad = gamma(2, self.u) * torch.maximum(lo.abs(), hi.abs())
            lo, hi = lo - pad, hi + pad
            return Val(lo, hi, x.const & y.const, torch.zeros_like(lo), lo.clone(), hi.clone())
        v, factor = (x, y) if isinstance(x, Val) else (y, x)
        return self._scale(v, torch.as_tensor(factor, dtype=torch.float64), ref, ops=2)

    def _cat(self, parts: Sequence[Val], dim: int, ref: Any) -> Val:
        if not isinstance(ref, torch.Tensor):
            raise _UnsupportedError("cat of values that are not tensors")
        d = dim % ref.dim()
        if d == 0:
            raise _UnsupportedError("cat along the batch dimension")
        n = self.n_vars
        with_a = any(p.a_lo is not None or p.a_hi is not None for p in parts)

        def coef(p: Val, which: str) -> torch.Tensor:
            a = getattr(p, which)
            return a if a is not None else torch.zeros(n, *p.lo.shape[1:], dtype=torch.float64)

        fields = {f: torch.cat([getattr(p, f) for p in parts], d) for f in ("lo", "hi", "const", "err", "c_lo", "c_hi")}
        if with_a:
            fields["a_lo"] = torch.cat([coef(p, "a_lo") for p in parts], d)
            fields["a_hi"] = torch.cat([coef(p, "a_hi") for p in parts], d)
        return Val(**fields)

    def _split(self, x: Val, ref: Any, args: Any, kwargs: Any, op: str) -> tuple[Val, ...]:
        if not isinstance(ref, (tuple, list)):
            raise _UnsupportedError(f"{op} without tensor pieces")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        d = int(dim) % x.lo.dim()
        if d == 0:
            raise _UnsupportedError(f"{op} along the batch dimension")
        sizes = [int(r.shape[d]) for r in ref]
        pieces: list[Val] = []
        start = 0
        for size in sizes:
            def cut(t: torch.Tensor, start: int = start, size: int = size) -> torch.Tensor:
                return t.narrow(d, start, size)
            pieces.append(_map_val(x, cut, cut))
            start += size
        return tuple(pieces)

    def _sum(self, node: fx.Node, op: str, x: Val, args: Any, kwargs: Any, ref: Any) -> Val:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if dims is None or not isinstance(ref, torch.Tensor) or set(kwargs) - {"dim", "keepdim"}:
            raise _UnsupportedError(f"{op} over every dimension or with a dtype")
        rank = x.lo.dim()
        dims_list = sorted({int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)})
        if 0 in dims_list:
            raise _UnsupportedError(f"{op} over the batch dimension")
        count = ir.prod(x.lo.shape[d] for d in dims_list)
        if not x.finite:
            return _unbounded(ref)

        def red(t: torch.Tensor) -> torch.Tensor:
            return getattr(torch, op)(t, dim=dims_list, keepdim=keepdim)

        round_out = gamma(count + 1, self.u) * red(x.mag)
        nonconst = torch.amax((~x.const).to(torch.float64), dim=dims_list, keepdim=keepdim) > 0
        lo, hi = red(x.lo) - round_out, red(x.hi) + round_out
        out = Val(lo, hi, ~nonconst, red(x.err) + round_out, red(x.c_lo), red(x.c_hi),
                  _red_opt(x.a_lo, op, dims_list, keepdim), _red_opt(x.a_hi, op, dims_list, keepdim))
        return out

    def _maxpool(self, x: Val, pool: Callable[[torch.Tensor], torch.Tensor], ref: Any) -> Val:
        if not x.finite:
            return _unbounded(ref)
        x = self._bounded(x)
        lo, hi = pool(x.lo), pool(x.hi)
        const = ~(pool((~x.const).to(torch.float64)) > 0)
        return Val(lo, hi, const, torch.zeros_like(lo), lo.clone(), hi.clone())

    def _avgpool(self, x: Val, pool: Callable[[torch.Tensor], torch.Tensor], ref: Any, name: str, args: Any,
                 kwargs: Any) -> Val:
        if not x.finite:
            return _unbounded(ref)
        window = _window_max_pool(pool, name, args, kwargs)
        lo, hi = pool(x.lo), pool(x.hi)
        count = ir.prod(x.lo.shape[2:])  # at least the elements of one window
        round_out = gamma(count + 2, self.u) * pool(x.mag)
        lo, hi = lo - round_out, hi + round_out
        const = ~(window((~x.const).to(torch.float64)) > 0)
        a_lo = None if x.a_lo is None else pool(x.a_lo)  # the input features act as the batch
        a_hi = a_lo if x.a_hi is x.a_lo else (None if x.a_hi is None else pool(x.a_hi))
        out = Val(lo, hi, const, pool(x.err) + round_out, pool(x.c_lo), pool(x.c_hi), a_lo, a_hi)
        return out


class _UnsupportedError(Exception):
    """An op the propagation cannot bound; its value becomes unbounded (never an error to the user)."""


def _unbounded(ref: torch.Tensor) -> Val:
    shape = ref.shape
    lo = torch.full(shape, -math.inf, dtype=torch.float64)
    hi = torch.full(shape, math.inf, dtype=torch.float64)
    return Val(lo, hi, torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.float64), lo.clone(),
               hi.clone())


def _map_val(x: Val, fn: Callable[[torch.Tensor], torch.Tensor], fn_a: Callable[[torch.Tensor], torch.Tensor]) -> Val:
    """A structural op (reshape, slice, permute) on every part; one function stays one."""
    c_lo = fn(x.c_lo)
    c_hi = c_lo if x.c_hi is x.c_lo else fn(x.c_hi)
    a_lo = None if x.a_lo is None else fn_a(x.a_lo)
    a_hi = a_lo if x.a_hi is x.a_lo else (None if x.a_hi is None else fn_a(x.a_hi))
    return Val(fn(x.lo), fn(x.hi), fn(x.const), fn(x.err), c_lo, c_hi, a_lo, a_hi)


def _add_opt(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _neg_opt(a: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else -a


def _mul_opt(a: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor | None:
    return None if a is None else a * s


def _red_opt(a: torch.Tensor | None, op: str, dims: list[int], keepdim: bool) -> torch.Tensor | None:
    return None if a is None else getattr(torch, op)(a, dim=dims, keepdim=keepdim)


def _window_max_pool(pool: Any, name: str, args: Any, kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A max pooling over the same windows as an average pooling (any element of a window)."""
    if isinstance(pool, nn.AvgPool1d):
        return lambda t: F.max_pool1d(t, pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
    if isinstance(pool, nn.AvgPool2d):
        return lambda t: F.max_pool2d(t, pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
    if isinstance(pool, nn.AdaptiveAvgPool1d):
        return lambda t: F.adaptive_max_pool1d(t, pool.output_size)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return lambda t: F.adaptive_max_pool2d(t, pool.output_size)
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
        fn = getattr(F, name.replace("avg", "max"))
        return lambda t: fn(t, *args[1:], **kwargs)
    # avg_pool{1,2}d(x, kernel_size, stride=None, padding=0, ceil_mode=False, ...)
    k = args[1] if len(args) > 1 else kwargs["kernel_size"]
    stride = args[2] if len(args) > 2 else kwargs.get("stride")
    padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
    ceil = args[4] if len(args) > 4 else kwargs.get("ceil_mode", False)
    fn = F.max_pool1d if name == "avg_pool1d" else F.max_pool2d
    return lambda t: fn(t, k, stride, padding, ceil_mode=ceil)


_MODULE_FUNCTIONS: dict[type[nn.Module], str] = {
    nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid",
    nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Softplus: "softplus", nn.CELU: "celu", nn.SELU: "selu",
    nn.LogSigmoid: "logsigmoid", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Hardswish: "hardswish",
}


def _module_function(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    import copy

    m = copy.deepcopy(mod).to(torch.float64)
    if hasattr(m, "inplace"):
        m.inplace = False
    if isinstance(m, nn.LeakyReLU) and not 0.0 <= m.negative_slope:
        raise _UnsupportedError("leaky ReLU with a negative slope below 0 is not monotone")
    if isinstance(m, (nn.ELU, nn.CELU)) and m.alpha < 0:
        raise _UnsupportedError("ELU with a negative alpha is not monotone")
    return lambda t: m(t)


def _function(node: fx.Node, name: str, args: Any, kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function of a call_function/call_method node, applied in float64."""
    rest, kw = tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "inplace"}
    if len(rest) and isinstance(rest[-1], bool) and name in ("relu6", "hardtanh", "leaky_relu", "elu", "celu",
                                                                 "selu", "hardsigmoid"):
        rest = rest[:-1]  # a trailing positional ``inplace``
    if any(isinstance(v, (Val, fx.Node)) for v in (*rest, *kw.values())):
        raise _UnsupportedError(f"{name} with arguments that depend on the input")
    if name == "leaky_relu" and float(rest[0] if rest else kw.get("negative_slope", 0.01)) < 0:
        raise _UnsupportedError("leaky ReLU with a negative slope")
    fn = getattr(F, name, None) or getattr(torch, name)
    return lambda t: fn(t, *rest, **kw)


def _flat_value(name: str, x: Val, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Elements whose input lies in a flat stretch of a clamp-like activation (the output is exact there)."""
    n_ops = 2
    if name in ("relu6", "hardtanh", "hardsigmoid"):
        # Find the flat ends by evaluating far outside: clamp values are exact constants there.
        low_end, high_end = fn(torch.tensor(-1e30, dtype=torch.float64)), fn(torch.tensor(1e30, dtype=torch.float64))
        lo_knee = {"relu6": 0.0, "hardsigmoid": -3.0}.get(name)
        hi_knee = {"relu6": 6.0, "hardsigmoid": 3.0}.get(name)
        if name == "hardtanh":
            lo_knee, hi_knee = float(low_end), float(high_end)
        assert lo_knee is not None and hi_knee is not None
        below = below_zero(x.lo - lo_knee, x.hi - lo_knee, n_ops)
        above = above_zero(x.lo - hi_knee, x.hi - hi_knee, n_ops)
        return below | above
    return torch.zeros_like(x.const)


def propagate(gm: fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, *, linear: bool = True,
              linear_limit: int = LINEAR_LIMIT) -> BoxBounds:
    """Bounds and constant elements of every tensor node of ``gm`` over the box ``[lo, hi]``
    (one sample with a batch dimension of 1); see the module docstring."""
    return BoxPropagation(gm, lo, hi, linear=linear, linear_limit=linear_limit).run()


__all__ = ["LINEAR_LIMIT", "BoxBounds", "BoxPropagation", "ReluStats", "Val", "above_zero", "below_zero", "gamma",
           "propagate"]

"""Helpers over the one IR of oamipc: a module-level torch.fx GraphModule with shapes propagated.

Parametric layers (Linear, Conv, BatchNorm, LayerNorm, GroupNorm) are ``call_module`` nodes;
everything else is ``call_function``/``call_method`` on torch functions, tensor methods or ATen
ops (programs loaded from ``torch.export`` are lifted into this form by :mod:`oamipc.lifting`).
:func:`op_name` gives one name for the many spellings of an op (``F.relu``, ``torch.relu``,
``x.relu()``, ``aten.relu.default``), and :data:`OP_KINDS` classifies those names by how they
treat the channel dimension, which is all the unit-group analysis needs to know about an op.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

# How an op treats channels; the unit-group analysis has one rule per kind.
ELEMENTWISE = "elementwise"  # unary, shape-preserving, per-element (activations, dropout, copies)
BINARY = "binary"  # element-wise over several tensors with broadcasting (add, sub, mul, div)
POOL = "pool"  # spatial op on dims >= 2 that keeps dim 1 (pooling)
RESHAPE = "reshape"  # view/reshape/flatten/squeeze/unsqueeze: decided from the shapes
RESIZE_CONST = "reshape-const"  # reshape ops whose size arguments are baked in (view, reshape)
REDUCE = "reduce"  # reduction over listed dims (mean, sum, amax, amin)
SOFTMAX = "softmax"  # per-dim normalisation: a barrier if it runs over the channel dim
CAT = "cat"
SPLIT = "split"
GETITEM = "getitem"
PERMUTE = "permute"  # transpose/permute: the channel dim moves, its units stay
MATMUL = "matmul"  # batched matmul: channels on a batch dim are matched like an element-wise op
ATTENTION = "attention"  # scaled_dot_product_attention: heads (a batch dim) of q, k, v are matched
NON_TENSOR = "non-tensor"  # size(), dim(): produce Python values

_ELEMENTWISE_NAMES = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "relu6", "hardtanh", "hardtanh_",
    "elu", "elu_", "selu", "celu", "softplus", "mish", "logsigmoid", "dropout", "dropout_",
    "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout", "clone",
    "contiguous", "detach", "neg", "abs", "clamp", "clamp_", "clamp_min", "clamp_max", "to",
    "float", "_to_copy", "exp", "square", "sqrt", "native_dropout", "identity",
}
_BINARY_NAMES = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "div", "div_",
    "truediv", "itruediv", "maximum", "minimum", "masked_fill", "masked_fill_",
}
_POOL_NAMES = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "_adaptive_avg_pool2d", "lp_pool1d", "lp_pool2d", "mean_pool",
}
_RESHAPE_NAMES = {"flatten", "unsqueeze", "squeeze", "squeeze_"}
_RESIZE_CONST_NAMES = {"view", "reshape", "_unsafe_view"}
_REDUCE_NAMES = {"mean", "sum", "amax", "amin"}
_SOFTMAX_NAMES = {"softmax", "log_softmax", "_softmax", "_log_softmax"}
_CAT_NAMES = {"cat", "concat", "concatenate"}
_SPLIT_NAMES = {"split", "split_with_sizes", "chunk"}
_PERMUTE_NAMES = {"transpose", "permute", "swapaxes", "swapdims"}
_MATMUL_NAMES = {"matmul", "bmm"}
_NON_TENSOR_NAMES = {"size", "dim", "sym_size", "numel", "getattr"}

OP_KINDS: dict[str, str] = {}
for _kind, _names in (
    (ELEMENTWISE, _ELEMENTWISE_NAMES), (BINARY, _BINARY_NAMES), (POOL, _POOL_NAMES),
    (RESHAPE, _RESHAPE_NAMES), (RESIZE_CONST, _RESIZE_CONST_NAMES), (REDUCE, _REDUCE_NAMES),
    (SOFTMAX, _SOFTMAX_NAMES), (CAT, _CAT_NAMES), (SPLIT, _SPLIT_NAMES),
    (GETITEM, {"getitem"}), (NON_TENSOR, _NON_TENSOR_NAMES), (PERMUTE, _PERMUTE_NAMES),
    (MATMUL, _MATMUL_NAMES), (ATTENTION, {"scaled_dot_product_attention"}),
):
    for _n in _names:
        OP_KINDS[_n] = _kind

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d,
)
CONV_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
BATCHNORM_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def first_output(value: Any) -> Any:
    """A network's main output: the first element of (nested) tuples and lists, as the analyses read
    a model that returns several outputs (the logits first)."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def op_name(node: fx.Node) -> str:
    """One name for an op however it was spelled (function, method, ATen overload)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    name = getattr(target, "__name__", str(target))
    return name.lstrip("_") if name in ("_max_pool2d", "_max_pool1d") else name


def op_kind(node: fx.Node) -> str | None:
    """The channel behaviour of a call_function/call_method node, or None when unknown."""
    return OP_KINDS.get(op_name(node))


def get_module(gm: fx.GraphModule, target: str) -> nn.Module:
    """The submodule at a qualified name (``layer1.0.conv1``)."""
    return gm.get_submodule(target)


def replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified name ``target`` (the parent containers are kept)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, new)


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The propagated shape of a tensor-valued node (None for non-tensors or non-nodes)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


def tuple_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    """Shapes of a node whose value is a tuple/list of tensors (split, chunk)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and all(hasattr(m, "shape") for m in meta):
        return [tuple(int(d) for d in m.shape) for m in meta]
    return None


def activation_sizes(gm: fx.GraphModule, example_batch: int) -> list[int]:
    """Values per sample of every tensor the graph computes (nested outputs included), from the
    ``tensor_meta`` of a shape propagation with ``example_batch`` samples: what bounds a pass's
    batch by memory.  Empty without that metadata."""
    return [math.prod(int(s) for s in meta.shape) // max(1, example_batch)
            for node in gm.graph.nodes for meta in _tensor_metas(node.meta.get("tensor_meta"))]


def _tensor_metas(meta: Any) -> list[Any]:
    if meta is None:
        return []
    if hasattr(meta, "shape"):
        return [meta]
    if isinstance(meta, dict):
        meta = list(meta.values())
    if isinstance(meta, (list, tuple)):
        return [m for item in meta for m in _tensor_metas(item)]
    return []


def iter_nodes(arg: Any) -> Iterator[fx.Node]:
    """Every fx.Node inside a (possibly nested) argument structure."""
    if isinstance(arg, fx.Node):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from iter_nodes(a)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from iter_nodes(a)
    elif isinstance(arg, slice):
        yield from iter_nodes((arg.start, arg.stop, arg.step))


def arg_or_kwarg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def prod(values: Any) -> int:
    """Product of integers (1 for an empty sequence)."""
    return int(math.prod(int(v) for v in values))


def size_args(node: fx.Node) -> tuple[list[Any], str | None]:
    """The size arguments of a view/reshape/expand node, and where they sit: ``"list"`` (one list or
    tuple after the tensor), ``"shape"``/``"size"`` (a keyword) or None (one positional argument
    each).  Both the unit analysis (which sizes are computed at run time) and the surgery (which
    constant sizes to rewrite) read them here."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        return list(args[1]), "list"
    for key in ("shape", "size"):
        if key in node.kwargs:
            return list(node.kwargs[key]), key
    return args[1:], None


def where(node: fx.Node) -> str:
    """How to name a node in a message: the module path for call_module, else the node name."""
    if node.op == "call_module":
        return str(node.target)
    return f"{node.name} ({op_name(node)})"

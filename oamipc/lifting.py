"""Lift the ATen-level graph of a ``torch.export`` program back to a module-level GraphModule.

A program loaded from a ``.pt2`` file is a graph of ATen calls whose weights are plain
attributes: nothing in it says "this is a Linear layer".  The pruning passes, like the rest of
oamipc, work on the IR that :mod:`oamipc.tracing` gives a traced model: ``call_module`` nodes of
``nn.Linear``, ``nn.Conv2d``, norms ...  :func:`exported_to_graph_module` matches the parametric
ATen calls and replaces each with a ``call_module`` node of the equivalent module, holding the
program's own tensors, so a ``.pt2`` program and a traced model reach the passes in the same
form.  Reading the archive safely is :mod:`oamipc.safe_load`'s job; this module gets a loaded
:class:`torch.export.ExportedProgram`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["exported_to_graph_module"]

# Lifting runs as the last step of loading a .pt2 file: its messages keep the loader's name.
log = logging.getLogger("oamipc.loading")


@dataclass
class _Lift:
    """One parametric ATen call to be replaced by a ``call_module`` node."""

    node: fx.Node  # the ATen call
    output: fx.Node  # the node whose value the module produces (node, or its getitem 0)
    input: fx.Node
    module: nn.Module
    params: dict[str, fx.Node]  # module attribute -> get_attr node in the source graph
    absorbed: set[fx.Node] = field(default_factory=set)  # nodes that disappear with the lift
    target: str = ""


def exported_to_graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """One module-level GraphModule computing what the exported program computes.

    Parametric ATen calls (linear, conv1d/2d and non-transposed convolution, eval-mode batch
    norm, layer norm, group norm, and the ``addmm``/``mm`` of a decomposed linear) become
    ``call_module`` nodes of ``nn.Linear``/``nn.Conv1d``/... holding the program's own
    parameters; a module is named after its parameters' prefix (``features.0.weight`` ->
    ``features.0``), or that prefix with dots as underscores where the name is taken.  All other
    ops stay ATen ``call_function`` nodes.  Plain positional inputs get a plain ``forward``
    signature and the original output structure (tensor, tuple, dict).
    """
    source = ep.module()
    graph = source.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)  # input guards of the exported signature: not part of the model
    graph.eliminate_dead_code()

    lifts = _find_lifts(source)
    gm = _rebuild(source, lifts)
    log.info(
        "lifted %d parametric ATen ops of the exported program into modules (%s)",
        len(lifts), ", ".join(sorted({type(lift.module).__name__ for lift in lifts})) or "none",
    )
    return gm


# ---- matching -------------------------------------------------------------------------------

_aten = torch.ops.aten


def _bound(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _tensor_attr(source: fx.GraphModule, value: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    obj = _fetch(source, str(value.target))
    return obj if isinstance(obj, torch.Tensor) else None


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _ntuple(value: Any, n: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values * n if len(values) == 1 and n > 1 else values


def _only_getitem0(node: fx.Node) -> fx.Node | None:
    """The single ``getitem(node, 0)`` user of a tuple-returning op, if that is its only use."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _find_lifts(source: fx.GraphModule) -> list[_Lift]:
    """Every liftable call in graph order; a weight shared by unlike calls is lifted once."""
    lifts: list[_Lift] = []
    seen: dict[tuple[str, ...], _Lift] = {}
    for node in source.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        lift = _match(source, node)
        if lift is None:
            continue
        key = tuple(f"{a}={n.target}" for a, n in sorted(lift.params.items()))
        earlier = seen.get(key)
        if earlier is not None:
            if repr(earlier.module) != repr(lift.module):
                log.info("not lifting %s: its weights are shared with a differently configured %s",
                         node.name, earlier.node.name)
                continue
            lift.module = earlier.module  # the same layer called twice
        seen[key] = lift
        lifts.append(lift)
    return lifts


def _match(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    packet = node.target.overloadpacket  # type: ignore[union-attr]
    matcher = _MATCHERS.get(packet)
    if matcher is None:
        return None
    try:
        return matcher(source, node)
    except (TypeError, ValueError, IndexError) as exc:  # an unusual call: leave it as ATen
        log.debug("not lifting %s: %s", node.name, exc)
        return None


def _params(source: fx.GraphModule, **values: Any) -> dict[str, fx.Node] | None:
    """get_attr nodes of the named tensors; None if one is neither absent nor a get_attr."""
    found: dict[str, fx.Node] = {}
    for name, value in values.items():
        if value is None:
            continue
        if _tensor_attr(source, value) is None:
            return None
        found[name] = value
    return found


def _lift_linear(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if params is None or weight is None or weight.dim() != 2:
        return None
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params, device="meta")
    return _Lift(node, node, args["input"], module, params, {node})


def _lift_addmm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    """``addmm(bias, x, permute(W, [1, 0]))`` and ``mm(x, t(W))``: a decomposed linear."""
    if node.target not in (_aten.addmm.default, _aten.mm.default):
        return None
    args = _bound(node)
    if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return None
    transposed = args["mat2"]
    if not isinstance(transposed, fx.Node) or len(transposed.users) != 1:
        return None
    is_t = transposed.target in (_aten.t.default, _aten.numpy_T.default)
    is_perm = transposed.target is _aten.permute.default and list(cast(Sequence[Any], transposed.args[1])) == [1, 0]
    if not (is_t or is_perm):
        return None
    weight_node = transposed.args[0]
    weight = _tensor_attr(source, weight_node)
    if node.target is _aten.mm.default:
        x, bias_node = args["self"], None
    else:
        x, bias_node = args["mat1"], args["self"]
    params = _params(source, weight=weight_node, bias=bias_node)
    if params is None or weight is None or weight.dim() != 2 or _rank(x) != 2:
        return None
    if bias_node is not None:
        bias = _tensor_attr(source, bias_node)
        if bias is None or tuple(bias.shape) != (weight.shape[0],):
            return None
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params, device="meta")
    return _Lift(node, node, x, module, params, {node, transposed})


def _lift_conv(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if args.get("transposed"):
        return None
    if "output_padding" in args and any(int(p) for p in args["output_padding"]):
        return None
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if params is None or weight is None or weight.dim() not in (3, 4):
        return None
    dims = weight.dim() - 2
    cls: type[nn.Module] = nn.Conv1d if dims == 1 else nn.Conv2d
    groups = int(args["groups"])
    module = cls(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
        stride=_ntuple(args["stride"], dims), padding=_ntuple(args["padding"], dims),
        dilation=_ntuple(args["dilation"], dims), groups=groups, bias="bias" in params,
        device="meta",
    )
    return _Lift(node, node, args["input"], module, params, {node})


def _lift_batch_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if args.get("training"):
        log.warning("batch norm %s uses batch statistics in the exported program (exported in "
                    "training mode?); it stays an ATen op: re-export after model.eval()", node.name)
        return None
    output = node
    if node.target is not _aten.batch_norm.default:
        found = _only_getitem0(node)
        if found is None:
            return None
        output = found
    params = _params(source, weight=args["weight"], bias=args["bias"],
                     running_mean=args["running_mean"], running_var=args["running_var"])
    mean = _tensor_attr(source, args["running_mean"])
    if params is None or mean is None or "running_var" not in params:
        return None
    if ("weight" in params) != ("bias" in params):
        return None
    rank = _rank(args["input"])
    if rank in (2, 3):
        cls: type[nn.Module] = nn.BatchNorm1d
    elif rank == 4:
        cls = nn.BatchNorm2d
    else:
        return None
    module = cls(mean.shape[0], eps=float(args["eps"]), momentum=float(args["momentum"]),
                 affine="weight" in params, device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


def _lift_layer_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    output = node if node.target is _aten.layer_norm.default else _only_getitem0(node)
    params = _params(source, weight=args["weight"], bias=args["bias"])
    if output is None or params is None or "weight" not in params:
        return None
    shape = [int(s) for s in args["normalized_shape"]]
    module = nn.LayerNorm(shape, eps=float(args["eps"]), bias="bias" in params, device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


def _lift_group_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if node.target is _aten.group_norm.default:
        output: fx.Node | None = node
        groups = int(args["num_groups"])
    else:
        output = _only_getitem0(node)
        groups = int(args["group"])
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if output is None or params is None or weight is None or "bias" not in params:
        return None
    module = nn.GroupNorm(groups, weight.shape[0], eps=float(args["eps"]), device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


_MATCHERS: dict[Any, Callable[[fx.GraphModule, fx.Node], _Lift | None]] = {
    _aten.linear: _lift_linear,
    _aten.addmm: _lift_addmm,
    _aten.mm: _lift_addmm,
    _aten.conv1d: _lift_conv,
    _aten.conv2d: _lift_conv,
    _aten.convolution: _lift_conv,
    _aten.batch_norm: _lift_batch_norm,
    _aten._native_batch_norm_legit_no_training: _lift_batch_norm,
    _aten.native_batch_norm: _lift_batch_norm,
    _aten.layer_norm: _lift_layer_norm,
    _aten.native_layer_norm: _lift_layer_norm,
    _aten.group_norm: _lift_group_norm,
    _aten.native_group_norm: _lift_group_norm,
}


# ---- rebuilding -----------------------------------------------------------------------------


def _rebuild(source: fx.GraphModule, lifts: list[_Lift]) -> fx.GraphModule:
    """Copy the graph with each lift as a call_module node, then build the new GraphModule."""
    absorbed = set().union(*(lift.absorbed for lift in lifts)) if lifts else set()
    dropped = {
        n for n in source.graph.nodes
        if n.op == "get_attr" and n.users and all(u in absorbed for u in n.users)
    }
    remaining = [str(n.target) for n in source.graph.nodes if n.op == "get_attr" and n not in dropped]
    kept_modules = [str(n.target) for n in source.graph.nodes if n.op == "call_module"]
    _name_lifts(source, lifts, remaining + kept_modules)

    graph, simple = fx.Graph(), _plain_inputs(source)
    if not simple:
        graph._codegen = source.graph._codegen  # keep the pytree input/output handling
    env: dict[fx.Node, fx.Node] = {}
    by_node = {lift.node: lift for lift in lifts}
    for node in source.graph.nodes:
        if node in dropped or (node in absorbed and node not in by_node):
            continue
        lift = by_node.get(node)
        if lift is not None:
            new = graph.call_module(lift.target, (env[lift.input],))
            new.meta.update(_kept_meta(node))
            env[lift.output] = new
            continue
        if node.op == "output" and simple:
            flat = node.args[0]
            out_spec = source.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
            graph.output(pytree.tree_unflatten([env[n] if isinstance(n, fx.Node) else n for n in flat], out_spec))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = _kept_meta(node)
        env[node] = new

    root: dict[str, Any] = {}
    for lift in lifts:
        root[lift.target] = _materialise(source, lift)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[str(node.target)] = _fetch(source, str(node.target))
    gm = fx.GraphModule(root, graph, class_name=_class_name(source))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _plain_inputs(source: fx.GraphModule) -> bool:
    """Whether the exported signature is plain positional tensors (no nesting, no kwargs)."""
    info = getattr(source.graph._codegen, "pytree_info", None)
    if info is None:
        return False
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    expected = pytree.tree_structure((tuple(range(len(placeholders))), {}))
    return bool(info.in_spec == expected)


def _kept_meta(node: fx.Node) -> dict[str, Any]:
    """Provenance worth keeping; fake tensors ('val') would go stale and slow deep copies."""
    return {k: node.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack") if k in node.meta}


def _class_name(source: fx.GraphModule) -> str:
    for node in source.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, qualified = next(iter(stack.values()))
            name = str(qualified).rsplit(".", 1)[-1]
            if not path and name.isidentifier():
                return name
    return "ExportedModule"


def _materialise(source: fx.GraphModule, lift: _Lift) -> nn.Module:
    """Give the meta-device module of a lift the program's own tensors."""
    module = lift.module
    if not any(p.is_meta for p in module.parameters()) and not any(b.is_meta for b in module.buffers()):
        return module  # shared with an earlier lift, already filled
    for attr, node in lift.params.items():
        tensor = _fetch(source, str(node.target))
        if attr in ("weight", "bias"):
            value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
            setattr(module, attr, value)
        else:
            setattr(module, attr, tensor)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        owner_name = str(lift.params["running_mean"].target).rpartition(".")[0]
        try:
            count = _fetch(source, f"{owner_name}.num_batches_tracked") if owner_name else None
        except AttributeError:
            count = None
        module.num_batches_tracked = (
            count if isinstance(count, torch.Tensor) else torch.tensor(0, dtype=torch.long)
        )
    module.eval()
    return module


def _name_lifts(source: fx.GraphModule, lifts: list[_Lift], taken_paths: list[str]) -> None:
    """Deterministic module names: the parameters' common prefix when it is free, else flat."""
    taken = set(taken_paths)
    firsts = {p.split(".")[0] for p in taken}
    by_module: dict[int, str] = {}
    for lift in lifts:
        if id(lift.module) in by_module:
            lift.target = by_module[id(lift.module)]
            continue
        prefix = _common_prefix(lift)
        if prefix and _free(prefix, lift, taken, source):
            name = prefix
        else:
            base = (prefix or lift.node.name).replace(".", "_")
            if hasattr(fx.GraphModule, base) or not base.isidentifier():
                base = f"m_{base}"
            name, i = base, 1
            while name in firsts or any(t == name or t.startswith(name + ".") for t in taken):
                name, i = f"{base}_{i}", i + 1
        lift.target = name
        by_module[id(lift.module)] = name
        taken.add(name)
        firsts.add(name.split(".")[0])


def _common_prefix(lift: _Lift) -> str | None:
    prefixes = set()
    for attr, node in lift.params.items():
        owner, _, leaf = str(node.target).rpartition(".")
        if leaf != attr:
            return None
        prefixes.add(owner)
    return prefixes.pop() if len(prefixes) == 1 else None


def _free(prefix: str, lift: _Lift, taken: set[str], source: fx.GraphModule) -> bool:
    """Whether ``prefix`` can hold the lifted module without hiding anything else."""
    parts = prefix.split(".")
    if hasattr(fx.GraphModule, parts[0]) or not all(p.isidentifier() or p.isdigit() for p in parts):
        return False
    own = {f"{prefix}.{attr}" for attr in lift.params}
    for attr, node in lift.params.items():
        tensor = _fetch(source, str(node.target))
        if f"{prefix}.{attr}" in taken and attr in ("weight", "bias") and not isinstance(tensor, nn.Parameter):
            return False  # still read elsewhere as a plain tensor: it cannot become a parameter
    for path in taken:
        if prefix.startswith(path + "."):
            return False  # would nest the module inside another lifted module or tensor
        if path == prefix or path.startswith(prefix + "."):
            if path not in own:
                return False
    return True

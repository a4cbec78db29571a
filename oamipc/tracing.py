"""Turn a model into the one IR of oamipc: a module-level ``fx.GraphModule`` with shapes.

:func:`trace` runs ``torch.fx`` symbolic tracing (or keeps a GraphModule that
:mod:`oamipc.lifting`, the ``torch.export`` side of this job, already made of a loaded program),
puts the result in eval mode and calls :func:`propagate_shapes`, which every transform re-runs
afterwards.  Both turn failures into a one-line :class:`TraceError` that names the place (module
path and source line, or graph node) and the way out (``--leaf-module``, ``--input-shape``),
because the raw torch.fx errors name neither.  :func:`parse_input_shape` and
:func:`example_inputs_for` build the example input from the CLI's ``--input-shape``.
"""

from __future__ import annotations

import difflib
import logging
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from oamipc.attention import swap_known_modules
from oamipc.errors import TraceError, UsageError, first_line

log = logging.getLogger(__name__)

__all__ = ["example_inputs_for", "parse_input_shape", "propagate_shapes", "trace"]

_EXAMPLE_SHAPE = "1,1,28,28"
_LINE = 240  # longest quote of a torch.fx error in a message
_TORCH_DIR = Path(torch.__file__).resolve().parent
_STDLIB_DIRS = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
_THIS_FILE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


def trace(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    leaf_modules: Sequence[str] = (),
) -> fx.GraphModule:
    """A GraphModule of ``model`` in eval mode with ``tensor_meta`` on every tensor node.

    Modules named in ``leaf_modules`` (qualified names such as ``layer1.0``) stay opaque
    ``call_module`` nodes, like torch's own layers; oamipc then leaves their insides unpruned.
    ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers are traced through traceable
    stand-ins that compute the same function (:mod:`oamipc.attention`), not kept opaque.  A
    model that already is a GraphModule (a loaded ``.pt2``) is used as it is.  The result
    shares parameters with ``model`` (the stand-ins hold copies of theirs): copy the model first
    if it must stay untouched.
    """
    if isinstance(model, fx.GraphModule):
        if leaf_modules:
            log.warning("leaf modules %s ignored: the model is already a graph (from a .pt2)",
                        ", ".join(leaf_modules))
        gm = model
    else:
        gm = _symbolic_trace(model, tuple(leaf_modules))
    gm.eval()
    _copy_written_inputs(gm, tuple(example_inputs))
    log.info("traced %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


# Ops through which a tensor still shares the caller's storage (an in-place op there writes it).
_VIEW_OPS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "getitem", "split",
             "chunk", "narrow", "expand", "contiguous", "detach", "t", "unflatten", "view_as", "reshape_as"}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _copy_written_inputs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Propagate shapes; make the graph copy every input that it writes in place, first.

    A model that applies an in-place op to its input (``nn.ReLU(inplace=True)`` right after a
    flatten, ``x.clamp_(...)``) would overwrite the caller's tensors: the example input, and the
    calibration, test and verification batches that oamipc feeds it again and again, so that
    accuracies and the ONNX check would see altered data.  Such inputs are found statically (an
    in-place op on the input or on a view of it) and by running the graph on copies and comparing;
    a ``clone`` of each is then put at the top of the graph, which leaves the model's own
    aliasing, and so its outputs, exactly as they were.
    """
    copies = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    propagate_shapes(gm, copies)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:
        return  # nested inputs: placeholders and tensors do not pair up
    written = {p for p, t, c in zip(placeholders, inputs, copies)
               if isinstance(t, torch.Tensor) and not _same_values(t, c)}
    written |= _written_in_place(gm, placeholders)
    if not written:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        for p in placeholders:
            if p in written:
                clone = gm.graph.call_method("clone", (p,))
                p.replace_all_uses_with(clone, delete_user_cb=lambda user, c=clone: user is not c)
    gm.graph.lint()
    gm.recompile()
    log.info("the model writes its input(s) %s in place: the graph copies them first",
             ", ".join(p.name for p in placeholders if p in written))
    propagate_shapes(gm, inputs)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape and values, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def _written_in_place(gm: fx.GraphModule, placeholders: list[fx.Node]) -> set[fx.Node]:
    """Placeholders that an in-place op writes, maybe through a view of them.

    In-place ops: methods and functions named with a trailing underscore (``relu_``, ``add_``) and
    modules built with ``inplace=True`` (torch.fx cannot trace item assignment, ``x[:, 0] = 0``).
    """
    root: dict[fx.Node, fx.Node] = {p: p for p in placeholders}  # view of an input -> that input
    written: set[fx.Node] = set()
    for node in gm.graph.nodes:
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None or src not in root:
            continue
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if (module is not None and getattr(module, "inplace", False) is True) or (
                node.op != "call_module" and name.endswith("_") and not name.startswith("_")):
            written.add(root[src])
        elif name in _VIEW_OPS or isinstance(module, _VIEW_MODULES):
            root[node] = root[src]
    return written


class _Tracer(fx.Tracer):
    """An fx tracer that keeps chosen modules opaque and remembers where tracing broke.

    Buffers read in a forward are graph values (``get_attr``), not constants: a causal-mask
    buffer sliced to the sequence length (``self.mask[:, :, :t, :t]`` with ``t = x.size(1)``) or a
    padding buffer expanded to the batch (``self.pad.expand(x.size(0), -1)``) mixes a buffer with
    a size only known at run time, which fails on a plain tensor.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_names: frozenset[str]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.failed_in: tuple[str, nn.Module] | None = None  # deepest module being traced

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_names or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                try:
                    self.failed_in = (self.path_of_module(m), m)
                except NameError:  # not in the hierarchy: let the enclosing module be named
                    pass
            raise


def _symbolic_trace(model: nn.Module, leaf_modules: tuple[str, ...]) -> fx.GraphModule:
    _check_leaf_names(model, leaf_modules)
    tracer = _Tracer(frozenset(leaf_modules))
    model = swap_known_modules(model, frozenset(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise _trace_error(model, tracer.failed_in, exc) from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _check_leaf_names(model: nn.Module, leaf_modules: tuple[str, ...]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    for leaf in leaf_modules:
        if leaf == "":
            raise TraceError("--leaf-module '' would hide the whole model; name a submodule such as "
                             f"'{names[0] if names else 'layer1'}'")
        if leaf not in known:
            close = difflib.get_close_matches(leaf, names, n=3) or names[:5]
            raise TraceError(
                f"--leaf-module '{leaf}' is not a submodule of {type(model).__name__}; "
                f"valid names include {', '.join(close) or '(none: the model has no submodules)'}"
            )


def _trace_error(model: nn.Module, failed_in: tuple[str, nn.Module] | None, exc: Exception) -> TraceError:
    """A one-line error naming the module, the user's source line and the way out."""
    location = _user_frame(exc)
    reason = _first_sentence(exc)
    if failed_in is not None and failed_in[0]:
        path, module = failed_in
        return TraceError(
            f"torch.fx cannot trace module '{path}' ({type(module).__name__}){location}: {reason}; "
            f"pass --leaf-module {path} to keep that module opaque (it is then not pruned), "
            f"or make its forward traceable"
        )
    return TraceError(
        f"torch.fx cannot trace the forward of {type(model).__name__}{location}: {reason}; "
        f"torch.fx follows no Python control flow on tensor values: move that code into a "
        f"submodule and pass it to --leaf-module, or rewrite it with tensor ops (torch.where)"
    )


def _user_frame(exc: BaseException) -> str:
    """`` at file:line (`code`)`` for the deepest frame outside torch, the stdlib and oamipc."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith("<") or _is_library(Path(frame.filename).resolve()):
            continue
        code = f" (`{frame.line.strip()}`)" if frame.line else ""
        return f" at {frame.filename}:{frame.lineno}{code}"
    return ""


def _is_library(file: Path) -> bool:
    """torch, the standard library or this module: frames that are not the model's code."""
    if file == _THIS_FILE or file.is_relative_to(_TORCH_DIR):
        return True
    if {"site-packages", "dist-packages"} & set(file.parts):
        return False  # installed model code (torchvision, timm, ...) counts as the user's
    return any(file.is_relative_to(d) for d in _STDLIB_DIRS)


# --------------------------------------------------------------------------------------------
# Shape propagation
# --------------------------------------------------------------------------------------------


class _ShapeFailure(Exception):  # noqa: N818 - control flow, turned into a TraceError before it leaves
    """Carries the node that failed out of the interpreter."""

    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node = node
        self.cause = cause


class _NodeShapeProp(ShapeProp):
    """ShapeProp that reports which node failed instead of printing a traceback.

    torch's ShapeProp prints the traceback to stderr and buries the node in a multi-line
    message; this one runs each node itself (without fake tensors) and raises
    :class:`_ShapeFailure` with the node, writing the same ``tensor_meta``/``type`` meta.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except _ShapeFailure:
            raise
        except Exception as exc:
            raise _ShapeFailure(n, exc) from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                # Without the memory format, which nothing here reads: finding it goes through
                # torch._check, whose first call imports torch's symbolic-shape machinery (sympy),
                # about a second of the first compile in a process.
                return _extract_tensor_metadata(obj, include_contiguity=False)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)  # stale after a transform changed this node
        n.meta["type"] = type(result)
        return result


def propagate_shapes(
    gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], *, transformed: bool = False
) -> Any:
    """Run ``gm`` on ``example_inputs`` without gradients, recording ``node.meta["tensor_meta"]``.

    Returns the model's output on the inputs.  A failure raises a :class:`TraceError` naming
    the node (and module) that failed, the input shape given, and which shape to pass instead.
    ``transformed=True`` says the same inputs ran through the graph before a transform changed
    it: then the input shape is not the cause, and the error says so and names the way out
    (keeping the failing module whole) instead of suggesting another ``--input-shape``.
    """
    inputs = tuple(example_inputs)
    _check_input_count(gm, inputs)
    try:
        with torch.no_grad():
            return _NodeShapeProp(gm).propagate(*inputs)
    except _ShapeFailure as failure:
        if transformed:
            raise _transform_error(gm, failure.node, failure.cause, inputs) from failure.cause
        raise _shape_error(gm, failure.node, failure.cause, inputs) from failure.cause


def _check_input_count(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:
        return  # nested inputs: the codegen flattens them, counts do not compare
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if not len(required) <= len(inputs) <= len(placeholders):
        names = ", ".join(n.name for n in placeholders)
        raise TraceError(
            f"the model takes {len(required)} input(s) ({names}) but {len(inputs)} example input(s) "
            f"were given ({_shapes(inputs)}); give one --input-shape per model input"
        )


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node 'name' (op target: Type)``: where in the graph a propagation failed."""
    where = f"node '{node.name}' ({node.op}"
    if node.op == "call_module":
        where += f" {node.target}: {type(gm.get_submodule(str(node.target))).__name__}"
    elif node.op == "call_function":
        where += f" {getattr(node.target, '__name__', node.target)}"
    return where + ")"


def _transform_error(
    gm: fx.GraphModule, node: fx.Node, cause: BaseException, inputs: tuple[torch.Tensor, ...]
) -> TraceError:
    """The one-line error when a transformed graph no longer runs on inputs the original ran on."""
    module = _enclosing_module(node)
    fix = (f"keep '{module}' whole with --leaf-module {module}" if module
           else "move that code into a module and keep it whole with --leaf-module")
    return TraceError(
        f"the changed network no longer runs at {_where(gm, node)} on input shape {_shapes(inputs)}, which the "
        f"original ran on: {first_line(cause, limit=_LINE)}; the code there depends on a width that was "
        f"changed; {fix}"
    )


def _enclosing_module(node: fx.Node) -> str | None:
    """The qualified name of the innermost module whose forward holds the node (rather than the node's
    own module: a layer that fails on its input needs the code around it kept whole), else the
    node's own module (kept opaque, it keeps the units it reads), else None."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path) for path, _ in stack.values()] if isinstance(stack, dict) else []
    own = str(node.target) if node.op == "call_module" else None
    around = [p for p in paths if p and p != own]
    return around[-1] if around else own


def _shape_error(
    gm: fx.GraphModule, node: fx.Node, cause: BaseException, inputs: tuple[torch.Tensor, ...]
) -> TraceError:
    """The one-line error for a failed propagation: node, module, input shape, fix."""
    where = _where(gm, node)
    # The message's first line; an exception without a message is named by its type.
    reason = first_line(cause, limit=_LINE)
    if isinstance(cause, AssertionError):
        reason += " (the model's own check rejected the example input)"
    return TraceError(
        f"shape propagation failed at {where} for input shape {_shapes(inputs)}: {reason}; "
        f"pass --input-shape matching the model, e.g. {_suggest_shape(gm, node, inputs)}"
    )


def _suggest_shape(gm: fx.GraphModule, node: fx.Node, inputs: tuple[torch.Tensor, ...]) -> str:
    """A shape that fixes the first layer when it reads the input directly, else a generic one."""
    source = node.args[0] if node.args else None
    if node.op == "call_module" and isinstance(source, fx.Node) and source.op == "placeholder":
        index = [n for n in gm.graph.nodes if n.op == "placeholder"].index(source)
        if index < len(inputs):
            shape = list(inputs[index].shape)
            module = gm.get_submodule(str(node.target))
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and len(shape) == module.weight.dim():
                shape[1] = module.in_channels
                return ",".join(map(str, shape)) + f" ({module.in_channels} input channels)"
            if isinstance(module, nn.Linear) and shape:
                shape[-1] = module.in_features
                return ",".join(map(str, shape)) + f" ({module.in_features} input features)"
    return f"{_EXAMPLE_SHAPE} for 28x28 grey images"


def _shapes(inputs: tuple[torch.Tensor, ...]) -> str:
    return " and ".join(
        ",".join(str(d) for d in t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs
    ) or "(no inputs)"


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,1,28,28"`` (or ``"1x1x28x28"``, brackets allowed) -> ``(1, 1, 28, 28)``."""
    cleaned = text.strip().strip("()[]").replace("x", ",").replace("X", ",")
    parts = [p.strip() for p in cleaned.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # a trailing comma, as in "(1,)"
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(
            f"--input-shape '{text}' is not a list of positive integers; write it like "
            f"{_EXAMPLE_SHAPE} (batch, channels, height, width)"
        )
    return shape


def example_inputs_for(shape: Sequence[int], *, seed: int = 0) -> tuple[torch.Tensor]:
    """One standard-normal input of ``shape``, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(int(d) for d in shape), generator=generator),)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _first_sentence(exc: BaseException) -> str:
    """fx's messages run on for several sentences; the first says what happened."""
    text = first_line(exc, limit=_LINE)
    head, sep, _ = text.partition(". ")
    return head if sep and len(head) > 20 else text.rstrip(".")

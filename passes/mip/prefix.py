"""Forward passes of pruned copies of one network on fixed samples, reusing their common prefix.

Why.  The held-out judgements (:mod:`.evidence`) run a physically pruned copy of the network on
thousands of samples per plan, and plans judged one after the other mostly differ in late layers
only: on the shipped LeNet-5 at half its MACs, 13 of the 14 candidates after the warm start
changed the fully connected layers alone, so their convolutions and poolings, most of a pass's
work, computed the very values of the plan they were compared with.

How.  Every node of a pruned copy gets a *fingerprint*: what it computes (a module's class, its
settings and the bytes of its parameters and buffers; a function's or method's name and its
constant arguments) and the fingerprints of its inputs; the *prefix key* of a position digests
the fingerprints of every node before it, in order.  Two copies with the same prefix key at a
position ran the same operations on the same values in the same batches up to there (in-place
updates included), so they hold the same values there, to the last bit.  At each *resume point*
(before a node whose module has parameters) the values that later nodes still read are kept per
batch under the point's prefix key, while they fit in a byte budget (:data:`STORE_BYTES`, half of
it for one run's values; the least recently used points are dropped first).  A later copy starts
from its deepest resume point whose values are kept and runs only the nodes after it.  Kept values
are copies, and are handed out as copies, so an in-place operation later in a run cannot change them.

A copy whose fingerprint cannot be told apart safely (a module with hooks, an argument without a
stable description) simply shares nothing: its nodes get fingerprints no other copy has.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from oamipc.ir import first_output

#: Bytes of kept values (all runs together); half of it at most for one run's values.
STORE_BYTES = 1 << 26

_unique = itertools.count()  # fingerprints no other node has (see :func:`_unshareable`)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and contents of a tensor, as bytes to hash."""
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    if t.numel() == 0:
        return head
    flat = t.detach().reshape(-1).contiguous()
    return head + flat.view(torch.uint8).cpu().numpy().tobytes()  # any dtype, bfloat16 included


def _unshareable() -> str:
    return f"<unique {next(_unique)}>"


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _describe(value: Any, prints: dict[fx.Node, str]) -> str:
    """A stable description of an argument: nodes by fingerprint, constants by value."""
    if isinstance(value, fx.Node):
        return f"<node {prints[value]}>"
    if isinstance(value, (tuple, list)):
        inner = ",".join(_describe(v, prints) for v in value)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v, prints)}" for k, v in value.items()) + "}"
    if isinstance(value, slice):
        return f"slice({_describe((value.start, value.stop, value.step), prints)})"
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(_tensor_bytes(value)).hexdigest()
    if isinstance(value, _PLAIN):
        return f"{type(value).__name__}:{value!r}"
    return _unshareable()


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{module}.{name}" if name else _unshareable()


def _module_digest(mod: torch.nn.Module) -> str:
    """Class, public settings, parameters and buffers of ``mod`` and its submodules."""
    h = hashlib.sha256()
    for name, sub in mod.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks or getattr(sub, "_backward_hooks", None):
            return _unshareable()
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{sub.training}".encode())
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_"):
                continue
            h.update(f"{key}={_describe(value, {})};".encode())
        for key, t in itertools.chain(sub.named_parameters(recurse=False), sub.named_buffers(recurse=False)):
            h.update(key.encode())
            h.update(b"none" if t is None else _tensor_bytes(t))
    return h.hexdigest()


def fingerprints(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node's fingerprint (see the module docstring); the placeholders' are their names."""
    prints: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            what = f"input {node.target}"
        elif node.op == "get_attr":
            attr: Any = gm
            for part in str(node.target).split("."):
                attr = getattr(attr, part)
            what = _describe(attr, prints) if isinstance(attr, torch.Tensor) else _unshareable()
        elif node.op == "call_module":
            what = _module_digest(gm.get_submodule(str(node.target)))
        else:
            what = _target_name(node.target)
        text = f"{node.op}|{what}|{_describe(node.args, prints)}|{_describe(node.kwargs, prints)}"
        prints[node] = hashlib.sha256(text.encode()).hexdigest()
    return prints


@dataclass(frozen=True)
class ResumePoint:
    """Before node ``index``: the earlier nodes a later node still reads."""

    index: int
    live: tuple[fx.Node, ...]


def resume_points(gm: fx.GraphModule) -> list[ResumePoint]:
    """Points before each node whose module has parameters, shallowest first; a point whose live
    values include the input is left out (starting there saves nothing)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=-1) for n in nodes}
    points = []
    for i, node in enumerate(nodes):
        if node.op != "call_module" or not any(True for _ in gm.get_submodule(str(node.target)).parameters()):
            continue
        live = tuple(n for n in nodes[:i] if last_use[n] >= i)
        if live and not any(n.op == "placeholder" for n in live):
            points.append(ResumePoint(i, live))
    return points


def _storable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_contiguous() or value.is_contiguous(memory_format=torch.channels_last)
    if isinstance(value, (tuple, torch.Size)):
        return all(isinstance(v, (int, float, bool)) for v in value)
    return isinstance(value, (int, float, bool))


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class _Entry:
    """The live values at one resume point, one tuple per batch (filled as the batches run)."""

    def __init__(self) -> None:
        self.values: list[tuple[Any, ...]] = []
        self.nbytes = 0


def prefix_keys(nodes: list[fx.Node], prints: dict[fx.Node, str]) -> list[str]:
    """``keys[i]``: a digest of the fingerprints of ``nodes[:i]`` in order, so equal keys mean equal
    computations up to position ``i``, in-place updates included."""
    keys = [hashlib.sha256(b"start").hexdigest()]
    for node in nodes:
        keys.append(hashlib.sha256(f"{keys[-1]}|{prints[node]}".encode()).hexdigest())
    return keys


class PrefixRuns:
    """Runs networks on fixed samples in fixed batches, reusing the values of shared prefixes.

    ``run(net)`` returns ``net``'s first output for each batch of ``x`` (``step`` samples, the
    last one shorter), the very values ``net(batch)`` gives; ``stats`` counts the runs and the
    nodes run and skipped, for tests and reports.
    """

    def __init__(self, x: torch.Tensor, step: int, device: torch.device, budget: int = STORE_BYTES) -> None:
        self.x, self.step, self.device, self.budget = x, step, device, budget
        self.batches = -(-len(x) // step)
        self.store: OrderedDict[str, _Entry] = OrderedDict()  # prefix key -> live values, least recently used first
        self.stats = {"runs": 0, "resumed": 0, "nodes_run": 0, "nodes_skipped": 0}

    def run(self, net: fx.GraphModule) -> list[torch.Tensor]:
        nodes = list(net.graph.nodes)
        keys = prefix_keys(nodes, fingerprints(net))
        points = resume_points(net)
        start = next((p for p in reversed(points) if keys[p.index] in self.store), None)
        begin = 0 if start is None else start.index
        if start is not None:
            self.store.move_to_end(keys[begin])
        later = {p.index: p for p in points if p.index > begin and keys[p.index] not in self.store}
        fresh: dict[str, _Entry] = {}
        room = self.budget // 2
        interp = fx.Interpreter(net)
        outputs = []
        for b in range(self.batches):
            lo = b * self.step
            if start is None:
                interp.env, interp.args_iter = {}, iter((self.x[lo:lo + self.step].to(self.device),))
            else:
                kept = self.store[keys[begin]].values[b]
                interp.env, interp.args_iter = {n: _copy(v) for n, v in zip(start.live, kept)}, iter(())
            for i in range(begin, len(nodes)):
                point = later.get(i)
                if point is not None:  # no local name holds the live values: they are freed at their last use
                    if b == 0:
                        size = sum(_nbytes(interp.env[n]) for n in point.live) * self.batches
                        if all(_storable(interp.env[n]) for n in point.live) and size <= room:
                            fresh[keys[i]] = _Entry()
                            room -= size
                    if keys[i] in fresh:
                        entry = fresh[keys[i]]
                        entry.values.append(tuple(_copy(interp.env[n]) for n in point.live))
                        entry.nbytes += sum(_nbytes(v) for v in entry.values[-1])
                node = nodes[i]
                interp.env[node] = interp.run_node(node)
                for dead in interp.user_to_last_uses.get(node, []):
                    del interp.env[dead]
                if node.op == "output":
                    outputs.append(first_output(interp.env[node]))
                    break
            interp.env = {}
        self.stats["runs"] += 1
        self.stats["resumed"] += int(start is not None)
        self.stats["nodes_run"] += len(nodes) - begin
        self.stats["nodes_skipped"] += begin
        self.store.update(fresh)
        self._evict(keep=set(fresh) | ({keys[begin]} if start is not None else set()))
        return outputs

    def _evict(self, keep: set[str]) -> None:
        """Drop the least recently used values until the store fits its budget (this run's last)."""
        total = sum(e.nbytes for e in self.store.values())
        for key in list(self.store):
            if total <= self.budget:
                break
            if key not in keep:
                total -= self.store.pop(key).nbytes

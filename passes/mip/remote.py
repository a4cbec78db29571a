"""Where the MIP planner's independent tasks run: forked local workers, or Ray tasks.

The MIP analysis has work that splits into independent tasks: the paper formulation's class
problems, the budget formulation's layer sub-problems (solved ahead at the current plan), the
joint stage's speculative trust radii and its flip-effect batches.  A :class:`Dispatch` runs
``fn(shared, i)`` for ``i`` in ``range(n)`` and yields the results in that order, so the plan
never depends on how many workers ran them or which finished first.

* ``local`` (:class:`LocalDispatch`, the default, ``MipOptions.executor``): the forked workers
  of :mod:`.workers` (``jobs``), exactly as before; the shared state is inherited, not sent.
* ``ray`` (:class:`RayDispatch`): Ray tasks of one CPU each (:mod:`oamipc.executor`: an
  embedded local Ray with ``jobs`` CPUs, or the cluster at ``ray_address``).  Large state (the
  network, the calibration samples) goes to the object store once with :meth:`Dispatch.put`,
  and a task reads it back with :func:`resolve`, which keeps it per worker process, so each
  worker unpickles and rebuilds it once, not once per task.  Solvers are built inside the
  tasks (a PuLP problem does not travel); each task runs one torch thread, and its MILP solves
  one solver thread unless ``threads`` says otherwise.

fx GraphModules do not pickle (their ``__reduce__`` regenerates Python code and fails on the
graphs oamipc traces, and it would drop the nodes' shapes and names anyway).  :meth:`Dispatch.put`
therefore pickles every GraphModule inside the value as a :class:`PortableGraph`: the graph's
nodes (op, name, target, arguments, shape metadata) and the modules and tensors they read; the
worker rebuilds the same graph, node for node, with the same parameters.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import fx
from torch.fx.node import map_aggregate, map_arg

from oamipc.executor import executor

from .workers import fork_map

S = TypeVar("S")
R = TypeVar("R")

_META_KEPT = ("tensor_meta", "type")  # the node metadata the analysis reads (shapes, value types)
_RESOLVED: OrderedDict[str, Any] = OrderedDict()  # per worker process: stored values already unpickled
_RESOLVED_KEEP = 4


class _Ref:
    """A node argument that names another node of the same graph (by its name)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[type[_Ref], tuple[str]]:
        return _Ref, (self.name,)


@dataclass(frozen=True)
class PortableGraph:
    """A GraphModule as picklable data: its nodes in order and the attributes they read."""

    attrs: dict[str, Any]  # qualified name -> the module, parameter or tensor a node reads
    nodes: list[tuple[str, str, Any, Any, Any, Any, dict[str, Any]]]  # op, name, target, args, kwargs, type, meta
    codegen: Any  # the graph's code generator when it is not the plain one (a lifted program's pytree handling)
    training: bool
    class_name: str

    @classmethod
    def of(cls, gm: fx.GraphModule) -> PortableGraph:
        attrs: dict[str, Any] = {}
        nodes = []
        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                attrs[str(node.target)] = functools.reduce(getattr, str(node.target).split("."), gm)
            nodes.append((node.op, node.name, node.target, map_arg(node.args, lambda n: _Ref(n.name)),
                          map_arg(node.kwargs, lambda n: _Ref(n.name)), node.type,
                          {k: node.meta[k] for k in _META_KEPT if k in node.meta}))
        codegen = gm.graph._codegen
        return cls(attrs, nodes, None if type(codegen) is fx.graph.CodeGen else codegen, gm.training,
                   type(gm).__name__)

    def build(self) -> fx.GraphModule:
        """The GraphModule again: the same nodes (names included), the same modules and tensors."""
        graph = fx.Graph()
        if self.codegen is not None:
            graph._codegen = self.codegen
        env: dict[str, fx.Node] = {}

        def lookup(a: Any) -> Any:
            return env[a.name] if isinstance(a, _Ref) else a

        for op, name, target, args, kwargs, type_expr, meta in self.nodes:
            node = graph.create_node(op, target, map_aggregate(args, lookup), map_aggregate(kwargs, lookup),
                                     name=name, type_expr=type_expr)
            if node.name != name:  # create_node keeps a free, valid name: the original graph's are
                raise RuntimeError(f"rebuilding the graph renamed node {name!r} to {node.name!r}")
            node.meta.update(meta)
            env[name] = node
        gm = fx.GraphModule(self.attrs, graph, class_name=self.class_name)
        return gm.train(self.training)


def _rebuild(portable: PortableGraph) -> fx.GraphModule:
    return portable.build()


def dumps(value: Any) -> bytes:
    """``value`` pickled (cloudpickle), every GraphModule in it as a :class:`PortableGraph`."""
    import ray.cloudpickle as cloudpickle

    class _Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, fx.GraphModule):
                return _rebuild, (PortableGraph.of(obj),)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


@dataclass(frozen=True)
class Stored:
    """A value in Ray's object store (pickled by :func:`dumps`); :func:`resolve` reads it."""

    ref: Any  # ray.ObjectRef of the pickled bytes
    key: str


def resolve(value: Any) -> Any:
    """In a task: the value behind a :class:`Stored` handle (unpickled once per worker process);
    anything else is returned as it is (local workers get the value itself)."""
    if not isinstance(value, Stored):
        return value
    hit = _RESOLVED.get(value.key)
    if hit is None:
        import pickle

        import ray

        hit = pickle.loads(ray.get(value.ref))  # noqa: S301 - bytes this compile put in its own object store
        _RESOLVED[value.key] = hit
        while len(_RESOLVED) > _RESOLVED_KEEP:
            _RESOLVED.popitem(last=False)
    else:
        _RESOLVED.move_to_end(value.key)
    return hit


class Dispatch(Protocol):
    """Runs ``fn(shared, i)`` for ``i`` in ``range(n)``; results in that order."""

    name: str
    workers: int
    remote: bool  # tasks run in other processes that do not share this one's memory

    def map(self, fn: Callable[[S, int], R], shared: S, n: int) -> Iterator[R]: ...

    def put(self, value: Any) -> Any:
        """A handle tasks :func:`resolve` to ``value``; sent to the workers once."""
        ...


class LocalDispatch:
    """Forked local workers (:func:`.workers.fork_map`), or this process with one job."""

    name = "local"
    remote = False

    def __init__(self, jobs: int = 1) -> None:
        self.workers = jobs

    def map(self, fn: Callable[[S, int], R], shared: S, n: int) -> Iterator[R]:
        return fork_map(fn, shared, n, self.workers)

    def put(self, value: Any) -> Any:
        return value


class RayDispatch:
    """Ray tasks (:class:`oamipc.executor.RayExecutor`), large state through the object store."""

    name = "ray"
    remote = True

    def __init__(self, ex: Any) -> None:
        self.ex = ex
        self.workers = ex.workers

    def map(self, fn: Callable[[S, int], R], shared: S, n: int) -> Iterator[R]:
        return iter(self.ex.map(fn, shared, list(range(n))))

    def put(self, value: Any) -> Stored:
        ref = self.ex.ray.put(dumps(value))
        return Stored(ref, ref.hex())


@contextlib.contextmanager
def dispatch(kind: str = "local", jobs: int = 1, ray_address: str | None = None) -> Iterator[Dispatch]:
    """The dispatch of ``kind`` for the ``with`` block (an embedded Ray starts and stops with it)."""
    if kind == "local":
        yield LocalDispatch(jobs)
        return
    with executor(kind, jobs, ray_address) as ex:
        yield RayDispatch(ex)


def solver_threads(threads: int | None, where: Dispatch) -> int | None:
    """The solver threads of a task: as asked, else one per Ray worker (local: the solver's default)."""
    return threads if threads is not None or not where.remote else 1

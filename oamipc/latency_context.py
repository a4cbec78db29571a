"""Per-layer latency in context: onnxruntime profiles of whole networks, attributed to layers.

A layer timed alone pays what the whole network does not (its own layout conversions, no fusion
with the activation or the residual add) and its savings can be off by 3x on a network such as
MobileNetV2.  So the latency model times layers where they run: each variant of the network
(the dense one and a few with narrower groups) runs whole in onnxruntime with profiling on, and
every kernel's time is attributed to one layer of the PyTorch graph:

* the exported ONNX file's Conv / Gemm / MatMul nodes are matched, in order, with the graph's
  Conv and Linear modules (their weight shapes must agree, else nothing is attributed);
* every other node of the exported file (activation, pooling, residual add, flatten) belongs to
  the layer that produces its first input, or else to the first layer that reads its output;
* onnxruntime rewrites the graph before it runs it: fused nodes are named after an original
  tensor (``<tensor>_nchwc``) or keep an original node's name or one of its initializers (the
  bias); nodes it creates (``ReorderInput``/``ReorderOutput``) are followed through the
  optimised graph (saved with ``optimized_model_filepath``) to the layer upstream, or else
  downstream.  What still has no layer is kept under ``""``, so the attributed times always sum
  to the profile's total kernel time.

The variants are timed interleaved (one run of each in turn, several rounds) so a busy machine
disturbs them alike, with the dense network also timed without profiling in the same rotation
(the model's whole-network latency).  CPU provider only: a GPU profile's node times are launch
times, not kernel times.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oamipc.runtime import _session_options, import_onnxruntime

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

REST = ""  # the owner of kernels that no layer produces or reads (e.g. nothing at all in a conv net)
KERNEL_SUFFIX = "_kernel_time"
MIN_ROUNDS = 7
MAX_ROUNDS = 60
TARGET_SECONDS = 4.0  # profiled rounds continue until the rotation has run this long (MIN/MAX_ROUNDS bound it)


@dataclass(frozen=True)
class LayerOp:
    """One Conv/Linear module of the PyTorch graph, in execution order: its name and weight shape."""

    name: str
    weight_shape: tuple[int, ...]


def _initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}


def match_layers(model: onnx.ModelProto, layers: Sequence[LayerOp]) -> dict[str, str] | None:
    """ONNX node name -> layer name for the file's Conv/Gemm/MatMul nodes, matched in order with
    ``layers``; None when the two do not line up (count or a weight's shape differs)."""
    shapes = _initializer_shapes(model)
    found: list[tuple[onnx.NodeProto, tuple[int, ...] | None]] = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            found.append((node, shapes.get(node.input[1])))
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in shapes:
            shape = shapes[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            found.append((node, shape if node.op_type == "Gemm" and trans_b else tuple(reversed(shape))))
    if len(found) != len(layers):
        return None
    out = {}
    for (node, shape), layer in zip(found, layers):
        if shape is not None and shape != layer.weight_shape:
            return None
        out[node.name] = layer.name
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _propagate(graph: onnx.GraphProto, owner: dict[str, str | None]) -> dict[str, str]:
    """Give every node of ``graph`` (in topological order) the owner of its first owned producer,
    else of its first owned consumer; ``owner`` holds the nodes already known."""
    producer = _producers(graph)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    for n in graph.node:
        if owner.get(n.name) is None:
            ups = [owner.get(producer[i].name) for i in n.input if i in producer]
            owner[n.name] = next((u for u in ups if u is not None), None)
    for n in reversed(graph.node):
        if owner.get(n.name) is None:
            downs = [owner.get(c.name) for o in n.output for c in consumers.get(o, [])]
            owner[n.name] = next((d for d in downs if d is not None), None)
    return {name: (o if o is not None else REST) for name, o in owner.items()}


def node_owners(model: onnx.ModelProto, optimized: onnx.ModelProto | None, layer_of: dict[str, str]) -> dict[str, str]:
    """Node name -> owning layer for the nodes onnxruntime runs (see the module docstring).

    ``model`` is the exported file, ``optimized`` the graph onnxruntime made of it (None: the
    exported graph runs as it is), ``layer_of`` the exported layer nodes' layers."""
    graph = model.graph
    original = _propagate(graph, {n.name: layer_of.get(n.name) for n in graph.node})
    if optimized is None:
        return original
    producer = _producers(graph)
    by_init: dict[str, str] = {}
    for n in graph.node:
        if n.name in layer_of:
            for i in n.input[1:]:
                by_init.setdefault(i, layer_of[n.name])
    known: dict[str, str | None] = {}
    for n in optimized.graph.node:
        owner: str | None = None
        if n.name in original and original[n.name] != REST:
            owner = original[n.name]
        elif n.name.endswith("_nchwc") and n.name[: -len("_nchwc")] in producer:
            owner = original.get(producer[n.name[: -len("_nchwc")]].name)
        if owner in (None, REST):
            owner = next((by_init[i] for i in n.input if i in by_init), None)
        known[n.name] = owner if owner != REST else None
    return _propagate(optimized.graph, known)


def parse_profile(events: Sequence[dict[str, Any]], owners: dict[str, str], skip_runs: int = 0
                  ) -> list[dict[str, float]]:
    """Per run, milliseconds of kernel time per owner (``owners``: node name -> layer; a node not
    in it counts under :data:`REST`).  The k-th occurrence of a node belongs to run k; the first
    ``skip_runs`` runs (warm-up) are dropped."""
    seen: dict[str, int] = defaultdict(int)
    runs: list[dict[str, float]] = []
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        node = name[: -len(KERNEL_SUFFIX)]
        k = seen[node]
        seen[node] += 1
        while len(runs) <= k:
            runs.append(defaultdict(float))
        runs[k][owners.get(node, REST)] += float(e.get("dur", 0.0)) / 1000.0
    return [dict(r) for r in runs[skip_runs:]]


def kernel_total_ms(events: Sequence[dict[str, Any]]) -> float:
    """All kernel time in a profile, in milliseconds (the oracle of :func:`parse_profile`)."""
    return sum(float(e.get("dur", 0.0)) for e in events
               if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX)) / 1000.0


@dataclass
class _Profiled:
    """An onnxruntime session with profiling on, and the layer owning each node it runs."""

    session: Any
    owners: dict[str, str]


def open_profiled(path: Path, layers: Sequence[LayerOp], threads: int, tmp: Path, tag: str = "0"
                  ) -> _Profiled | None:
    """A profiling CPU session of the file at ``path`` (profile and optimised graph written under
    ``tmp``) with the owner of every node it runs; None when its layers cannot be matched."""
    import onnx  # here, not at the top: importing onnx took 0.6 s of every compile, and only profiles read it

    ort = import_onnxruntime()
    model = onnx.load(str(path))
    layer_of = match_layers(model, layers)
    if layer_of is None:
        return None
    options = _session_options(ort, threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / f"profile-{tag}")
    optimized_path = tmp / f"optimized-{tag}.onnx"
    options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(optimized_path), load_external_data=False) if optimized_path.is_file() else None
    return _Profiled(session, node_owners(model, optimized, layer_of))


def profile_variants(paths: Sequence[Path], layers_of: Sequence[Sequence[LayerOp]], sample_shape: tuple[int, ...],
                     batch: int, threads: int) -> tuple[float, list[dict[str, float]]] | None:
    """Time ``paths[0]`` (the dense network) whole and every path with profiling, interleaved.

    Returns the dense network's median milliseconds without profiling and, per path, the median
    over rounds of each layer's in-context milliseconds (``layers_of[k]``: the Conv/Linear modules
    of network ``k`` in order); None when a file's layers cannot be matched."""
    ort = import_onnxruntime()
    x = np.random.default_rng(1).standard_normal((batch, *sample_shape)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="oamipc-profile-") as tmp_dir:
        tmp = Path(tmp_dir)
        profiled = []
        for k, (path, layers) in enumerate(zip(paths, layers_of)):
            opened = open_profiled(path, layers, threads, tmp, str(k))
            if opened is None:
                log.info("in-context profile: the layers of %s could not be matched to its ONNX nodes", path)
                return None
            profiled.append(opened)
        plain = ort.InferenceSession(str(paths[0]), sess_options=_session_options(ort, threads),
                                     providers=["CPUExecutionProvider"])
        feeds = {plain.get_inputs()[0].name: x}
        warmup = 2
        for _ in range(warmup):
            plain.run(None, feeds)
            for p in profiled:
                p.session.run(None, feeds)
        wall: list[float] = []
        start = time.perf_counter()
        rounds = 0
        while rounds < MIN_ROUNDS or (time.perf_counter() - start < TARGET_SECONDS and rounds < MAX_ROUNDS):
            t0 = time.perf_counter_ns()
            plain.run(None, feeds)
            wall.append((time.perf_counter_ns() - t0) / 1e6)
            for p in profiled:
                p.session.run(None, feeds)
            rounds += 1
        out = []
        for p in profiled:
            events = json.loads(Path(p.session.end_profiling()).read_text())
            runs = parse_profile(events, p.owners, skip_runs=warmup)
            names = sorted({name for r in runs for name in r})
            out.append({name: float(np.median([r.get(name, 0.0) for r in runs])) for name in names})
    return float(np.median(wall)), out

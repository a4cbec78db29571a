"""A measured latency model: what each layer costs at each width, on this machine's onnxruntime.

Latency is a staircase in width, not a line in MACs (onnxruntime's fast convolutions work on
blocks of channels), so a latency target needs measurements, not a formula.  By default the
curves come from whole-network profiles (the layers timed in context,
:mod:`oamipc.latency_context`, planned by :mod:`oamipc.passes.latency_model`).  This module
holds the model, the disk cache and the older way, still the fallback and ``method="alone"``:
for every Linear and Conv layer of a network it times the layer alone, as a one-node ONNX graph built
directly with ``onnx.helper`` (no exporter in the loop), under the execution provider, batch
size and thread count of the target:

* a curve over the output width with the input width at its original value, and one over the
  input width with the output at its original value (a depthwise convolution has one width);
* at candidate widths: multiples of the layer's rounding step (the ``round_to`` multiple of the
  group it reads or writes), at most :data:`POINTS` of them, evenly spread, the full width
  always included; widths in between are interpolated linearly.

A layer at widths ``(i, o)`` is predicted as ``T_out(o) * T_in(i) / T_out(full)`` (separable),
and a plan's latency as the dense network's *measured* latency plus the sum of its layers'
changes: per-call overheads cancel in the differences.  Layers timed alone also pay layout
conversions that the whole network does not (MobileNetV2's layers alone sum to 1.3x the whole
network; the in-context curves do not), and either way a latency planner checks its plan on
the whole network (:func:`measure_pair`) and scales the layers' changes by what the whole
network showed (``LatencyModel.scale``).  Measurements are cached on disk (``$OAMIPC_CACHE_DIR``
or ``~/.cache/oamipc``), keyed by everything that makes them valid: CPU model (or GPU name),
provider, onnxruntime version, layer signature (or the whole network's bytes), widths, batch
and threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from oamipc.cache import cache_root
from oamipc.runtime import CPU, Device, import_onnxruntime, make_session

log = logging.getLogger(__name__)

POINTS = 8  # measured widths per curve (the full width always among them)
MIN_RUNS = 15
MIN_SECONDS = 0.02
CACHE_FILE = "latency-v1.json"
PAIR_SECONDS = 3.0  # the least time a whole-network check (dense against pruned) is timed for
CONTEXT_VERSION = 1  # of the in-context profile's method: a change to it must not read older entries


@dataclass(frozen=True)
class LayerSignature:
    """What a layer's latency depends on besides its widths: op, geometry and input size."""

    kind: str  # "linear" | "conv" | "depthwise"
    spatial: tuple[int, ...]  # input spatial size (conv) or the extra leading dims of a Linear input
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    bias: bool = True


@dataclass(frozen=True)
class MeasureSetup:
    """Where measurements are valid: provider, batch, threads (the device's name is added to the key)."""

    batch: int = 64
    threads: int = 1
    device: Device = "cpu"


def _device_name(provider: str) -> str:
    if provider == CPU:
        from oamipc.hardware import cpu_model

        return cpu_model()
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else provider
    except Exception:  # noqa: BLE001 - any failure here only makes the key less specific
        return provider


def _key(what: Mapping[str, Any], setup: MeasureSetup, provider: str) -> str:
    """A cache key: what was measured plus everything about where (batch, threads, provider, device, onnxruntime)."""
    parts = {**what, "batch": setup.batch, "threads": setup.threads, "provider": provider,
             "device": _device_name(provider), "onnxruntime": import_onnxruntime().__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_key(sig: LayerSignature, c_in: int, c_out: int, setup: MeasureSetup, provider: str) -> str:
    """The cache key of one layer measurement: every input that changes the number."""
    return _key({"sig": asdict(sig), "c_in": c_in, "c_out": c_out}, setup, provider)


def context_key(dense: bytes, layers: list[str], widths: list[list[list[int]]], sample_shape: tuple[int, ...],
                setup: MeasureSetup) -> str:
    """The cache key of one in-context profile (:mod:`oamipc.latency_context`): the dense file's
    bytes, the layers and their widths in every variant, the input shape, plus where it ran."""
    what = {"dense": hashlib.sha256(dense).hexdigest(), "layers": layers, "widths": widths,
            "shape": list(sample_shape), "version": CONTEXT_VERSION}
    return "ctx-" + _key(what, setup, CPU)


def cache_path() -> Path:
    return cache_root() / CACHE_FILE


class _Cache:
    """The on-disk table of measurements (read once, written back atomically when it grew)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def get(self, key: str) -> Any:
        """The stored value (a float, or the in-context profile's table), or None."""
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh)
            os.replace(tmp, self.path)
        except OSError as exc:  # a cache that cannot be written only costs time next run
            log.warning("cannot write the latency cache %s (%s); measurements will be repeated", self.path, exc)
        self.dirty = False


def layer_onnx(sig: LayerSignature, c_in: int, c_out: int) -> bytes:
    """A one-node ONNX model of the layer at these widths, with a dynamic batch dimension."""
    # Imported here, not with the module: onnx takes 0.3-1.3 s to import, and a MAC plan needs none.
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    spatial = list(sig.spatial)
    x_shape: list[str | int]
    if sig.kind == "linear":
        x_shape = ["batch", *spatial, c_in]
        w = rng.standard_normal((c_in, c_out)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"])]
        inits = [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())]
        if sig.bias:
            b = rng.standard_normal(c_out).astype(np.float32)
            inits.append(helper.make_tensor("b", TensorProto.FLOAT, b.shape, b))
            nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
        else:
            nodes[0].output[0] = "y"
    else:
        groups = c_out if sig.kind == "depthwise" else 1
        cin_per_group = 1 if sig.kind == "depthwise" else c_in
        x_shape = ["batch", c_in if sig.kind != "depthwise" else c_out, *spatial]
        w = rng.standard_normal((c_out, cin_per_group, *sig.kernel)).astype(np.float32)
        inits = [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())]
        inputs = ["x", "w"]
        if sig.bias:
            b = rng.standard_normal(c_out).astype(np.float32)
            inits.append(helper.make_tensor("b", TensorProto.FLOAT, b.shape, b))
            inputs.append("b")
        pads = list(sig.padding) * 2
        nodes = [helper.make_node("Conv", inputs, ["y"], kernel_shape=list(sig.kernel), strides=list(sig.stride),
                                  pads=pads, dilations=list(sig.dilation), group=groups)]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def time_session(session: Any, feeds: dict[str, np.ndarray]) -> float:
    """Median milliseconds of ``session.run`` after a warm-up (at least MIN_RUNS runs and MIN_SECONDS)."""
    for _ in range(3):
        session.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < MIN_SECONDS:
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if len(times) > 2000:
            break
    return float(np.median(times))


def _measure(sig: LayerSignature, c_in: int, c_out: int, setup: MeasureSetup) -> float:
    session, _ = make_session(layer_onnx(sig, c_in, c_out), device=setup.device, intra_op_threads=setup.threads)
    shape = session.get_inputs()[0].shape
    dims = [setup.batch] + [int(d) for d in shape[1:]]
    x = np.random.default_rng(1).standard_normal(dims).astype(np.float32)
    return time_session(session, {"x": x})


@dataclass
class LayerCurve:
    """Measured latency of one layer: over output widths (input full) and input widths (output full)."""

    name: str
    signature: LayerSignature
    full_in: int
    full_out: int
    out_widths: list[int] = field(default_factory=list)
    out_ms: list[float] = field(default_factory=list)
    in_widths: list[int] = field(default_factory=list)
    in_ms: list[float] = field(default_factory=list)

    def ms(self, c_in: int, c_out: int) -> float:
        """Predicted milliseconds at widths ``(c_in, c_out)`` (separable, linear between measurements)."""
        t_out = float(np.interp(c_out, self.out_widths, self.out_ms))
        if self.signature.kind == "depthwise" or not self.in_widths:
            return t_out
        t_in = float(np.interp(c_in, self.in_widths, self.in_ms))
        full = float(np.interp(self.full_out, self.out_widths, self.out_ms))
        return t_out * t_in / full if full > 0 else t_out

    @property
    def full_ms(self) -> float:
        return self.ms(self.full_in, self.full_out)


def candidate_widths(full: int, step: int, lowest: int = 1, points: int = POINTS) -> list[int]:
    """Widths to measure: multiples of ``step`` from ``lowest`` up, and ``full``; at most ``points``."""
    step = max(1, step)
    grid = sorted({w for w in range(step, full + 1, step) if w >= lowest} | {full})
    if len(grid) <= points:
        return grid
    idx = np.unique(np.round(np.linspace(0, len(grid) - 1, points)).astype(int))
    return sorted({grid[i] for i in idx} | {full})


@dataclass
class LatencyModel:
    """Per-layer curves and the dense network's measured latency; predicts a plan's latency."""

    setup: MeasureSetup
    provider: str
    dense_ms: float
    layers: list[LayerCurve]
    measured: int = 0  # measurements taken (the rest came from the cache)
    cached: int = 0
    scale: float = 1.0  # calibration: how much of the layers' measured savings the whole network shows
    method: str = "alone"  # how the layers were timed: "alone" (one-node graphs) or "context" (profiles)

    def predict(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Predicted milliseconds of the network with ``widths`` (layer name -> (in, out)); others full."""
        total = 0.0
        for layer in self.layers:
            if layer.name in widths:
                c_in, c_out = widths[layer.name]
                total += layer.ms(c_in, c_out) - layer.full_ms
        return self.dense_ms + self.scale * total

    def scaled(self, scale: float) -> LatencyModel:
        """The same measurements with the layers' changes multiplied by ``scale`` (see calibration)."""
        return replace(self, scale=scale)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.setup.batch, "threads": self.setup.threads, "provider": self.provider,
                "method": self.method, "dense_ms": self.dense_ms, "measured": self.measured, "cached": self.cached,
                "layers": [{"name": c.name, "kind": c.signature.kind, "full": [c.full_in, c.full_out],
                            "out_widths": c.out_widths, "out_ms": c.out_ms, "in_widths": c.in_widths,
                            "in_ms": c.in_ms} for c in self.layers]}


@contextlib.contextmanager
def cache_session() -> Iterator[_Cache]:
    """The measurement cache for one model build; written back at the end."""
    cache = _Cache(cache_path())
    try:
        yield cache
    finally:
        cache.save()


def measure_curve(name: str, sig: LayerSignature, full_in: int, full_out: int, out_widths: list[int],
                  in_widths: list[int], setup: MeasureSetup, provider: str, cache: _Cache,
                  counts: dict[str, int]) -> LayerCurve:
    """Measure (or read from ``cache``) one layer's two curves on ``provider`` (the one that ran the
    dense network)."""

    def one(c_in: int, c_out: int) -> float:
        key = cache_key(sig, c_in, c_out, setup, provider)
        hit = cache.get(key)
        if hit is not None:
            counts["cached"] += 1
            return hit
        value = _measure(sig, c_in, c_out, setup)
        cache.put(key, value)
        counts["measured"] += 1
        return value

    curve = LayerCurve(name, sig, full_in, full_out)
    curve.out_widths = out_widths
    curve.out_ms = [one(full_in if sig.kind != "depthwise" else w, w) for w in out_widths]
    if sig.kind != "depthwise":
        curve.in_widths = in_widths
        curve.in_ms = [one(w, full_out) for w in in_widths]
    return curve


def measure_pair(dense: str | Path, pruned: str | Path, sample_shape: tuple[int, ...], setup: MeasureSetup,
                 cache: _Cache | None = None, rounds: int = 30, min_seconds: float = PAIR_SECONDS) -> float:
    """Pruned over dense latency, timed interleaved (A, B, A, B, ...) at ``setup.batch``: the median of
    the per-round ratios, which a busy machine disturbs far less than two separate medians.  At
    least ``rounds`` rounds and ``min_seconds`` of them: 30 rounds of a small network take half a
    second, and on a busy machine plans predicted alike then measured anywhere from 0.24 to 0.65.

    Cached by both files' bytes and the setup, so a plan made again on the same machine sees the
    same number (and is the same plan)."""
    from oamipc.bench import benchmark

    a, b = Path(dense).read_bytes(), Path(pruned).read_bytes()
    what = {"dense": hashlib.sha256(a).hexdigest(), "pruned": hashlib.sha256(b).hexdigest(),
            "shape": list(sample_shape), "rounds": rounds, **({"seconds": min_seconds} if min_seconds else {})}
    key = "pair-" + _key(what, setup, CPU if setup.device == "cpu" else str(setup.device))
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    result = benchmark([dense, pruned], batch_sizes=(setup.batch,), warmup=max(3, rounds // 10), runs=rounds,
                       min_time_s=min_seconds or None, device=setup.device, intra_op_threads=setup.threads)
    ratio = result.batches[0].pairwise_ratio
    if ratio is None:
        raise RuntimeError("the interleaved timing gave no ratio")
    if cache is not None:
        cache.put(key, float(ratio))
    return float(ratio)


def measure_network(onnx_path: str | Path, sample_shape: tuple[int, ...], setup: MeasureSetup,
                    cache: _Cache | None = None) -> tuple[float, str]:
    """Median milliseconds of a whole ONNX network at ``setup.batch`` (input: ``(batch, *sample_shape)``).

    With a ``cache``, keyed by the file's bytes and everything in :func:`cache_key`, so that the same
    network on the same machine gets the same number, and the same latency plan, every time."""
    data = Path(onnx_path).read_bytes()
    key = None
    if cache is not None and setup.device == "cpu":
        key = "net-" + _key({"network": hashlib.sha256(data).hexdigest(), "shape": list(sample_shape)}, setup, CPU)
        hit = cache.get(key)
        if hit is not None:
            return hit, CPU
    session, provider = make_session(data, device=setup.device, intra_op_threads=setup.threads)
    x = np.random.default_rng(1).standard_normal((setup.batch, *sample_shape)).astype(np.float32)
    value = time_session(session, {session.get_inputs()[0].name: x})
    if cache is not None and key is not None:
        cache.put(key, value)
    return value, provider


"""Latency of ONNX files under onnxruntime, one model alone or two interleaved (A/B).

What is measured: the wall time of ``session.run`` on seeded random inputs (host to device
copies included when a GPU runs the model), per model and batch size, with
``time.perf_counter_ns``.  Why interleaved: with two models each timed round runs A once then B
once, so thermal drift, frequency scaling and noisy neighbours hit both alike; the speed-up is
reported both as the ratio of the medians and as the median of the per-round ratios (the latter
is the more robust one when the machine drifts).  Garbage collection is paused while timing.

The input shapes come from the ONNX file: dim 0 (symbolic or fixed) is the batch; any other
symbolic dimension needs a per-sample shape from the caller (``sample_shapes``).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oamipc.errors import DataError, UsageError
from oamipc.hardware import cpu_model
from oamipc.runtime import CUDA, Device, import_onnxruntime, make_session

__all__ = ["BatchResult", "BenchResult", "LatencyStats", "ModelInfo", "benchmark", "cpu_model"]

log = logging.getLogger(__name__)

#: onnxruntime element types that random inputs can be generated for.
_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

SampleShapes = Mapping[str, Sequence[int]] | Sequence[int]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one batch size, in milliseconds; throughput in samples/s."""

    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    std_ms: float
    throughput: float  # batch / median latency

    @classmethod
    def from_ns(cls, times_ns: Sequence[int], batch: int) -> LatencyStats:
        ms = np.asarray(times_ns, dtype=np.float64) / 1e6
        median = float(np.median(ms))
        return cls(runs=len(ms), median_ms=median, p90_ms=float(np.percentile(ms, 90)),
                   p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()), min_ms=float(ms.min()),
                   std_ms=float(ms.std()), throughput=batch / (median / 1e3) if median > 0 else float("inf"))


@dataclass(frozen=True)
class ModelInfo:
    """One benchmarked file: its path, the provider that really ran it, its declared inputs."""

    path: str
    provider: str
    inputs: dict[str, list[int | str | None]]


@dataclass(frozen=True)
class BatchResult:
    """Every model at one batch size; the ratios only when there are two models (A, B).

    ``speedup``: median(A) / median(B), above 1 when B is faster.  ``speedup_pairwise``: the
    median over rounds of A_i / B_i.  ``latency_ratio`` and ``pairwise_ratio``: the same two
    the other way round (B / A), i.e. B's latency as a fraction of A's.
    """

    batch: int
    input_shapes: tuple[dict[str, list[int]], ...]
    stats: tuple[LatencyStats, ...]
    times_ns: tuple[tuple[int, ...], ...] = field(repr=False)
    speedup: float | None = None
    speedup_pairwise: float | None = None
    latency_ratio: float | None = None
    pairwise_ratio: float | None = None


@dataclass(frozen=True)
class BenchResult:
    """The whole measurement, with the settings and machine that produced it."""

    models: tuple[ModelInfo, ...]
    batches: tuple[BatchResult, ...]
    provider: str
    gpu: bool
    device: str
    onnxruntime_version: str
    intra_op_threads: int | None
    inter_op_threads: int
    cpu: str
    cpu_count: int | None
    warmup: int
    runs: int
    min_time_s: float | None
    seed: int

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per batch size: ``a_*`` and ``b_*`` columns (``b_*`` None for one model)."""
        rows = []
        for br in self.batches:
            row: dict[str, Any] = {"batch": br.batch}
            for key, i in (("a", 0), ("b", 1)):
                st = br.stats[i] if i < len(br.stats) else None
                for name in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "throughput"):
                    row[f"{key}_{name}"] = getattr(st, name) if st else None
            row.update(speedup=br.speedup, speedup_pairwise=br.speedup_pairwise,
                       latency_ratio=br.latency_ratio, pairwise_ratio=br.pairwise_ratio)
            rows.append(row)
        return rows

    def to_dict(self, *, include_times: bool = False) -> dict[str, Any]:
        """Plain JSON-serialisable data; the raw per-run times (ns) only on request."""
        batches = []
        for br in self.batches:
            entry: dict[str, Any] = {
                "batch": br.batch, "input_shapes": list(br.input_shapes),
                "models": [asdict(st) for st in br.stats],
                "speedup": br.speedup, "speedup_pairwise": br.speedup_pairwise,
                "latency_ratio": br.latency_ratio, "pairwise_ratio": br.pairwise_ratio,
            }
            if include_times:
                entry["times_ns"] = [list(t) for t in br.times_ns]
            batches.append(entry)
        return {
            "models": [asdict(m) for m in self.models], "provider": self.provider, "gpu": self.gpu,
            "device": self.device, "onnxruntime": self.onnxruntime_version,
            "intra_op_threads": self.intra_op_threads, "inter_op_threads": self.inter_op_threads,
            "cpu": self.cpu, "cpu_count": self.cpu_count, "warmup": self.warmup, "runs": self.runs,
            "min_time_s": self.min_time_s, "seed": self.seed, "batches": batches, "rows": self.rows(),
        }


def benchmark(paths: Sequence[str | os.PathLike[str]], *, batch_sizes: Sequence[int] = (1, 64), warmup: int = 10,
              runs: int = 100, min_time_s: float | None = None, device: Device = "auto",
              intra_op_threads: int | None = 1, seed: int = 0, sample_shapes: SampleShapes | None = None,
              progress: Callable[[int, int], None] | None = None) -> BenchResult:
    """Time one ONNX file, or two interleaved (A, B, A, B, ...), at each batch size.

    ``runs`` timed rounds per batch size (each round runs every model once) after ``warmup``
    untimed rounds; with ``min_time_s`` the timing goes on past ``runs`` rounds until that many
    seconds have passed for the batch size.  ``sample_shapes``: the shape of one sample (no batch
    dimension) for inputs whose other dimensions are symbolic, by input name (or one shape for a
    one-input model).  ``progress(done, total)`` is called as rounds complete (with
    ``min_time_s`` the total grows when the timing is extended).
    """
    _check_options(paths, batch_sizes, warmup, runs, min_time_s)
    ort = import_onnxruntime()
    sessions = []
    models = []
    for p in paths:
        session, provider = make_session(p, device=device, intra_op_threads=intra_op_threads)
        sessions.append(session)
        models.append(ModelInfo(path=str(p), provider=provider,
                                inputs={i.name: list(i.shape) for i in session.get_inputs()}))
    providers = sorted({m.provider for m in models})
    if len(providers) > 1:
        log.warning("the models run on different providers (%s): their latencies are not comparable",
                    ", ".join(providers))

    total = len(batch_sizes) * runs
    done = 0
    batches = []
    for batch in batch_sizes:
        feeds = [_feed(s, Path(m.path), batch, sample_shapes, seed) for s, m in zip(sessions, models)]
        for _ in range(warmup):
            for s, f in zip(sessions, feeds):
                s.run(None, f)
        times, done, total = _timed_rounds(sessions, feeds, runs, min_time_s, done, total, progress)
        batches.append(_batch_result(batch, feeds, times))
        log.info("batch %d: %s", batch, ", ".join(f"{m.path} {r.median_ms:.4f} ms" for m, r in
                                                  zip(models, batches[-1].stats)))
    if progress:
        progress(done, done)
    return BenchResult(
        models=tuple(models), batches=tuple(batches), provider=", ".join(providers),
        gpu=any(m.provider == CUDA for m in models), device=device, onnxruntime_version=ort.__version__,
        intra_op_threads=intra_op_threads, inter_op_threads=1, cpu=cpu_model(), cpu_count=os.cpu_count(),
        warmup=warmup, runs=runs, min_time_s=min_time_s, seed=seed)


def _check_options(paths: Sequence[Any], batch_sizes: Sequence[int], warmup: int, runs: int,
                   min_time_s: float | None) -> None:
    if not 1 <= len(paths) <= 2:
        raise UsageError(f"benchmark takes one or two ONNX files (A [B]), got {len(paths)}")
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if runs < 1 or warmup < 0:
        raise UsageError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if min_time_s is not None and min_time_s < 0:
        raise UsageError(f"min_time_s must be >= 0, got {min_time_s}")


def _timed_rounds(sessions: list[Any], feeds: list[dict[str, np.ndarray]], runs: int, min_time_s: float | None,
                  done: int, total: int, progress: Callable[[int, int], None] | None
                  ) -> tuple[list[list[int]], int, int]:
    """Interleaved timed rounds; returns the times (ns) per model and the updated progress counts."""
    times: list[list[int]] = [[] for _ in sessions]
    budget_ns = int((min_time_s or 0.0) * 1e9)
    report_every = max(1, runs // 100)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        rounds = 0
        while rounds < runs or time.perf_counter_ns() - start < budget_ns:
            for s, f, t in zip(sessions, feeds, times):
                t0 = time.perf_counter_ns()
                s.run(None, f)
                t.append(time.perf_counter_ns() - t0)
            rounds += 1
            done += 1
            total = max(total, done)
            if progress and rounds % report_every == 0:
                progress(done, total)
    finally:
        if was_enabled:
            gc.enable()
    return times, done, total


def _batch_result(batch: int, feeds: list[dict[str, np.ndarray]], times: list[list[int]]) -> BatchResult:
    stats = tuple(LatencyStats.from_ns(t, batch) for t in times)
    shapes = tuple({name: list(a.shape) for name, a in f.items()} for f in feeds)
    raw = tuple(tuple(t) for t in times)
    if len(times) < 2:
        return BatchResult(batch=batch, input_shapes=shapes, stats=stats, times_ns=raw)
    a, b = (np.asarray(t, dtype=np.float64) for t in times[:2])
    return BatchResult(batch=batch, input_shapes=shapes, stats=stats, times_ns=raw,
                       speedup=stats[0].median_ms / stats[1].median_ms,
                       speedup_pairwise=float(np.median(a / b)),
                       latency_ratio=stats[1].median_ms / stats[0].median_ms,
                       pairwise_ratio=float(np.median(b / a)))


def _feed(session: Any, path: Path, batch: int, sample_shapes: SampleShapes | None,
          seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs for every model input at ``batch``; equal shapes get equal data."""
    feed = {}
    metas = session.get_inputs()
    for index, meta in enumerate(metas):
        shape = _resolve_shape(meta.name, list(meta.shape), path, batch, sample_shapes, len(metas))
        dtype = _DTYPES.get(meta.type)
        if dtype is None:
            raise DataError(f"input {meta.name!r} of {path} has type {meta.type}: the benchmark can only make "
                            f"random {', '.join(_DTYPES)} inputs; benchmark it with your own harness")
        rng = np.random.default_rng([seed, batch, index])
        if np.issubdtype(dtype, np.floating):
            data = rng.standard_normal(shape).astype(dtype)
        else:
            data = rng.integers(0, 2, size=shape).astype(dtype)
        feed[meta.name] = data
    return feed


def _resolve_shape(name: str, declared: list[Any], path: Path, batch: int, sample_shapes: SampleShapes | None,
                   n_inputs: int) -> tuple[int, ...]:
    """Concrete shape of one input: dim 0 is the batch, the rest from the file or ``sample_shapes``."""
    if not declared:
        return ()
    given = _given_sample_shape(name, sample_shapes, n_inputs)
    if given is not None:
        if len(given) != len(declared) - 1:
            raise UsageError(f"sample shape {list(given)} for input {name!r} of {path} has {len(given)} dims, "
                             f"the model expects {len(declared) - 1} besides the batch ({declared})")
        rest = [int(d) for d in given]
    else:
        symbolic = [str(d) for d in declared[1:] if not isinstance(d, int)]
        if symbolic:
            raise UsageError(f"input {name!r} of {path} has symbolic dims {symbolic} besides the batch "
                             f"({declared}): give its per-sample shape, e.g. sample_shapes={{{name!r}: (...)}}")
        rest = list(declared[1:])
    if isinstance(declared[0], int) and declared[0] != batch:
        raise UsageError(f"{path} has a fixed batch size of {declared[0]} (input {name!r}): benchmark it with "
                         f"batch size {declared[0]}, or re-export it with a dynamic batch")
    return (batch, *rest)


def _given_sample_shape(name: str, sample_shapes: SampleShapes | None, n_inputs: int) -> Sequence[int] | None:
    if sample_shapes is None:
        return None
    if isinstance(sample_shapes, Mapping):
        return sample_shapes.get(name)
    if n_inputs != 1:
        raise UsageError("the model has several inputs: give sample_shapes as a mapping from input name to shape")
    return sample_shapes


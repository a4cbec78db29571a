"""What the machine's kernels prefer, and whether a compiled network really got faster.

onnxruntime's fast CPU convolutions (MLAS's NCHWc layout) work on blocks of channels as wide as
one SIMD register holds floats: 16 with AVX-512, 8 with AVX2, 4 with SSE/NEON.  A layer whose
width is not a multiple of the block falls back to a slower kernel, which is how a pruned
network with half the MACs can run slower than the original (Torch-Pruning issue 38,
onnxruntime issue 14392).

:func:`conv_paths` finds out which widths take the fast path by asking onnxruntime itself: it
builds one-convolution ONNX graphs at chosen widths, lets the CPU provider optimise them, and
reads the optimised graph back (a blocked ``com.microsoft.nchwc`` Conv or not; the blocked
weight's padded output dimension is the block).  This is deterministic (no timing) and takes
milliseconds.  On onnxruntime 1.32 with AVX-512 it finds: block 16; any output width (padded up
to the block, so widths between multiples of the block cost the same); input widths below the
block, or multiples of 4; depthwise widths 1 or multiples of 4.  :func:`cpu_channel_block`
returns the probed block, or reads it off the CPU's feature flags where the probe cannot run.
:func:`speed_verdict` turns an A/B latency measurement into what a user must be told: whether
the pruned network is slower at any measured batch, and which kept widths are likely why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from oamipc.cache import cache_root

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``keys`` (None: none, or unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not readable)."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_model() -> str:
    """The CPU's model name (measurements are valid for one CPU model)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_channel_block(flags: frozenset[str] | None = None) -> int:
    """Channels per block of onnxruntime's CPU convolutions here: probed (:func:`conv_paths`), or
    from the CPU flags (given ``flags``, or where the probe cannot run): 16 (AVX-512), 8 (AVX2), else 4."""
    if flags is None:
        paths = conv_paths()
        if paths is not None:
            return paths.block
    return flags_channel_block(cpu_flags() if flags is None else flags)


def flags_channel_block(flags: frozenset[str]) -> int:
    """The channel block that the CPU's vector width suggests: 16 (AVX-512), 8 (AVX2), else 4."""
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    if flags or platform.machine().lower() in ("arm64", "aarch64"):
        return 4
    return 8  # flags unknown: the most common block of today's x86 machines


@dataclass(frozen=True)
class ConvPaths:
    """Which convolution widths onnxruntime's CPU provider runs on its blocked (NCHWc) kernels here.

    ``block``: output channels are computed in blocks of this many (a width is padded up to a
    multiple); ``in_align``: an input width of at least ``block`` must be a multiple of this (below
    the block any width is read directly); ``depthwise_align``: a depthwise width must be 1 or a
    multiple of this.  Widths that break a rule run on the generic kernel plus layout conversions.
    """

    block: int
    in_align: int
    depthwise_align: int

    def fast_input(self, width: int) -> bool:
        return width < self.block or width % self.in_align == 0

    def fast_depthwise(self, width: int) -> bool:
        return width == 1 or width % self.depthwise_align == 0


def _conv_graph(c_in: int, c_out: int, group: int) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper

    w = np.zeros((c_out, c_in // group, 3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def _blocked_out(c_in: int, c_out: int, group: int, tmp: str) -> int | None:
    """The padded output width of the blocked Conv onnxruntime makes of this convolution (None: not blocked)."""
    import onnx

    from oamipc.runtime import import_onnxruntime

    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # it warns that an optimised model is machine-specific: that is the point
    path = os.path.join(tmp, f"probe_{c_in}_{c_out}_{group}.onnx")
    opts.optimized_model_filepath = path
    ort.InferenceSession(_conv_graph(c_in, c_out, group), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(path)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv":
            dims = inits.get(node.input[1])
            return int(dims[0]) if dims else c_out
    return None


def _first_aligned(fast: Any, block: int) -> int:
    """The smallest a in 1, 2, 4, ... below ``block`` for which width ``block + a`` is fast (else ``block``)."""
    a = 1
    while a < block:
        if fast(block + a):
            return a
        a *= 2
    return block


#: The file under the cache directory that keeps the probe's answers (:func:`conv_paths`).
PROBE_FILE = "conv_paths.json"


def probe_key() -> str:
    """What the probe's answer depends on: the CPU (model, architecture, feature flags) and the
    installed onnxruntime builds' versions (read from the package metadata, without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    builds = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            builds[dist] = version(dist)
        except PackageNotFoundError:
            continue
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return json.dumps({"cpu": cpu_model(), "machine": platform.machine(), "flags": flags, "builds": builds},
                      sort_keys=True)


def _probe_cache() -> Path:
    return cache_root() / PROBE_FILE


@lru_cache(maxsize=1)
def conv_paths() -> ConvPaths | None:
    """Probe onnxruntime's CPU convolution paths on this machine (None where it has no blocked kernels
    or the probe fails; callers then fall back to :func:`flags_channel_block`).

    A finished probe's answer is kept on disk (``$OAMIPC_CACHE_DIR/conv_paths.json``, keyed by
    :func:`probe_key`): the probe imports onnx and onnxruntime and optimises a dozen graphs, about
    1 s of every compile started in a fresh process; read back, the answer costs milliseconds.
    A failed probe is not kept."""
    key, path = probe_key(), _probe_cache()
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    if key in stored:
        try:
            return None if stored[key] is None else ConvPaths(**stored[key])
        except TypeError:
            pass  # an entry of another shape: probe again
    found, paths = probe_conv_paths()
    if found:
        stored[key] = None if paths is None else asdict(paths)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
                f.write(json.dumps(stored, indent=1, sort_keys=True))
            os.replace(f.name, path)
        except OSError as exc:  # an unwritable cache only costs the probe again next time
            log.info("cannot keep the convolution probe's answer in %s (%s)", path, exc)
    return paths


def probe_conv_paths() -> tuple[bool, ConvPaths | None]:
    """The probe itself, uncached: (whether it ran to the end, its answer)."""
    try:
        with tempfile.TemporaryDirectory(prefix="oamipc-probe-") as tmp:
            block = _blocked_out(1, 1, 1, tmp)
            if block is None or block < 2:
                return True, None
            in_align = _first_aligned(lambda w: _blocked_out(w, block, 1, tmp) is not None, block)
            dw_align = _first_aligned(lambda w: _blocked_out(w, w, w, tmp) is not None, block)
            paths = ConvPaths(block, in_align, dw_align)
    except Exception as exc:  # noqa: BLE001 - a failed probe only loses precision: the CPU flags remain
        log.info("could not probe onnxruntime's convolution kernels (%s); using the CPU flags", exc)
        return False, None
    log.info("onnxruntime CPU convolutions here: %s", paths)
    return True, paths


def unaligned_widths(widths: Mapping[str, Mapping[str, Any]], block: int) -> dict[str, tuple[int, int]]:
    """Layers pruned to a width that is not a multiple of ``block`` although the original was."""
    out = {}
    for name, w in widths.items():
        before, after = int(w.get("before", 0)), int(w.get("after", 0))
        if after < before and before % block == 0 and after % block:
            out[str(name)] = (before, after)
    return out


def speed_verdict(latency: Mapping[str, Any], widths: Mapping[str, Mapping[str, Any]],
                  block: int | None = None) -> dict[str, Any]:
    """Whether the pruned network (B) is faster than the original (A) at every measured batch, and why not.

    ``latency`` is a benchmark's ``to_dict()`` (rows with ``speedup`` = median A / median B),
    ``widths`` the report's per-layer widths.  The result goes into the report as
    ``latency.verdict``: ``slower_batches`` (where the speed-up is below 1), ``min_speedup``,
    ``provider``, ``unaligned`` (layers whose kept width breaks the channel block) and ``why``,
    one sentence for the console.
    """
    rows = [r for r in latency.get("rows", []) if r.get("speedup") is not None]
    provider = str(latency.get("provider", "?"))
    block = block or (cpu_channel_block() if "CPU" in provider else 8)
    slower = [int(r["batch"]) for r in rows if float(r["speedup"]) < 1.0]
    odd = unaligned_widths(widths, block)
    if not slower:
        why = ""
    elif odd:
        names = ", ".join(f"{n} {b}->{a}" for n, (b, a) in list(odd.items())[:4]) + (" ..." if len(odd) > 4 else "")
        why = (f"{len(odd)} layer(s) keep widths that are not multiples of {block}, the channel block of "
               f"{provider}'s fast kernels on this machine ({names}); compile with --round-to {block}")
    else:
        why = (f"every kept width is a multiple of {block} (or unchanged); the MACs removed do not pay for "
               f"themselves at this batch on {provider} (call overhead dominates small networks)")
    return {"slower_batches": slower, "min_speedup": min((float(r["speedup"]) for r in rows), default=None),
            "provider": provider, "block": block, "unaligned": {k: list(v) for k, v in odd.items()}, "why": why}

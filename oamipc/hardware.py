"""What the machine's kernels prefer, and whether a compiled network really got faster.

onnxruntime's fast CPU convolutions (MLAS's NCHWc layout) work on blocks of channels as wide as
one SIMD register holds floats: 16 with AVX-512, 8 with AVX2, 4 with SSE/NEON.  A layer whose
width is not a multiple of the block falls back to a slower kernel, which is how a pruned
network with half the MACs can run slower than the original (Torch-Pruning issue 38,
onnxruntime issue 14392).  :func:`cpu_channel_block` reads the block off the CPU's feature flags
(a probe of this machine, not a constant); :func:`speed_verdict` turns an A/B latency
measurement into what a user must be told: whether the pruned network is slower at any measured
batch, and which kept widths are likely why.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any


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
    """Channels per block of onnxruntime's CPU convolutions here: 16 (AVX-512), 8 (AVX2), else 4."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    if flags or platform.machine().lower() in ("arm64", "aarch64"):
        return 4
    return 8  # flags unknown: the most common block of today's x86 machines


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

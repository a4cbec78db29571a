"""Where oamipc keeps what it computed once and can reuse on this machine.

The convolution probe's answers (:mod:`oamipc.hardware`), latency measurements
(:mod:`oamipc.latency`) and trained family networks (:mod:`oamipc.training`) all live under one
directory, so that one environment variable moves or clears them all.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$OAMIPC_CACHE_DIR``, else ``~/.cache/oamipc`` (read on every call: tests and users may change it)."""
    return Path(os.environ.get("OAMIPC_CACHE_DIR") or Path.home() / ".cache" / "oamipc")

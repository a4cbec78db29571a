"""onnxruntime access: one import point and one way to open an inference session.

Why a module of its own: onnxruntime is an optional dependency that comes in two mutually
exclusive builds (``onnxruntime`` for CPU, ``onnxruntime-gpu`` for CUDA; both install the same
``onnxruntime`` module), and a CUDA session can silently fall back to the CPU when the CUDA
libraries cannot be loaded.  Export verification and benchmarking both need to know which
provider *really* runs the model, so that check lives here, once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from oamipc.errors import ExportError, LoadError, UsageError, first_line

__all__ = ["CPU", "CUDA", "Device", "available_providers", "import_onnxruntime", "make_session"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
Device = Literal["auto", "cpu", "cuda"]

#: onnxruntime log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_ERRORS_ONLY = 3


def import_onnxruntime() -> ModuleType:
    """Return the ``onnxruntime`` module, or raise :class:`ExportError` saying how to install it."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ExportError(
            "onnxruntime is not installed: install exactly one of `pip install oamipc[cpu]` (onnxruntime) "
            "or `pip install oamipc[gpu]` (onnxruntime-gpu), never both"
        ) from exc
    _warn_if_both_builds()
    return ort


@functools.cache
def _warn_if_both_builds() -> None:
    """Both builds installed side by side overwrite each other's files: warn once, don't fail."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(dist)
    if len(installed) == 2:
        log.warning("both onnxruntime and onnxruntime-gpu are installed; they share one module and conflict: "
                    "uninstall both and install only one")


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build lists (not proof that they can run)."""
    return list(import_onnxruntime().get_available_providers())


def make_session(path_or_bytes: str | os.PathLike[str] | bytes, *, device: Device = "auto",
                 intra_op_threads: int | None = 1) -> tuple[Any, str]:
    """Open an onnxruntime session and return it with the provider that actually runs it.

    ``device``: ``"cpu"``; ``"cuda"`` (an :class:`ExportError` when CUDA is not really usable);
    ``"auto"``: CUDA when it is listed *and* still the first active provider after the session is
    created (onnxruntime falls back to the CPU silently when CUDA libraries are missing), else the
    CPU.  ``intra_op_threads``: threads inside one operator; 1 (the default) gives stable
    latency numbers, ``None`` lets onnxruntime use every core.  Inter-op parallelism is off
    (one thread) and the graph is optimised at the highest level, as it would be in deployment.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    if intra_op_threads is not None and intra_op_threads < 1:
        raise UsageError(f"intra_op_threads must be >= 1 (or None for all cores), got {intra_op_threads}")
    ort = import_onnxruntime()
    where = "<bytes>" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    model: str | bytes = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
    if isinstance(model, str) and not Path(model).is_file():
        raise LoadError(f"ONNX file {model} not found: check the path")

    options = _session_options(ort, intra_op_threads)
    listed = ort.get_available_providers()
    if device == "cuda" and CUDA not in listed:
        raise ExportError(f"device cuda requested for {where}, but this onnxruntime build has no "
                          f"CUDAExecutionProvider (it lists {', '.join(listed)}): install oamipc[gpu] "
                          "(onnxruntime-gpu) instead of onnxruntime, or use device cpu")
    if device != "cpu" and CUDA in listed:
        try:
            with warnings.catch_warnings(record=True) as caught:  # its fallback warning: reported below
                warnings.simplefilter("always")
                session = ort.InferenceSession(model, sess_options=options, providers=[CUDA, CPU])
            for w in caught:
                log.debug("onnxruntime: %s", first_line(w.message))
        except Exception as exc:
            if device == "cuda":
                raise ExportError(f"cannot open {where} with CUDA: {first_line(exc)}; check the CUDA and "
                                  "cuDNN libraries onnxruntime-gpu needs, or use device cpu") from exc
            log.warning("CUDA session for %s failed (%s); using the CPU", where, first_line(exc))
        else:
            active = session.get_providers()
            if active and active[0] == CUDA:
                return session, CUDA
            if device == "cuda":
                raise ExportError(f"CUDAExecutionProvider is listed but not active for {where} (active: "
                                  f"{', '.join(active)}): the CUDA/cuDNN libraries could not be loaded; fix "
                                  "the CUDA installation or use device cpu")
            log.warning("CUDAExecutionProvider is listed but onnxruntime fell back to %s for %s; "
                        "the CUDA libraries could not be loaded", ", ".join(active), where)
            return session, active[0]
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=[CPU])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {where}: {first_line(exc)}; re-export the model") from exc
    return session, session.get_providers()[0]


def _session_options(ort: ModuleType, intra_op_threads: int | None) -> Any:
    """Full graph optimisation, the given intra-op threads (0: onnxruntime's default), no inter-op."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 0 if intra_op_threads is None else intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = _ORT_ERRORS_ONLY
    return options

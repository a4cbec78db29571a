"""The one error hierarchy of oamipc.

Every failure the user can act on is raised as a subclass of :class:`OamipcError` whose message is
one line saying what went wrong, where (a file, a graph node such as ``layer1.0.conv2``, an
option) and what to do about it.  Only the CLI catches these: it prints the line and exits 1.
Anything that is not an ``OamipcError`` is a bug in oamipc and keeps its traceback.

Messages often quote an exception raised by torch, a solver or an exporter, whose own message can
run for pages: :func:`first_line` and :func:`describe` are the one way to quote it in a line;
:func:`first_few` lists a few names (keys, archive entries) and counts the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class OamipcError(Exception):
    """Base class: a failure with a one-line, actionable message."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages from wrapped exceptions are folded.
        super().__init__(" ".join(str(message).split()))


class UsageError(OamipcError):
    """Options that contradict each other or are out of range (CLI exit code 2)."""

    exit_code = 2


class LoadError(OamipcError):
    """A model file that cannot be loaded safely or at all."""


class DataError(OamipcError):
    """A dataset that cannot be found, read, or matched to the model's input."""


class TraceError(OamipcError):
    """A model that torch.fx cannot trace, or whose shapes cannot be propagated."""


class UnsupportedGraphError(OamipcError):
    """A graph pattern that a pass cannot handle; names the node."""


class PlanError(OamipcError):
    """A pruning plan that cannot be built or applied (budget unreachable, stale plan, ...)."""


class SolverError(OamipcError):
    """A MILP solver that is missing, failed, or returned nothing usable."""


class ExportError(OamipcError):
    """ONNX export failed, or the exported file disagrees with the torch module."""


class SpeedupError(OamipcError):
    """The compiled network is not as much faster as the user required (``--require-speedup``)."""


class OutputError(OamipcError):
    """An output path that cannot be written."""


# --------------------------------------------------------------------------------------------
# Messages of wrapped exceptions
# --------------------------------------------------------------------------------------------

# Colour codes: some tools (torch's weights-only unpickler among them) colour their messages.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def first_line(message: BaseException | Warning | str, *, limit: int | None = None) -> str:
    """The first non-empty line of ``message``, stripped: the part of a wrapped error worth showing.

    Exporters, solvers and torch append pages of dumps, hints and tracebacks to their messages;
    the first line says what happened.  An exception or warning without a message gives its type
    name, an empty string gives ``""``.  Colour escape codes are dropped.  With ``limit``, a
    longer line is cut to ``limit`` characters, the last three being ``...``.
    """
    for line in _ANSI_ESCAPE.sub("", str(message)).splitlines():
        text = line.strip()
        if text:
            if limit is not None and len(text) > limit:
                return text[: limit - 3] + "..."
            return text
    return "" if isinstance(message, str) else type(message).__name__


def describe(exc: BaseException, *, limit: int | None = None) -> str:
    """``Type: first line`` of ``exc`` (just ``Type`` when it has no message), for "failed (...)" clauses."""
    name = type(exc).__name__
    if not _ANSI_ESCAPE.sub("", str(exc)).strip():
        return name
    return f"{name}: {first_line(exc, limit=limit)}"


def first_few(items: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more: ``a, b, c (+4 more)``."""
    listed = ", ".join(items[:shown])
    more = len(items) - shown
    return f"{listed} (+{more} more)" if more > 0 else listed

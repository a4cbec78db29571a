"""The one error hierarchy of oamipc.

Every failure the user can act on is raised as a subclass of :class:`OamipcError` whose message is
one line saying what went wrong, where (a file, a graph node such as ``layer1.0.conv2``, an
option) and what to do about it.  Only the CLI catches these: it prints the line and exits 1.
Anything that is not an ``OamipcError`` is a bug in oamipc and keeps its traceback.
"""

from __future__ import annotations


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


class OutputError(OamipcError):
    """An output path that cannot be written."""

"""The target of a compile: how much to remove, and the rules every plan obeys.

One value, validated once where it enters (the Python API, the CLI, a pipeline string) and then
carried unchanged through planning, selection and the MIP, instead of five loose arguments that
each layer re-checks.

* ``prune_ratio`` R: every group drops ``floor(R * size)`` units.
* ``flops_budget`` F: the pruned network keeps at most the fraction F of the original MACs,
  with the units chosen across layers.  A latency budget (a fraction of the measured latency)
  is the same kind of target with another cost model; it will be one more field here, read by
  every planner through :attr:`Target.kind`.
* ``min_keep``: every group keeps at least this many units; ``round_to``: kept widths are
  multiples of it where the layer allows.

A :class:`TargetError` names the offending field by its Python name; front ends re-spell it in
their own vocabulary (``--flops-budget`` on the CLI, ``flops-budget`` in a pipeline string) with
:meth:`TargetError.spelled`, so an API user never reads about flags they did not pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from oamipc.errors import UsageError

_FIELDS = ("prune_ratio", "flops_budget", "min_keep", "round_to")


def _spell(name: str, style: str) -> str:
    kebab = name.replace("_", "-")
    return {"cli": f"--{kebab}", "pipeline": kebab}.get(style, name)


class TargetError(UsageError):
    """An out-of-range or contradictory target; ``field`` names the option (Python spelling).

    ``template`` holds ``{prune_ratio}``-style placeholders for option names, filled in the
    Python spelling here and in a front end's spelling by :meth:`spelled`.
    """

    def __init__(self, field: str, template: str, style: str = "python") -> None:
        self.field = field
        self.template = template
        super().__init__(template.format(**{f: _spell(f, style) for f in _FIELDS}))

    def spelled(self, style: str) -> TargetError:
        """The same error with option names spelled for a front end: ``"cli"`` or ``"pipeline"``."""
        return TargetError(self.field, self.template, style)


@dataclass(frozen=True)
class Target:
    """How much to remove (a ratio or a MAC budget) and the per-group rules; see the module docstring."""

    prune_ratio: float | None = None
    flops_budget: float | None = None
    min_keep: int = 1
    round_to: int = 1

    def __post_init__(self) -> None:
        if self.prune_ratio is not None and self.flops_budget is not None:
            raise TargetError("prune_ratio", "give one of {prune_ratio} and {flops_budget}, not both")
        if self.prune_ratio is not None and not 0.0 <= self.prune_ratio < 1.0:
            raise TargetError("prune_ratio", f"{{prune_ratio}} must be in [0, 1), got {self.prune_ratio:g}")
        if self.flops_budget is not None and not 0.0 < self.flops_budget <= 1.0:
            raise TargetError("flops_budget", f"{{flops_budget}} must be in (0, 1], got {self.flops_budget:g}")
        if self.min_keep < 1:
            raise TargetError("min_keep", f"{{min_keep}} must be at least 1, got {self.min_keep}")
        if self.round_to < 1:
            raise TargetError("round_to", f"{{round_to}} must be at least 1, got {self.round_to}")

    @property
    def is_set(self) -> bool:
        """Whether the target says how much to remove (a ratio or a budget)."""
        return self.prune_ratio is not None or self.flops_budget is not None

    @property
    def kind(self) -> str:
        """``"ratio"`` (a fixed count per group) or ``"macs"`` (a budget on the network's MACs)."""
        if not self.is_set:
            raise TargetError("flops_budget", "say how much to remove: give {flops_budget} or {prune_ratio}")
        return "ratio" if self.prune_ratio is not None else "macs"

    def require(self) -> Target:
        """This target, or a TargetError when it does not say how much to remove."""
        _ = self.kind
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

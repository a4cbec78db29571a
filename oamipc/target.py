"""The target of a compile: how much to remove, and the rules every plan obeys.

One value, validated once where it enters (the Python API, the CLI, a pipeline string) and then
carried unchanged through planning, selection and the MIP, instead of five loose arguments that
each layer re-checks.

* ``prune_ratio`` R: every group drops ``floor(R * size)`` units.
* ``flops_budget`` F: the pruned network keeps at most the fraction F of the original MACs,
  with the units chosen across layers.
* ``latency_budget`` L: the pruned network's latency, predicted by a measured latency model
  (:mod:`oamipc.latency`) at ``latency_batch``, at most the fraction L of the dense network's
  measured latency.  Every planner reads the kind through :attr:`Target.kind`.
* ``min_keep``: every group keeps at least this many units; ``round_to``: kept widths are
  multiples of it where the layer allows, or ``"auto"``: per group, the channel block of the
  execution provider's fast convolution kernels (``channel_block``; by default probed from this
  machine's CPU, :func:`oamipc.hardware.cpu_channel_block`), applied only to groups produced by
  convolutions whose original width is itself a multiple of the block (:func:`granularity`).

A :class:`TargetError` names the offending field by its Python name; front ends re-spell it in
their own vocabulary (``--flops-budget`` on the CLI, ``flops-budget`` in a pipeline string) with
:meth:`TargetError.spelled`, so an API user never reads about flags they did not pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from oamipc.errors import UsageError
from oamipc.units import UnitGraph

AUTO = "auto"
CONV_KINDS = ("conv", "depthwise", "grouped")

_FIELDS = ("prune_ratio", "flops_budget", "latency_budget", "latency_batch", "min_keep", "round_to")


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
    latency_budget: float | None = None
    latency_batch: int = 64
    min_keep: int = 1
    round_to: int | str = 1
    channel_block: int | None = None  # with round_to="auto": None probes this machine's CPU

    def __post_init__(self) -> None:
        given = [f for f in ("prune_ratio", "flops_budget", "latency_budget") if getattr(self, f) is not None]
        if len(given) > 1:
            raise TargetError(given[0], "give one of {prune_ratio}, {flops_budget} and {latency_budget}, not several")
        if self.latency_budget is not None and not 0.0 < self.latency_budget <= 1.0:
            raise TargetError("latency_budget", f"{{latency_budget}} must be in (0, 1], got {self.latency_budget:g}")
        if self.latency_batch < 1:
            raise TargetError("latency_batch", f"{{latency_batch}} must be at least 1, got {self.latency_batch}")
        if self.prune_ratio is not None and not 0.0 <= self.prune_ratio < 1.0:
            raise TargetError("prune_ratio", f"{{prune_ratio}} must be in [0, 1), got {self.prune_ratio:g}")
        if self.flops_budget is not None and not 0.0 < self.flops_budget <= 1.0:
            raise TargetError("flops_budget", f"{{flops_budget}} must be in (0, 1], got {self.flops_budget:g}")
        if self.min_keep < 1:
            raise TargetError("min_keep", f"{{min_keep}} must be at least 1, got {self.min_keep}")
        if isinstance(self.round_to, str):
            if self.round_to != AUTO:
                raise TargetError("round_to", f"{{round_to}} must be a positive integer or 'auto', got "
                                              f"{self.round_to!r}")
        elif self.round_to < 1:
            raise TargetError("round_to", f"{{round_to}} must be at least 1, got {self.round_to}")
        if self.channel_block is not None and self.channel_block < 1:
            raise TargetError("round_to", f"the channel block must be at least 1, got {self.channel_block}")

    @property
    def is_set(self) -> bool:
        """Whether the target says how much to remove (a ratio or a budget)."""
        return self.prune_ratio is not None or self.flops_budget is not None or self.latency_budget is not None

    @property
    def kind(self) -> str:
        """``"ratio"`` (a fixed count per group), ``"macs"`` or ``"latency"`` (a budget on the network)."""
        if not self.is_set:
            raise TargetError("flops_budget", "say how much to remove: give {flops_budget}, {latency_budget} or "
                                              "{prune_ratio}")
        if self.prune_ratio is not None:
            return "ratio"
        return "macs" if self.flops_budget is not None else "latency"

    def require(self) -> Target:
        """This target, or a TargetError when it does not say how much to remove."""
        _ = self.kind
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def granularity(target: Target, graph: UnitGraph) -> dict[int, int]:
    """Per group id, the multiple its kept width must be (a group may always keep all its units).

    An integer ``round_to`` applies to every group.  ``"auto"`` gives the channel block to groups
    written by a convolution whose original width is a multiple of it, and 1 to the rest: Linear
    layers run on GEMM kernels without a channel block, and rounding a width that was never
    aligned would buy no speed and cost units.
    """
    if not isinstance(target.round_to, str):
        return {g.id: int(target.round_to) for g in graph.groups}
    from oamipc.hardware import cpu_channel_block  # the probe reads /proc once, on first use

    block = target.channel_block or cpu_channel_block()
    conv_units: set[int] = set()
    for layer in graph.layers:
        if layer.kind in CONV_KINDS:
            conv_units.update(int(u) for u in layer.out_units.tolist() if u >= 0)
    return {g.id: block if g.size % block == 0 and conv_units.intersection(g.units) else 1 for g in graph.groups}

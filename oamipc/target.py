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
  multiples of it where the layer allows, or ``"auto"`` (the default): per group, what the
  execution provider's fast convolution kernels need (the channel block, or the alignment of
  their inputs; probed from this machine's onnxruntime, :func:`oamipc.hardware.conv_paths`;
  ``channel_block`` overrides the block), applied only to groups produced by convolutions whose
  original width is itself a multiple (:func:`granularity`).

A :class:`TargetError` names the offending field by its Python name; front ends re-spell it in
their own vocabulary (``--flops-budget`` on the CLI, ``flops-budget`` in a pipeline string) with
:meth:`TargetError.spelled`, so an API user never reads about flags they did not pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from oamipc.errors import UsageError
from oamipc.units import UnitGraph, UnitGroup

if TYPE_CHECKING:
    from oamipc.hardware import ConvPaths

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
    round_to: int | str = AUTO
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


def conv_paths_for(target: Target) -> ConvPaths:
    """The convolution paths ``round_to="auto"`` rounds for: probed on this machine
    (:func:`oamipc.hardware.conv_paths`), with ``channel_block`` as the block when the target names one."""
    from oamipc.hardware import ConvPaths, conv_paths, cpu_flags, flags_channel_block

    probed = conv_paths()
    if probed is None:
        block = target.channel_block or flags_channel_block(cpu_flags())
        return ConvPaths(block, block, block)
    if target.channel_block is None or target.channel_block == probed.block:
        return probed
    block = target.channel_block
    return ConvPaths(block, min(probed.in_align, block), min(probed.depthwise_align, block))


def granularity(target: Target, graph: UnitGraph) -> dict[int, int]:
    """Per group id, the multiple its kept width must be (a group may always keep all its units).

    An integer ``round_to`` applies to every group.  ``"auto"`` follows onnxruntime's blocked CPU
    convolutions (:class:`oamipc.hardware.ConvPaths`, probed), for groups written by a convolution:

    * a width of two or more blocks keeps multiples of the block: output channels are computed a
      whole block at a time, so widths in between cost as much as the next multiple;
    * another width that is a multiple of the alignment the blocked kernels need (input widths of
      a block or more, read by a convolution; depthwise widths) keeps multiples of that alignment,
      so that no reader falls off the blocked path (MobileNetV2's 24-channel streams: multiples
      of 4, not 21);
    * the rest keep any width (1): rounding a width that was never aligned buys no speed.

    Only groups that a convolution reads (or that hold a depthwise one) are rounded.  The last
    convolution before a Linear classifier writes a group nobody reads as channels: any width of
    it stays on the blocked path (outputs are padded), so rounding would only forbid savings in
    its readers; measured on LeNet-5 / Fashion-MNIST, it cost ``mip`` 34 points of accuracy at
    15% of the MACs.  Linear layers run on GEMM kernels without a channel block: their groups get 1.  A prune-ratio
    target gets 1 everywhere under ``"auto"``: it fixes every group's count by itself, and rounding
    would silently change what was asked, where a budget lets the planner spend the difference
    elsewhere (an integer ``round_to`` still rounds a ratio's counts up).
    Under a MAC budget, a group of one block keeps multiples of the block too (it stays whole),
    unless the budget would otherwise force some group below a useful width
    (:func:`below_block`): then as few block-rounded groups as needed, those freeing the fewest
    MACs first, keep multiples of the input alignment instead and may go below the block.
    Widths below the block are read by a slower direct kernel: at half their MACs, SmallVGG ran
    at 0.64 of the dense latency at batch 64 with its two 16-channel groups cut to 8 and 0.56
    with them whole; SmallResNet at 0.68 with its 28x28 stream cut to 12 and 0.59 with two
    14x14 groups at 12 instead.  Keeping one-block groups whole at any budget starves the rest:
    a digits CNN with convolutions of 16 and 32 channels met 15% of its MACs only by cutting
    the 32 to one channel, and ``mip`` fell from 82% to 26% test accuracy.  A latency target
    lets one-block groups go below the block: its planner reads the measured cost of every width.
    """
    if not isinstance(target.round_to, str):
        return {g.id: int(target.round_to) for g in graph.groups}
    if target.prune_ratio is not None:
        return {g.id: 1 for g in graph.groups}
    paths = conv_paths_for(target)
    conv_units: set[int] = set()  # written by a convolution
    conv_read: set[int] = set()  # read as input channels by a (non-depthwise) convolution
    depthwise: set[int] = set()
    for layer in graph.layers:
        if layer.kind in CONV_KINDS:
            conv_units.update(int(u) for u in layer.out_units.tolist() if u >= 0)
        if layer.kind in ("conv", "grouped"):
            conv_read.update(int(u) for u in layer.in_units.tolist() if u >= 0)
        if layer.kind == "depthwise":
            depthwise.update(int(u) for u in layer.out_units.tolist() if u >= 0)
    steps = {}
    below: dict[int, int] = {}  # group id -> its step where a MAC budget lets it go below the block
    for g in graph.groups:
        units = set(g.units)
        if not conv_units & units or not (conv_read | depthwise) & units:
            steps[g.id] = 1  # no convolution reads it: every width keeps every kernel on its fast path
            continue
        # What keeps every member and reader on the blocked path: readers need widths below the
        # block or multiples of the input alignment, depthwise members multiples of theirs.
        align = 1
        if g.size >= paths.block and conv_read.intersection(g.units):
            align = paths.in_align
        if depthwise.intersection(g.units):
            align = math.lcm(align, paths.depthwise_align)
        if g.size % paths.block == 0 and (g.size > paths.block or target.flops_budget is not None):
            steps[g.id] = paths.block
            blocks = g.size // paths.block
            if (target.flops_budget is not None and align < paths.block and g.size % align == 0
                    and (BELOW_BLOCK_MAX_BLOCKS is None or blocks <= BELOW_BLOCK_MAX_BLOCKS)):
                below[g.id] = align
        else:
            steps[g.id] = align if g.size % align == 0 else 1
    if below:
        for gid in below_block(target, graph, steps, below):
            steps[gid] = below[gid]
    return steps


#: The block-rounded groups that a MAC budget may let go below the block (:func:`below_block`):
#: those of at most this many blocks, or any (None).  ``--below-block-max-blocks`` of
#: benchmarks/latency.py and benchmarks/mip_quality.py compares None with 1 (benchmarks/RESULTS.md,
#: issue 12; None kept).
BELOW_BLOCK_MAX_BLOCKS: int | None = None

#: A group kept at less than this fraction of its width is cut below a useful width: a MAC budget
#: that would force that lets block-rounded groups go below the block (:func:`below_block`).
#: Chosen on the trained-network family's tune half (0.125, 0.25 and 0.5 tried on its digits
#: CNNs; benchmarks/RESULTS.md).
USEFUL_FRACTION = 0.5


def _floor_count(group: UnitGroup, step: int, min_keep: int, width: int | None = None) -> int:
    """The group's kept count at its useful floor: ``USEFUL_FRACTION`` of ``width`` (default: the
    group's; at least ``min_keep`` and its pinned units), rounded up to its step (or the whole group)."""
    want = max(math.ceil(USEFUL_FRACTION * (width or group.size)), min_keep, len(group.pinned), 1)
    if step > 1:
        want = math.ceil(want / step) * step
    return min(want, group.size)


def _floor_mask(graph: UnitGraph, orders: dict[int, list[list[int]]], counts: dict[int, int]) -> np.ndarray:
    """A kept mask with ``counts[g]`` units of each group listed, taken in ``orders[g]`` (per block,
    pinned units first; equal numbers per block), every other unit kept.  MACs depend on counts only."""
    kept = graph.all_kept()
    for gid, n in counts.items():
        blocks = orders[gid]
        per_block = math.ceil(n / len(blocks))
        for order in blocks:
            kept[order[per_block:]] = False
    return kept


def below_block(target: Target, graph: UnitGraph, steps: dict[int, int], below: dict[int, int]) -> list[int]:
    """The block-rounded groups (``below``: group id -> its step below the block) that a MAC budget
    lets go below the block, given every group's ``steps``.

    The floor plan keeps every prunable group at :data:`USEFUL_FRACTION` of its width, rounded
    up to its step.  When it fits the budget, no group has to go below a useful width for the
    block-rounded groups to keep multiples of the block, and they do.  Otherwise groups are let
    go below the block one at a time until the floor plan fits (or none is left), each at its
    floor below the block (``USEFUL_FRACTION`` of one block, rounded up to its step below it):
    each time the one that frees the fewest MACs, but some (ties: lower group id).  So as few
    MACs as the budget needs run on the slower kernels, in the cheap layers first: on
    SmallResNet at half its MACs, 32-channel groups at 14x14 rather than the 16-channel stream
    at 28x28.  Groups of several blocks take part too: keeping them on the block
    (:data:`BELOW_BLOCK_MAX_BLOCKS` = 1) was measured and not taken.  It made ResNet-18 at 15% of
    its MACs faster, but SmallResNet at half its MACs slower (its 28x28 group goes below the block
    instead), and it was no more accurate on the trained SmallVGG (benchmarks/RESULTS.md, issue 12).
    """
    assert target.flops_budget is not None
    limit = target.flops_budget * graph.macs() * (1 + 1e-9)
    by_id = {g.id: g for g in graph.groups}
    counts = {g.id: _floor_count(g, steps[g.id], target.min_keep) for g in graph.groups if g.prunable}
    block = max(steps[gid] for gid in below)
    low = {gid: min(_floor_count(by_id[gid], step, target.min_keep, width=block), counts[gid])
           for gid, step in below.items() if by_id[gid].prunable}

    orders = {g.id: [sorted(b, key=lambda u, g=g: (u not in g.pinned, u)) for b in (g.blocks or [list(g.units)])]
              for g in graph.groups if g.id in counts}

    def floor_macs(extra: dict[int, int]) -> float:
        return graph.macs(_floor_mask(graph, orders, {**counts, **extra}))

    relaxed: list[int] = []
    now = floor_macs({})
    while now > limit:
        options = [(floor_macs({gid: n}), gid) for gid, n in low.items() if gid not in relaxed]
        options = [(-m, gid) for m, gid in options if m < now]
        if not options:
            break
        m, gid = min(options)
        now = -m
        relaxed.append(gid)
        counts[gid] = low[gid]
    return sorted(relaxed)

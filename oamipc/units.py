"""Unit groups: the data the unit-group analysis produces and every later step reads.

Vocabulary
----------
* A **source unit** is one output neuron of a Linear layer or one output channel of a Conv layer.
* A **unit** is the smallest thing that can be removed: a set of source units that must go
  together (channel ``j`` of every convolution joined by a residual add, the matching output of
  a squeeze-excitation FC layer, ...).  Units are numbered ``0..n_units-1``.
* A **group** is a set of producers coupled by at least one unit (a residual chain, or a single
  layer).  ``--prune-ratio`` applies per group; the report lists widths per group.

Every tensor in the graph carries a :class:`Layout` that says, for each index of its channel
dimension, which unit it belongs to (``-1``: a channel no producer owns, such as the network
input, which is never removed).  The prune transform keeps the positions whose unit is kept; the
cost model counts the multiply-accumulates of every Linear/Conv layer as a function of the kept
units, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Unit id of each index along dimension ``dim`` of a tensor (-1: not removable)."""

    dim: int
    units: np.ndarray  # int64, one entry per channel index

    def keep_positions(self, kept: np.ndarray) -> np.ndarray:
        """Indices along ``dim`` that survive when ``kept[u]`` says which units are kept."""
        units = self.units
        mask = units < 0
        tracked = ~mask
        mask[tracked] = kept[units[tracked]]
        return np.nonzero(mask)[0]


@dataclass(frozen=True)
class SplitLayout:
    """The layouts of the pieces of a split/chunk (one per output), indexed by getitem."""

    pieces: tuple[Layout | None, ...]


@dataclass
class LayerCost:
    """Cost model of one Linear/Conv layer as a function of the kept units.

    ``macs = c_io * kept(in_units) * kept(out_units) + c_o * kept(out_units)`` where
    ``kept(positions)`` counts positions whose unit is kept (or not removable).  Dense layers
    have ``c_o = 0``; depthwise and grouped convolutions have ``c_io = 0`` (their input width is
    tied to the output or fixed).  Parameters follow the same form with ``p_io``/``p_o``.
    """

    node: str
    target: str
    kind: str  # linear | conv | depthwise | grouped
    in_units: np.ndarray
    out_units: np.ndarray
    c_io: float
    c_o: float
    p_io: float
    p_o: float

    @staticmethod
    def _count(units: np.ndarray, kept: np.ndarray) -> int:
        tracked = units >= 0
        return int((~tracked).sum() + kept[units[tracked]].sum())

    def widths(self, kept: np.ndarray) -> tuple[int, int]:
        """(input width, output width) under a kept mask."""
        return self._count(self.in_units, kept), self._count(self.out_units, kept)

    def macs(self, kept: np.ndarray) -> float:
        n_in, n_out = self.widths(kept)
        return self.c_io * n_in * n_out + self.c_o * n_out

    def params(self, kept: np.ndarray) -> float:
        n_in, n_out = self.widths(kept)
        return self.p_io * n_in * n_out + self.p_o * n_out


@dataclass
class UnitGroup:
    """Coupled producers and the units they share; ``units`` in the group's local order."""

    id: int
    name: str
    producers: list[str]  # module targets of the Linear/Conv layers whose outputs are units here
    units: list[int]
    pinned: dict[int, str] = field(default_factory=dict)  # unit -> why it must be kept
    blocks: list[list[int]] | None = None  # equal kept count per block (grouped conv, GroupNorm)

    @property
    def key(self) -> str:
        """A name that identifies the group on any copy of the same model (for plan replay)."""
        return "+".join(sorted(self.producers))

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return any(u not in self.pinned for u in self.units)


@dataclass(frozen=True)
class Barrier:
    """A node the analysis cannot see through: the units feeding it are kept."""

    node: str
    op: str
    reason: str
    units_pinned: int


@dataclass
class UnitGraph:
    """Result of the unit-group analysis (see the module docstring)."""

    n_units: int
    groups: list[UnitGroup]
    unit_group: np.ndarray  # unit -> group id
    layouts: dict[str, Layout | SplitLayout]  # node name -> layout of its output
    layers: list[LayerCost]
    barriers: list[Barrier]
    members: dict[int, list[tuple[str, int]]]  # unit -> (producer target, channel index) pairs
    # Unit sets that must keep at least one unit each: the pieces of a channel split/chunk (torch
    # cannot split off an empty piece that the rest of the graph still indexes) and the inputs of a
    # channel cat (an emptied input leaves its producer with no output channel, e.g. one branch's
    # conv when the cat feeds a residual add and the coupled group keeps units of the other).
    floors: list[np.ndarray] = field(default_factory=list)

    def all_kept(self) -> np.ndarray:
        return np.ones(self.n_units, dtype=bool)

    def macs(self, kept: np.ndarray | None = None) -> float:
        """Multiply-accumulates of all Linear/Conv layers when ``kept`` units survive."""
        kept = self.all_kept() if kept is None else kept
        return float(sum(layer.macs(kept) for layer in self.layers))

    def pinned_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_units, dtype=bool)
        for g in self.groups:
            for u in g.pinned:
                mask[u] = True
        return mask

    def group_by_key(self) -> dict[str, UnitGroup]:
        return {g.key: g for g in self.groups}

    def summary(self) -> dict[str, Any]:
        """Plain-data description for reports and ``oamipc inspect``."""
        return {
            "units": self.n_units,
            "groups": [
                {
                    "name": g.name,
                    "producers": g.producers,
                    "units": g.size,
                    "pinned": len(g.pinned),
                    "prunable": g.prunable,
                    "equal_count_blocks": len(g.blocks) if g.blocks else None,
                    "pinned_reasons": sorted(set(g.pinned.values())),
                }
                for g in self.groups
            ],
            "barriers": [b.__dict__ for b in self.barriers],
        }

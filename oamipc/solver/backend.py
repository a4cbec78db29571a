"""The contract between :func:`oamipc.solver.solve` and the solver backends.

Each backend module (:mod:`~oamipc.solver.highs`, :mod:`~oamipc.solver.cbc`,
:mod:`~oamipc.solver.scip`) has ``available() -> bool`` and a :data:`Backend` function ``run``
that solves a PuLP problem and returns an :class:`Outcome`: the solver's own verdict, mapped to
one of the statuses of :mod:`oamipc.solver`, and its raw bound.  The core turns that into a
:class:`~oamipc.solver.core.SolveResult`.  This module holds what both sides need, so that the
core can import the backends without the backends importing the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import pulp
from pulp import constants as lpc

__all__ = ["Backend", "Outcome", "default_start", "is_mip", "parse_float"]


@dataclass
class Outcome:
    """What a solver backend reports back to :func:`~oamipc.solver.solve`."""

    status: str
    # Dual bound in the problem's sense, *without* the objective's constant term.
    raw_bound: float | None = None
    # The solver's objective value of its incumbent, without the constant (None: unknown).
    raw_objective: float | None = None


class Backend(Protocol):
    """The signature of every backend's ``run``; ``start`` holds a value for every variable."""

    def __call__(
        self,
        prob: pulp.LpProblem,
        *,
        time_limit: float | None,
        gap: float | None,
        threads: int | None,
        node_limit: int | None,
        start: Mapping[str, float] | None,
        msg: bool,
    ) -> Outcome: ...


def default_start(var: pulp.LpVariable) -> float:
    """Start value of a variable the warm start does not mention."""
    if var.varValue is not None:
        return float(var.varValue)
    if var.lowBound is not None:
        return float(var.lowBound)
    if var.upBound is not None and var.upBound < 0:
        return float(var.upBound)
    return 0.0


def is_mip(prob: pulp.LpProblem) -> bool:
    """Whether ``prob`` has an integer variable (else it is an LP)."""
    return any(v.cat == lpc.LpInteger for v in prob.variables())


def parse_float(text: str) -> float | None:
    """``text`` as a finite float, or None (solver logs print ``inf``, ``-1e+50``, garbage)."""
    try:
        val = float(text)
    except ValueError:
        return None
    return val if math.isfinite(val) else None

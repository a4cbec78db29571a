"""A problem's rows evaluated at a given point: which are violated, and which are near-ties.

A solver that calls a problem infeasible does not say why.  When a point that should be
feasible is known (a plan evaluated in the network's own arithmetic, see
:meth:`oamipc.passes.mip.encoder.Encoder.reference_values`), evaluating every row there tells an
unsound row (violated at that point) from a numerical failure (every row holds, some only by a
hair that the solver's tolerance can turn into a false proof).  Nothing here runs a solver.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pulp
from pulp import constants as lpc


@dataclass(frozen=True)
class RowSlack:
    """How one row (or variable bound) of a problem fares at a given point.

    ``slack`` is how far the row is from being violated: negative when it is violated (by
    ``-slack``), zero when it is tight.  ``sense`` is ``<=``, ``>=``, ``=`` or ``bound``; ``terms``,
    ``largest_coef`` and ``constant`` say how big the row is (a big-M row shows its constant).
    """

    name: str
    sense: str
    slack: float
    terms: int
    largest_coef: float
    constant: float

    def describe(self) -> str:
        what = f"violated by {-self.slack:.3g}" if self.slack < 0 else f"slack {self.slack:.3g}"
        return (f"{self.name} ({self.sense}, {self.terms} terms, max |coef| {self.largest_coef:.3g}, "
                f"constant {self.constant:.9g}): {what}")


_SENSES = {lpc.LpConstraintLE: "<=", lpc.LpConstraintGE: ">=", lpc.LpConstraintEQ: "="}


def row_slacks(prob: pulp.LpProblem, values: Mapping[str, float]) -> list[RowSlack]:
    """The slack of every row and every finite variable bound of ``prob`` at ``values`` (by
    variable name), smallest (most violated) first.

    Activities are summed exactly (``math.fsum``), so what is reported is the point's own
    distance to each row, not the rounding of the evaluation.  Integrality is not checked.
    """
    out: list[RowSlack] = []
    for con in prob.constraints():
        coefs = [abs(c) for c in con.values()]
        activity = math.fsum([con.constant, *(c * values[v.name] for v, c in con.items())])
        slack = {lpc.LpConstraintLE: -activity, lpc.LpConstraintGE: activity}.get(con.sense, -abs(activity))
        out.append(RowSlack(str(con.name), _SENSES.get(con.sense, "?"), slack, len(coefs), max(coefs, default=0.0),
                            float(con.constant)))
    for var in prob.variables():
        value = values.get(var.name)
        if value is None:
            continue
        if var.lowBound is not None:
            out.append(RowSlack(f"lower bound of {var.name}", "bound", value - var.lowBound, 1, 1.0, var.lowBound))
        if var.upBound is not None:
            out.append(RowSlack(f"upper bound of {var.name}", "bound", var.upBound - value, 1, 1.0, var.upBound))
    return sorted(out, key=lambda r: r.slack)


def describe_slacks(slacks: list[RowSlack], *, top: int = 10, tolerance: float = 1e-9, near: float = 1e-5) -> str:
    """Say what :func:`row_slacks` found: the rows violated by more than ``tolerance`` (the worst
    ``top``) or, when there are none, the rows that hold by less than ``near`` without being
    exact: a solver that accepts violations up to its tolerance (1e-6 for HiGHS's MIP) can
    combine such near-ties into a proof that a point feasible in exact arithmetic is infeasible."""
    violated = [r for r in slacks if r.slack < -tolerance]
    if violated:
        return (f"{len(violated)} rows are violated; the worst:\n  "
                + "\n  ".join(r.describe() for r in violated[:top]))
    exact = sum(1 for r in slacks if abs(r.slack) <= tolerance)
    ties = [r for r in slacks if tolerance < r.slack < near]
    head = f"no row is violated ({exact} hold with equality), so the infeasibility is numerical; "
    if not ties:
        return head + f"no row holds by less than {near:g}"
    return (head + f"{len(ties)} rows hold by less than {near:g}, the tightest:\n  "
            + "\n  ".join(r.describe() for r in ties[:top]))


__all__ = ["RowSlack", "describe_slacks", "row_slacks"]

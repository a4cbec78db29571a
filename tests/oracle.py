"""Solving the oracle tests' MILPs: a problem with every free variable fixed to a known plan must
contain the network's own point, and when it does not, the failure says which rows are violated
there and by how much."""

from __future__ import annotations

import warnings

import numpy as np
import pulp
import pytest

from oamipc.passes.mip.encoder import Encoder
from oamipc.solver import describe_slacks, row_slacks, solve

_VIOLATION = 1e-9  # rows hold to ~1e-15 at the reference point; anything above this is a wrong bound


def solve_fixed(prob: pulp.LpProblem, enc: Encoder, kept: np.ndarray) -> None:
    """Check ``prob`` (its free variables fixed to ``kept``) at the network's point, then solve it.

    1. Every row and bound must hold at :meth:`Encoder.reference_values` of ``kept``, the point
       the rows describe computed the way the network computes it.  A violated row is an encoding
       bug (a bound or big-M constant that is not sound); the failure lists the worst rows by
       name (``e_h12_off``: the big-M row of ReLU output ``h12``) and by how much they fail.
    2. HiGHS then solves the problem as it is, so the caller can compare the logits of *its*
       point with torch: the rows must pin the logits down, not merely admit the right ones.
       HiGHS's root conflict analysis and restart presolve call some of these fully determined
       problems infeasible although step 1 holds (measured: 2 of 48 seeds on the zoo VGG's paper
       problem, none near a bound).  That is the solver's numerics, not the encoding: the solve
       is repeated from the reference point as a MIP start, as the planner does (see
       :meth:`Encoder.reference_phases`), with a warning that carries the tightest rows.
    """
    values = enc.reference_values(kept)
    slacks = row_slacks(prob, {v.name: float(x) for v, x in zip(enc.variables, values)})
    if slacks and slacks[0].slack < -_VIOLATION:
        pytest.fail("the network's own point is not feasible in the MILP: "
                    + describe_slacks(slacks, tolerance=_VIOLATION))
    prob.solve(pulp.HiGHS(msg=False))
    status = pulp.LpStatus[prob.status]
    if status == "Optimal":
        return
    warnings.warn(f"HiGHS calls the fixed MILP {status} although the network's point satisfies it: "
                  f"{describe_slacks(slacks, tolerance=_VIOLATION)}; solving again from that point", stacklevel=2)
    result = solve(prob, warm_start=enc.reference_start(kept))
    if not result.has_solution():
        pytest.fail(f"the fixed MILP is {result.status} even from the network's own point, which satisfies "
                    f"every row: {describe_slacks(slacks, tolerance=_VIOLATION)}")

"""Solving the oracle tests' MILPs: a problem with every free variable fixed to a known plan must
be feasible, and when the solver says otherwise the failure says which rows are violated at the
encoder's reference point, and by how much, or which ones are near-ties."""

from __future__ import annotations

import numpy as np
import pulp
import pytest

from oamipc.passes.mip.encoder import Encoder
from oamipc.solver import describe_slacks, row_slacks


def solve_fixed(prob: pulp.LpProblem, enc: Encoder, kept: np.ndarray) -> None:
    """Solve ``prob`` (its free variables fixed to ``kept``) with HiGHS; unless the status is
    Optimal, fail with the rows evaluated at :meth:`Encoder.reference_values` of ``kept``.

    The reference point is the network's own arithmetic, so a violated row there is an encoding
    bug (a bound or big-M constant that is not sound) and its name says which element and role
    (``e_h12_off``: the big-M row of ReLU output ``h12``); no violated row means the solver's
    tolerances turned near-ties into an infeasibility proof.
    """
    prob.solve(pulp.HiGHS(msg=False))
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        values = enc.reference_values(kept)
        slacks = row_slacks(prob, {v.name: float(x) for v, x in zip(enc.variables, values)})
        pytest.fail(f"the MILP with every free variable fixed is {status}; at the network's own values "
                    f"{describe_slacks(slacks)}")

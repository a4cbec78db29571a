"""Bounds of the MILP encoding's values, and the margins that keep them sound in floating point.

The encoder (:mod:`.encoder`) turns every ReLU, max pooling and keep-variable product into rows
whose constants are bounds of a value: the big-M ``h <= a - lo (1 - v)``, the box ``h in [0, hi]``
of a ReLU output, the product rows ``y <= hi m``.  A bound that a reachable value can cross makes
the MILP lose that value, and with it the plan that produces it: the problem with every keep
variable fixed to a real plan becomes infeasible (a compile drops the sub-problem; the oracle
tests fail).  This module owns everything about those bounds, so that the rules that make them
sound live in one place:

* :func:`box_bounds`: exact bounds of an affine expression over the box of its variables
  (interval arithmetic), widened by :func:`margin`;
* :func:`crown_bounds`: CROWN back-substitution through the linear relaxations of earlier ReLUs
  (:class:`Relaxation`), widened the same way;
* :func:`sample_phases`: the per-sample ReLU phases of the unpruned network (``--bounds sample``);
* :data:`BOUNDS`, the names of the three methods;
* the numerical constants: :data:`EPS_COEF` (coefficients below it are not kept, see
  :func:`truncate`), :data:`MARGIN_ABS` and :data:`MARGIN_REL` (see :func:`margin`).

Soundness contract.  A bound returned here contains every value the *rows* can give the
expression, not only the values of the real network: the encoder truncates a value's coefficients
(:func:`truncate`) before it bounds the value or writes a row from it, so rows and bounds see the
same numbers, and every bound is then widened by :func:`margin`, which dominates both the rounding
of the bound's own float64 computation and the feasibility tolerance of the solver.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

BOUNDS = ("crown", "interval", "sample")

EPS_COEF = 1e-9
"""Coefficients with a smaller magnitude are not kept.  HiGHS ignores matrix entries below its
``small_matrix_value`` (1e-9), and solvers mislabel optima with such entries in the matrix, so the
encoder never hands them over; :func:`truncate` removes them from a value *before* its bounds are
computed, so the bounds describe the expression the rows contain."""

MARGIN_ABS = 1e-5
"""Absolute part of :func:`margin`.  HiGHS accepts a MIP point that violates a row or bound by up
to ``mip_feasibility_tolerance`` (1e-6; 1e-7 for LPs), so it carries every value only to within
that tolerance, while it uses bounds as exact facts when it propagates, fixes binaries and
presolves.  A bound is only safe when no reachable value comes within the tolerance of it; ten
tolerances keep every true value clearly inside.  The old pad (1e-6 absolute + 1e-6 relative)
left hundreds of true values of the zoo VGG exactly one tolerance away: fixed plans are corners
of the keep box, where interval bounds are attained.  It is also larger than one float64
rounding of a bound used in a row constant (``-c + lo``) for values below 1e10."""

MARGIN_REL = 1e-5
"""Relative part of :func:`margin`, times the bound's magnitude.  HiGHS applies its absolute
tolerance to a scaled model (rows and columns scaled by powers of two), so in the encoder's units
the tolerance grows roughly with the size of the values a row holds; ten times 1e-6 again.  The
cost in tightness is small: on the zoo networks (lenet5, vgg_bn, resnet) ReLU bound widths grow
by a median of 4e-5 to 8e-4 (relative, per layer) over the old 1e-6 pad."""

NONNEG_SLACK = 10.0 * max(MARGIN_ABS, MARGIN_REL)
"""How far below zero (relative to ``1 + |hi|``) a lower bound of a value that is non-negative in
exact arithmetic (a ReLU output, a max of them) can end up after the margins of the layers it was
computed through; see :func:`may_be_negative`."""

_UNIT_ROUNDOFF = 2.0 ** -53


def truncate(coef: torch.Tensor) -> torch.Tensor:
    """``coef`` with every entry below :data:`EPS_COEF` in magnitude set to zero (a new tensor).

    Applied to every value before its bounds are computed, so that the expression that is bounded
    is exactly the one the rows contain: a dropped coefficient can then never move a row's value
    outside the bounds used in it.  The truncated value differs from the real network's by at most
    ``sum |w| * |x|`` over the dropped ``w`` (below 1e-9 each), which is what the rows always did.
    """
    return torch.where(coef.abs() < EPS_COEF, torch.zeros((), dtype=coef.dtype), coef)


def rounding_error(scale: torch.Tensor, n_ops: int) -> torch.Tensor:
    """A bound on the float64 error of a sum of ``n_ops`` rounded terms of total magnitude ``scale``.

    The classical bound ``gamma_n * sum |t_i|`` with ``gamma_n = n u / (1 - n u)`` (``u = 2**-53``)
    holds for any order of summation, so it covers whatever order torch or NumPy pick on a given
    CPU (the vectorised reductions differ between AVX2 and AVX-512 builds).
    """
    nu = n_ops * _UNIT_ROUNDOFF
    return scale * (nu / (1.0 - nu))


def margin(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, n_ops: int) -> torch.Tensor:
    """How far a computed bound pair is widened on each side: absolute + relative + rounding.

    ``MARGIN_ABS + MARGIN_REL * max(|lo|, |hi|)`` keeps every true value ten solver tolerances away
    from its bounds (see :data:`MARGIN_ABS`, :data:`MARGIN_REL`); :func:`rounding_error` of the
    computation's ``scale`` (the sum of the magnitudes of the terms that were added) covers the
    rounding of the bound itself, which matters only when its terms cancel by many orders of
    magnitude.  The margin is at least :data:`MARGIN_ABS`, so a widened bound is never a tie.
    """
    return MARGIN_ABS + MARGIN_REL * torch.maximum(lo.abs(), hi.abs()) + rounding_error(scale, n_ops)


def widen(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, n_ops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` widened by :func:`margin` on each side."""
    m = margin(lo, hi, scale, n_ops)
    return lo - m, hi + m


def may_be_negative(lo: float, hi: float) -> bool:
    """True when ``lo`` is too far below zero to be the margins of a value that is ``>= 0``.

    The paper formulation's gate needs a non-negative input; the bounds of such an input are below
    zero only by the margins of the (few) materialised layers they were computed through.
    """
    return lo < -NONNEG_SLACK * (1.0 + abs(hi))


def box_bounds(const: torch.Tensor, coef: torch.Tensor, var_lo: torch.Tensor,
               var_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``const + sum_i coef[i] * x_i`` over ``x_i in [var_lo[i], var_hi[i]]``, widened.

    Exact over the box before the margin (each variable takes the end of its interval that pushes
    the expression the right way), which is exact for expressions in the keep variables alone.
    ``coef`` has shape ``(n_vars, *const.shape)``; ``var_lo``/``var_hi`` shape ``(n_vars,)``.

    A lower bound whose terms are all non-negative (ReLU outputs, their maxima and averages, kept
    or not) is widened as usual but never below 0: such a sum is non-negative in exact arithmetic
    and in any rounding, so zero is a sound bound, and the artificial ``-1e-5`` bounds and
    right-hand sides the margin would otherwise put around exact zeros never reach the solver
    (likewise, an upper bound of a sum of non-positive terms never rises above 0).
    """
    if coef.shape[0] == 0:
        return const.clone(), const.clone()
    shape = (-1, *[1] * const.dim())
    lo_v, hi_v = var_lo.reshape(shape), var_hi.reshape(shape)
    pos, neg = coef.clamp(min=0), coef.clamp(max=0)
    lo_terms, hi_terms = pos * lo_v + neg * hi_v, pos * hi_v + neg * lo_v
    lo, hi = const + lo_terms.sum(0), const + hi_terms.sum(0)
    scale = const.abs() + (coef.abs() * torch.maximum(lo_v.abs(), hi_v.abs())).sum(0)
    wide_lo, wide_hi = widen(lo, hi, scale, coef.shape[0] + 2)
    nonneg = (const >= 0) & (lo_terms >= 0).all(0)
    nonpos = (const <= 0) & (hi_terms <= 0).all(0)
    return torch.where(nonneg, wide_lo.clamp(min=0.0), wide_lo), torch.where(nonpos, wide_hi.clamp(max=0.0), wide_hi)


@dataclass(frozen=True)
class Relaxation:
    """Linear bounds of one ReLU output ``h = relu(a)`` in terms of its pre-activation.

    ``a = const + sum coefs[i] * x[vars[i]]`` (the row's expression); ``h <= upper_slope * a +
    upper_intercept`` and ``h >= lower_slope * a`` for every ``a`` in the ReLU's bounds.
    """

    vars: list[int]
    coefs: np.ndarray
    const: float
    upper_slope: float
    upper_intercept: float
    lower_slope: float


def identity_relaxation(vars_: list[int], coefs: np.ndarray, const: float) -> Relaxation:
    """A stable active ReLU: ``h = a`` exactly."""
    return Relaxation(vars_, coefs, const, 1.0, 0.0, 1.0)


def relu_relaxation(vars_: list[int], coefs: np.ndarray, const: float, lo: float, hi: float) -> Relaxation:
    """An unstable ReLU (``lo < 0 < hi``): the chord above, the better of ``0`` and ``a`` below."""
    slope = hi / (hi - lo)
    return Relaxation(vars_, coefs, const, slope, -slope * lo, 1.0 if hi >= -lo else 0.0)


def crown_bounds(const: torch.Tensor, vars_: Sequence[int], coef: torch.Tensor, relax: Mapping[int, Relaxation],
                 var_lo: Sequence[float], var_hi: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of every element of ``const + sum coef[i] * x[vars[i]]`` by back-substitution (CROWN).

    An expression in ReLU outputs ``h_j`` is bounded above by replacing each ``h_j`` with its
    upper line ``su a_j + iu`` where its coefficient is positive and its lower line ``sl a_j``
    where negative (the reverse for the lower bound), ``a_j`` being the pre-activation as an
    expression of earlier variables; repeated until only variables without a relaxation (keep
    variables, products, max-pool outputs) remain, which take their box bounds.  Sound for
    every value of the keep variables in [0, 1], and never looser than interval arithmetic on
    the first layer after the free units, usually much tighter after it.  Returned flat and
    widened by :func:`margin`, with the magnitude of every term folded in as the rounding scale.
    """
    flat_const = const.reshape(-1).numpy()
    flat_coef = coef.reshape(len(vars_), -1).numpy()
    upper, scale_u, ops_u = _crown_upper(flat_const, vars_, flat_coef, relax, var_lo, var_hi)
    neg_lower, scale_l, ops_l = _crown_upper(-flat_const, vars_, -flat_coef, relax, var_lo, var_hi)
    lo, hi = torch.from_numpy(-neg_lower), torch.from_numpy(upper)
    return widen(lo, hi, torch.from_numpy(np.maximum(scale_u, scale_l)), max(ops_u, ops_l))


def _crown_upper(const: np.ndarray, vars_: Sequence[int], coef: np.ndarray, relax: Mapping[int, Relaxation],
                 var_lo: Sequence[float], var_hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    """Upper bound of ``const + sum coef[i] x[vars[i]]`` (flat), the magnitude of its terms, and
    the number of terms summed into it (for :func:`rounding_error`)."""
    n_e = const.shape[0]
    rows: dict[int, np.ndarray] = {}
    for i, v in enumerate(vars_):
        rows[v] = rows.get(v, np.zeros(n_e)) + coef[i]
    value = const.copy()
    scale = np.abs(const)
    steps = 0
    while True:
        relaxed = [v for v in rows if v in relax]
        if not relaxed:
            break
        j = max(relaxed)  # relaxations only refer to earlier variables
        c = rows.pop(j)
        r = relax[j]
        slope = np.where(c > 0, r.upper_slope, r.lower_slope)
        folded = c * (slope * r.const + np.where(c > 0, r.upper_intercept, 0.0))
        value += folded
        scale += np.abs(folded)
        scaled = c * slope
        for v, w in zip(r.vars, r.coefs.tolist()):
            rows[v] = rows.get(v, np.zeros(n_e)) + w * scaled
        steps += 1
    for v, row in rows.items():
        term = np.where(row > 0, row * var_hi[v], row * var_lo[v])
        value += term
        scale += np.abs(term)
    # Each element is a sum of one folded constant per substitution and one term per variable;
    # the products along a substitution chain add at most three roundings per step.
    return value, scale, 4 * steps + len(rows) + 2


class PhaseRecorder(fx.Interpreter):
    """Runs a network and keeps the first tensor input of every node (a ReLU's pre-activation)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.inputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.all_input_nodes:
            first = self.env.get(n.all_input_nodes[0])
            if isinstance(first, torch.Tensor):
                self.inputs[n.name] = first.detach()
        return out


def sample_phases(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's first input in the unpruned network on ``x`` (node name -> batch), in float64.

    ``--bounds sample`` fixes each ReLU's phase to the sign recorded here.  The network runs in
    float64 on a copy, as the encoder does, so a pre-activation within float32 rounding of zero
    gets the phase of the arithmetic the rows use, not one that the rows then contradict.
    """
    net = copy.deepcopy(gm).to(torch.float64).eval()
    recorder = PhaseRecorder(net)
    with torch.no_grad():
        recorder.run(x.detach().to(torch.float64))
    return recorder.inputs


__all__ = ["BOUNDS", "EPS_COEF", "MARGIN_ABS", "MARGIN_REL", "NONNEG_SLACK", "PhaseRecorder", "Relaxation",
           "box_bounds", "crown_bounds", "identity_relaxation", "margin", "may_be_negative", "relu_relaxation",
           "rounding_error", "sample_phases", "truncate", "widen"]

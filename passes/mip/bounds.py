"""Bounds of the MILP encoding's values.

The encoder (:mod:`.encoder`) turns every ReLU, max pooling and keep-variable product into rows
whose constants are bounds of a value: the big-M ``h <= a - lo (1 - v)``, the box ``h in [0, hi]``
of a ReLU output, the product rows ``y <= hi m``.  A bound that a reachable value can cross makes
the MILP lose that value, and with it the plan that produces it.  This module owns everything
about those bounds, apart from the rows that use them, so their rules live in one place:

* :func:`box_bounds`: exact bounds of an affine expression over the box of its variables
  (interval arithmetic), widened by :func:`margin`;
* :func:`crown_bounds`: CROWN back-substitution through the linear relaxations of earlier ReLUs
  (:class:`Relaxation`), widened the same way;
* :func:`sample_phases`: the per-sample ReLU phases of the unpruned network (``--bounds sample``);
* :data:`BOUNDS`, the names of the three methods, and the numerical constants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

BOUNDS = ("crown", "interval", "sample")

EPS_COEF = 1e-9  # coefficients below this are dropped (solvers mislabel optima with them)
_BOUND_PAD = 1e-6  # bounds are widened by this (relative + absolute) against rounding
NONNEG_SLACK = 1e-4  # pads of the bounds of a non-negative value, relative to 1 + |hi|


def margin(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """How far a computed bound pair is widened on each side against rounding."""
    return _BOUND_PAD * (1.0 + torch.maximum(lo.abs(), hi.abs()))


def widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` widened by :func:`margin` on each side."""
    m = margin(lo, hi)
    return lo - m, hi + m


def may_be_negative(lo: float, hi: float) -> bool:
    """True when ``lo`` is too far below zero to be the pads of a value that is ``>= 0``."""
    return lo < -NONNEG_SLACK * (1.0 + abs(hi))


def box_bounds(const: torch.Tensor, coef: torch.Tensor, var_lo: torch.Tensor,
               var_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``const + sum_i coef[i] * x_i`` over ``x_i in [var_lo[i], var_hi[i]]``, widened.

    Exact over the box before the margin (each variable takes the end of its interval that pushes
    the expression the right way), which is exact for expressions in the keep variables alone.
    ``coef`` has shape ``(n_vars, *const.shape)``; ``var_lo``/``var_hi`` shape ``(n_vars,)``.
    """
    if coef.shape[0] == 0:
        return const.clone(), const.clone()
    shape = (-1, *[1] * const.dim())
    lo_v, hi_v = var_lo.reshape(shape), var_hi.reshape(shape)
    pos, neg = coef.clamp(min=0), coef.clamp(max=0)
    lo = const + (pos * lo_v + neg * hi_v).sum(0)
    hi = const + (pos * hi_v + neg * lo_v).sum(0)
    return widen(lo, hi)


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
    widened by :func:`margin`.
    """
    flat_const = const.reshape(-1).numpy()
    flat_coef = coef.reshape(len(vars_), -1).numpy()
    upper = _crown_upper(flat_const, vars_, flat_coef, relax, var_lo, var_hi)
    neg_lower = _crown_upper(-flat_const, vars_, -flat_coef, relax, var_lo, var_hi)
    return widen(torch.from_numpy(-neg_lower), torch.from_numpy(upper))


def _crown_upper(const: np.ndarray, vars_: Sequence[int], coef: np.ndarray, relax: Mapping[int, Relaxation],
                 var_lo: Sequence[float], var_hi: Sequence[float]) -> np.ndarray:
    """Upper bound of ``const + sum coef[i] x[vars[i]]`` (flat)."""
    n_e = const.shape[0]
    rows: dict[int, np.ndarray] = {}
    for i, v in enumerate(vars_):
        rows[v] = rows.get(v, np.zeros(n_e)) + coef[i]
    value = const.copy()
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
        scaled = c * slope
        for v, w in zip(r.vars, r.coefs.tolist()):
            rows[v] = rows.get(v, np.zeros(n_e)) + w * scaled
    for v, row in rows.items():
        value += np.where(row > 0, row * var_hi[v], row * var_lo[v])
    return value


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
    """Every node's first input in the unpruned network on ``x`` (node name -> batch).

    ``--bounds sample`` fixes each ReLU's phase to the sign recorded here.
    """
    recorder = PhaseRecorder(gm)
    with torch.no_grad():
        recorder.run(x.to(next(gm.parameters()).dtype))
    return recorder.inputs


__all__ = ["BOUNDS", "EPS_COEF", "NONNEG_SLACK", "PhaseRecorder", "Relaxation", "box_bounds", "crown_bounds",
           "identity_relaxation", "margin", "may_be_negative", "relu_relaxation", "sample_phases", "widen"]

"""Constraints on keep variables shared by the MILP stages: the exact MAC budget and group rules.

Each stage expresses "unit ``u`` is kept" as a 0/1-valued affine expression ``m[u]`` of its own
binaries (the layer sub-problems use ``m_u`` itself; the joint stage uses a flip variable ``t_u``
and ``m_u = cur_u + (1 - 2 cur_u) t_u``).  Units without an entry are fixed to the current plan.

* **MACs.**  ``macs = sum_layers c_io * n_in * n_out + c_o * n_out`` with ``n = b + sum a_u m_u``
  (the unit analysis's cost model).  Terms in one side's variables are linear; the product of the
  two sides (a layer whose input and output units are both free) is linearised exactly with one
  continuous ``p_i = m_i * W`` per input unit (``W`` the output width's free part, ``m_i`` 0/1):
  ``p <= W_max m``, ``p <= W``, ``p >= W - W_max (1 - m)``, ``p >= 0``.
* **Groups.**  At least ``min_keep`` units; with ``--prune-ratio`` the count stays at the plan's;
  ``--round-to`` as ``count = r t (+ rest * full)``; equal counts in every block (grouped convs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pulp

from oamipc.target import Target, granularity
from oamipc.units import UnitGraph, UnitGroup

Keep = dict[int, pulp.LpAffineExpression]


def as_keep(variables: dict[int, pulp.LpVariable]) -> Keep:
    """Plain binaries as keep expressions."""
    return {u: pulp.LpAffineExpression([(v, 1.0)]) for u, v in variables.items()}


class _Linear:
    """A sparse accumulator ``const + sum coef * var`` (faster than chained PuLP arithmetic)."""

    def __init__(self) -> None:
        self.terms: dict[Any, float] = {}
        self.const = 0.0

    def add(self, expr: pulp.LpAffineExpression, c: float) -> None:
        for var, w in expr.items():
            self.terms[var] = self.terms.get(var, 0.0) + c * w
        self.const += c * expr.constant

    def add_var(self, var: pulp.LpVariable, c: float) -> None:
        self.terms[var] = self.terms.get(var, 0.0) + c

    def expression(self) -> pulp.LpAffineExpression:
        return pulp.LpAffineExpression([(v, c) for v, c in self.terms.items() if abs(c) > 0], constant=self.const)


def _width(units: np.ndarray, m: Keep, current: np.ndarray) -> tuple[dict[int, float], float]:
    """A layer side's width as ``b + sum_u a_u m_u`` (a: positions per free unit)."""
    a: dict[int, float] = {}
    b = 0.0
    for u in units.tolist():
        if u < 0:
            b += 1
        elif u in m:
            a[u] = a.get(u, 0.0) + 1.0
        elif current[u]:
            b += 1
    return a, b


def mac_expression(prob: pulp.LpProblem, graph: UnitGraph, m: Keep, current: np.ndarray,
                   prefix: str) -> pulp.LpAffineExpression:
    """The exact MACs of the network under ``m`` (adds the product variables' rows to ``prob``)."""
    acc = _Linear()
    for li, layer in enumerate(graph.layers):
        a_in, b_in = _width(layer.in_units, m, current)
        a_out, b_out = _width(layer.out_units, m, current)
        acc.const += layer.c_io * b_in * b_out + layer.c_o * b_out
        for u, a in a_out.items():
            acc.add(m[u], layer.c_io * b_in * a + layer.c_o * a)
        for u, a in a_in.items():
            acc.add(m[u], layer.c_io * b_out * a)
        if layer.c_io and a_in and a_out:
            w_max = float(sum(a_out.values()))
            w = _Linear()
            for u, a in a_out.items():
                w.add(m[u], a)
            w_expr = w.expression()
            for u, a in a_in.items():
                p = pulp.LpVariable(f"{prefix}p{li}_{u}", lowBound=0.0, upBound=w_max)
                prob += p - w_max * m[u] <= 0
                prob += p - w_expr <= 0
                prob += p - w_expr - w_max * m[u] >= -w_max
                acc.add_var(p, layer.c_io * a)
    return acc.expression()


def count_expression(units: list[int], m: Keep, current: np.ndarray) -> pulp.LpAffineExpression:
    """How many of ``units`` are kept."""
    acc = _Linear()
    for u in units:
        if u in m:
            acc.add(m[u], 1.0)
        elif current[u]:
            acc.const += 1.0
    return acc.expression()


def group_rows(prob: pulp.LpProblem, group: UnitGroup, m: Keep, current: np.ndarray, target: Target, *,
               round_to: int, prefix: str) -> None:
    """Count, rounding (``round_to``: the group's multiple, :func:`oamipc.target.granularity`) and
    equal-block rules of one group (see the module docstring)."""
    count = count_expression(group.units, m, current)
    if target.kind != "macs":  # a ratio, or a latency plan's widths: the MILP swaps units, counts stay
        prob += count == int(current[group.units].sum())
    else:
        prob += count >= max(target.min_keep, 1)
        if round_to > 1:
            top = group.size // round_to
            t = pulp.LpVariable(f"{prefix}t{group.id}", lowBound=0, upBound=top, cat=pulp.LpInteger)
            rest = group.size % round_to
            if rest:
                full = pulp.LpVariable(f"{prefix}full{group.id}", cat=pulp.LpBinary)
                prob += count == round_to * t + rest * full
                prob += full <= t - top + 1
            else:
                prob += count == round_to * t
    if group.blocks:
        counts = [count_expression(block, m, current) for block in group.blocks]
        for other in counts[1:]:
            prob += other == counts[0]


def plan_violations(graph: UnitGraph, kept: np.ndarray, reference: np.ndarray, target: Target, *,
                    spend: bool = False) -> list[str]:
    """The rules that the plan ``kept`` breaks, checked on the plan itself (empty: none).

    A MILP stage turns the solver's values into a plan and must not take the solver's word that
    the plan obeys the rows it was given: a solver bug, a numerically sloppy answer or a wrong
    status could hand back anything.  These are the rules every stage encodes (see the module
    docstring), plus the ones the stages keep by fixing variables: pinned units and one unit of
    every split or cat piece stay, and groups that cannot be pruned keep every unit.  ``reference`` is
    the plan whose per-group counts a ratio target must keep, and whose MACs a ``spend`` stage
    (``spend_budget``) must not fall below.
    """
    fixed_count = target.kind != "macs"
    min_keep, flops_budget = target.min_keep, target.flops_budget
    steps = granularity(target, graph)
    problems: list[str] = []
    if len(kept) != graph.n_units:
        return [f"the plan has {len(kept)} entries for {graph.n_units} units"]
    for group in graph.groups:
        units = np.asarray(group.units, dtype=np.int64)
        count = int(kept[units].sum())
        lost = [u for u in group.pinned if not kept[u]]
        if lost:
            problems.append(f"{group.name}: pinned unit {lost[0]} removed")
        if not group.prunable:
            continue
        if fixed_count and count != int(reference[units].sum()):
            problems.append(f"{group.name}: keeps {count} units, the target says {int(reference[units].sum())}")
        if count < min(max(min_keep, 1), group.size):
            problems.append(f"{group.name}: keeps {count} units, fewer than the minimum of {max(min_keep, 1)} per "
                            "group (min_keep)")
        round_to = steps[group.id]
        if round_to > 1 and count % round_to and count != group.size:
            problems.append(f"{group.name}: keeps {count} units, not a multiple of {round_to} (round_to)")
        if group.blocks and len({int(kept[block].sum()) for block in group.blocks}) > 1:
            problems.append(f"{group.name}: unequal kept counts in its blocks (grouped convolution)")
    for piece in graph.floors:
        if len(piece) and not kept[piece].any():
            problems.append(f"a channel split or cat piece (units {int(piece[0])}..) lost every unit")
    if flops_budget is not None:
        total = graph.macs()
        macs = graph.macs(kept)
        if macs > flops_budget * total * (1 + 1e-9):
            problems.append(f"keeps {macs / total:.4f} of the MACs, over the budget {flops_budget:g}")
        if spend and macs < graph.macs(reference) * (1 - 1e-9):
            problems.append(f"keeps {macs / total:.4f} of the MACs, less than the {graph.macs(reference) / total:.4f} "
                            "of the plan it started from (spend_budget)")
    return problems


def single_flip_macs(graph: UnitGraph, kept: np.ndarray) -> np.ndarray:
    """``|MACs(kept with u flipped) - MACs(kept)|`` for every unit ``u`` at once, (n_units,).

    Per layer, flipping ``u`` moves its input width by ``u``'s count among the input positions
    and its output width by its count among the output positions (signed: -1 for a kept unit,
    +1 for a removed one); the change of ``c_io * n_in * n_out + c_o * n_out`` follows.  Equal to
    evaluating :meth:`UnitGraph.macs` on each flipped plan, in one pass over the layers.
    """
    sign = np.where(kept, -1.0, 1.0)
    total = np.zeros(graph.n_units)
    for layer in graph.layers:
        n_in, n_out = layer.widths(kept)
        a = np.bincount(layer.in_units[layer.in_units >= 0], minlength=graph.n_units).astype(np.float64)
        b = np.bincount(layer.out_units[layer.out_units >= 0], minlength=graph.n_units).astype(np.float64)
        new_in, new_out = n_in + sign * a, n_out + sign * b
        total += layer.c_io * (new_in * new_out - n_in * n_out) + layer.c_o * (new_out - n_out)
    return np.abs(total)


def flip_macs(graph: UnitGraph, kept: np.ndarray, units: list[int]) -> np.ndarray:
    """``|graph.macs(kept with u flipped) - graph.macs(kept)|`` for each of ``units``, (len(units),).

    The very floats of evaluating :meth:`UnitGraph.macs` on every flipped plan (the same products
    of the same integer widths, summed over the layers in the same order), without recounting
    every layer's widths per unit: a flip moves only the widths of the layers that read or write
    its unit, by its count there.  :func:`single_flip_macs` sums per-layer changes instead, which
    can differ in the last bits when the layers' coefficients are not integers.
    """
    kept = np.asarray(kept, dtype=bool)
    widths = [layer.widths(kept) for layer in graph.layers]
    terms = [layer.c_io * n_in * n_out + layer.c_o * n_out for layer, (n_in, n_out) in zip(graph.layers, widths)]
    base = float(sum(terms))
    counts = []  # per layer: each unit's count among its input and output positions
    for layer in graph.layers:
        counts.append((np.bincount(layer.in_units[layer.in_units >= 0], minlength=graph.n_units),
                       np.bincount(layer.out_units[layer.out_units >= 0], minlength=graph.n_units)))
    out = np.empty(len(units))
    for i, u in enumerate(units):
        sign = -1 if kept[u] else 1
        flipped = list(terms)
        for j, (layer, (n_in, n_out), (a, b)) in enumerate(zip(graph.layers, widths, counts)):
            if a[u] or b[u]:
                new_in, new_out = n_in + sign * int(a[u]), n_out + sign * int(b[u])
                flipped[j] = layer.c_io * new_in * new_out + layer.c_o * new_out
        out[i] = abs(float(sum(flipped)) - base)
    return out

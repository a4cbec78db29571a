"""Refit-aware ranking and widths: which units, and how many per group, the layer refit can best do without.

Why.  Every planner scores a unit by what the network loses when the unit is removed *as it is*.
The default compile then refits every later layer (:mod:`.reconstruct`): each Linear/Conv layer
is fit by least squares to the dense layer's outputs from the inputs that are left.  After that
refit, what a unit is worth is how much of its readers' dense outputs the *other* kept units
cannot reproduce, and two units that carry the same signal are worth one.  That is a column
subset selection problem (the channel selection of ThiNet and of He et al.'s channel pruning,
ICCV 2017), and it also says how wide each layer should be: a layer whose readers' outputs a
few of its units already explain can be cut hard.  The refit selection
(:mod:`.plan_refit`) judges its candidates after the refit; this module gives it one candidate
built for the refit rather than judged by it.

How:

* **Statistics.**  For every Linear or Conv layer that reads units of a prunable group (a
  depthwise or grouped convolution's input is tied to its output and is left out: the layer
  after it reads the same units), the dense layer's normal equations on fitting samples
  (:func:`.reconstruct.layer_statistics`: the refit's own rows, with its intercept column).
* **Order.**  Per group, greedy forward selection in the Gram space: start from the columns
  every plan keeps (the intercept, inputs no unit owns, pinned units, other groups' units), then
  take one unit at a time, the one whose columns lower its readers' residual most, summed over
  readers, each reader's residual counted relative to its residual with the intercept alone.  A
  taken unit's columns are conditioned on in closed form (the Schur complement of their block),
  with the refit's ridge on the weight columns.  The order ranks the group's units, and the
  residual after each step is the group's curve ``r_g(k)`` (``k`` units kept).
* **Widths.**  From the full network, a step of about 1/:data:`STEPS` of a group is taken off
  the group whose curve rises least per MAC it frees, until the MAC budget holds.  The kept
  fractions go to the refit selection's width split, which applies ``min_keep``, rounding,
  pinned units and blocks and spends the budget exactly.
* **Cost.**  One pass of the dense network over the fitting samples, and per step of the greedy
  one small solve per candidate unit: milliseconds to a second on the networks the refit
  selection runs on.  A reader with more than :data:`MAX_COLUMNS` columns, or a group that no
  measured layer reads, gives no candidate (None) rather than a guess.

Deterministic: the statistics' rows are drawn with the compile's seed, ties go to the lower unit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from oamipc.units import LayerCost, UnitGraph

from .reconstruct import layer_statistics

log = logging.getLogger(__name__)

#: Steps per group of the width allocation (a step is 1/STEPS of the group, at least one unit).
STEPS = 32
#: A reader with more input columns than this is not measured (its Gram matrix would dominate the cost).
MAX_COLUMNS = 8192


@dataclass(frozen=True)
class RefitOrders:
    """Per prunable group: its units in the order the greedy took them, and the relative residual
    of its readers with the first ``k`` of them kept (``curve[k]``, ``k = 0 .. len(order)``)."""

    orders: dict[int, list[int]]
    curves: dict[int, np.ndarray]

    def ranking(self, graph: UnitGraph) -> np.ndarray:
        """Per unit, higher for units taken earlier (pinned units highest), in ``[0, 2]``."""
        out = np.zeros(graph.n_units)
        out[graph.pinned_mask()] = 2.0
        for order in self.orders.values():
            n = len(order)
            for i, u in enumerate(order):
                out[u] = 1.0 - i / max(n, 1)
        return out


class _Reader:
    """One reader layer's Gram matrix and cross products, conditioned on the columns taken so far."""

    def __init__(self, xtx: torch.Tensor, xty: torch.Tensor, yy: float, ridge: float) -> None:
        d = xtx.shape[0]
        weights = d - 1  # the last column is the intercept
        scale = float(xtx.diagonal()[:weights].mean()) if weights else 0.0
        m = xtx.clone()
        m.diagonal()[:weights] += ridge * scale + 1e-12 * max(scale, 1e-300)
        self.m, self.c, self.e = m, xty.clone(), float(yy)
        self.take(np.array([d - 1]))  # the intercept: residuals are counted around the mean
        self.total = max(self.e, 1e-300)

    def gains(self, blocks: np.ndarray) -> np.ndarray:
        """The residual each block of columns (``(U, b)`` indices) would remove if taken next."""
        idx = torch.as_tensor(blocks, dtype=torch.long)
        mb = self.m[idx[:, :, None], idx[:, None, :]]
        cb = self.c[idx]
        sol = torch.linalg.lstsq(mb, cb).solution if blocks.shape[1] > 1 else cb / mb[:, :, :1]
        return (cb * sol).sum(dim=(1, 2)).clamp(min=0).numpy()

    def take(self, cols: np.ndarray) -> None:
        """Condition on ``cols`` (the Schur complement of their block)."""
        b = torch.as_tensor(cols, dtype=torch.long)
        mbb = self.m[b][:, b]
        k = torch.linalg.lstsq(mbb, self.m[b]).solution  # (b, d): inv(M_BB) M_B.
        kc = torch.linalg.lstsq(mbb, self.c[b]).solution
        self.e -= float((self.c[b] * kc).sum())
        self.c -= self.m[:, b] @ kc
        self.m -= self.m[:, b] @ k
        self.m[b] = 0.0
        self.m[:, b] = 0.0
        self.m[b, b] = 1.0  # keeps later solves of these (never again chosen) columns finite
        self.c[b] = 0.0


def _columns(layer: LayerCost, conv_window: int) -> dict[int, np.ndarray]:
    """Per unit read by ``layer``, the columns of its regression rows (channel-major for a conv)."""
    out: dict[int, list[int]] = {}
    for pos, u in enumerate(layer.in_units.tolist()):
        if u >= 0:
            out.setdefault(int(u), []).extend(range(pos * conv_window, (pos + 1) * conv_window))
    return {u: np.asarray(c, dtype=np.int64) for u, c in out.items()}


def refit_orders(gm: fx.GraphModule, graph: UnitGraph, x: torch.Tensor, *, ridge: float, max_rows: int,
                 seed: int, example_batch: int) -> RefitOrders | None:
    """Greedy refit-aware orders and curves of every prunable group (module docstring), or None."""
    readers = [layer for layer in graph.layers if layer.kind in ("linear", "conv") and (layer.in_units >= 0).any()]
    # In graph order: the statistics' paused forward passes then run each network once.
    stats = layer_statistics(gm, list(dict.fromkeys(r.target for r in readers)), x, max_rows, seed, example_batch)
    group_of = graph.unit_group
    orders: dict[int, list[int]] = {}
    curves: dict[int, np.ndarray] = {}
    pinned = graph.pinned_mask()
    for g in graph.groups:
        if not g.prunable:
            continue
        mine = [u for u in g.units if not pinned[u]]
        states: list[tuple[_Reader, dict[int, np.ndarray]]] = []
        for layer in readers:
            if not np.isin(layer.in_units, mine).any():
                continue
            got = stats.get(layer.target)
            if got is None or got[0].shape[0] != 1 or got[0].shape[-1] > MAX_COLUMNS:
                return None  # a reader the statistics cannot describe: no candidate rather than a guess
            xtx, xty, yy, _ = got
            d = xtx.shape[-1] - 1
            window = d // max(len(layer.in_units), 1)
            if window * len(layer.in_units) != d:
                return None
            cols = _columns(layer, window)
            state = _Reader(xtx[0], xty[0], float(yy[0]), ridge)
            base = [c for u, c in cols.items() if group_of[u] != g.id or pinned[u]]
            base += [np.arange(p * window, (p + 1) * window) for p in np.flatnonzero(layer.in_units < 0)]
            if base:
                state.take(np.concatenate(base))
            states.append((state, {u: cols[u] for u in mine if u in cols}))
        if not states:
            return None
        order: list[int] = []
        left = list(mine)
        curve = [sum(s.e / s.total for s, _ in states)]
        while left:
            gain = np.zeros(len(left))
            for state, cols in states:
                have = [i for i, u in enumerate(left) if u in cols]
                if not have:
                    continue
                sizes = {len(cols[left[i]]) for i in have}
                if len(sizes) == 1:
                    gain[have] += state.gains(np.stack([cols[left[i]] for i in have])) / state.total
                else:
                    for i in have:
                        gain[i] += state.gains(cols[left[i]][None, :])[0] / state.total
            i = int(np.argmax(gain))  # the first of equal gains: the lower unit (``left`` stays sorted)
            u = left.pop(i)
            order.append(u)
            for state, cols in states:
                if u in cols:
                    state.take(cols[u])
            curve.append(sum(s.e / s.total for s, _ in states))
        orders[g.id] = order
        curves[g.id] = np.maximum(np.minimum.accumulate(np.asarray(curve)), 0.0)
    return RefitOrders(orders, curves)


def allocate(graph: UnitGraph, found: RefitOrders, limit: float) -> dict[int, float] | None:
    """Per prunable group the kept fraction after steps off the flattest curves until ``limit`` MACs hold."""
    kept = graph.all_kept()
    count = {gid: len(order) for gid, order in found.orders.items()}
    touching = {gid: [layer for layer in graph.layers
                      if np.isin(layer.in_units, order).any() or np.isin(layer.out_units, order).any()]
                for gid, order in found.orders.items()}

    def local(gid: int, mask: np.ndarray) -> float:
        return float(sum(layer.macs(mask) for layer in touching[gid]))

    def set_count(mask: np.ndarray, gid: int, n: int) -> None:
        order = found.orders[gid]
        mask[order[:n]] = True
        mask[order[n:]] = False

    total = graph.macs(kept)
    while total > limit:
        best: tuple[float, int, int, float] | None = None
        for gid, n in sorted(count.items()):
            step = max(1, math.ceil(len(found.orders[gid]) / STEPS))
            lower = max(n - step, 1 if n > 1 else 0)
            if lower >= n or lower < 1:
                continue
            before = local(gid, kept)
            trial = kept.copy()
            set_count(trial, gid, lower)
            freed = before - local(gid, trial)
            if freed <= 0:
                continue
            curve = found.curves[gid]
            cost = (float(curve[lower]) - float(curve[n])) / freed
            if best is None or cost < best[0]:
                best = (cost, gid, lower, freed)
        if best is None:
            return None
        _, gid, lower, freed = best
        set_count(kept, gid, lower)
        count[gid] = lower
        total -= freed
    pinned = graph.pinned_mask()
    return {g.id: max(count[g.id] + int(pinned[g.units].sum()), 1) / g.size
            for g in graph.groups if g.id in count}

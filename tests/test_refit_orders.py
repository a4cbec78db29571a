"""The refit-aware ranking and widths (:mod:`oamipc.passes.refit_orders`).

Oracles: least squares solved directly with numpy on the very rows the refit would fit (the
greedy's residual curve must be the ridge fit's residual of the units it kept), brute force over
single units, and the unit graph's exact MAC count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.refit_orders import allocate, refit_orders
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace

RIDGE = 1e-3


def _net(duplicate: bool = False) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, 3))
    if duplicate:  # hidden units 0 and 1 compute the same thing: one of them is worth nothing after a refit
        with torch.no_grad():
            net[0].weight[1] = net[0].weight[0]
            net[0].bias[1] = net[0].bias[0]
            net[0].weight[0] *= 3.0  # the larger copy: a magnitude ranking would keep both first
            net[0].bias[0] *= 3.0
            net[0].weight[1] *= 3.0
            net[0].bias[1] *= 3.0
    x = torch.randn(1, 6)
    return trace(net, (x,)), torch.randn(400, 6)


def _orders(gm: torch.fx.GraphModule, x: torch.Tensor):
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    found = refit_orders(gm, graph, x, ridge=RIDGE, max_rows=10_000, seed=0, example_batch=1)
    assert found is not None
    return graph, found


def _ridge_residual(h: np.ndarray, y: np.ndarray, cols: list[int]) -> float:
    """Ridge objective with an unpenalised intercept, as the refit solves it (the penalty from all columns)."""
    lam = RIDGE * float((h * h).sum(axis=0).mean())
    design = np.concatenate([h[:, cols], np.ones((len(h), 1))], axis=1)
    pen = np.diag([lam] * len(cols) + [0.0])
    w = np.linalg.solve(design.T @ design + pen, design.T @ y)
    r = y - design @ w
    return float((r * r).sum() + lam * (w[:-1] ** 2).sum())


def test_the_curve_is_the_ridge_residual_of_the_kept_units() -> None:
    gm, x = _net()
    graph, found = _orders(gm, x)
    net = gm
    with torch.no_grad():
        h = torch.relu(net.get_submodule("0")(x)).double().numpy()  # what layer "2" reads
        y = (torch.from_numpy(h) @ net.get_submodule("2").weight.double().T).numpy() \
            + net.get_submodule("2").bias.double().numpy()
    first = next(g for g in graph.groups if g.prunable and "0" in g.producers)
    order, curve = found.orders[first.id], found.curves[first.id]
    assert sorted(order) == sorted(first.units)
    base = _ridge_residual(h, y, [])
    for k in range(len(order) + 1):
        kept = [first.units.index(u) for u in order[:k]]
        assert curve[k] == pytest.approx(_ridge_residual(h, y, kept) / base, rel=1e-6, abs=1e-9)
    # The first pick is the best single unit by brute force.
    singles = [_ridge_residual(h, y, [i]) for i in range(len(first.units))]
    assert first.units.index(order[0]) == int(np.argmin(singles))


def test_a_duplicated_unit_is_ranked_last() -> None:
    gm, x = _net(duplicate=True)
    graph, found = _orders(gm, x)
    first = next(g for g in graph.groups if g.prunable and "0" in g.producers)
    order = found.orders[first.id]
    a, b = first.units[0], first.units[1]
    assert order.index(a) == len(order) - 1 or order.index(b) == len(order) - 1
    drops = -np.diff(found.curves[first.id])
    assert drops[-1] < 0.1 * drops[:-1].min()  # only the ridge penalty's split between the copies is left


@pytest.mark.parametrize("budget", [0.7, 0.4, 0.2])
def test_the_widths_meet_the_budget_and_follow_the_curves(budget: float) -> None:
    gm, x = _net()
    graph, found = _orders(gm, x)
    limit = budget * graph.macs()
    weights = allocate(graph, found, limit)
    assert weights is not None and set(weights) == set(found.orders)
    kept = graph.all_kept()
    for g in graph.groups:
        if g.id in weights:
            n = round(weights[g.id] * g.size)
            order = found.orders[g.id]
            kept[order[n:]] = False
            assert 1 <= n <= g.size
    assert graph.macs(kept) <= limit
    ranking = found.ranking(graph)
    for g in graph.groups:  # units taken earlier rank higher
        if g.id in found.orders:
            assert list(np.argsort(-ranking[found.orders[g.id]], kind="stable")) == list(range(g.size))


def test_the_same_inputs_give_the_same_orders() -> None:
    gm, x = _net()
    _, one = _orders(gm, x)
    _, two = _orders(gm, x)
    assert one.orders == two.orders
    for gid in one.curves:
        np.testing.assert_array_equal(one.curves[gid], two.curves[gid])


def test_conv_and_flatten_readers_follow_the_refit_rows() -> None:
    """A conv read by a conv (windows of 3x3 per channel) and by a Linear through a flatten (16
    features per channel): the curves are the ridge residuals of numpy's fit on unfolded rows."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 3))
    gm = trace(net, (torch.randn(1, 1, 6, 6),))
    x = torch.randn(200, 1, 6, 6)
    graph, found = _orders(gm, x)
    with torch.no_grad():
        a = torch.relu(net[0](x))
        rows_a = torch.nn.functional.unfold(a, 3).transpose(1, 2).reshape(-1, 4 * 9).double().numpy()
        y_a = net[2](a).permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
        h_b = torch.relu(net[2](a)).flatten(1).double().numpy()
        y_b = net[5](torch.relu(net[2](a)).flatten(1)).double().numpy()
    for producer, h, y, width in (("0", rows_a, y_a, 9), ("2", h_b, y_b, 16)):
        group = next(g for g in graph.groups if g.prunable and producer in g.producers)
        order, curve = found.orders[group.id], found.curves[group.id]
        base = _ridge_residual(h, y, [])
        for k in range(len(order) + 1):
            starts = [group.units.index(u) * width for u in order[:k]]
            cols = [c for s in starts for c in range(s, s + width)]
            assert curve[k] == pytest.approx(_ridge_residual(h, y, cols) / base, rel=1e-5, abs=1e-8)

"""Unit tests for the importance criteria (passes/importance_*.py), against hand-computed scores.

Definitions under test:

* L1/L2: per producer channel, the p-norm of its weight row with the bias appended; a unit that
  couples several producers gets the *sum* of its members' norms; consumers do not count.
* random: ``np.random.default_rng(seed).random(n_units)`` with the compile seed.
* activation: mean |x| of the unit's channel where each Linear/Conv reads it, averaged over
  samples, positions and readers; a unit no layer reads is scored at its producer's output.
* taylor: per unit, ``(sum over its members' weights and biases of w * dL/dw)^2`` with ``L`` the
  summed cross-entropy, divided by the number of samples (one batch here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn

from oamipc.errors import UsageError
from oamipc.passes import (
    ActivationImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    TaylorImportance,
    UnitGroupAnalysis,
    criteria,
    get_criterion,
)
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace
from oamipc.units import UnitGraph


def setup(model: nn.Module, x: torch.Tensor, *, data: torch.Tensor | None = None, labels: torch.Tensor | None = None,
          seed: int = 0) -> tuple[fx.GraphModule, AnalysisManager, UnitGraph]:
    gm = trace(model.eval(), (x[:2],))
    am = AnalysisManager(CompileContext((x[:2],), data, labels, seed=seed))
    return gm, am, am.get(UnitGroupAnalysis(), gm)


def units_of(graph: UnitGraph, target: str) -> list[int]:
    return graph.layouts[target].units.tolist()


def set_linear(mod: nn.Linear, weight: list[list[float]], bias: list[float] | None) -> None:
    with torch.no_grad():
        mod.weight.copy_(torch.tensor(weight))
        if bias is not None:
            mod.bias.copy_(torch.tensor(bias))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 2)
        self.fc2 = nn.Linear(2, 2, bias=False)
        set_linear(self.fc1, [[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]], [1.0, -1.0])
        set_linear(self.fc2, [[2.0, 0.0], [0.0, -3.0]], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """fc1 and fc2 are coupled by the add; fc3 only consumes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 2)
        self.fc2 = nn.Linear(2, 2)
        self.fc3 = nn.Linear(2, 2)
        set_linear(self.fc1, [[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]], [1.0, -1.0])
        set_linear(self.fc2, [[3.0, 4.0], [0.0, -1.0]], [0.0, 2.0])
        set_linear(self.fc3, [[100.0, 100.0], [-100.0, 100.0]], [0.0, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc3(h + self.fc2(h))


# --------------------------------------------------------------------------------------------
# L1 / L2
# --------------------------------------------------------------------------------------------


def test_l1_and_l2_on_set_weights() -> None:
    gm, am, graph = setup(TinyMLP(), torch.randn(4, 3))
    l1, l2 = am.get(L1Importance(), gm), am.get(L2Importance(), gm)
    u1, u2 = units_of(graph, "fc1"), units_of(graph, "fc2")
    # fc1 rows with the bias appended: [1, -2, 3, 1] and [0.5, 0, -0.5, -1].
    np.testing.assert_allclose(l1[u1], [7.0, 2.0])
    np.testing.assert_allclose(l2[u1], [np.sqrt(15.0), np.sqrt(1.5)])
    # fc2 has no bias: only the weights count.
    np.testing.assert_allclose(l1[u2], [2.0, 3.0])
    np.testing.assert_allclose(l2[u2], [2.0, 3.0])
    assert l1.dtype == np.float64 and l1.shape == (graph.n_units,)


def test_coupled_units_sum_their_producers_norms_and_ignore_consumers() -> None:
    gm, am, graph = setup(ResidualMLP(), torch.randn(4, 3))
    u = units_of(graph, "fc1")
    assert units_of(graph, "fc2") == u  # coupled by the residual add
    l1, l2 = am.get(L1Importance(), gm), am.get(L2Importance(), gm)
    # fc1 rows: [1,-2,3 | 1], [.5,0,-.5 | -1]; fc2 rows: [3,4 | 0], [0,-1 | 2].
    np.testing.assert_allclose(l1[u], [7.0 + 7.0, 2.0 + 3.0])
    np.testing.assert_allclose(l2[u], [np.sqrt(15.0) + 5.0, np.sqrt(1.5) + np.sqrt(5.0)])
    # The sum of norms, not the norm of the concatenated rows.
    assert not np.isclose(l2[u[0]], np.sqrt(15.0 + 25.0))


def test_conv_filter_norm_covers_input_channels_kernel_and_bias() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 3, 2)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.c(x)).mean((2, 3)))

    model = Conv()
    with torch.no_grad():
        model.c.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 2, 2, 2) - 12)
        model.c.bias.copy_(torch.tensor([1.0, -2.0, 0.0]))
    gm, am, graph = setup(model, torch.randn(2, 2, 4, 4))
    w = model.c.weight.detach().double().reshape(3, -1)
    b = model.c.bias.detach().double()
    rows = torch.cat([w, b[:, None]], 1)
    u = units_of(graph, "c")
    np.testing.assert_allclose(am.get(L1Importance(), gm)[u], rows.abs().sum(1).numpy())
    np.testing.assert_allclose(am.get(L2Importance(), gm)[u], rows.pow(2).sum(1).sqrt().numpy())


def test_registry_names_the_criteria() -> None:
    assert {"l1", "l2", "random", "activation", "taylor"} <= set(criteria())
    assert isinstance(get_criterion("l2"), L2Importance)
    with pytest.raises(UsageError, match=r"unknown importance 'l3'; choose one of: .*l1.*l2"):
        get_criterion("l3")


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


def test_random_is_seeded() -> None:
    x = torch.randn(4, 3)
    scores = {}
    for seed in (0, 0, 1):
        gm, am, graph = setup(ResidualMLP(), x, seed=seed)
        scores.setdefault(seed, []).append(am.get(RandomImportance(), gm))
    np.testing.assert_array_equal(scores[0][0], scores[0][1])
    assert not np.array_equal(scores[0][0], scores[1][0])
    np.testing.assert_array_equal(scores[1][0], np.random.default_rng(1).random(graph.n_units))
    assert ((scores[1][0] >= 0) & (scores[1][0] < 1)).all()


# --------------------------------------------------------------------------------------------
# data requirements
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", [ActivationImportance, TaylorImportance])
def test_data_criteria_need_data(criterion: type) -> None:
    gm, am, _ = setup(TinyMLP(), torch.randn(4, 3))
    with pytest.raises(UsageError, match=rf"importance '{criterion.criterion}' needs calibration data: pass --data"):
        am.get(criterion(), gm)


def test_taylor_needs_labels_but_activation_does_not() -> None:
    x = torch.randn(8, 3)
    gm, am, graph = setup(TinyMLP(), x, data=x)
    with pytest.raises(UsageError, match="importance 'taylor' needs labelled data: give --data with labels"):
        am.get(TaylorImportance(), gm)
    assert am.get(ActivationImportance(), gm).shape == (graph.n_units,)


def test_data_free_criteria_need_no_data() -> None:
    gm, am, graph = setup(TinyMLP(), torch.randn(4, 3))
    for criterion in (L1Importance(), L2Importance(), RandomImportance()):
        assert am.get(criterion, gm).shape == (graph.n_units,)


# --------------------------------------------------------------------------------------------
# activation
# --------------------------------------------------------------------------------------------


class DeadUnitMLP(nn.Module):
    """fc1's unit 2 never fires (zero weights, negative bias through a ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc1.weight[2] = 0.0
            self.fc1.bias[2] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_activation_is_mean_abs_where_read_and_zero_for_a_dead_unit() -> None:
    model = DeadUnitMLP()
    x = torch.randn(300, 3)  # more than one internal batch of 256
    gm, am, graph = setup(model, x, data=x)
    scores = am.get(ActivationImportance(), gm)
    with torch.no_grad():
        hidden = torch.relu(model.fc1(x)).double()
        out = model.fc2(torch.relu(model.fc1(x))).double()
    u1, u2 = units_of(graph, "fc1"), units_of(graph, "fc2")
    np.testing.assert_allclose(scores[u1], hidden.abs().mean(0).numpy(), rtol=1e-6)
    assert scores[u1[2]] == 0.0
    assert (scores[[u for i, u in enumerate(u1) if i != 2]] > 0).all()
    # Output units are read by no layer: scored at their producer's output.
    np.testing.assert_allclose(scores[u2], out.abs().mean(0).numpy(), rtol=1e-6)


class TwoReaders(nn.Module):
    """c1's channels are read by c2 at full size and by c3 after a 2x2 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.c3 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = torch.nn.functional.max_pool2d(a, 2)
        y = self.c2(a).mean((2, 3)) + self.c3(b).mean((2, 3))
        return self.fc(y)


def test_activation_averages_over_positions_and_readers() -> None:
    model = TwoReaders()
    x = torch.randn(6, 2, 4, 4)
    gm, am, graph = setup(model, x, data=x)
    scores = am.get(ActivationImportance(), gm)
    with torch.no_grad():
        a = torch.relu(model.c1(x)).double()
        b = torch.nn.functional.max_pool2d(a, 2)
    expected = (a.abs().mean((0, 2, 3)) + b.abs().mean((0, 2, 3))) / 2
    np.testing.assert_allclose(scores[units_of(graph, "c1")], expected.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# taylor
# --------------------------------------------------------------------------------------------


def _taylor_terms(mod: nn.Linear, x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Per output row of ``mod``: sum of w * dL/dw over its weights and bias."""
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    t = (mod.weight * mod.weight.grad).sum(1)
    if mod.bias is not None:
        t = t + mod.bias * mod.bias.grad
    return t.detach().double()


def test_taylor_matches_hand_computation_and_zero_unit_scores_zero() -> None:
    torch.manual_seed(1)
    model = DeadUnitMLP()
    with torch.no_grad():
        model.fc1.bias[2] = 0.0  # all weights of unit 2 zero
    x = torch.randn(20, 3)
    y = torch.randint(0, 2, (20,))
    gm, am, graph = setup(model, x, data=x, labels=y)
    scores = am.get(TaylorImportance(), gm)
    reference = DeadUnitMLP()
    reference.load_state_dict(model.state_dict())
    t1 = _taylor_terms(reference.fc1, x, y, reference)
    t2 = _taylor_terms(reference.fc2, x, y, reference)
    u1, u2 = units_of(graph, "fc1"), units_of(graph, "fc2")
    np.testing.assert_allclose(scores[u1], (t1**2 / 20).numpy(), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(scores[u2], (t2**2 / 20).numpy(), rtol=1e-4, atol=1e-10)
    assert scores[u1[2]] == 0.0
    assert (scores[[u for i, u in enumerate(u1) if i != 2]] > 0).all()


def test_taylor_adds_coupled_terms_before_squaring() -> None:
    model = ResidualMLP()
    x = torch.randn(16, 3)
    y = torch.randint(0, 2, (16,))
    gm, am, graph = setup(model, x, data=x, labels=y)
    scores = am.get(TaylorImportance(), gm)
    reference = ResidualMLP()
    t1 = _taylor_terms(reference.fc1, x, y, reference)
    t2 = _taylor_terms(reference.fc2, x, y, reference)
    u = units_of(graph, "fc1")
    np.testing.assert_allclose(scores[u], ((t1 + t2) ** 2 / 16).numpy(), rtol=1e-4)
    assert not np.allclose(scores[u], ((t1**2 + t2**2) / 16).numpy(), rtol=1e-3)

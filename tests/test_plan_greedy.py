"""Unit tests for passes/plan_greedy.py: from scores to the kept-unit mask.

The rules under test (see the module docstring of ``plan_greedy``): with ``prune_ratio`` R each
prunable group drops ``floor(R * size)`` units, the lowest-scored ones (so the kept count rounds
up); with ``flops_budget`` F the pruned network keeps at most F of the MACs, checked here with the
independent cost counter on the network that ``apply_plan`` really rebuilds; ``min_keep``,
``round_to``, equal-count blocks and split-piece floors constrain the kept counts; ties break by
unit index.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import fx, nn

from oamipc.errors import OamipcError, PlanError
from oamipc.passes import PlanGreedyAnalysis, UnitGroupAnalysis, apply_plan, count_costs, select
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.plan import Plan
from oamipc.target import Target, TargetError
from oamipc.tracing import propagate_shapes, trace
from oamipc.units import UnitGraph

from .models import build, example_input


def analyse(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, UnitGraph]:
    gm = trace(model.eval(), (x,))
    return gm, AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)


def prunable(graph: UnitGraph):
    return [g for g in graph.groups if g.prunable]


def kept_count(kept: np.ndarray, group) -> int:
    return int(kept[group.units].sum())


def rng_scores(graph: UnitGraph, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(graph.n_units)


class Wide(nn.Module):
    """Three hidden groups of 10, 20 and 32 units, then 3 pinned outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 10)
        self.fc2 = nn.Linear(10, 20)
        self.fc3 = nn.Linear(20, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.out(torch.relu(self.fc3(x)))


@pytest.fixture(scope="module")
def wide() -> tuple[fx.GraphModule, UnitGraph]:
    return analyse(Wide(), torch.randn(2, 4))


# --------------------------------------------------------------------------------------------
# prune_ratio
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75, 0.99])
def test_ratio_drops_floor_of_ratio_times_size_per_group(wide, ratio: float) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=ratio, flops_budget=None))
    sizes = {g.name: g.size for g in prunable(graph)}
    assert sizes == {"fc1": 10, "fc2": 20, "fc3": 32}
    for g in prunable(graph):
        assert kept_count(kept, g) == g.size - math.floor(ratio * g.size), g.name
    out = next(g for g in graph.groups if not g.prunable)
    assert kept[out.units].all()


def test_ratio_rounding_keeps_more_not_fewer(wide) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.25, flops_budget=None))
    counts = {g.name: kept_count(kept, g) for g in prunable(graph)}
    # 0.25 * 10 = 2.5 -> drop 2 (keep 8); 0.25 * 20 = 5 -> keep 15; 0.25 * 32 = 8 -> keep 24.
    assert counts == {"fc1": 8, "fc2": 15, "fc3": 24}


def test_ratio_keeps_the_highest_scored_units(wide) -> None:
    _, graph = wide
    scores = rng_scores(graph, seed=3)
    kept = select(graph, scores, Target(prune_ratio=0.5, flops_budget=None))
    for g in prunable(graph):
        n = g.size - g.size // 2
        best = sorted(g.units, key=lambda u: -scores[u])[:n]
        assert sorted(np.array(g.units)[kept[g.units]].tolist()) == sorted(best), g.name


def test_ratio_zero_keeps_everything(wide) -> None:
    _, graph = wide
    assert select(graph, rng_scores(graph), Target(prune_ratio=0.0, flops_budget=None)).all()


# --------------------------------------------------------------------------------------------
# min_keep and round_to
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_keep", [1, 3, 12, 50])
def test_min_keep_is_honoured(wide, min_keep: int) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.99, flops_budget=None, min_keep=min_keep))
    for g in prunable(graph):
        ratio_count = g.size - math.floor(0.99 * g.size)  # 1 for every group here
        assert kept_count(kept, g) == min(g.size, max(min_keep, ratio_count)), g.name


def test_min_keep_only_raises_counts(wide) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.25, flops_budget=None, min_keep=12))
    counts = {g.name: kept_count(kept, g) for g in prunable(graph)}
    assert counts == {"fc1": 10, "fc2": 15, "fc3": 24}


def test_round_to_gives_multiples_where_width_allows(wide) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.5, flops_budget=None, round_to=8))
    counts = {g.name: kept_count(kept, g) for g in prunable(graph)}
    # Ratio asks 5/10/16 kept; rounding goes up to the next multiple of 8 (or the full width).
    assert counts == {"fc1": 8, "fc2": 16, "fc3": 16}
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.1, flops_budget=None, round_to=8))
    counts = {g.name: kept_count(kept, g) for g in prunable(graph)}
    # 9 of 10 -> no multiple of 8 in [9, 10) so the full width; 18 of 20 -> 20 (full); 29 of 32 -> 32.
    assert counts == {"fc1": 10, "fc2": 20, "fc3": 32}


def test_round_to_with_min_keep(wide) -> None:
    _, graph = wide
    kept = select(graph, rng_scores(graph), Target(prune_ratio=0.99, flops_budget=None, round_to=8, min_keep=9))
    counts = {g.name: kept_count(kept, g) for g in prunable(graph)}
    assert counts == {"fc1": 10, "fc2": 16, "fc3": 16}


# --------------------------------------------------------------------------------------------
# Equal-count blocks and split floors
# --------------------------------------------------------------------------------------------


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gconv(torch.relu(self.c1(x))))
        return self.fc(self.flat(self.pool(torch.relu(self.c3(x)))))


def test_grouped_conv_blocks_keep_equal_counts() -> None:
    x = torch.randn(2, 3, 5, 5)
    gm, graph = analyse(Grouped(), x)
    g = next(g for g in graph.groups if g.producers == ["gconv"])
    assert g.blocks is not None and [len(b) for b in g.blocks] == [4, 4]
    scores = np.zeros(graph.n_units)
    scores[g.blocks[0]] = [10, 11, 12, 13]  # every top-4 unit is in block 0
    scores[g.blocks[1]] = [1, 2, 3, 4]
    kept = select(graph, scores, Target(prune_ratio=0.5, flops_budget=None))
    assert [int(kept[b].sum()) for b in g.blocks] == [2, 2]
    assert kept[[g.blocks[0][2], g.blocks[0][3], g.blocks[1][2], g.blocks[1][3]]].all()
    # min_keep over blocks: 3 units -> 2 per block.
    kept = select(graph, scores, Target(prune_ratio=0.99, flops_budget=None, min_keep=3))
    assert [int(kept[b].sum()) for b in g.blocks] == [2, 2]
    pruned = copy.deepcopy(gm)
    apply_plan(pruned, graph, kept)
    propagate_shapes(pruned, (x,))
    gconv = pruned.get_submodule("gconv")
    assert (gconv.out_channels, gconv.groups) == (4, 2)
    assert pruned(x).shape == (2, 3)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.ca = nn.Conv2d(2, 4, 1)
        self.cb = nn.Conv2d(6, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(torch.relu(self.c0(x)), [2, 6], dim=1)
        y = torch.relu(self.ca(a) + self.cb(b))
        return self.fc(self.flat(self.pool(y)))


def test_split_pieces_never_empty() -> None:
    x = torch.randn(2, 3, 5, 5)
    gm, graph = analyse(Split(), x)
    c0 = next(g for g in graph.groups if g.producers == ["c0"])
    piece_a, piece_b = c0.units[:2], c0.units[2:]
    assert sorted(map(sorted, (f.tolist() for f in graph.floors))) == sorted([piece_a, piece_b])
    scores = np.zeros(graph.n_units)
    scores[c0.units] = [0.2, 0.1, 5, 6, 7, 8, 9, 10]  # piece a holds the two worst units
    kept = select(graph, scores, Target(prune_ratio=0.75, flops_budget=None))
    # 8 - 6 = 2 kept: the best of piece a (forced) and the best overall (in piece b).
    assert np.array(c0.units)[kept[c0.units]].tolist() == [piece_a[0], piece_b[-1]]
    # Even a ratio that asks for one unit keeps one per piece.
    kept = select(graph, scores, Target(prune_ratio=0.99, flops_budget=None))
    assert kept[piece_a].sum() == 1 and kept[piece_b].sum() == 1
    pruned = copy.deepcopy(gm)
    apply_plan(pruned, graph, kept)
    propagate_shapes(pruned, (x,))
    assert pruned.get_submodule("ca").in_channels == 1 and pruned.get_submodule("cb").in_channels == 1
    assert pruned(x).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# flops_budget
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> tuple[fx.GraphModule, UnitGraph, torch.Tensor]:
    x = example_input("resnet", batch=2)
    gm, graph = analyse(build("resnet"), x)
    return gm, graph, x


def _pruned_macs(gm: fx.GraphModule, graph: UnitGraph, kept: np.ndarray, x: torch.Tensor) -> int:
    pruned = copy.deepcopy(gm)
    apply_plan(pruned, graph, kept)
    propagate_shapes(pruned, (x,))
    return count_costs(pruned).macs


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_flops_budget_is_met_on_the_rebuilt_network(resnet, budget: float) -> None:
    gm, graph, x = resnet
    total = count_costs(gm).macs
    assert graph.macs() == total
    kept = select(graph, rng_scores(graph), Target(prune_ratio=None, flops_budget=budget))
    macs = _pruned_macs(gm, graph, kept, x)
    assert macs <= budget * total
    assert macs == graph.macs(kept)
    # Greedy, one step at a time: not far below the budget either.
    assert macs > 0.5 * budget * total
    for g in graph.groups:
        assert kept_count(kept, g) >= 1


def test_flops_budget_one_keeps_everything(resnet) -> None:
    _, graph, _ = resnet
    assert select(graph, rng_scores(graph), Target(prune_ratio=None, flops_budget=1.0)).all()


def test_flops_budget_respects_min_keep_and_round_to(resnet) -> None:
    gm, graph, x = resnet
    total = count_costs(gm).macs
    kept = select(graph, rng_scores(graph), Target(prune_ratio=None, flops_budget=0.4, min_keep=4, round_to=4))
    assert _pruned_macs(gm, graph, kept, x) <= 0.4 * total
    for g in prunable(graph):
        n = kept_count(kept, g)
        assert n >= 4 and (n % 4 == 0 or n == g.size), (g.name, n)


def test_flops_budget_unreachable_is_a_plan_error(resnet) -> None:
    _, graph, _ = resnet
    with pytest.raises(PlanError, match="unreachable"):
        select(graph, rng_scores(graph), Target(prune_ratio=None, flops_budget=1e-6))


def test_flops_budget_removes_low_scores_first() -> None:
    """Two identical layers: the budget is met by removing from the one whose scores are low."""
    x = torch.randn(2, 4)
    _, graph = analyse(Wide(), x)
    scores = np.ones(graph.n_units)
    fc2 = next(g for g in graph.groups if g.name == "fc2")
    fc2_units = np.array(fc2.units)
    scores[fc2_units[:10]] = 0.01  # ten clearly useless units in fc2
    total = graph.macs()
    kept = select(graph, scores, Target(prune_ratio=None, flops_budget=(total - 1) / total))
    removed = np.nonzero(~kept)[0].tolist()
    assert removed and set(removed) <= set(fc2_units[:10].tolist())


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prune_ratio": None, "flops_budget": None},
     "say how much to remove: give flops_budget, latency_budget or prune_ratio"),
    ({"prune_ratio": 0.5, "flops_budget": 0.5},
     "give one of prune_ratio, flops_budget and latency_budget, not several"),
    ({"prune_ratio": -0.1, "flops_budget": None}, r"prune_ratio must be in \[0, 1\), got -0.1"),
    ({"prune_ratio": 1.0, "flops_budget": None}, r"prune_ratio must be in \[0, 1\), got 1"),
    ({"prune_ratio": 1.5, "flops_budget": None}, r"prune_ratio must be in \[0, 1\)"),
    ({"prune_ratio": float("nan"), "flops_budget": None}, r"prune_ratio must be in \[0, 1\)"),
    ({"prune_ratio": None, "flops_budget": 0.0}, r"flops_budget must be in \(0, 1\], got 0"),
    ({"prune_ratio": None, "flops_budget": -0.5}, r"flops_budget must be in \(0, 1\]"),
    ({"prune_ratio": None, "flops_budget": 1.01}, r"flops_budget must be in \(0, 1\], got 1.01"),
    ({"prune_ratio": 0.5, "flops_budget": None, "min_keep": 0}, "min_keep must be at least 1, got 0"),
    ({"prune_ratio": 0.5, "flops_budget": None, "round_to": 0}, "round_to must be at least 1, got 0"),
])
def test_bad_targets_raise_usage_errors_named_for_each_front_end(wide, kwargs: dict, message: str) -> None:
    """A target is validated once, when it is made; the Python API names fields, the CLI flags."""
    _, graph = wide
    with pytest.raises(TargetError, match=message) as info:
        select(graph, rng_scores(graph), Target(**kwargs).require())
    assert isinstance(info.value, OamipcError) and info.value.exit_code == 2
    assert "--" + info.value.field.replace("_", "-") in str(info.value.spelled("cli"))


# --------------------------------------------------------------------------------------------
# Determinism and ties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [{"prune_ratio": 0.5, "flops_budget": None},
                                    {"prune_ratio": None, "flops_budget": 0.5}])
def test_same_inputs_same_plan(resnet, target: dict) -> None:
    _, graph, _ = resnet
    scores = rng_scores(graph, seed=7)
    a = select(graph, scores.copy(), Target(**target))
    b = select(graph, scores.copy(), Target(**target))
    np.testing.assert_array_equal(a, b)
    assert not a.all()


def test_ties_break_by_lower_unit_index(wide) -> None:
    _, graph = wide
    kept = select(graph, np.ones(graph.n_units), Target(prune_ratio=0.5, flops_budget=None))
    for g in prunable(graph):
        n = g.size - g.size // 2
        assert np.array(g.units)[kept[g.units]].tolist() == g.units[:n], g.name


def test_partial_ties_break_by_index_among_equals(wide) -> None:
    _, graph = wide
    g = next(g for g in graph.groups if g.name == "fc1")
    scores = np.zeros(graph.n_units)
    scores[g.units] = [1, 5, 1, 5, 1, 1, 5, 1, 1, 1]  # three 5s, seven 1s
    kept = select(graph, scores, Target(prune_ratio=0.5, flops_budget=None))
    u = g.units
    assert np.array(u)[kept[u]].tolist() == [u[0], u[1], u[2], u[3], u[6]]


def test_budget_ties_are_deterministic_with_equal_scores(resnet) -> None:
    _, graph, _ = resnet
    flat = np.ones(graph.n_units)
    runs = [select(graph, flat, Target(prune_ratio=None, flops_budget=0.5)) for _ in range(3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    for g in prunable(graph):  # within a group, the lower indices survive
        n = kept_count(runs[0], g)
        assert np.array(g.units)[runs[0][g.units]].tolist() == g.units[:n]


# --------------------------------------------------------------------------------------------
# The analysis wrapper
# --------------------------------------------------------------------------------------------


def test_greedy_planner_builds_a_plan_matching_select() -> None:
    x = torch.randn(2, 4)
    gm = trace(Wide().eval(), (x,))
    am = AnalysisManager(CompileContext((x,)))
    planned = am.get(PlanGreedyAnalysis(importance="l2", target=Target(prune_ratio=0.5, round_to=4)), gm)
    plan = planned.plan
    assert isinstance(plan, Plan) and plan.criterion == "l2"
    assert plan.settings["prune_ratio"] == 0.5 and plan.settings["round_to"] == 4
    widths = plan.widths()
    assert widths == {"fc1": (10, 8), "fc2": (20, 12), "fc3": (32, 16), "out": (3, 3)}
    assert set(planned.scores) == {"fc1", "fc2", "fc3"}
    assert planned.record is None  # the greedy planner has nothing of its own to report


def test_plan_that_empties_a_group_is_a_plan_error(wide) -> None:
    """Regression: a replayed plan keeping no unit of a group built a layer of width 0.

    A Linear of width 0 silently turned the next layer into its bias (a conv of width 0 failed
    with a misleading shape error); the plan is now refused, naming the group.
    """
    _, graph = wide
    g = prunable(graph)[1]
    plan = Plan.from_mask(graph, graph.all_kept(), "test")
    next(gp for gp in plan.groups if gp.key == g.key).kept = []
    with pytest.raises(PlanError, match=rf"keeps no unit of group '{g.name}'.*--min-keep"):
        plan.kept_mask(graph)


def test_plan_with_unequal_blocks_is_a_plan_error() -> None:
    """Regression: a plan keeping 3 + 4 channels of a groups=2 conv crashed with torch's ValueError."""
    x = torch.randn(2, 3, 5, 5)
    _, graph = analyse(Grouped(), x)
    g = next(g for g in graph.groups if g.producers == ["gconv"])
    kept = graph.all_kept()
    kept[g.blocks[0][0]] = False
    with pytest.raises(PlanError, match=r"keeps \[3, 4\] units in the 2 equal-count blocks of group 'gconv'"):
        Plan.from_mask(graph, kept, "test").kept_mask(graph)
    kept[g.blocks[1][0]] = False  # equal counts again: accepted
    assert (Plan.from_mask(graph, kept, "test").kept_mask(graph) == kept).all()

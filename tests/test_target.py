"""The target is one value, validated once where it enters, spelled for each front end."""

from __future__ import annotations

import math

import pytest
import torch

import oamipc
from oamipc.errors import UsageError
from oamipc.target import Target, TargetError

from .models import ZOO, example_input


def test_kind_and_validation() -> None:
    assert Target(prune_ratio=0.5).kind == "ratio" and Target(flops_budget=0.5).kind == "macs"
    assert not Target().is_set
    with pytest.raises(TargetError, match="say how much to remove"):
        Target().require()
    with pytest.raises(TargetError) as info:
        Target(flops_budget=2.0)
    assert info.value.field == "flops_budget"
    assert str(info.value) == "flops_budget must be in (0, 1], got 2"
    assert str(info.value.spelled("cli")) == "--flops-budget must be in (0, 1], got 2"
    assert str(info.value.spelled("pipeline")) == "flops-budget must be in (0, 1], got 2"


def test_compile_takes_the_target_as_one_value_or_as_keywords_but_not_both() -> None:
    model = ZOO["mlp"].factory()
    x = example_input("mlp", batch=1)
    a = oamipc.compile(model, x, importance="l2", target=Target(prune_ratio=0.5, round_to=2))
    b = oamipc.compile(model, x, importance="l2", prune_ratio=0.5, round_to=2)
    assert a.plan is not None and a.plan.groups == b.plan.groups  # type: ignore[union-attr]
    assert a.report["settings"]["round_to"] == 2
    with pytest.raises(UsageError, match="not both"):
        oamipc.compile(model, x, target=Target(prune_ratio=0.5), flops_budget=0.5)
    with pytest.raises(TargetError, match=r"^prune_ratio must be in \[0, 1\), got 1.5$"):  # the API's spelling
        oamipc.compile(model, torch.zeros_like(x), prune_ratio=1.5)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_round_to_auto_aligns_conv_widths_keeps_the_budget_and_spends_it(budget: float) -> None:
    """``round_to="auto"``: convolutions whose width is a multiple of the channel block keep a
    multiple of it, Linear layers are not rounded, the MAC budget holds, and no rounded step that
    would still fit is left unspent."""
    from oamipc.models import SmallVGG
    from oamipc.passes import UnitGroupAnalysis, count_costs
    from oamipc.passmanager import AnalysisManager, CompileContext
    from oamipc.target import granularity

    torch.manual_seed(0)
    model = SmallVGG(widths=(16, 32, 64), image_size=28, hidden=96).eval()
    x = torch.zeros(1, 1, 28, 28)
    target = Target(flops_budget=budget, round_to="auto", channel_block=8)
    result = oamipc.compile(model, x, importance="l1", target=target)
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), result.original)
    steps = granularity(target, graph)
    by_producer = {p: g for g in graph.groups for p in g.producers}
    assert steps[by_producer["head.1"].id] == 1  # a Linear group: GEMM kernels have no channel block
    for name, w in result.report["widths"].items():
        if name.startswith("features") and name != "features.17":  # the last conv: no conv reads it
            assert w["after"] % 8 == 0, (name, w)
    assert steps[by_producer["features.17"].id] == 1
    before, after = result.report["before"]["macs"], result.report["after"]["macs"]
    assert after <= budget * before and count_costs(result.module).macs == after
    kept = result.plan.kept_mask(graph)  # type: ignore[union-attr]
    for g in graph.groups:  # spent: one more rounded step of any conv group would break the budget
        missing = [u for u in g.units if not kept[u]]
        if steps[g.id] > 1 and len(missing) >= steps[g.id]:
            more = kept.copy()
            more[missing[: steps[g.id]]] = True
            assert graph.macs(more) > budget * before, g.name


def test_round_to_auto_probes_this_machine_when_no_block_is_given() -> None:
    from oamipc.hardware import cpu_channel_block
    from oamipc.target import granularity

    model = ZOO["lenet5"].factory()
    x = example_input("lenet5", batch=1)
    gm = oamipc.compile(model, x, importance="l1", prune_ratio=0.0).original
    from oamipc.passes import UnitGroupAnalysis
    from oamipc.passmanager import AnalysisManager, CompileContext

    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    steps = granularity(Target(flops_budget=0.5, round_to="auto"), graph)
    block = cpu_channel_block()
    assert set(steps.values()) <= {1, block}
    assert granularity(Target(flops_budget=0.5, round_to=4), graph) == {g.id: 4 for g in graph.groups}


class _Widths(torch.nn.Module):
    """Conv widths of every kind ``auto`` tells apart: 6 (never aligned), 24 (aligned to 4, not to a
    block of 16), 24 depthwise, 32 (two blocks), 16 (one block), 32 read by no convolution, then
    a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(6, 24, 3, padding=1)
        self.dw = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.c = torch.nn.Conv2d(24, 32, 1)
        self.d = torch.nn.Conv2d(32, 16, 3, padding=1)
        self.e = torch.nn.Conv2d(16, 32, 1)
        self.fc = torch.nn.Linear(32, 40)
        self.out = torch.nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = torch.relu(self.d(torch.relu(self.c(torch.relu(self.dw(x))))))
        x = torch.relu(self.e(x))
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


def _widths_graph():
    from oamipc.passes import UnitGroupAnalysis
    from oamipc.passmanager import AnalysisManager, CompileContext
    from oamipc.tracing import trace

    x = torch.zeros(1, 3, 8, 8)
    gm = trace(_Widths().eval(), (x,))
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    return {p: g for g in graph.groups for p in g.producers}, graph


def test_auto_steps_follow_the_probed_kernel_rules() -> None:
    """Block multiples keep the block, other aligned conv widths keep the kernels' alignment
    (depthwise included), unaligned conv widths and Linear layers are not rounded, and a prune
    ratio is never rounded by ``auto``."""
    from oamipc.target import conv_paths_for, granularity

    by, graph = _widths_graph()
    target = Target(flops_budget=0.5, channel_block=16)
    paths = conv_paths_for(target)
    steps = granularity(target, graph)
    align24 = math.lcm(paths.in_align, paths.depthwise_align)
    assert steps[by["a"].id] == 1
    assert steps[by["b"].id] == (align24 if 24 % align24 == 0 else 1)  # b and dw write one group
    assert steps[by["c"].id] == 16  # two blocks
    assert steps[by["d"].id] == paths.in_align  # one block: with the block it could only stay whole
    assert steps[by["e"].id] == 1  # read by no convolution: any width keeps the kernels fast
    assert steps[by["fc"].id] == 1
    assert set(granularity(Target(prune_ratio=0.5), graph).values()) == {1}


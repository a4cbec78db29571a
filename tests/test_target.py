"""The target is one value, validated once where it enters, spelled for each front end."""

from __future__ import annotations

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
        if name.startswith("features"):
            assert w["after"] % 8 == 0, (name, w)
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

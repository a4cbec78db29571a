"""Unit tests for oamipc/passmanager.py (analysis caching, invalidation, pass running) and
oamipc/pipeline.py (the pipeline-string parser)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import oamipc.passes  # noqa: F401 - registers the pass library
from oamipc.errors import PlanError, UsageError
from oamipc.passes import CostAnalysis, L1Importance, MipOptions, PlanMipAnalysis, PruneUnitsPass, UnitGroupAnalysis
from oamipc.passmanager import (
    Analysis,
    AnalysisManager,
    CompileContext,
    Pass,
    PassManager,
    PassResult,
    options_of,
    register,
    registry,
)
from oamipc.pipeline import parse_pipeline
from oamipc.target import Target
from oamipc.tracing import trace

CALLS: Counter[str] = Counter()


@dataclass(frozen=True)
class CountingAnalysis(Analysis[int]):
    """Counts its runs per option value; the result is the number of graph nodes."""

    name: ClassVar[str] = "test-counting"
    tag: str = "a"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> int:
        CALLS[self.tag] += 1
        return len(gm.graph.nodes)


@dataclass(frozen=True)
class OtherAnalysis(Analysis[int]):
    name: ClassVar[str] = "test-other"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> int:
        CALLS["other"] += 1
        return 0


@dataclass(frozen=True)
class DependentAnalysis(Analysis[int]):
    """Asks the manager for another analysis: it must be served from the cache."""

    name: ClassVar[str] = "test-dependent"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> int:
        CALLS["dependent"] += 1
        return am.get(CountingAnalysis(), gm) + 1


@dataclass(frozen=True)
class AddReluPass(Pass):
    """Appends a ReLU before the output: changes the graph."""

    name: ClassVar[str] = "test-add-relu"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            relu = gm.graph.call_function(torch.relu, (out.args[0],))
        out.args = (relu,)
        gm.recompile()
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class PreservingPass(AddReluPass):
    name: ClassVar[str] = "test-preserving"
    preserves: ClassVar[tuple[type[Analysis], ...]] = (CountingAnalysis,)


@dataclass(frozen=True)
class NoOpPass(Pass):
    name: ClassVar[str] = "test-noop"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class FailingPass(Pass):
    name: ClassVar[str] = "test-failing"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        raise PlanError("it broke")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def setup() -> tuple[fx.GraphModule, AnalysisManager]:
    CALLS.clear()
    x = torch.randn(2, 4)
    return trace(Net().eval(), (x,)), AnalysisManager(CompileContext((x,)))


# --------------------------------------------------------------------------------------------
# AnalysisManager
# --------------------------------------------------------------------------------------------


def test_analysis_is_computed_once_when_asked_twice(setup) -> None:
    gm, am = setup
    first = am.get(CountingAnalysis(), gm)
    second = am.get(CountingAnalysis(), gm)
    assert first == second == len(gm.graph.nodes)
    assert CALLS["a"] == 1
    assert am.cached(CountingAnalysis()) == first
    assert "test-counting" in am.timings


def test_equal_options_share_a_cache_entry_and_different_ones_do_not(setup) -> None:
    gm, am = setup
    am.get(CountingAnalysis("a"), gm)
    am.get(CountingAnalysis("b"), gm)
    am.get(CountingAnalysis("a"), gm)
    assert CALLS == Counter({"a": 1, "b": 1})


def test_dependency_is_served_from_the_cache(setup) -> None:
    gm, am = setup
    am.get(CountingAnalysis(), gm)
    assert am.get(DependentAnalysis(), gm) == len(gm.graph.nodes) + 1
    am.get(DependentAnalysis(), gm)
    assert CALLS == Counter({"a": 1, "dependent": 1})


def test_real_analyses_are_cached_by_value(setup) -> None:
    gm, am = setup
    a = am.get(UnitGroupAnalysis(), gm)
    assert am.get(UnitGroupAnalysis(), gm) is a
    assert am.get(UnitGroupAnalysis(("fc1",)), gm) is not a
    s = am.get(L1Importance(), gm)
    assert am.get(L1Importance(), gm) is s


def test_invalidate_drops_everything_not_preserved(setup) -> None:
    gm, am = setup
    am.get(CountingAnalysis(), gm)
    am.get(OtherAnalysis(), gm)
    am.invalidate(preserved=(CountingAnalysis,))
    assert am.cached(CountingAnalysis()) is not None
    assert am.cached(OtherAnalysis()) is None
    am.invalidate()
    assert am.cached(CountingAnalysis()) is None


# --------------------------------------------------------------------------------------------
# PassManager
# --------------------------------------------------------------------------------------------


def test_modifying_pass_invalidates_cached_analyses(setup) -> None:
    gm, am = setup
    before = am.get(CountingAnalysis(), gm)
    am.get(OtherAnalysis(), gm)
    gm = PassManager([AddReluPass()]).run(gm, am)
    assert am.cached(CountingAnalysis()) is None and am.cached(OtherAnalysis()) is None
    after = am.get(CountingAnalysis(), gm)
    assert after == before + 1, "recomputed on the changed graph"
    assert CALLS["a"] == 2


def test_pass_that_changes_nothing_keeps_the_cache(setup) -> None:
    gm, am = setup
    am.get(CountingAnalysis(), gm)
    PassManager([NoOpPass()]).run(gm, am)
    am.get(CountingAnalysis(), gm)
    assert CALLS["a"] == 1


def test_preserved_analyses_survive_a_modifying_pass(setup) -> None:
    gm, am = setup
    before = am.get(CountingAnalysis(), gm)
    am.get(OtherAnalysis(), gm)
    PassManager([PreservingPass()]).run(gm, am)
    assert am.get(CountingAnalysis(), gm) == before  # served from the cache: the pass vouched for it
    assert CALLS["a"] == 1
    assert am.cached(OtherAnalysis()) is None
    am.get(OtherAnalysis(), gm)
    assert CALLS["other"] == 2


def test_analysis_steps_in_a_pipeline_are_computed_and_cached(setup) -> None:
    gm, am = setup
    PassManager([CountingAnalysis(), CountingAnalysis(), AddReluPass(), CountingAnalysis()]).run(gm, am)
    assert CALLS["a"] == 2


def test_verify_repropagates_shapes_after_a_modifying_pass(setup) -> None:
    gm, am = setup
    fc1_shape = next(n for n in gm.graph.nodes if n.name == "fc1").meta["tensor_meta"].shape
    assert tuple(fc1_shape) == (2, 8)
    manager = PassManager([PruneUnitsPass(target=Target(prune_ratio=0.5))])
    gm = manager.run(gm, am)
    node = next(n for n in gm.graph.nodes if n.name == "fc1")
    assert tuple(node.meta["tensor_meta"].shape) == (2, 4)
    assert am.get(CostAnalysis(), gm).layers["fc1"]["out"] == 4
    [(name, outcome)] = manager.outcomes
    assert name == "prune-units" and outcome.units_removed == 4


def test_error_in_a_pass_names_it_and_what_ran_before(setup) -> None:
    gm, am = setup
    with pytest.raises(PlanError, match=r"^pass test-failing \(after: test-noop, test-counting\): it broke$"):
        PassManager([NoOpPass(), CountingAnalysis(), FailingPass()]).run(gm, am)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_holds_the_pass_library() -> None:
    known = registry()
    assert known["prune-units"] is PruneUnitsPass
    assert known["unit-groups"] is UnitGroupAnalysis
    assert known["costs"] is CostAnalysis


def test_register_rejects_nameless_and_duplicate_names() -> None:
    @dataclass(frozen=True)
    class Nameless(Analysis[int]):
        def run(self, gm: fx.GraphModule, am: AnalysisManager) -> int:
            return 0

    with pytest.raises(TypeError, match="non-empty class attribute `name`"):
        register(Nameless)

    @dataclass(frozen=True)
    class Impostor(Analysis[int]):
        name: ClassVar[str] = "prune-units"

        def run(self, gm: fx.GraphModule, am: AnalysisManager) -> int:
            return 0

    with pytest.raises(TypeError, match="two passes are registered as 'prune-units'"):
        register(Impostor)
    assert registry()["prune-units"] is PruneUnitsPass
    assert register(PruneUnitsPass) is PruneUnitsPass  # re-registering the same class is fine


# --------------------------------------------------------------------------------------------
# parse_pipeline
# --------------------------------------------------------------------------------------------


def test_parse_pipeline_with_options() -> None:
    steps = parse_pipeline("prune-units{importance=l2,prune-ratio=0.5},costs")
    assert steps == [PruneUnitsPass(importance="l2", target=Target(prune_ratio=0.5)), CostAnalysis()]
    assert type(steps[0].target.prune_ratio) is float


def test_parse_pipeline_converts_every_field_type() -> None:
    [step] = parse_pipeline(" prune-units { flops-budget = 0.25 , min-keep=3, round_to=8, "
                            "leaf-modules=layer1;layer2.0, prune-ratio=none } ")
    assert step == PruneUnitsPass(target=Target(flops_budget=0.25, min_keep=3, round_to=8),
                                  leaf_modules=("layer1", "layer2.0"))
    assert type(step.target.min_keep) is int


def test_parse_pipeline_accepts_bare_names_and_empty_braces() -> None:
    assert parse_pipeline("unit-groups,costs{}") == [UnitGroupAnalysis(), CostAnalysis()]


def test_unknown_pass_lists_known_names() -> None:
    with pytest.raises(UsageError, match="unknown pass 'prune-unit' in pipeline; known passes: ") as info:
        parse_pipeline("costs,prune-unit{prune-ratio=0.5}")
    message = str(info.value)
    for name in ("prune-units", "unit-groups", "costs", "plan-greedy", "plan-mip", "importance-l1"):
        assert name in message


def test_unknown_option_lists_the_pass_options() -> None:
    with pytest.raises(UsageError, match=r"pass 'prune-units' has no option 'ratio'; its options: ") as info:
        parse_pipeline("prune-units{ratio=0.5}")
    for option in ("importance", "prune-ratio", "flops-budget", "min-keep", "round-to", "leaf-modules"):
        assert option in str(info.value)
    with pytest.raises(UsageError, match="pass 'costs' has no option 'x'; its options: none"):
        parse_pipeline("costs{x=1}")


def test_option_without_value_is_rejected() -> None:
    with pytest.raises(UsageError, match="has no option 'importance'"):
        parse_pipeline("prune-units{importance}")


@pytest.mark.parametrize(("text", "message"), [
    ("prune-units{prune-ratio=half}", r"pipeline option prune-units.prune-ratio='half' is not a valid float"),
    ("prune-units{min-keep=1.5}", r"pipeline option prune-units.min-keep='1.5' is not a valid int"),
    ("prune-units{round-to=}", r"round-to must be a positive integer or 'auto', got ''"),
    ("prune-units{plan=x.json}", r"pipeline option prune-units.plan cannot be set from a pipeline string"),
])
def test_bad_option_values_are_rejected(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_pipeline(text)


@pytest.mark.parametrize("text", [
    "prune-units{importance=l2",
    "prune-units}",
    "prune-units{a={b}}",
    "costs,,unit-groups",
    "costs unit-groups",
    "prune units",
    "costs;unit-groups",
])
def test_malformed_pipelines_are_rejected(text: str) -> None:
    with pytest.raises(UsageError, match="cannot parse pipeline at .*expected name or name"):
        parse_pipeline(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_pipeline_is_rejected(text: str) -> None:
    with pytest.raises(UsageError, match="empty pipeline; known passes: .*prune-units"):
        parse_pipeline(text)


def test_options_of_lists_dataclass_fields() -> None:
    assert list(options_of(CountingAnalysis)) == ["tag"]
    assert options_of(int) == {}


def test_targets_are_validated_when_the_pipeline_is_parsed() -> None:
    """A target is checked once, where it enters, and the message spells options as the string does."""
    with pytest.raises(UsageError, match=r"^pass 'prune-units': prune-ratio must be in \[0, 1\), got 1.5$"):
        parse_pipeline("prune-units{prune-ratio=1.5}")
    with pytest.raises(UsageError, match=r"^pass 'plan-mip': MIP formulation 'magic' is unknown"):
        parse_pipeline("plan-mip{formulation=magic}")


def test_the_mip_planner_and_its_options_are_nameable_in_a_pipeline() -> None:
    plan_mip, prune = parse_pipeline("plan-mip{solver=highs,time-limit=7.5,flops-budget=0.4,layer-nodes=50},"
                                     "prune-units")
    assert isinstance(plan_mip, PlanMipAnalysis) and isinstance(prune, PruneUnitsPass)
    assert plan_mip.target == Target(flops_budget=0.4)
    assert plan_mip.options == MipOptions(time_limit=7.5, layer_nodes=50)
    assert prune.importance is None and not prune.target.is_set  # it applies the planner's plan
    # Options are the cache key: other options, another analysis.
    assert plan_mip != parse_pipeline("plan-mip{time-limit=8,flops-budget=0.4,layer-nodes=50}")[0]


def test_prune_units_applies_the_plan_of_the_planner_before_it(setup) -> None:
    gm, am = setup
    manager = PassManager(parse_pipeline("plan-greedy{importance=l2,prune-ratio=0.5},prune-units"))
    gm = manager.run(gm, am)
    [(_, outcome)] = manager.outcomes
    assert outcome.plan.criterion == "l2" and outcome.units_removed == 4
    assert outcome.planned is not None and outcome.planned.plan is outcome.plan


def test_prune_units_without_a_plan_says_how_to_give_one(setup) -> None:
    gm, am = setup
    with pytest.raises(UsageError, match="prune-units has no plan: give it a target"):
        PassManager(parse_pipeline("prune-units")).run(gm, am)


def test_costs_after_pruning_come_from_the_pruned_graph_even_without_verification() -> None:
    """Regression: with ``verify=False`` the report counted each layer with its new input width and
    its old output width (stale shape metadata): LeNet-5 (5x5 convs, ``view(-1, 256)``) at a 0.5
    MAC budget reported 0.766 of the MACs for a network that has 0.498."""
    import copy

    import oamipc
    from oamipc.passes import count_costs
    from oamipc.tracing import propagate_shapes

    model = oamipc.load_model(Path(__file__).resolve().parent.parent / "examples" / "fashion_lenet5.pt")
    x = torch.zeros(1, 1, 28, 28)
    for verify in (True, False):
        result = oamipc.compile(model, x, importance="l1", flops_budget=0.5, verify=verify)
        fresh = copy.deepcopy(result.module)
        propagate_shapes(fresh, (x,))
        assert result.report["after"]["macs"] == count_costs(fresh).macs  # the oracle: shapes from scratch
        assert result.report["after"]["macs"] <= 0.5 * result.report["before"]["macs"]
        assert result.report["prune"]["predicted_macs_after"] == result.report["after"]["macs"]

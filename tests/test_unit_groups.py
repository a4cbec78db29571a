"""Unit tests for passes/unit_groups.py: which channels are units, how they couple, what is pinned.

Every structural claim is checked twice where it matters: on the analysis result (layouts, groups,
pinned reasons, barriers) and on the network that ``apply_plan`` rebuilds from it, against a torch
reference (the original network with the removed units' weights zeroed, or hand-sliced weights).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import fx, nn

from oamipc.passes import UnitGroupAnalysis, apply_plan, select
from oamipc.passes.unit_groups import OUTPUT_REASON
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.target import Target
from oamipc.tracing import propagate_shapes, trace
from oamipc.units import UnitGraph

from .models import Asserts


def analyse(model: nn.Module, x: torch.Tensor, leaf_modules: tuple[str, ...] = ()) -> tuple[fx.GraphModule, UnitGraph]:
    gm = trace(model.eval(), (x,), leaf_modules=leaf_modules)
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(leaf_modules), gm)
    return gm, graph


def layer(graph: UnitGraph, target: str):
    return next(lay for lay in graph.layers if lay.target == target)


def group_of(graph: UnitGraph, producer: str):
    return next(g for g in graph.groups if producer in g.producers)


def prune(gm: fx.GraphModule, graph: UnitGraph, x: torch.Tensor, removed: list[int]) -> fx.GraphModule:
    """A pruned deep copy of ``gm`` with ``removed`` units gone (shapes re-propagated)."""
    pruned = copy.deepcopy(gm)
    kept = graph.all_kept()
    kept[removed] = False
    apply_plan(pruned, graph, kept)
    propagate_shapes(pruned, (x,))
    return pruned


def zero_rows(mod: nn.Module, rows: list[int]) -> None:
    with torch.no_grad():
        mod.weight[rows] = 0.0
        if mod.bias is not None:
            mod.bias[rows] = 0.0


# --------------------------------------------------------------------------------------------
# Depthwise detection
# --------------------------------------------------------------------------------------------


class OneChannelThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 1, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, padding=1)  # groups == in_channels == 1: an ordinary conv
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))))


def test_conv_after_single_channel_conv_is_not_depthwise() -> None:
    x = torch.randn(2, 3, 6, 6)
    gm, graph = analyse(OneChannelThenConv(), x)
    c1_unit = graph.layouts["c1"].units.tolist()
    c2_units = graph.layouts["c2"].units.tolist()
    assert layer(graph, "c2").kind == "conv"
    assert len(set(c2_units)) == 4, "c2's four channels must be four distinct units"
    assert not set(c2_units) & set(c1_unit), "c2's outputs must not be c1's unit repeated"
    assert group_of(graph, "c2").producers == ["c2"]
    assert group_of(graph, "c2").size == 4
    assert group_of(graph, "c1").size == 1
    # c2 is a producer of its own: removing one of its channels is possible and exact.
    pruned = prune(gm, graph, x, [c2_units[1]])
    assert pruned.get_submodule("c2").out_channels == 3
    assert pruned.get_submodule("c2").in_channels == 1
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c2"), [1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # depthwise, channel multiplier 2
        self.pw = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        return self.fc(self.flat(self.pool(torch.relu(self.pw(x)))))


def test_depthwise_conv_shares_its_producers_units() -> None:
    x = torch.randn(2, 3, 6, 6)
    gm, graph = analyse(Depthwise(), x)
    c1 = graph.layouts["c1"].units
    assert layer(graph, "dw").kind == "depthwise"
    np.testing.assert_array_equal(graph.layouts["dw"].units, np.repeat(c1, 2))
    np.testing.assert_array_equal(layer(graph, "pw").in_units, np.repeat(c1, 2))
    g = group_of(graph, "c1")
    assert g.producers == ["c1"] and g.units == sorted(c1.tolist())
    assert all(p != "dw" for grp in graph.groups for p in grp.producers), "a depthwise conv produces no units"

    removed = [int(c1[1]), int(c1[3])]
    pruned = prune(gm, graph, x, removed)
    dw = pruned.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (2, 4, 2)
    assert pruned.get_submodule("pw").in_channels == 4
    torch.testing.assert_close(dw.weight, gm.get_submodule("dw").weight[[0, 1, 4, 5]])
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c1"), [1, 3])
    zero_rows(ref.get_submodule("dw"), [2, 3, 6, 7])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


# --------------------------------------------------------------------------------------------
# Coupling: residual add, cat
# --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 5, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        y = torch.relu(a + self.c2(a))
        return self.fc(self.flat(self.pool(torch.relu(self.c3(y)))))


def test_residual_add_couples_both_branches_into_one_group() -> None:
    x = torch.randn(2, 3, 6, 6)
    gm, graph = analyse(Residual(), x)
    g = group_of(graph, "c1")
    assert g is group_of(graph, "c2")
    assert sorted(g.producers) == ["c1", "c2"] and g.size == 4
    np.testing.assert_array_equal(graph.layouts["c1"].units, graph.layouts["c2"].units)
    for i, u in enumerate(graph.layouts["c1"].units.tolist()):
        assert sorted(graph.members[u]) == [("c1", i), ("c2", i)]
    assert not g.pinned
    # Removing one coupled unit drops the channel from both producers and from every consumer.
    u = int(graph.layouts["c1"].units[2])
    pruned = prune(gm, graph, x, [u])
    assert pruned.get_submodule("c1").out_channels == 3
    assert (pruned.get_submodule("c2").in_channels, pruned.get_submodule("c2").out_channels) == (3, 3)
    assert pruned.get_submodule("c3").in_channels == 3
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c1"), [2])
    zero_rows(ref.get_submodule("c2"), [2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


class SelfCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 5, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        return self.fc(self.flat(self.pool(torch.relu(self.c2(torch.cat([a, a], 1))))))


def test_self_cat_repeats_units_at_both_offsets() -> None:
    x = torch.randn(2, 3, 6, 6)
    gm, graph = analyse(SelfCat(), x)
    c1 = graph.layouts["c1"].units
    np.testing.assert_array_equal(graph.layouts["cat"].units, np.concatenate([c1, c1]))
    np.testing.assert_array_equal(layer(graph, "c2").in_units, np.concatenate([c1, c1]))
    assert graph.layouts["cat"].dim == 1

    pruned = prune(gm, graph, x, [int(c1[1])])
    c2 = pruned.get_submodule("c2")
    assert c2.in_channels == 6
    torch.testing.assert_close(c2.weight, gm.get_submodule("c2").weight[:, [0, 2, 3, 4, 6, 7]])
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c1"), [1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


class TwoCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(self.flat(self.pool(self.c(y))))


def test_cat_of_two_producers_offsets_the_second() -> None:
    x = torch.randn(2, 3, 5, 5)
    gm, graph = analyse(TwoCat(), x)
    a, b = graph.layouts["a"].units, graph.layouts["b"].units
    np.testing.assert_array_equal(layer(graph, "c").in_units, np.concatenate([a, b]))
    assert group_of(graph, "a") is not group_of(graph, "b"), "cat does not couple its inputs"
    # b's channel 0 sits at offset 3 of c's input, b's channel 4 at offset 7.
    pruned = prune(gm, graph, x, [int(a[2]), int(b[0]), int(b[4])])
    keep_cols = [0, 1, 4, 5, 6]
    torch.testing.assert_close(pruned.get_submodule("c").weight, gm.get_submodule("c").weight[:, keep_cols])
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("a"), [2])
    zero_rows(ref.get_submodule("b"), [0, 4])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


# --------------------------------------------------------------------------------------------
# Barriers, outputs, leaf modules
# --------------------------------------------------------------------------------------------


@torch.fx.wrap
def opaque_scale(x: torch.Tensor) -> torch.Tensor:
    """A user function fx keeps as one call: the unit analysis cannot know what it does."""
    return x * 2.0


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = opaque_scale(torch.relu(self.c1(x)))
        return self.fc(self.flat(self.pool(torch.relu(self.c2(y)))))


class Sorted(Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = torch.sort(torch.relu(self.c1(x)), dim=1)
        return self.fc(self.flat(self.pool(torch.relu(self.c2(y)))))


@pytest.mark.parametrize(("cls", "op"), [(Wrapped, "opaque_scale"), (Sorted, "sort")])
def test_unsupported_op_is_a_barrier_that_pins_its_inputs(cls: type[nn.Module], op: str) -> None:
    x = torch.randn(2, 3, 5, 5)
    gm, graph = analyse(cls(), x)
    [barrier] = graph.barriers
    assert barrier.op == op
    assert barrier.units_pinned == 4
    assert "not supported" in barrier.reason and op in barrier.reason
    g1 = group_of(graph, "c1")
    assert set(g1.pinned) == set(g1.units) and not g1.prunable
    assert all(op in why and "not supported" in why for why in g1.pinned.values())
    # What comes out of the barrier is not removable: c2 reads fixed channels.
    assert (layer(graph, "c2").in_units == -1).all()
    # c2 on the far side is still prunable, and the summary reports the barrier.
    assert group_of(graph, "c2").prunable
    summary = graph.summary()
    assert [b["op"] for b in summary["barriers"]] == [op]
    s1 = next(s for s in summary["groups"] if s["name"] == "c1")
    assert s1["pinned"] == 4 and not s1["prunable"] and any(op in r for r in s1["pinned_reasons"])
    # Selection keeps every pinned unit even at a high ratio.
    kept = select(graph, np.arange(graph.n_units, dtype=float), Target(prune_ratio=0.75, flops_budget=None))
    assert kept[g1.units].all()
    assert kept[group_of(graph, "c2").units].sum() == 2


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(h), h


def test_network_outputs_are_pinned_and_never_pruned() -> None:
    x = torch.randn(4, 6)
    gm, graph = analyse(TwoOutputs(), x)
    for producer in ("fc3", "fc2"):  # fc2's units reach the second output directly
        g = group_of(graph, producer)
        assert not g.prunable
        assert set(g.pinned) == set(g.units)
        assert set(g.pinned.values()) == {OUTPUT_REASON}
    assert group_of(graph, "fc1").prunable and not group_of(graph, "fc1").pinned
    scores = np.zeros(graph.n_units)  # every unit scored as useless
    kept = select(graph, scores, Target(prune_ratio=0.9, flops_budget=None))
    assert kept[group_of(graph, "fc3").units].all() and kept[group_of(graph, "fc2").units].all()
    assert kept[group_of(graph, "fc1").units].sum() == 8 - 7
    pruned = prune(gm, graph, x, [u for u in range(graph.n_units) if not kept[u]])
    out, hidden = pruned(x)
    assert out.shape == (4, 3) and hidden.shape == (4, 5)


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.c2 = nn.Conv2d(4, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.c1(x)))
        return self.fc(self.flat(self.pool(torch.relu(self.c2(y)))))


def test_leaf_module_is_opaque_and_unpruned() -> None:
    x = torch.randn(2, 3, 5, 5)
    # Contrast: without the leaf, the conv inside the block is an ordinary producer.
    _, open_graph = analyse(WithBlock(), x)
    assert any("block.0" in g.producers for g in open_graph.groups)

    model = WithBlock()
    gm, graph = analyse(model, x, leaf_modules=("block",))
    assert [n.op for n in gm.graph.nodes if n.target == "block"] == ["call_module"]
    assert all("block.0" not in g.producers for g in graph.groups)
    assert all(lay.target != "block.0" for lay in graph.layers)
    [barrier] = graph.barriers
    assert barrier.node == "block" and "leaf module" in barrier.reason and barrier.units_pinned == 4
    g1 = group_of(graph, "c1")
    assert not g1.prunable and all("leaf module" in why for why in g1.pinned.values())
    assert (layer(graph, "c2").in_units == -1).all()

    inner_before = copy.deepcopy(model.block[0].state_dict())
    kept = select(graph, np.arange(graph.n_units, dtype=float), Target(prune_ratio=0.5, flops_budget=None))
    pruned = prune(gm, graph, x, [u for u in range(graph.n_units) if not kept[u]])
    assert pruned.get_submodule("c2").out_channels == 3, "the rest of the network is still pruned"
    inner = pruned.get_submodule("block")[0]
    assert (inner.in_channels, inner.out_channels) == (4, 4)
    for k, v in inner.state_dict().items():
        torch.testing.assert_close(v, inner_before[k])


# --------------------------------------------------------------------------------------------
# Flatten into a Linear
# --------------------------------------------------------------------------------------------


class ConvFlat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(4 * 3 * 3, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        if self.how == "module":
            y = self.flat(y)
        elif self.how == "function":
            y = torch.flatten(y, 1)
        else:
            y = y.view(y.size(0), -1)
        return self.fc2(torch.relu(self.fc1(y)))


@pytest.mark.parametrize("how", ["module", "function", "view"])
def test_flatten_maps_each_channel_to_its_hw_block(how: str) -> None:
    x = torch.randn(3, 2, 3, 3)
    gm, graph = analyse(ConvFlat(how), x)
    c1 = graph.layouts["c1"].units
    fc1_in = layer(graph, "fc1").in_units
    np.testing.assert_array_equal(fc1_in, np.repeat(c1, 9))

    pruned = prune(gm, graph, x, [int(c1[2])])
    fc1 = pruned.get_submodule("fc1")
    assert fc1.in_features == 27
    cols = [i for i in range(36) if not 18 <= i < 27]
    torch.testing.assert_close(fc1.weight, gm.get_submodule("fc1").weight[:, cols])
    torch.testing.assert_close(fc1.bias, gm.get_submodule("fc1").bias)
    assert pruned.get_submodule("c1").out_channels == 3
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c1"), [2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


class AddToHalfInput(nn.Module):
    """``cat([x, c1(x)]) + c2(x)``: c2's first channels are added to the network input's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, self.c1(x)], 1) + self.c2(x)
        return self.fc(y.mean((2, 3)))


def test_unit_added_to_a_fixed_channel_is_pinned() -> None:
    """Regression (found by tests/test_fuzz.py): only the positions of a partly fixed operand pin.

    Channels 0 and 1 of the sum hold the input's channels, which cannot be removed, so c2's
    channels 0 and 1 must be kept; they used to stay removable and the pruned add failed with a
    shape mismatch.  Channels 2 and 3 (c1 + c2) remain one prunable unit each.
    """
    x = torch.randn(2, 2, 5, 5)
    gm, graph = analyse(AddToHalfInput(), x)
    c2 = graph.layouts["c2"].units.tolist()
    g = group_of(graph, "c2")
    assert set(g.pinned) == set(c2[:2])
    assert all("fixed channels" in why and "add" in why for why in g.pinned.values())
    assert graph.layouts["add"].units.tolist()[:2] == [-1, -1]
    np.testing.assert_array_equal(graph.layouts["add"].units[2:], graph.layouts["c1"].units)
    pruned = prune(gm, graph, x, [c2[3]])
    assert pruned.get_submodule("c2").out_channels == 3 and pruned.get_submodule("c1").out_channels == 1
    ref = copy.deepcopy(gm)
    zero_rows(ref.get_submodule("c1"), [1])
    zero_rows(ref.get_submodule("c2"), [3])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


def test_width_checked_by_torch_assert_is_pinned() -> None:
    """Regression: pruning a width that ``torch._assert`` checks failed in the assert after pruning.

    The error blamed the input shape ("the model's own check rejected the example input; pass
    --input-shape"); now the checked units are kept, with the reason and a barrier in the report,
    and units whose batch size or rank is checked stay prunable.
    """
    x = torch.randn(4, 6)
    gm, graph = analyse(Asserts(), x)
    g1, g2 = group_of(graph, "fc1"), group_of(graph, "fc2")
    assert set(g1.pinned) == set(g1.units) and all("torch._assert" in why for why in g1.pinned.values())
    assert g2.prunable and not g2.pinned
    assert [b.reason for b in graph.barriers] == ["checks a channel width (torch._assert)"]
    kept = select(graph, np.arange(graph.n_units, dtype=float), Target(prune_ratio=0.5, flops_budget=None))
    pruned = prune(gm, graph, x, [u for u in range(graph.n_units) if not kept[u]])
    assert pruned.get_submodule("fc2").out_features == 4 and pruned(x).shape == (4, 3)


class TiedLayers(nn.Module):
    """Two Linear layers holding the same weight Parameter (tied), between two free layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.mid = nn.Linear(8, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x))))))
        return self.fc(torch.relu(self.mid(h)))


def test_layers_sharing_a_parameter_are_barriers() -> None:
    """Regression: tied layers were rebuilt with different slices of the one weight, untying them.

    Each is now a barrier like a module called twice: ``inp``, ``a`` and ``b`` keep their widths,
    the tie survives pruning, and ``mid`` (after the tied pair) is still prunable.
    """
    x = torch.randn(4, 6)
    gm, graph = analyse(TiedLayers(), x)
    [barrier] = graph.barriers  # b reads a's output, which holds no units: nothing more to pin
    assert (barrier.node, barrier.reason) == ("a", "shares a parameter with b (tied weights)")
    assert not group_of(graph, "inp").prunable
    assert not any(g.producers in (["a"], ["b"]) for g in graph.groups)
    kept = select(graph, np.arange(graph.n_units, dtype=float), Target(prune_ratio=0.5, flops_budget=None))
    pruned = prune(gm, graph, x, [u for u in range(graph.n_units) if not kept[u]])
    assert pruned.get_submodule("a").weight is pruned.get_submodule("b").weight
    assert pruned.get_submodule("mid").out_features == 3


# --------------------------------------------------------------------------------------------
# Tokens flattened into one feature vector
# --------------------------------------------------------------------------------------------


class TokenFlatten(nn.Module):
    """Token-wise Linear on (B, 5, 4) -> (B, 5, 6), then every token's channels flattened into one vector."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.fc1, self.act, self.head = nn.Linear(4, 6), nn.ReLU(), nn.Linear(30, 3)
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.spelling == "flatten":
            h = h.flatten(1)
        elif self.spelling == "view_const":  # the width 5 * 6 baked into the graph
            h = h.view(-1, 30)
        else:
            h = h.reshape(h.size(0), -1)
        return self.head(h)


@pytest.mark.parametrize("spelling", ["flatten", "view_const", "reshape_neg"])
def test_flattened_tokens_keep_their_channels_prunable(spelling: str) -> None:
    """(B, T, C) -> (B, T * C) repeats the channel layout T times: fc1's units stay removable (this
    was a barrier that kept all of them), and the pruned network is the original with those
    units' rows zeroed, the head losing the matching column of every token."""
    torch.manual_seed(0)
    model = TokenFlatten(spelling).eval()
    x = torch.randn(3, 5, 4)
    gm, graph = analyse(model, x)
    group = group_of(graph, "fc1")
    assert not group.pinned and not graph.barriers
    flat = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                and ir_name(n) in ("flatten", "view", "reshape"))
    assert graph.layouts[flat.name].units.tolist() == np.tile(np.arange(6), 5).tolist()
    removed = [group.units[1], group.units[4]]
    pruned = prune(gm, graph, x, removed)
    assert pruned.get_submodule("head").in_features == 20
    ref = copy.deepcopy(model)
    zero_rows(ref.fc1, [1, 4])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x))


def ir_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")

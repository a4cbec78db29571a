"""Prefix reuse of the held-out passes: the outputs are the pruned network's own, bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.budget import group_order
from oamipc.passes.mip.evidence import HeldOut
from oamipc.passes.mip.masked import margins
from oamipc.passes.mip.prefix import PrefixRuns, fingerprints, resume_points
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.surgery import apply_plan
from oamipc.tracing import trace

from .models import ZOO, example_input


def _setup(name: str, n: int):
    x = example_input(name, batch=n, seed=2)
    gm = trace(ZOO[name].factory(), (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    return gm, graph, x


def _pruned(gm, graph, kept: np.ndarray):
    net = copy.deepcopy(gm)
    if not kept.all():
        apply_plan(net, graph, kept)
    return net.eval()


def _drop_one(graph, kept: np.ndarray, group) -> np.ndarray:
    """``kept`` less one more free unit of ``group`` (when it has two kept ones)."""
    out = kept.copy()
    free = [u for u in group.units if u not in group.pinned and out[u]]
    if len(free) >= 2 and not group.blocks:
        out[free[-1]] = False
    return out


def _direct(net, x: torch.Tensor, step: int) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [net(x[lo:lo + step]) for lo in range(0, len(x), step)]
    while outs and isinstance(outs[0], (tuple, list)):
        outs = [o[0] for o in outs]
    return outs


@pytest.mark.parametrize("name", ["lenet5", "vgg_bn", "resnet", "inception", "functional", "residual_chain",
                                  "flatten_view", "conv1d"])
def test_prefix_runs_give_the_pruned_networks_own_outputs_bitwise(name: str) -> None:
    """Plans that differ in the last group, then in the first, then an earlier plan again: each run's
    outputs equal the pruned network's forward on the same batches to the last bit, and a plan that
    changes only the group nearest the output starts after the layers it shares."""
    gm, graph, x = _setup(name, n=10)
    order = group_order(gm, graph)
    base = graph.all_kept()
    for g in order:
        base = _drop_one(graph, base, g)
    late = _drop_one(graph, base, order[0])
    early = _drop_one(graph, base, order[-1])
    runs = PrefixRuns(x, 4, torch.device("cpu"))
    for kept in (base, late, early, base, late):
        net = _pruned(gm, graph, kept)
        with torch.no_grad():
            got = runs.run(net)
        want = _direct(net, x, 4)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert runs.stats["runs"] == 5
    if name in ("lenet5", "vgg_bn", "flatten_view"):  # chains: the late plan shares the convolutions
        assert runs.stats["resumed"] >= 2 and runs.stats["nodes_skipped"] > 0


class _InPlace(nn.Module):
    """In-place updates of values that resume points keep: ``h.add_(1)`` after ``fc1`` read ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).flatten(1)
        y = self.fc1(h)
        h.add_(1.0)
        return self.fc2(torch.relu_(y)) + h[:, :3]


def test_in_place_ops_after_a_resume_point_do_not_change_kept_values() -> None:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_InPlace().eval())
    x = torch.randn(6, 2, 4, 4)
    runs = PrefixRuns(x, 4, torch.device("cpu"))
    changed = copy.deepcopy(gm)
    with torch.no_grad():
        changed.fc1.weight.mul_(-1.0)  # starts from the value kept before fc1, which ``h.add_`` updates
    for net in (gm, copy.deepcopy(gm), changed, changed, gm):
        with torch.no_grad():
            got = runs.run(net)
        for a, b in zip(got, _direct(net, x, 4)):
            assert torch.equal(a, b)
    assert runs.stats["resumed"] == 4


def test_fingerprints_follow_the_weights_and_nothing_is_kept_without_budget() -> None:
    gm, graph, x = _setup("lenet5", n=6)
    twin = copy.deepcopy(gm)
    changed = copy.deepcopy(gm)
    last = [n for n in changed.graph.nodes if n.op == "call_module"][-1]
    with torch.no_grad():
        changed.get_submodule(str(last.target)).weight[0, 0] += 1.0
    a, b, c = fingerprints(gm), fingerprints(twin), fingerprints(changed)
    assert list(a.values()) == list(b.values())
    names = {n.name: v for n, v in c.items()}
    assert [names[n.name] == v for n, v in a.items()].count(False) >= 2  # the layer and the output
    assert names[last.name] != a[next(n for n in a if n.name == last.name)]
    assert len(resume_points(gm)) >= 2
    runs = PrefixRuns(x, 4, torch.device("cpu"), budget=0)
    for net in (gm, twin):
        with torch.no_grad():
            got = runs.run(net)
        for g, w in zip(got, _direct(net, x, 4)):
            assert torch.equal(g, w)
    assert runs.stats["resumed"] == 0 and not runs.store


def test_held_out_measures_equal_the_pruned_network_on_every_plan() -> None:
    """HeldOut with prefix reuse: each plan's margins are those of its physically pruned network."""
    gm, graph, x = _setup("lenet5", n=40)
    y = torch.arange(40) % 10
    target = torch.ones(40, dtype=torch.float64)
    judge = HeldOut(gm, graph, x, y, target)
    order = group_order(gm, graph)
    kept = graph.all_kept()
    for g in order:
        kept = _drop_one(graph, kept, g)
        m = judge.measure(kept)
        with torch.no_grad():
            want = margins(_pruned(gm, graph, kept)(x).double(), y)
        assert np.array_equal(m.correct, (want > 0).numpy())
        assert np.array_equal(m.hinge, (target - want).clamp(min=0).numpy())

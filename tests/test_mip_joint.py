"""The joint stage and its tools: masked forward passes (oracle: the physically pruned network),
the single-flip exactness of the linear model, budget and acceptance guards, determinism."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from oamipc.errors import UnsupportedGraphError
from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip import masked
from oamipc.passes.mip.budget import group_order, nonlinear_elements_after, unit_magnitude
from oamipc.passes.mip.evidence import HeldOut
from oamipc.passes.mip.joint import JointStage
from oamipc.passes.mip.masked import FlipShare, MaskedNetwork, margins
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.surgery import apply_plan
from oamipc.target import Target
from oamipc.tracing import trace

from .models import ZOO, example_input


def _setup(name: str, n: int = 8):
    x = example_input(name, batch=n, seed=2)
    gm = trace(ZOO[name].factory(), (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    return gm, graph, x


def _random_plan(graph, rng, p=0.6) -> np.ndarray:
    kept = graph.all_kept()
    for g in graph.groups:
        free = [u for u in g.units if u not in g.pinned]
        if g.blocks or not free:
            continue
        drop = [u for u in free if rng.random() > p]
        if len(drop) == len(free):
            drop = drop[1:]
        kept[drop] = False
    for piece in graph.floors:
        if not kept[piece].any():
            kept[piece[0]] = True
    return kept


@pytest.mark.parametrize("name", ["mlp", "lenet5", "vgg_bn", "resnet", "inception", "chunk", "residual_chain",
                                  "conv1d", "mobilenet", "se"])
def test_masked_forward_equals_the_pruned_network(name: str) -> None:
    gm, graph, x = _setup(name, n=3)
    net = MaskedNetwork(gm, graph)
    rng = np.random.default_rng(0)
    plans = np.stack([graph.all_kept()] + [_random_plan(graph, rng) for _ in range(3)])
    got = net.logits(x, plans)
    for plan, logits in zip(plans, got):
        pruned = copy.deepcopy(gm)
        if not plan.all():
            apply_plan(pruned, graph, plan)
        with torch.no_grad():
            want = pruned(x)
        torch.testing.assert_close(logits.float(), want, rtol=1e-4, atol=1e-4)


def _block_plan(graph, rng) -> np.ndarray:
    """A random plan that also prunes groups with equal-count blocks (the same count from each block)."""
    kept = graph.all_kept()
    for g in graph.groups:
        if not g.prunable or g.pinned:
            continue
        blocks = g.blocks or [list(g.units)]
        drop = int(rng.integers(1, len(blocks[0])))  # keeps at least one per block
        for b in blocks:
            kept[list(rng.permutation(b)[:drop])] = False
    return kept


def test_masked_layernorm_and_groupnorm_equal_the_pruned_network() -> None:
    """LayerNorm over features and GroupNorm (blocks of 4; one group per channel) see every channel:
    the masked forward takes their statistics over each plan's kept channels, as the pruned layer does."""
    gm, graph, x = _setup("norms", n=3)
    net = MaskedNetwork(gm, graph)
    assert sorted(net.norms) == ["gn1", "gn2", "ln"]
    rng = np.random.default_rng(0)
    plans = np.stack([graph.all_kept()] + [_block_plan(graph, rng) for _ in range(4)])
    assert all((~p).any() for p in plans[1:])
    for plan, logits in zip(plans, net.logits(x, plans)):
        pruned = copy.deepcopy(gm)
        if not plan.all():
            apply_plan(pruned, graph, plan)
        with torch.no_grad():
            want = pruned(x)
        torch.testing.assert_close(logits.float(), want, rtol=1e-4, atol=1e-4)


def test_unmasked_cross_channel_normalisation_is_refused_with_the_node_named() -> None:
    """A normalisation across removable channels that the masked forward does not model is refused."""
    gm, graph, _ = _setup("norms", n=2)
    gm.gn2 = torch.nn.InstanceNorm2d(8)  # what no unit analysis would let through, put behind its back
    with pytest.raises(UnsupportedGraphError, match="normalises across channels"):
        MaskedNetwork(gm, graph)


@pytest.mark.parametrize("name", ["lenet5", "resnet"])
@pytest.mark.parametrize("parts", [2, 3])
def test_flip_shares_split_one_calls_batches_without_changing_a_logit(name: str, parts: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Shares of ``each_flip`` (what Ray tasks measure) are disjoint, cover every flip, and give each
    flip the very logits of the whole call; batches, not layers, are dealt, so no share is idle."""
    gm, graph, x = _setup(name, n=4)
    monkeypatch.setattr(masked, "CHUNK_ELEMENTS", 4 * 2 * x[0].numel() * 8)  # several batches per layer
    net = MaskedNetwork(gm, graph)
    current = _random_plan(graph, np.random.default_rng(1)).astype(np.float64)
    units = [u for g in graph.groups for u in g.units if u not in g.pinned]
    costs = (net.flip_costs(current) * graph.macs(current))[units].astype(float).tolist()
    whole: dict[int, torch.Tensor] = {}

    def keep(into: dict[int, torch.Tensor]):
        def take(block: torch.Tensor, slots: list[int]) -> None:
            for s, b in zip(slots, block):
                assert s not in into
                into[s] = b
        return take

    net.each_flip(x, current, units, keep(whole))
    shares = []
    for k in range(parts):
        got: dict[int, torch.Tensor] = {}
        assert net.each_flip(x, current, units, keep(got), share=FlipShare(k, parts, costs)) is None
        shares.append(got)
    read = {s for s, u in enumerate(units) if net.first_reader[u] < len(gm.graph.nodes)}
    assert all(shares), "every share gets batches"
    assert sum(len(g) for g in shares) == len(read) and set().union(*shares) == read
    for got in shares:
        for s, b in got.items():
            assert torch.equal(b, whole[s])


def test_nonlinear_elements_after_counts_downstream_relus() -> None:
    gm, graph, _ = _setup("mlp")
    order = group_order(gm, graph)
    last, first = order[0], order[-1]
    assert nonlinear_elements_after(gm, graph, last) == 0  # only the output Linear reads it
    hidden = gm.get_submodule(last.producers[0]).out_features
    assert nonlinear_elements_after(gm, graph, first) == hidden


def _stage(gm, graph, x, kept, budget, radius_time=5.0):
    net = MaskedNetwork(gm, graph)
    z = net.logits(x, graph.all_kept()[None, :])[0]
    y = z.argmax(1)
    free = [u for g in graph.groups for u in g.units if u not in g.pinned]
    stage = JointStage(net, graph, x, y, margins(z, y), free=free, magnitude=unit_magnitude(gm, graph),
                       target=Target(flops_budget=budget, round_to=1), solver="highs",
                       time_limit=radius_time, threads=1, tie_reward=0.0)
    return net, stage, y, margins(z, y)


def test_single_flip_model_is_exact_and_plans_stay_within_budget() -> None:
    """With a trust radius of 1 the linear model is exact: its hinge at the solver's answer equals
    the real network's hinge on the same samples; every answer keeps the MAC budget."""
    gm, graph, x = _setup("lenet5", n=12)
    rng = np.random.default_rng(1)
    kept = _random_plan(graph, rng, p=0.5)
    budget = graph.macs(kept) / graph.macs() + 0.02
    net, stage, y, target = _stage(gm, graph, x, kept, budget)
    from oamipc.passes.mip.joint import JointRound

    rec = JointRound(radius=1)
    cand = stage.solve_round(kept, stage.effects(kept), 1, 10.0, rec)
    assert cand is not None and rec.solve["status"] == "optimal"
    assert int((cand != kept).sum()) <= 1
    assert graph.macs(cand) <= budget * graph.macs() * (1 + 1e-9)
    real = float((target - margins(net.logits(x, cand[None, :])[0], y)).clamp(min=0).mean())
    assert rec.model_objective == pytest.approx(real, abs=1e-6)
    assert rec.model_objective <= rec.warm_objective + 1e-9


def test_joint_stage_never_accepts_a_worse_plan_and_is_deterministic_for_any_jobs() -> None:
    """Same plan and same rounds twice, and with the trust radii solved ahead in 2 forked workers."""
    gm, graph, x = _setup("mlp", n=24)
    kept = _random_plan(graph, np.random.default_rng(3), p=0.5)
    budget = graph.macs(kept) / graph.macs()
    x_hold = example_input("mlp", batch=32, seed=9)

    def run(jobs: int = 1) -> tuple[np.ndarray, list]:
        net, stage, y, target = _stage(gm, graph, x, kept, budget)
        z_hold = net.logits(x_hold, graph.all_kept()[None, :])[0]
        y_hold = z_hold.argmax(1)
        t_hold = margins(z_hold, y_hold)

        def holdout(plan: np.ndarray) -> float:
            got = margins(net.logits(x_hold, plan[None, :])[0], y_hold)
            return float((t_hold - got).clamp(min=0).mean())

        import time

        judge = HeldOut(gm, graph, x_hold, y_hold, t_hold, rule="hinge")
        out = stage.run(kept, judge, radius=6, max_rounds=6, deadline=time.perf_counter() + 60, jobs=jobs)
        assert holdout(out) <= holdout(kept) + 1e-12
        assert judge.loss(out) == pytest.approx(holdout(out), abs=1e-5)  # pruned network = masked evaluation
        for r in stage.rounds:
            if r.outcome == "improved":
                assert r.holdout_after < r.holdout_before
        assert graph.macs(out) <= budget * graph.macs() * (1 + 1e-9)
        return out, [(r.radius, r.outcome, r.flips) for r in stage.rounds]

    a, b, c = run(), run(), run(jobs=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    assert a[1] == b[1] == c[1]
    assert any(outcome != "improved" for _, outcome, _ in a[1]), "no round fell back to a smaller radius"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_are_scipys(seed: int) -> None:
    from scipy.stats import rankdata  # the oracle (the library itself does not import scipy.stats)

    from oamipc.passes.mip.joint import average_ranks

    rng = np.random.default_rng(seed)
    for v in (rng.integers(0, 5, 40).astype(float), rng.normal(size=17), np.array([3.0]), np.zeros(6),
              np.array([-0.0, 0.0, 1.0, -1.0, 1.0])):
        np.testing.assert_array_equal(average_ranks(v), rankdata(v))

"""The joint stage's flip effects: prefix-cached flips and the first-order screen.

Oracles: :meth:`MaskedNetwork.logits` on the flipped plans (itself checked against the physically
pruned network in ``test_mip_joint.py``), and central finite differences of the masked network
in float64 for the gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.budget import unit_magnitude
from oamipc.passes.mip.joint import JointStage
from oamipc.passes.mip.masked import MaskedNetwork, margins
from oamipc.passes.mip.rows import flip_macs, single_flip_macs
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.target import Target
from oamipc.tracing import trace

from .models import ZOO, example_input
from .test_mip_joint import _random_plan


def _setup(name: str, n: int):
    x = example_input(name, batch=n, seed=5)
    gm = trace(ZOO[name].factory(), (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    return gm, graph, x


def _free(graph) -> list[int]:
    return [u for g in graph.groups if g.prunable for u in g.units if u not in g.pinned]


@pytest.mark.parametrize("name", ["mlp", "lenet5", "vgg_bn", "resnet", "inception", "chunk", "residual_chain",
                                  "conv1d", "mobilenet", "se"])
def test_flip_logits_equal_full_forward_passes_of_the_flipped_plans(name: str) -> None:
    gm, graph, x = _setup(name, n=3)
    net = MaskedNetwork(gm, graph)
    current = _random_plan(graph, np.random.default_rng(1))
    units = _free(graph)
    z0, d = net.flip_logits(x, current, units)
    plans = np.repeat(current[None, :], len(units), axis=0)
    for i, u in enumerate(units):
        plans[i, u] = not current[u]
    want = net.logits(x, np.concatenate([current[None, :], plans]))
    torch.testing.assert_close(z0, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d, want[1:] - want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "mobilenet"])
def test_margin_gradients_match_finite_differences(name: str) -> None:
    gm, graph, x = _setup(name, n=2)
    gm = gm.double()
    net = MaskedNetwork(gm, graph)
    current = _random_plan(graph, np.random.default_rng(2))
    x = x.double()
    z = net.logits(x, current[None, :])[0]
    y = z.argmax(1)
    got_z, rivals, g = net.margin_gradients(x, current, y, 2)
    torch.testing.assert_close(got_z, z)
    assert torch.equal(rivals, torch.argsort(z.scatter(1, y[:, None], float("-inf")), dim=1, descending=True)[:, :2])
    units = _free(graph)[:: max(1, len(_free(graph)) // 12)]
    eps = 1e-4
    for u in units:
        up, down = current.astype(np.float64), current.astype(np.float64)
        up[u] += eps
        down[u] -= eps
        zz = net.logits(x, np.stack([up, down]))
        for r in range(2):
            diff = zz.gather(2, y[None, :, None].expand(2, -1, 1))[..., 0] \
                - zz.gather(2, rivals[None, :, r:r + 1].expand(2, -1, 1))[..., 0]
            want = (diff[0] - diff[1]) / (2 * eps)
            torch.testing.assert_close(g[:, r, u], want, rtol=1e-4, atol=1e-6)


def test_screened_stage_measures_only_the_pool_and_its_estimates_rank_like_the_exact_effects() -> None:
    """With a MAC budget below what every flip costs, only the screened pool is measured exactly
    (within the budget), every measured effect equals the full forward pass, and the record
    carries the screen's rank correlation; with enough, every free unit is measured."""
    gm, graph, x = _setup("vgg_bn", n=16)
    net = MaskedNetwork(gm, graph)
    z = net.logits(x, graph.all_kept()[None, :])[0]
    y = z.argmax(1)
    free = _free(graph)
    current = _random_plan(graph, np.random.default_rng(4), p=0.7)

    def stage(exact_macs: float) -> JointStage:
        return JointStage(net, graph, x, y, margins(z, y), free=free, magnitude=unit_magnitude(gm, graph),
                          target=Target(flops_budget=0.6, round_to=1), solver="highs", time_limit=5.0, threads=1,
                          tie_reward=0.0, exact_macs=exact_macs)

    costs = net.flip_costs(current) * graph.macs(current) * len(x)
    budget = float(costs[free].sum()) / 3
    small = stage(exact_macs=budget)
    eff = small.effects(current)
    assert 0 < len(eff.units) < len(free) and set(eff.units) <= set(free)
    assert costs[eff.units].sum() <= budget
    plans = np.repeat(current[None, :], len(eff.units), axis=0)
    for i, u in enumerate(eff.units):
        plans[i, u] = not current[u]
    zf = net.logits(x, plans).numpy()
    rows = np.arange(len(x))[:, None]
    assert (eff.cols[:, 0] == y.numpy()).all() and (eff.cols[:, 1:] != eff.cols[:, :1]).all()
    np.testing.assert_allclose(eff.d, zf[:, rows, eff.cols] - eff.z0[rows, eff.cols], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eff.loss, small._mean_hinge(zf) - small._mean_hinge(eff.z0), rtol=1e-6, atol=1e-9)
    rec = small.measurements[-1]
    assert rec["exact"] == len(eff.units) and rec["free"] == len(free)
    assert rec["exact_macs"] == pytest.approx(costs[eff.units].sum())
    assert rec["spearman"] is not None and -1.0 <= rec["spearman"] <= 1.0
    full = stage(exact_macs=float(costs[free].sum()) + 1).effects(current)
    assert full.units == free
    assert set(small.candidates(current, eff, 4)) <= set(eff.units)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "residual_chain", "mobilenet"])
def test_single_flip_macs_equal_the_cost_model_on_each_flipped_plan(name: str) -> None:
    gm, graph, _ = _setup(name, n=1)
    kept = _random_plan(graph, np.random.default_rng(6))
    got = single_flip_macs(graph, kept)
    for u in range(graph.n_units):
        flipped = kept.copy()
        flipped[u] = not kept[u]
        assert got[u] == pytest.approx(abs(graph.macs(flipped) - graph.macs(kept)), rel=1e-12, abs=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "residual_chain", "mobilenet", "conv1d", "inception"])
def test_flip_macs_are_the_very_floats_of_the_cost_model_on_each_flipped_plan(name: str) -> None:
    gm, graph, _ = _setup(name, n=1)
    for seed in (6, 7):
        kept = _random_plan(graph, np.random.default_rng(seed))
        units = list(range(graph.n_units))[::-1]  # any order, each unit once
        got = flip_macs(graph, kept, units)
        for i, u in enumerate(units):
            flipped = kept.copy()
            flipped[u] = not kept[u]
            assert got[i] == abs(graph.macs(flipped) - graph.macs(kept))  # bitwise: the joint stage ranks by it

"""Mean replacement: the MILP encoding and the masked forward model exactly what the prune
transform builds (bias folded, then units removed); plans carry the shift through JSON."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pulp
import pytest
import torch

import oamipc
from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.encoder import Encoder, evaluate
from oamipc.passes.mip.masked import MaskedNetwork
from oamipc.passes.mip.means import bias_shift, reading_means
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.plan import Plan
from oamipc.surgery import apply_plan, fold_bias_shift
from oamipc.tracing import trace

from .models import ZOO, example_input
from .oracle import solve_fixed

ROOT = Path(__file__).resolve().parent.parent


def _setup(name: str):
    x = example_input(name, batch=5, seed=6)
    gm = trace(ZOO[name].factory(), (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    rng = np.random.default_rng(2)
    kept = graph.all_kept()
    for g in graph.groups:
        free = [u for u in g.units if u not in g.pinned]
        if len(free) > 1 and not g.blocks:
            kept[rng.choice(free, size=len(free) // 2, replace=False)] = False
    return gm, graph, x, kept


def _physical(gm, graph, kept, means, x) -> np.ndarray:
    pruned = copy.deepcopy(gm)
    fold_bias_shift(pruned, bias_shift(gm, graph, kept, means))
    apply_plan(pruned, graph, kept)
    with torch.no_grad():
        return pruned(x).double().numpy()


@pytest.mark.parametrize("name", ["mlp", "flatten_view", "lenet5"])
def test_encoding_and_masked_forward_with_means_equal_the_folded_pruned_network(name: str) -> None:
    gm, graph, x, kept = _setup(name)
    means = reading_means(gm, MaskedNetwork(gm, graph).reading, x)
    assert means  # every one of these models has Linear readers of removable units
    want = _physical(gm, graph, kept, means, x)
    with torch.no_grad():
        assert not np.allclose(want, _physical(gm, graph, kept, {}, x), atol=1e-4)  # the means matter
    got = MaskedNetwork(gm, graph, means).logits(x, kept[None, :])[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The encoding with every free unit a keep variable fixed to the plan.
    prob = pulp.LpProblem("means", pulp.LpMinimize)
    pinned = graph.pinned_mask()
    free = {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in range(graph.n_units) if not pinned[u]}
    enc = Encoder(gm, graph, x, graph.all_kept(), free, prob, means=means)
    logits = enc.logits()
    for u, var in free.items():
        var.lowBound = var.upBound = float(kept[u])
    prob += pulp.LpAffineExpression()
    solve_fixed(prob, enc, kept)
    np.testing.assert_allclose(evaluate(enc, logits), want, atol=1e-4, rtol=1e-4)


def test_mean_replacement_is_kept_only_when_held_out_data_agrees_and_replays(tmp_path: Path) -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    opts = {"mean_replacement": True, "samples": 16, "holdout": 64, "time_limit": 30.0, "joint_rivals": 1,
            "joint_nodes": 20, "joint_rounds": 3, "exact_binaries": 0}
    res = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="mip", flops_budget=0.2,
                         calib_samples=128, mip_options=opts, refit_select=False)  # the MILP's own plan
    mr = res.report["mip"]["mean_replacement"]
    assert mr["requested"] and mr["readers"]
    assert mr["applied"] == (mr["holdout_with"] < mr["holdout_without"])
    assert mr["applied"]  # at 20% of the MACs the means help here (measured), so the replay below tests them
    assert bool(res.plan.bias_shift) == mr["applied"]
    path = tmp_path / "plan.json"
    res.plan.save(path)
    again = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, plan=Plan.load(path))
    x = data.test.x[:64]
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), res.module(x))
    assert again.report["accuracy"]["after"] == res.report["accuracy"]["after"]

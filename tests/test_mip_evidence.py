"""Held-out evidence of the MIP planner: the paired rule, the held-out pool, the never-worse check."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import oamipc
from oamipc.errors import UsageError
from oamipc.passes.mip.evidence import HOLDOUT_MAX, HOLDOUT_MIN, Measure, compare, holdout_order, holdout_size, no_worse
from oamipc.passes.mip.options import MipOptions
from oamipc.passes.plan_mip import PlanMipAnalysis

ROOT = Path(__file__).resolve().parent.parent
# Node limits bound every solve, so the plan is the same on every run; all held-out samples are used.
FAST = {"samples": 16, "holdout": 100_000, "time_limit": 30.0, "total_time_limit": 300.0, "joint_rivals": 1,
        "joint_nodes": 20, "joint_rounds": 4, "exact_binaries": 0}
SOLVER_FREE = ("l2", "l1", "taylor", "activation")


def _measure(correct: list[bool], hinge: list[float]) -> Measure:
    return Measure(np.array(correct, dtype=bool), np.array(hinge, dtype=np.float64))


def test_paired_rule_rejects_a_lower_hinge_that_costs_accuracy() -> None:
    """The proxy and accuracy disagree: the candidate lowers the mean hinge on every sample but one
    and loses 6 samples for 1 gained.  The hinge rule takes it; the paired rule refuses it."""
    n = 200
    before = _measure([True] * 150 + [False] * 50, [1.0] * n)
    correct = [True] * 144 + [False] * 6 + [True] + [False] * 49  # 6 lost, 1 gained
    after = _measure(correct, [0.5] * (n - 1) + [3.0])
    assert after.mean_hinge < before.mean_hinge
    assert compare(before, after, "hinge").accepted
    verdict = compare(before, after, "paired")
    assert not verdict.accepted
    assert (verdict.gained, verdict.lost) == (1, 6)
    assert not compare(before, after, "accuracy").accepted


def test_paired_rule_statistics_match_their_closed_forms() -> None:
    """McNemar's statistic and the paired z of the hinge drop, computed by hand, and the decision at
    the threshold: 9 gained / 1 lost is beyond noise at z = 1.645, 3 / 1 is not."""
    rng = np.random.default_rng(0)
    n = 500
    base = rng.random(n) < 0.8
    hinge = rng.random(n) * 2
    before = Measure(base, hinge)
    flip_up = np.flatnonzero(~base)[:9]
    flip_down = np.flatnonzero(base)[:1]
    correct = base.copy()
    correct[flip_up], correct[flip_down] = True, False
    noisy = hinge + rng.normal(0.0, 0.5, n)  # no systematic hinge change
    after = Measure(correct, noisy)
    v = compare(before, after, "paired", z=1.645)
    assert v.z_accuracy == pytest.approx(8 / math.sqrt(10))
    d = hinge - noisy
    assert v.z_hinge == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(n)))
    assert v.accepted and "accuracy higher" in v.reason
    correct = base.copy()
    correct[flip_up[:3]], correct[flip_down] = True, False
    weak = compare(before, Measure(correct, noisy), "paired", z=1.645)
    assert weak.z_accuracy == pytest.approx(2 / math.sqrt(4))
    assert abs(weak.z_hinge) < 1.645 and not weak.accepted
    # The same accuracy and a clearly lower hinge: accepted on the hinge's evidence.
    lower = compare(before, Measure(base, hinge - 0.1 + rng.normal(0.0, 0.01, n)), "paired")
    assert lower.accepted and (lower.gained, lower.lost) == (0, 0) and lower.z_hinge > 10


def test_loss_gate_refuses_any_loss_at_zero_and_only_a_significant_loss_above() -> None:
    """``loss_z`` sets how much lost accuracy refuses a move whose hinge is far lower.  4 lost / 1
    gained: McNemar's z is -3/sqrt(5) = -1.34, within noise; 12 lost / 2 gained: -10/sqrt(14) = -2.67."""
    n = 400
    hinge = np.linspace(0.5, 2.0, n)
    before = Measure(np.arange(n) < 300, hinge)

    def moved(lost: int, gained: int) -> Measure:
        correct = np.arange(n) < 300
        correct[:lost], correct[300:300 + gained] = False, True
        return Measure(correct, hinge - 0.3)  # the hinge drops on every sample: z_hinge is infinite

    small = moved(4, 1)
    v0 = compare(before, small, "paired", z=1.645, loss_z=0.0)
    assert (v0.gained, v0.lost) == (1, 4) and v0.z_accuracy == pytest.approx(-3 / math.sqrt(5))
    assert not v0.accepted and "accuracy lower" in v0.reason
    v1 = compare(before, small, "paired", z=1.645, loss_z=1.645)
    assert v1.accepted and "hinge lower" in v1.reason
    large = moved(12, 2)
    v2 = compare(before, large, "paired", z=1.645, loss_z=1.645)
    assert v2.z_accuracy == pytest.approx(-10 / math.sqrt(14)) and not v2.accepted
    # No loss at all: the gate is the same for every loss_z.
    assert compare(before, moved(0, 0), "paired", loss_z=0.0).accepted
    with pytest.raises(UsageError, match="accept_loss_z"):
        MipOptions(accept_loss_z=-1.0)


def test_never_worse_check_orders_by_accuracy_then_hinge() -> None:
    ref = _measure([True, True, False], [0.0, 0.5, 2.0])
    assert no_worse(_measure([True, True, True], [5.0, 5.0, 5.0]), ref)  # more accurate, hinge irrelevant
    assert no_worse(_measure([True, False, True], [0.0, 0.5, 1.0]), ref)  # as accurate, lower hinge
    assert not no_worse(_measure([True, False, True], [1.0, 1.0, 1.0]), ref)  # as accurate, higher hinge
    assert not no_worse(_measure([True, False, False], [0.0, 0.0, 0.0]), ref)  # less accurate


def test_holdout_order_drops_exactly_the_seen_rows_in_a_seeded_order() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 4, 4, generator=gen)
    x[10] = x[3]  # a duplicate of a seen row was seen too
    seen = x[[3, 50, 299]].clone()
    idx = holdout_order(x, seen, seed=5)
    assert sorted(idx.tolist()) == sorted(set(range(300)) - {3, 10, 50, 299})
    assert torch.equal(holdout_order(x, seen, seed=5), idx)
    assert not torch.equal(holdout_order(x, seen, seed=6), idx)
    assert len(holdout_order(x, x, seed=0)) == 0


def test_holdout_size_is_bounded_by_work_and_by_the_data() -> None:
    assert holdout_size(None, 1194, 25_000) == 1194  # small network: all of the data
    assert holdout_size(None, 60_000, 416_520) == 2_000_000_000 // 416_520
    assert holdout_size(None, 60_000, 1e9) == HOLDOUT_MIN
    assert holdout_size(None, 60_000, 1.0) == HOLDOUT_MAX
    assert holdout_size(64, 1000, 1.0) == 64 and holdout_size(5000, 1000, 1.0) == 1000
    with pytest.raises(UsageError, match="holdout"):
        MipOptions(holdout=0)
    with pytest.raises(UsageError, match="acceptance"):
        MipOptions(accept="sometimes")


def test_final_check_returns_the_solver_free_plan_when_the_milp_loses() -> None:
    """A MILP plan less accurate on the held-out samples than the best solver-free plan is replaced."""
    worse = _measure([True, False, False, False], [0.1, 0.1, 0.1, 0.1])
    better = _measure([True, True, False, False], [1.0, 1.0, 1.0, 1.0])
    judge = SimpleNamespace(measure=lambda kept: worse)
    solver = SimpleNamespace(heldout=judge, plain_heldout=judge, bias_shift={"fc": [1.0]}, records=[], joint_rounds=[],
                             calib=SimpleNamespace(holdout_source="train"))
    mip_plan, free_plan = np.array([True, False]), np.array([False, True])
    section, kept = PlanMipAnalysis()._select(solver, mip_plan, {"l2": (free_plan, better)}, "l2")
    np.testing.assert_array_equal(kept, free_plan)
    assert section["chosen"] == "solver-free" and "l2" in section["decided_by"]
    assert solver.bias_shift == {}
    judge.measure = lambda kept: better
    section, kept = PlanMipAnalysis()._select(solver, mip_plan, {"l2": (free_plan, better)}, "l2")
    assert section["chosen"] == "mip"
    np.testing.assert_array_equal(kept, mip_plan)


def _heldout_accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).double().mean())


@pytest.fixture(scope="module")
def digits_runs() -> dict[str, oamipc.CompileResult]:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    kw = {"data": data, "flops_budget": 0.3, "calib_samples": 128, "reconstruct": False}
    runs = {c: oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance=c, **kw) for c in SOLVER_FREE}
    runs["mip"] = oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance="mip", mip_options=FAST, **kw)
    runs["mip-again"] = oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance="mip", mip_options=FAST, **kw)
    return runs


def test_mip_is_never_worse_on_held_out_data_than_any_solver_free_plan(digits_runs) -> None:
    """Oracle: the train split less the 16 MILP samples, each pruned network run by PyTorch."""
    data = oamipc.load_data("digits")
    train = data.train
    calib = train.stratified_sample(128, seed=0)
    seen = calib.x[:16].reshape(16, -1)
    flat = train.x.reshape(len(train.x), -1)
    unseen = ~(flat[:, None, :] == seen[None]).all(-1).any(1)
    x, y = train.x[unseen].float(), train.y[unseen]
    mip = digits_runs["mip"]
    selection = mip.report["mip"]["selection"]
    assert selection["holdout_source"] == "train"
    assert selection["holdout_samples"] == int(unseen.sum()) == len(train.x) - 16
    got = _heldout_accuracy(mip.module, x, y)
    assert selection[selection["chosen"] if selection["chosen"] == "mip" else "best_solver_free"]["accuracy"] \
        == pytest.approx(got)
    free = {c: _heldout_accuracy(digits_runs[c].module, x, y) for c in SOLVER_FREE}
    assert got >= max(free.values()) - 1e-12
    best = max(SOLVER_FREE, key=lambda c: free[c])
    assert free[selection["best_solver_free"]["criterion"]] == pytest.approx(free[best])
    assert selection["best_solver_free"]["accuracy"] == pytest.approx(free[best])
    assert mip.report["mip"]["warm_start"]["chosen"] == selection["best_solver_free"]["criterion"]
    assert selection["rule"] == "paired" and selection["z"] == pytest.approx(1.645)


def test_every_accepted_move_has_evidence_and_the_plan_is_deterministic(digits_runs) -> None:
    a, b = digits_runs["mip"], digits_runs["mip-again"]
    assert a.report["mip"]["reproducible"]
    assert [g.kept for g in a.plan.groups] == [g.kept for g in b.plan.groups]
    assert a.report["mip"]["selection"] == b.report["mip"]["selection"]
    mip = a.report["mip"]
    moves = [r for r in mip["subproblems"] + mip["joint_rounds"] if r["outcome"] in ("improved", "rejected")]
    assert {r["outcome"] for r in moves} == {"improved", "rejected"}  # both kinds of verdict are exercised
    for r in moves:
        ev = r["evidence"]
        assert ev["accepted"] == (r["outcome"] == "improved")
        if ev["accepted"]:  # no loss of accuracy beyond the gate, and a gain beyond noise
            loss_z = mip["selection"]["loss_z"]
            assert ev["z_accuracy"] >= -loss_z
            if loss_z == 0:
                assert ev["gained"] >= ev["lost"]
            assert max(ev["z_accuracy"], ev["z_hinge"]) >= 1.645


def test_pipeline_names_the_acceptance_options() -> None:
    from oamipc.pipeline import parse_pipeline

    plan = parse_pipeline("plan-mip{flops-budget=0.5,accept=hinge,accept-z=2.5,holdout=100},prune-units")[0]
    assert (plan.options.accept, plan.options.accept_z, plan.options.holdout) == ("hinge", 2.5, 100)
    assert MipOptions().accept == "paired" and MipOptions().holdout is None
    gated = parse_pipeline("plan-mip{flops-budget=0.5,accept-loss-z=1.0},prune-units")[0]
    assert gated.options.accept_loss_z == 1.0

"""The budgeted MILP: exact MAC constraint, held-out acceptance guard, determinism, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pulp
import pytest
import torch

import oamipc
from oamipc.errors import UsageError
from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.budget import BudgetSolver, Calibration
from oamipc.passes.mip.options import MipOptions
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.plan import Plan
from oamipc.solver import solve
from oamipc.target import Target
from oamipc.tracing import trace

from .models import ZOO, example_input

ROOT = Path(__file__).resolve().parent.parent
# Small enough that no solve reaches its time limit (node limits bound the joint stage), so the
# plan must be the same on every run.
FAST = {"samples": 16, "holdout": 64, "time_limit": 30.0, "total_time_limit": 300.0, "joint_rivals": 1,
        "joint_nodes": 20, "joint_rounds": 4, "exact_binaries": 0}


@pytest.mark.parametrize("name", ["mlp", "residual_chain", "resnet"])
def test_mac_constraint_equals_the_cost_model(name: str) -> None:
    """With the keep variables fixed, the linearised MAC row equals UnitGraph.macs exactly,
    including layers that read and write the same group (products of widths)."""
    x = example_input(name, batch=1)
    gm = trace(ZOO[name].factory(), (x,))
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    rng = np.random.default_rng(0)
    calib = Calibration(x, torch.zeros(1, dtype=torch.long), x, torch.zeros(1, dtype=torch.long),
                        torch.zeros(1), torch.zeros(1))
    for group in [g for g in graph.groups if g.prunable]:
        current = rng.random(graph.n_units) < 0.7
        free = [u for u in group.units if u not in group.pinned]
        # spend_budget off: its lower bound on the MACs would make most random fixings infeasible.
        bs = BudgetSolver(gm, graph, calib, MipOptions(spend_budget=False), Target(flops_budget=1.0), forced=set())
        choice = rng.random(len(free)) < 0.5
        m = {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in free}
        for u, c in zip(free, choice):  # fixed after creation: PuLP resets a binary's bounds to [0, 1]
            m[u].lowBound = m[u].upBound = float(c)
        prob = pulp.LpProblem("macs", pulp.LpMinimize)
        bs._macs(prob, group, m, current)
        macs_row = list(prob.constraints.values())[-1]
        prob += pulp.LpAffineExpression()
        assert solve(prob).status == "optimal"
        expected = current.copy()
        for u, c in zip(free, choice):
            expected[u] = c
        # The row is  macs(m) - budget <= 0.
        assert pulp.value(macs_row) + bs.total_macs == pytest.approx(graph.macs(expected), rel=1e-9)


@pytest.fixture(scope="module")
def digits_mlp_mip() -> tuple[oamipc.CompileResult, oamipc.CompileResult]:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    runs = [oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="mip", flops_budget=0.3,
                           calib_samples=128, mip_options=FAST) for _ in range(2)]
    return runs[0], runs[1]


def test_mip_meets_the_budget_and_never_worsens_the_held_out_loss(digits_mlp_mip) -> None:
    result, _ = digits_mlp_mip
    report = result.report
    assert report["after"]["macs"] <= 0.3 * report["before"]["macs"] + 1e-9
    mip = report["mip"]
    # The paired rule never accepts a move that loses held-out samples, and the final check holds.
    assert mip["selection"]["mip"]["accuracy"] >= mip["selection"]["best_solver_free"]["accuracy"]
    warm = next(c for c in mip["warm_start"]["candidates"] if c["criterion"] == mip["warm_start"]["chosen"])
    assert mip["selection"]["mip"]["accuracy"] >= warm["holdout_accuracy"]
    assert mip["warm_start"]["chosen"] in {c["criterion"] for c in mip["warm_start"]["candidates"]}
    outcomes = {s["outcome"] for s in mip["subproblems"]}
    assert outcomes <= {"improved", "unchanged", "rejected", "no-incumbent", "skipped"}
    last = mip["subproblems"][0]  # the last hidden layer: affine in its keep variables
    assert last["encoding"]["relu_binaries"] == 0
    assert last["solve"]["status"] in {"optimal", "feasible"}
    assert last["solve"]["n_binaries"] >= last["free_units"]
    json.dumps(report)


def test_mip_is_deterministic(digits_mlp_mip) -> None:
    a, b = digits_mlp_mip
    rounds = a.report["mip"]["joint_rounds"]
    assert rounds and not any(r["time_limited"] for r in rounds)
    assert [r["outcome"] for r in rounds] == [r["outcome"] for r in b.report["mip"]["joint_rounds"]]
    assert a.plan == b.plan


def test_mip_needs_data_and_a_known_formulation() -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    with pytest.raises(UsageError, match="needs calibration data"):
        oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance="mip", flops_budget=0.5)
    with pytest.raises(UsageError, match="formulation"):
        oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=oamipc.load_data("digits"), importance="mip",
                       flops_budget=0.5, mip_options={"formulation": "magic"})


def test_spend_budget_never_lowers_the_warm_starts_macs(digits_mlp_mip) -> None:
    """With ``spend_budget`` (the default) the MILPs swap or add units: the plan keeps at least the
    MACs of the warm-start plan, which is rebuilt here by the chosen cheap criterion itself."""
    result, _ = digits_mlp_mip
    assert result.report["mip"]["spend_budget"] is True
    warm = result.report["mip"]["warm_start"]["chosen"]
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    plain = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance=warm, flops_budget=0.3,
                           calib_samples=128)
    assert plain.report["after"]["macs"] <= result.report["after"]["macs"] <= 0.3 * result.report["before"]["macs"]


def test_plan_violations_flags_a_plan_spending_less_than_its_start() -> None:
    from oamipc.passes.mip.rows import plan_violations

    x = example_input("mlp", batch=1)
    gm = trace(ZOO["mlp"].factory(), (x,))
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    start = graph.all_kept()
    smaller = start.copy()
    smaller[next(g for g in graph.groups if g.prunable).units[0]] = False
    target = Target(flops_budget=1.0)
    assert plan_violations(graph, smaller, start, target) == []
    [problem] = plan_violations(graph, smaller, start, target, spend=True)
    assert "less than the 1.0000 of the plan it started from (spend_budget)" in problem
    assert plan_violations(graph, start, smaller, target, spend=True) == []  # adding units is allowed


def test_the_mip_planner_named_in_a_pipeline_makes_the_same_plan(digits_mlp_mip) -> None:
    """``plan-mip{...},prune-units`` is the same planner as ``importance="mip"``: the same plan and record,
    with the options spelled as the pipeline string spells them."""
    result, _ = digits_mlp_mip
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    options = ",".join(f"{k.replace('_', '-')}={v}" for k, v in FAST.items())
    piped = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=oamipc.load_data("digits"), calib_samples=128,
                           pipeline=f"plan-mip{{flops-budget=0.3,{options}}},prune-units")
    selected = result.report.get("refit_select", {})  # the compile may have chosen another plan after the refit
    own = Plan.from_dict(selected["planner_plan"]) if selected.get("changed") else result.plan
    assert piped.plan is not None and piped.plan.groups == own.groups
    assert piped.report["mip"]["warm_start"] == result.report["mip"]["warm_start"]
    assert [s["outcome"] for s in piped.report["mip"]["subproblems"]] == \
        [s["outcome"] for s in result.report["mip"]["subproblems"]]


def test_mip_options_are_validated_when_made_and_name_fields() -> None:
    with pytest.raises(UsageError, match=r"^relax \(the LP relaxation\) applies to the 'paper' formulation only$"):
        MipOptions(relax=True)
    with pytest.raises(UsageError, match="unknown MIP option.*nodes; known: formulation, solver"):
        MipOptions.of({"nodes": 3})
    assert MipOptions.of({"time_limit": 5}) == MipOptions(time_limit=5)
    assert MipOptions.of(None) == MipOptions()


def test_mip_device_is_checked_when_the_options_are_made() -> None:
    with pytest.raises(UsageError, match="MIP device 'tpu' is unknown"):
        MipOptions(device="tpu")
    with pytest.raises(UsageError, match="joint_exact_macs must be positive"):
        MipOptions(joint_exact_macs=0)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="torch sees no usable CUDA GPU"):
            MipOptions(device="cuda")
    assert MipOptions(device="auto").torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mip_plan_on_cuda_is_the_cpu_plan() -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    plans = [oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="mip", flops_budget=0.3,
                            calib_samples=128, mip_options={**FAST, "device": device}).plan
             for device in ("cpu", "cuda")]
    assert plans[0] == plans[1]

"""The refit-aware selection: candidate plans judged by held-out accuracy after a refit.

Oracles: every candidate rebuilt from the report, pruned and refit through the public API on the
fold's fitting samples, and measured with PyTorch's own argmax on the fold's judging samples; the
MAC count of the unit graph and of the pruned network; the planner's plan without reconstruction.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import oamipc
from oamipc.cli import app
from oamipc.data import Dataset, DataSplits
from oamipc.errors import UsageError
from oamipc.passes import ReconstructPass, UnitGroupAnalysis, plan_refit
from oamipc.passes.plan_refit import POOL_SAMPLES, group_positions, judge_split, tilt_weights, width_split
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.plan import Plan
from oamipc.target import Target
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 0.15


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, DataSplits, torch.Tensor]:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    data = oamipc.load_data("digits")
    return model, data, torch.zeros(1, *data.train.x.shape[1:])


@pytest.fixture(scope="module")
def selected(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor]) -> oamipc.CompileResult:
    model, data, example = digits
    return oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False,
                          refit_select=True)


def test_the_chosen_candidate_is_the_most_accurate_after_its_refit(
        digits: tuple[torch.nn.Module, DataSplits, torch.Tensor], selected: oamipc.CompileResult) -> None:
    model, data, example = digits
    record = selected.report["refit_select"]
    assert record["ran"] and len(record["candidates"]) >= 5
    assert selected.plan is not None
    x, y = data.train.x.float(), data.train.y
    # The folds, as specified: a seeded order of the train split, its first POOL_SAMPLES, dealt into three.
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7919))[:POOL_SAMPLES]
    parts = [order[i::3] for i in range(3)]
    with torch.no_grad():
        dense = model.eval()(x)
    rows: list[tuple[int, float]] = []
    for cand in record["candidates"]:
        plan = selected.plan.with_kept(cand["kept"])
        correct, hinge, n = 0, 0.0, 0
        for i, judge in enumerate(parts):
            fit = torch.cat([parts[j] for j in range(3) if j != i]).sort().values
            split = DataSplits(Dataset("fit", x[fit], y[fit]), Dataset("judge", x[judge], y[judge]))
            net = oamipc.compile(model, example, data=split, plan=plan, reconstruct=ReconstructPass(samples=0)).module
            with torch.no_grad():
                logits = net(x[judge]).double()
            correct += int((logits.argmax(1) == y[judge]).sum())
            n += len(judge)

            def margin(z: torch.Tensor, idx: torch.Tensor = judge) -> torch.Tensor:
                true = z.gather(1, y[idx][:, None]).squeeze(1)
                return true - z.scatter(1, y[idx][:, None], float("-inf")).amax(1)

            hinge += float((margin(dense[judge].double()) - margin(logits)).clamp(min=0).sum())
        assert correct == cand["correct"], cand["name"]
        assert hinge / n == pytest.approx(cand["hinge"], rel=1e-6, abs=1e-9), cand["name"]
        rows.append((-correct, hinge / n))
    best = min(range(len(rows)), key=lambda i: rows[i])
    assert record["chosen"] == record["candidates"][best]["name"]
    chosen_kept = {g.name: g.kept for g in selected.plan.groups if g.name in record["candidates"][best]["kept"]}
    assert chosen_kept == record["candidates"][best]["kept"]


def test_every_candidate_and_the_result_keep_within_the_budget(selected: oamipc.CompileResult) -> None:
    for cand in selected.report["refit_select"]["candidates"]:
        assert cand["macs_kept"] <= BUDGET + 1e-9, cand["name"]
    report = selected.report
    assert report["after"]["macs"] <= BUDGET * report["before"]["macs"] * (1 + 1e-9)


def test_the_folds_leave_the_refit_aware_candidate_out(selected: oamipc.CompileResult) -> None:
    record = selected.report["refit_select"]
    assert record["mode"] == "folds" and record["refit_aware"] == "off"
    assert not any(c["origin"] == "refit-aware" for c in record["candidates"])


def test_the_off_switch_gives_the_planners_own_plan(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor],
                                                    selected: oamipc.CompileResult) -> None:
    model, data, example = digits
    plain = oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False,
                           reconstruct=False)
    off = oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False,
                         refit_select=False)
    assert plain.plan is not None and off.plan is not None and selected.plan is not None
    assert off.plan.groups == plain.plan.groups
    assert off.report["refit_select"] == {"enabled": False, "note": "turned off (--no-refit-select)"}
    assert "reconstruct" in off.report
    record = selected.report["refit_select"]
    first = record["candidates"][0]
    assert first["origin"] == "planner"
    assert first["kept"] == {g.name: g.kept for g in plain.plan.groups if g.name in first["kept"]}
    if record["changed"]:
        assert Plan.from_dict(record["planner_plan"]).groups == plain.plan.groups
    else:
        assert selected.plan.groups == plain.plan.groups


def test_the_selection_is_deterministic(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor],
                                       selected: oamipc.CompileResult) -> None:
    model, data, example = digits
    again = oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False,
                           refit_select=True)
    strip = ("seconds",)
    assert ({k: v for k, v in again.report["refit_select"].items() if k not in strip}
            == {k: v for k, v in selected.report["refit_select"].items() if k not in strip})
    assert again.plan is not None and selected.plan is not None and again.plan.groups == selected.plan.groups


def test_the_cost_rule_skips_an_expensive_refit(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model, data, example = digits
    monkeypatch.setattr(plan_refit, "WORK_MACS", 1.0)
    res = oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False)
    record = res.report["refit_select"]
    assert record["enabled"] and not record["ran"] and "too expensive" in record["reason"]
    plain = oamipc.compile(model, example, data=data, importance="l1", flops_budget=BUDGET, lossless=False,
                           reconstruct=False)
    assert res.plan is not None and plain.plan is not None and res.plan.groups == plain.plan.groups


def test_usage_errors(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor]) -> None:
    model, data, example = digits
    with pytest.raises(UsageError, match="needs reconstruction"):
        oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.5, reconstruct=False,
                       refit_select=True)
    plan = oamipc.compile(model, example, importance="l1", flops_budget=0.5).plan
    with pytest.raises(UsageError, match="replayed plan"):
        oamipc.compile(model, example, data=data, plan=plan, refit_select=True)


def test_folds_are_disjoint_and_cover_the_pool() -> None:
    folds = judge_split(1000, seed=3)
    judged = torch.cat([j for j, _ in folds])
    assert sorted(judged.tolist()) == sorted(set(judged.tolist())) and len(judged) == 1000
    for judge, fit in folds:
        assert not set(judge.tolist()) & set(fit.tolist())
        assert len(judge) + len(fit) == 1000
    big = judge_split(10 * POOL_SAMPLES, seed=3)
    assert sum(len(j) for j, _ in big) == POOL_SAMPLES


def _mlp_graph() -> tuple[Any, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.ReLU(), torch.nn.Linear(40, 30), torch.nn.ReLU(),
                              torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    x = torch.randn(1, 20)
    gm = trace(net, (x,))
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    return gm, graph


@pytest.mark.parametrize("tilt", [0.0, 0.5, 1.0, -0.5])
def test_width_splits_fit_the_budget_and_keep_the_ranking(tilt: float) -> None:
    _, graph = _mlp_graph()
    rng = np.random.default_rng(0)
    ranking = rng.random(graph.n_units)
    target = Target(flops_budget=0.3, round_to=1)
    kept = width_split(graph, ranking, target, tilt_weights(graph, tilt))
    assert kept is not None
    # Closed-form MACs of the chain 20 -> a -> b -> c -> 5.
    pos = group_positions(graph)
    groups = sorted((g for g in graph.groups if g.prunable), key=lambda g: pos[g.id])
    a, b, c = (int(kept[g.units].sum()) for g in groups)
    macs = 20 * a + a * b + b * c + c * 5
    assert macs == graph.macs(kept) and macs <= 0.3 * (20 * 40 + 40 * 30 + 30 * 20 + 20 * 5)
    for g in groups:  # inside a group the best-ranked units stay
        units = np.asarray(g.units)
        n = int(kept[units].sum())
        top = set(units[np.argsort(-ranking[units], kind="stable")[:n]].tolist())
        assert set(units[kept[units]].tolist()) == top
    widths = [a / 40, b / 30, c / 20]
    if tilt > 0:
        assert widths[0] >= widths[-1]
    if tilt < 0:
        assert widths[0] <= widths[-1]


def test_a_tilt_is_within_one_step_of_a_full_budget() -> None:
    _, graph = _mlp_graph()
    ranking = np.arange(graph.n_units, dtype=np.float64)[::-1].copy()
    target = Target(flops_budget=0.3, round_to=1)
    kept = width_split(graph, ranking, target, tilt_weights(graph, 0.5))
    assert kept is not None
    limit = 0.3 * graph.macs()
    for g in graph.groups:  # no single unit more fits anywhere: the budget is spent
        if not g.prunable or kept[g.units].all():
            continue
        more = kept.copy()
        more[next(u for u in g.units if not kept[u])] = True
        assert graph.macs(more) > limit


def test_cli_flag(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["compile", str(ROOT / "examples" / "digits_mlp.pt"), "--data", "digits",
                                      "--importance", "l1", "--flops-budget", "0.3", "-o", str(out), "--no-bench",
                                      "--refit-select"])
    assert result.exit_code == 0, result.output
    assert "refit selection:" in result.output
    result = CliRunner().invoke(app, ["compile", str(ROOT / "examples" / "digits_mlp.pt"), "--data", "digits",
                                      "--importance", "l1", "--flops-budget", "0.3", "-o", str(out), "--no-bench",
                                      "--refit-select", "--no-reconstruct"])
    assert result.exit_code == UsageError("").exit_code and "needs reconstruction" in result.output


# ------------------------------------------------------------------------------------------------
# the cheap judgement: one fit/judge split where the folds cost too much and the train split is big


def _work(model: torch.nn.Module, shape: tuple[int, ...], n: int) -> tuple[float, float]:
    """One candidate's work under the folds and under the one split, for a train split of ``n``."""
    from oamipc.passes.costs import count_costs

    gm = trace(model, (torch.zeros(1, *shape),))
    macs, layers = count_costs(gm).macs, plan_refit.fittable_layers(gm)
    per = {name: sum(plan_refit.candidate_work(macs, layers, len(f), len(j)) for j, f in split)
           for name, split in (("folds", judge_split(n, 0)), ("split", plan_refit.one_split(n, 0)))}
    return per["folds"], per["split"]


def test_the_cost_rule_takes_the_cheap_judgement_for_fashion_networks() -> None:
    lenet = oamipc.load_model(ROOT / "examples" / "fashion_lenet5.pt")
    folds, split = _work(lenet, (1, 28, 28), 60_000)
    # Closed form: 416,520 MACs, 5 layers; folds of 2,048 fitting + 1,024 judged, three times; one split of 512 + 2,048.
    assert folds == pytest.approx(3 * 416_520 * (5 * 2048 + 1024))
    assert split == pytest.approx(416_520 * (5 * 512 + 2048))
    mode, k = plan_refit.choose_mode(60_000, folds, split, plan_refit.WORK_MACS, plan_refit.SPLIT_WORK_MACS)
    assert (mode, k) == ("split", int(plan_refit.SPLIT_WORK_MACS // split)) and k >= plan_refit.SPLIT_MIN_CANDIDATES
    # The same network with a train split too small for the split: no selection.
    assert plan_refit.choose_mode(2000, folds, split, plan_refit.WORK_MACS, plan_refit.SPLIT_WORK_MACS) == ("none", 0)
    # The digits MLP keeps the folds (its behaviour before the cheap judgement).
    mlp = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    folds, split = _work(mlp, (1, 8, 8), 1258)
    assert plan_refit.choose_mode(1258, folds, split, plan_refit.WORK_MACS, plan_refit.SPLIT_WORK_MACS)[0] == "folds"


def test_one_split_is_disjoint_seeded_and_sized() -> None:
    [(judge, fit)] = plan_refit.one_split(10_000, seed=5)
    assert len(judge) == plan_refit.SPLIT_JUDGE_SAMPLES and len(fit) == plan_refit.SPLIT_FIT_SAMPLES
    assert not set(judge.tolist()) & set(fit.tolist())
    [(again, fit2)] = plan_refit.one_split(10_000, seed=5)
    assert torch.equal(judge, again) and torch.equal(fit, fit2)


@pytest.fixture(scope="module")
def big_digits(digits: tuple[torch.nn.Module, DataSplits, torch.Tensor]) -> DataSplits:
    """The digits with a train split of 3,774 (the images three times, seeded noise on the copies)."""
    _, data, _ = digits
    gen = torch.Generator().manual_seed(0)
    x = data.train.x.float()
    big = torch.cat([x, x + 0.5 * torch.randn(x.shape, generator=gen), x + 0.5 * torch.randn(x.shape, generator=gen)])
    return DataSplits(Dataset("train", big, data.train.y.repeat(3)), data.test)


@pytest.mark.parametrize("rank", ["correct", "loss"])
def test_the_cheap_judgements_winner_is_a_direct_rebuilds_best(
        digits: tuple[torch.nn.Module, DataSplits, torch.Tensor], big_digits: DataSplits,
        monkeypatch: pytest.MonkeyPatch, rank: str) -> None:
    model, _, example = digits
    monkeypatch.setattr(plan_refit, "WORK_MACS", 1.0)  # the folds never fit: the cost rule takes the split
    monkeypatch.setattr(plan_refit, "RANK", rank)
    monkeypatch.setattr(plan_refit, "GROW_ROUNDS", {"folds": 1, "split": 12})  # later rounds, judged and rebuilt too
    # Under the loss ranking no growth of the first round improves on the refit-aware candidate and no later
    # round runs: leave it out there, so that the later rounds' rebuild is checked under both rankings.
    monkeypatch.setattr(plan_refit, "REFIT_AWARE", {"folds": False, "split": rank == "correct"})
    res = oamipc.compile(model, example, data=big_digits, importance="l1", flops_budget=BUDGET, lossless=False)
    record = res.report["refit_select"]
    assert record["ran"] and record["mode"] == "split" and record["folds"] == 1 and record["rank"] == rank
    assert record["judge_samples"] == plan_refit.SPLIT_JUDGE_SAMPLES and record["fit_samples"] == [512]
    assert len(record["candidates"]) >= plan_refit.SPLIT_MIN_CANDIDATES and res.plan is not None
    assert record["grow_rounds"] > 1 and any(c["round"] >= 2 for c in record["candidates"])  # rebuilt below too
    assert record["refit_aware"] == ("built" if rank == "correct" else "off")
    assert (rank == "correct") == any(c["origin"] == "refit-aware" for c in record["candidates"])  # rebuilt below
    x, y = big_digits.train.x.float(), big_digits.train.y
    # The split, as specified: the seeded order of the train split, its first 2,048 judged, the next 512 fit.
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7919))
    judge, fit = order[:2048].sort().values, order[2048:2560].sort().values
    split = DataSplits(Dataset("fit", x[fit], y[fit]), Dataset("judge", x[judge], y[judge]))
    rows = []
    for cand in record["candidates"]:
        net = oamipc.compile(model, example, data=split, plan=res.plan.with_kept(cand["kept"]),
                             reconstruct=ReconstructPass(samples=0)).module
        with torch.no_grad():
            logits = net(x[judge]).double()
        correct = int((logits.argmax(1) == y[judge]).sum())
        loss = float(torch.nn.functional.cross_entropy(logits, y[judge]))
        assert correct == cand["correct"], cand["name"]
        assert loss == pytest.approx(cand["loss"], rel=1e-6), cand["name"]
        rows.append((-correct, cand["hinge"]) if rank == "correct" else (loss, -correct))
    best = min(range(len(rows)), key=lambda i: rows[i])
    assert record["chosen"] == record["candidates"][best]["name"]
    assert {g.name: g.kept for g in res.plan.groups if g.name in record["candidates"][best]["kept"]} == \
        record["candidates"][best]["kept"]
    again = oamipc.compile(model, example, data=big_digits, importance="l1", flops_budget=BUDGET, lossless=False)
    assert again.plan is not None and again.plan.groups == res.plan.groups  # deterministic


# ------------------------------------------------------------------------------------------------
# later rounds of one-group growths (the cheap judgement's coordinate search)


def _search(rounds: int, want: tuple[int, int, int] | None) -> tuple[Any, list[Any]]:
    """The width splits of a uniform 30% plan of the 20-40-30-20-5 MLP, judged by a closed form:
    correct = 10,000 minus 10 per unit of distance from the widths ``want`` (None: the uniform plan's)."""
    from oamipc.passes.plan_refit import Candidate, Judged, PlanRefitSelectAnalysis, planner_for

    gm, graph = _mlp_graph()
    target = Target(flops_budget=0.3, round_to=1)
    pos = group_positions(graph)
    groups = sorted((g for g in graph.groups if g.prunable), key=lambda g: pos[g.id])

    start = width_split(graph, np.arange(graph.n_units, dtype=np.float64)[::-1].copy(), target,
                        tilt_weights(graph, 0.0))
    assert start is not None
    goal = want or tuple(int(start[g.units].sum()) for g in groups)

    def judge(c: Any) -> Any:
        dist = sum(abs(int(c.kept[g.units].sum()) - w) for g, w in zip(groups, goal))
        return Judged(c, 10_000 - 10 * dist, 10_000, float(dist))
    first = judge(Candidate("uniform", "planner", start))
    sel = PlanRefitSelectAnalysis(target=target, inner=planner_for("l1", target), tilts=())
    return graph, [first, *sel._width_splits(gm, graph, [first], judge, 11, rounds)]


def test_later_rounds_grow_from_the_best_so_far_while_it_improves() -> None:
    from oamipc.passes.plan_refit import best

    want = (10, 22, 20)  # a narrow first layer, wide later ones: several growths from the uniform split
    graph, got = _search(12, want)
    _, first_round = _search(1, want)
    # One round is a prefix of the search: the later rounds only add candidates.
    assert [j.candidate.name for j in first_round] == [j.candidate.name for j in got[:len(first_round)]]
    assert all(j.candidate.grow_round <= 1 for j in first_round)
    rounds = sorted({j.candidate.grow_round for j in got})
    assert rounds[-1] >= 2, [j.candidate.name for j in got]
    for r in rounds:
        if r < 2:
            continue
        before = [j for j in got if j.candidate.grow_round < r]
        lead = best(before)
        this = [j for j in got if j.candidate.grow_round == r]
        # every candidate of round r grows one group of the best plan of the rounds before ...
        assert all(j.candidate.name.startswith(lead.candidate.name + ", ") for j in this)
        assert all(j.candidate.name.count(" x1.3") == r for j in this)
        # ... and round r ran only because round r - 1 improved on the best before it
        assert best([j for j in got if j.candidate.grow_round < r - 1]).correct < lead.correct
    assert best(got).correct > best(first_round).correct  # the search went further than one round
    limit = 0.3 * graph.macs()
    assert all(graph.macs(j.candidate.kept) <= limit for j in got)
    masks = [j.candidate.kept.tobytes() for j in got]
    assert len(set(masks)) == len(masks)  # no plan judged twice


def test_the_search_stops_where_no_growth_improves() -> None:
    _, got = _search(12, None)  # the uniform split is the goal: every growth moves away from it
    assert [j.candidate.grow_round for j in got] == [0, 1, 1, 1]


def test_with_kept_replaces_only_the_named_groups_and_leaves_the_original_alone(
        selected: oamipc.CompileResult) -> None:
    plan = copy.deepcopy(selected.plan)  # the fixture is shared
    plan.bias_shift = {"dummy": [1.0]}
    first, *rest = plan.groups
    other = plan.with_kept({first.name: [0]})
    assert other.groups[0].kept == [0] and plan.groups[0].kept == first.kept
    assert [g.kept for g in other.groups[1:]] == [g.kept for g in rest]
    assert other.bias_shift == {} and plan.bias_shift == {"dummy": [1.0]}
    other.settings["changed"] = True
    assert "changed" not in plan.settings

"""The refit selection's cheap judgement (one fit/judge split): every candidate's test accuracy.

For each network and MAC budget, one default ``mip`` compile runs with the cheap judgement's
work limit lifted (``--split-work-macs``, default 1e12: all 12 candidates), and every candidate
the selection judged is then replayed (its plan pruned and reconstructed as the compile does)
and measured on the test split.  A smaller work limit judges a prefix of the same candidate
list (the bases first, then the width splits in order), so the table gives, for every candidate
count ``k``, the test accuracy of the plan the rule would choose among the first ``k``: the
evidence for ``SPLIT_WORK_MACS``.  The planner's own plan is candidate 1 (``k = 1``: the
selection off).  Candidates other than the planner's are replayed without a bias shift, as the
selection's own refits judge them.

Run::

    nice -n 5 python benchmarks/refit_split.py --family tune --budgets 0.3,0.15 \
        --out benchmarks/results/refit_split_tune.json
    nice -n 5 python benchmarks/refit_split.py --models fashion_lenet5,fashion_mlp --budgets 0.5,0.3,0.15

``--rank loss`` or ``--rank hinge`` ranks the candidates by a continuous measure instead of the
count (``plan_refit.RANK``); whatever the run's ranking, the second table gives what each ranking
picks among the candidates the default work limit judges.  ``--judge-samples`` and
``--fit-samples`` change the cheap judgement's split (the cost rule counts them, so the second
table's ``k`` follows).

``--no-refit-aware`` leaves out the refit-aware candidate (the rule before it, for an A/B);
``--digits`` adds the half's digits members (the three folds, every candidate they afford);
``--refit-aware-folds`` judges the refit-aware candidate under the folds too (off by default).

``--grow-rounds 12`` turns on the later rounds of one-group growths (off by default); the table's
"one round" column is then the rule without them, from the same run.

Without ``--family`` the shipped Fashion-MNIST examples; ``--family tune|report`` takes that
half's Fashion-MNIST members (``--members`` to name some, ``--seeds``).  With
``--split-work-macs 1.2e10 --only-chosen``: the default rule's own choice against the planner's
plan, the other candidates not measured on test::

    nice -n 5 python benchmarks/refit_split.py --family report --seeds 0 --budgets 0.3,0.15 \
        --split-work-macs 1.2e10 --only-chosen --out benchmarks/results/refit_split_report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.atomic import atomic_output
from oamipc.passes import plan_refit
from oamipc.plan import Plan

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import family  # noqa: E402
import mip_quality  # noqa: E402

#: The library's own work limit of the cheap judgement (the command line lifts it for the run).
DEFAULT_SPLIT_WORK_MACS = plan_refit.SPLIT_WORK_MACS


def rank_key(cand: dict[str, Any], rank: str) -> tuple[float, ...]:
    """A recorded candidate's sort key under the ranking ``rank`` (``plan_refit.Judged.key``)."""
    return plan_refit.rank_key(cand["correct"], cand["hinge"], cand.get("loss", 0.0), rank)


def winners(cands: list[dict[str, Any]], rank: str | None = None) -> list[int]:
    """For every prefix length ``k`` (1..n), the index the ranking ``rank`` (None: the library's) picks among
    the first ``k``."""
    how = plan_refit.RANK if rank is None else rank
    return [min(range(k), key=lambda i: (*rank_key(cands[i], how), i)) for k in range(1, len(cands) + 1)]


def default_count(row: dict[str, Any]) -> int:
    """How many candidates the library's default work limit judges for this row's network (the folds' limit
    where the row ran the folds: the digits networks)."""
    per = row.get("work_macs_per_candidate") or 1.0
    limit = plan_refit.WORK_MACS if row.get("mode") == "folds" else DEFAULT_SPLIT_WORK_MACS
    return max(1, min(plan_refit.MAX_CANDIDATES, int(limit // per), len(row["candidates"])))


def one_round(cands: list[dict[str, Any]]) -> int:
    """The index the rule picks among the candidates of at most one growth round (the rule before later rounds)."""
    keep = [i for i, c in enumerate(cands) if c.get("round", 0) <= 1]
    return min(keep, key=lambda i: (*rank_key(cands[i], plan_refit.RANK), i))


def run_one(net: mip_quality.Network, budget: float, seed: int, only_planner: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    res = oamipc.compile(net.model, net.example, data=net.data, importance="mip", flops_budget=budget, seed=seed)
    seconds = time.perf_counter() - start
    rec = res.report["refit_select"]
    assert res.plan is not None
    row: dict[str, Any] = {"model": net.name, **{k: v for k, v in net.info.items() if k != "training"},
                           "budget": budget, "seconds": seconds, "mode": rec.get("mode"),
                           "selection_seconds": rec.get("seconds"), "chosen": rec.get("chosen"),
                           "rank": rec.get("rank"), "work_macs_per_candidate": rec.get("work_macs_per_candidate"),
                           "accuracy_dense": res.report["accuracy"]["before"],
                           "accuracy_chosen": res.report["accuracy"]["after"], "candidates": []}
    if not rec.get("ran"):
        row["reason"] = rec.get("reason")
        return row
    planner = Plan.from_dict(rec["planner_plan"]) if rec.get("changed") else res.plan
    one = one_round(rec["candidates"])
    for i, cand in enumerate(rec["candidates"]):
        plan = planner if i == 0 else res.plan.with_kept(cand["kept"])
        if only_planner and i > 0 and cand["name"] != rec["chosen"] and i != one:
            test = float("nan")
        elif cand["name"] == rec["chosen"]:
            test = res.report["accuracy"]["after"]
        else:
            again = oamipc.compile(net.model, net.example, data=net.data, plan=plan, seed=seed)
            test = again.report["accuracy"]["after"]
        row["candidates"].append({k: cand.get(k, 0) for k in ("name", "origin", "round", "widths", "macs_kept",
                                                             "accuracy", "correct", "hinge", "loss")}
                                 | {"test_accuracy": test})
    row["prefix_winner"] = winners(row["candidates"])
    row["one_round_winner"] = one
    return row


def table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    head = ("| model | MACs | " + " | ".join(f"k={k}" for k in ks)
            + " | one round | all rounds | best candidate on test |")
    lines = [head, "|" + "---|" * (len(ks) + 5)]
    for r in rows:
        c, w = r["candidates"], r.get("prefix_winner", [])
        cells = [f"{100 * c[w[min(k, len(c)) - 1]]['test_accuracy']:.2f}%" if c else "-" for k in ks]
        cells += [f"{100 * c[r['one_round_winner']]['test_accuracy']:.2f}% ({c[r['one_round_winner']]['name']})",
                  f"{100 * c[w[-1]]['test_accuracy']:.2f}% ({c[w[-1]]['name']})"] if c else ["-", "-"]
        top = max(c, key=lambda x: x["test_accuracy"]) if c else None
        lines.append(f"| {r['model']} | {r['budget']:.2f} | " + " | ".join(cells)
                     + (f" | {100 * top['test_accuracy']:.2f}% ({top['name']}) |" if top else " | - |"))
    return "\n".join(lines)


def rank_table(rows: list[dict[str, Any]]) -> str:
    """Per row, the test accuracy of the plan each ranking picks among the candidates the default work limit
    judges (their list as this run's ranking built it), and the best of them on test; then the mean and worst
    change from the planner's plan per ranking."""
    ranks = list(plan_refit.RANKS)
    lines = ["| model | MACs | k | planner's plan | " + " | ".join(ranks) + " | best of the k on test |",
             "|" + "---|" * (len(ranks) + 5)]
    gains: dict[str, list[float]] = {r: [] for r in [*ranks, "best"]}
    for r in rows:
        c = r["candidates"]
        if not c or any(x["test_accuracy"] != x["test_accuracy"] for x in c):  # nan: not measured
            continue
        k = default_count(r)
        own = c[0]["test_accuracy"]
        cells = []
        for rank in ranks:
            i = winners(c[:k], rank)[-1]
            gains[rank].append(100 * (c[i]["test_accuracy"] - own))
            cells.append(f"{100 * c[i]['test_accuracy']:.2f}% ({c[i]['name']})")
        top = max(c[:k], key=lambda x: x["test_accuracy"])
        gains["best"].append(100 * (top["test_accuracy"] - own))
        lines.append(f"| {r['model']} | {r['budget']:.2f} | {k} | {100 * own:.2f}% | " + " | ".join(cells)
                     + f" | {100 * top['test_accuracy']:.2f}% |")
    if gains["best"]:
        lines.append("| mean / worst change (points) | | | | " + " | ".join(
            f"{sum(gains[x]) / len(gains[x]):+.2f} / {min(gains[x]):+.2f}" for x in ranks)
            + f" | {sum(gains['best']) / len(gains['best']):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_lenet5,fashion_mlp")
    parser.add_argument("--family", choices=("tune", "report"), default=None)
    parser.add_argument("--members", default=None, help="with --family: architectures or member names")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budgets", default="0.5,0.3,0.15")
    parser.add_argument("--split-work-macs", type=float, default=1e12)
    parser.add_argument("--grow-rounds", type=int, default=None,
                        help="rounds of one-group growths under the cheap judgement (default: the library's)")
    parser.add_argument("--rank", choices=plan_refit.RANKS, default=None,
                        help="how the selection ranks its candidates (default: the library's)")
    parser.add_argument("--judge-samples", type=int, default=None,
                        help="judged samples of the cheap split (default: the library's; the cost rule counts them)")
    parser.add_argument("--fit-samples", type=int, default=None,
                        help="fitting samples of the cheap split (default: the library's; the cost rule counts them)")
    parser.add_argument("--no-refit-aware", action="store_true",
                        help="leave the refit-aware candidate out (plan_refit.REFIT_AWARE), the rule before it")
    parser.add_argument("--refit-aware-folds", action="store_true",
                        help="judge the refit-aware candidate under the folds too (the digits networks)")
    parser.add_argument("--digits", action="store_true",
                        help="with --family: also the half's digits members (they run the three folds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-chosen", action="store_true",
                        help="measure on test only the chosen plan and the planner's (the rule's own outcome, quicker)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "refit_split.json")
    args = parser.parse_args(argv)
    plan_refit.SPLIT_WORK_MACS = args.split_work_macs
    if args.rank is not None:
        plan_refit.RANK = args.rank
    if args.judge_samples is not None:
        plan_refit.SPLIT_JUDGE_SAMPLES = args.judge_samples
    if args.fit_samples is not None:
        plan_refit.SPLIT_FIT_SAMPLES = args.fit_samples
    if args.refit_aware_folds:
        plan_refit.REFIT_AWARE = {**plan_refit.REFIT_AWARE, "folds": True}
    if args.no_refit_aware:
        plan_refit.REFIT_AWARE = {mode: False for mode in plan_refit.REFIT_AWARE}
    if args.grow_rounds is not None:
        plan_refit.GROW_ROUNDS = {**plan_refit.GROW_ROUNDS, "split": args.grow_rounds}
    torch.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.family:
        members = [m for m in family.members(args.family, seeds=tuple(int(s) for s in args.seeds.split(",")),
                                             names=tuple(args.members.split(",")) if args.members else None)
                   if m.data == "fashion-mnist" or args.digits]
        networks = mip_quality.family_networks(members, family.cache_dir(), {})
    else:
        networks = mip_quality.shipped_networks(args.models.split(","))
    rows: list[dict[str, Any]] = []
    for net in networks:
        for b in budgets:
            rows.append(run_one(net, b, args.seed, args.only_chosen))
            r = rows[-1]
            print(f"  {r['model']} {b:.2f}: chosen {r['chosen']} {100 * r['accuracy_chosen']:.2f}% "
                  f"({r['seconds']:.1f} s, selection {r['selection_seconds']:.1f} s)", file=sys.stderr, flush=True)
            with atomic_output(args.out) as tmp:
                Path(tmp).write_text(json.dumps({"setting": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                indent=1))
    if args.only_chosen:
        print("| model | MACs | planner's plan | one round | chosen | vs one round | chosen plan | candidates | "
              "selection s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            c = r["candidates"]
            own = c[0]["test_accuracy"] if c else r["accuracy_chosen"]
            first = c[r["one_round_winner"]]["test_accuracy"] if c else r["accuracy_chosen"]
            print(f"| {r['model']} | {r['budget']:.2f} | {100 * own:.2f}% | {100 * first:.2f}% | "
                  f"{100 * r['accuracy_chosen']:.2f}% | {100 * (r['accuracy_chosen'] - first):+.2f} | {r['chosen']} | "
                  f"{len(c)} | {r['selection_seconds']:.1f} |")
    else:
        print(table(rows, [1, 5, 6, 7, 8, 10, 12]))
        print()
        print(rank_table(rows))


if __name__ == "__main__":
    main()

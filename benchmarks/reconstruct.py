"""Does layer reconstruction help?  Test accuracy without fine-tuning, with and without it.

For each shipped example model, MAC budget and criterion, the model is compiled with
``reconstruct=False`` (the plan and the accuracy of the plain pruned network), then the same plan
is replayed with the ``reconstruct`` pass (the default options unless ``--samples``/``--ridge``
say otherwise).  Replaying the plan gives exactly the network a compile with reconstruction
makes (the pass runs after pruning and does not change the plan), without solving a MILP twice.

``--ablation`` adds, for every row, the accuracy with other pass options (fewer and more
samples, a weaker and a stronger ridge, ``layers=readers``).  ``--single-group`` runs the
experiment that chose ``layers=all``: plans that prune one unit group only (the ``l1`` plan's
choice in that group, every other group kept whole), reconstructed with ``layers=readers`` and
with ``layers=all``.

``--refit-select`` compiles every row once with reconstruction and the refit-aware selection
(``refit_select=True``, :class:`oamipc.passes.PlanRefitSelectAnalysis`); the planner's own plan
(from the selection's record) is replayed without and with reconstruction as before, so each row
has the accuracy before and after the selection, from one MILP solve.

``--family digits-mlp2x128,...`` runs members of the trained-network family
(``benchmarks/family.py``; architectures or ``<architecture>-s<seed>``, trained or read from its
cache) instead of the shipped examples.

Run::

    python benchmarks/reconstruct.py --criteria l1                       # four models, ~2 minutes
    python benchmarks/reconstruct.py --family digits-mlp2x128,digits-mlp3x96,digits-mlp4x64 --criteria l1,mip
    python benchmarks/reconstruct.py --criteria mip                      # the MILP plans, ~10 minutes
    python benchmarks/reconstruct.py --criteria l1 --ablation --single-group
    python benchmarks/reconstruct.py --models digits_mlp --budgets 0.3  # a quick look

It prints a Markdown table and writes JSON (default ``benchmarks/results/reconstruct_<criteria>.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.hardware import cpu_model
from oamipc.passes import ReconstructPass

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # the family's networks are defined in their own module
    sys.path.insert(0, str(HERE))
import family  # noqa: E402

DATA = {"digits": "digits", "fashion": "fashion-mnist"}
MODELS = "digits_mlp,digits_cnn,fashion_mlp,fashion_lenet5"
#: Pass options compared with the defaults by --ablation.
ABLATION: dict[str, dict[str, Any]] = {
    "samples=512": {"samples": 512}, "samples=16384": {"samples": 16384}, "ridge=1e-4": {"ridge": 1e-4},
    "ridge=1e-2": {"ridge": 1e-2}, "layers=readers": {"layers": "readers"},
}


def _rebuilt(model: torch.nn.Module, example: torch.Tensor, data: oamipc.DataSplits, plan: oamipc.Plan,
             options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Replay ``plan`` with reconstruction; the accuracy and the pass's record."""
    start = time.perf_counter()
    res = oamipc.compile(model, example, data=data, plan=plan, seed=seed, reconstruct=ReconstructPass(**options))
    rec = res.report["reconstruct"]
    return {"accuracy": res.report["accuracy"]["after"], "seconds": time.perf_counter() - start,
            "reconstruct_seconds": rec["seconds"], "samples": rec["samples"], "layers_refit": rec["layers_refit"],
            "output_error_before": rec["output_error_before"], "output_error_after": rec["output_error_after"],
            "layers": rec["layers"]}


Network = tuple[str, torch.nn.Module, oamipc.DataSplits, torch.Tensor]


def shipped(models: list[str]) -> Iterator[Network]:
    """The shipped example files ``examples/<name>.pt``, with their data and an example input."""
    for name in models:
        model = oamipc.load_model(ROOT / "examples" / f"{name}.pt")
        data = oamipc.load_data(DATA[name.split("_")[0]])
        yield name, model, data, torch.zeros(1, *data.train.x.shape[1:])


def family_members(names: list[str]) -> Iterator[Network]:
    """Members of the trained-network family (trained now or read from its cache)."""
    for member in family.members("all", names=tuple(names)):
        model, _ = family.network(member)
        yield member.name, model, family.splits(member.data), family.example_input(member)


def _selected(model: torch.nn.Module, example: torch.Tensor, data: oamipc.DataSplits, criterion: str,
              budget: float, options: dict[str, Any], seed: int) -> tuple[oamipc.CompileResult, dict[str, Any]]:
    """Compile with reconstruction and the refit selection; the planner's own plan (plain, without
    reconstruction) as the result, and the selection's outcome."""
    start = time.perf_counter()
    res = oamipc.compile(model, example, data=data, importance=criterion, flops_budget=budget, seed=seed,
                         reconstruct=ReconstructPass(**options), refit_select=True)
    seconds = time.perf_counter() - start
    record = res.report["refit_select"]
    own = oamipc.Plan.from_dict(record["planner_plan"]) if record.get("changed") else res.plan
    assert own is not None
    plain = oamipc.compile(model, example, data=data, plan=own, seed=seed, reconstruct=False)
    plain.report.update({k: v for k, v in res.report.items() if k == "mip"})
    widths = {g.name: len(g.kept) for g in res.plan.groups} if res.plan is not None else {}
    outcome = {"accuracy": res.report["accuracy"]["after"], "compile_seconds": seconds, "ran": record.get("ran"),
               "reason": record.get("reason"), "chosen": record.get("chosen"), "changed": record.get("changed"),
               "seconds": record.get("seconds"), "widths": widths,
               "candidates": [{k: c[k] for k in ("name", "origin", "widths", "macs_kept", "accuracy", "hinge")}
                              for c in record.get("candidates", [])]}
    return plain, outcome


def run(networks: Iterable[Network], budgets: list[float], criteria: list[str], options: dict[str, Any], seed: int,
        ablation: bool, refit_select: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, model, data, example in networks:
        for budget in budgets:
            for criterion in criteria:
                start = time.perf_counter()
                selected = None
                if refit_select:
                    res, selected = _selected(model, example, data, criterion, budget, options, seed)
                else:
                    res = oamipc.compile(model, example, data=data, importance=criterion, flops_budget=budget,
                                         seed=seed, reconstruct=False)
                assert res.plan is not None
                rep = res.report
                row: dict[str, Any] = {
                    "model": name, "budget": budget, "criterion": criterion,
                    "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                    "accuracy_dense": rep["accuracy"]["before"], "accuracy_pruned": rep["accuracy"]["after"],
                    "compile_seconds": time.perf_counter() - start,
                    "plan": {g.name: g.kept for g in res.plan.groups},
                    "reconstructed": _rebuilt(model, example, data, res.plan, options, seed)}
                if selected is not None:
                    row["refit_select"] = selected
                if "mip" in rep:  # whether a wall-clock safety net fired (then the plan depends on the load)
                    row["mip"] = {"seconds": rep["mip"].get("seconds"), "reproducible": rep["mip"].get("reproducible")}
                if ablation:
                    row["ablation"] = {label: _rebuilt(model, example, data, res.plan, options | extra, seed)
                                       for label, extra in ABLATION.items()}
                rows.append(row)
                rec = row["reconstructed"]
                picked = (f"; refit select {selected['accuracy']:.4f} ({selected['chosen']})"
                          if selected is not None else "")
                print(f"  {name} {budget:.2f} {criterion:5s} acc {row['accuracy_pruned']:.4f} -> {rec['accuracy']:.4f} "
                      f"(output error {rec['output_error_before']:.3f} -> {rec['output_error_after']:.3f}, "
                      f"{rec['reconstruct_seconds']:.1f} s){picked}", file=sys.stderr, flush=True)
    return rows


def single_group(networks: Iterable[Network], budgets: list[float], seed: int) -> list[dict[str, Any]]:
    """Prune one group at a time (the l1 plan's choice there): reconstruct with layers=readers vs all."""
    rows: list[dict[str, Any]] = []
    for name, model, data, example in networks:
        for budget in budgets:
            base = oamipc.compile(model, example, data=data, importance="l1", flops_budget=budget, seed=seed,
                                  reconstruct=False).plan
            assert base is not None
            for i, group in enumerate(base.groups):
                if len(group.kept) == group.size:
                    continue
                plan = copy.deepcopy(base)
                for j, other in enumerate(plan.groups):
                    if j != i:
                        other.kept = list(range(other.size))
                row: dict[str, Any] = {"model": name, "budget": budget, "group": group.name,
                                       "kept": len(group.kept), "size": group.size}
                plain = oamipc.compile(model, example, data=data, plan=plan, seed=seed, reconstruct=False)
                row["accuracy_pruned"] = plain.report["accuracy"]["after"]
                for layers in ("readers", "all"):
                    rec = _rebuilt(model, example, data, plan, {"layers": layers}, seed)
                    row[layers] = {"accuracy": rec["accuracy"], "layers_refit": rec["layers_refit"]}
                rows.append(row)
                print(f"  {name} {budget:.2f} only {group.name} {len(group.kept)}/{group.size}: "
                      f"{row['accuracy_pruned']:.4f}, readers {row['readers']['accuracy']:.4f}, "
                      f"all {row['all']['accuracy']:.4f}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]], criteria: list[str]) -> str:
    select = any("refit_select" in r for r in rows)
    head = " | ".join(f"{c} | {c} + reconstruct" + (f" | {c} + reconstruct, refit selection | chosen" if select
                                                      else "") for c in criteria)
    per = 4 if select else 2
    lines = [f"| model | MACs kept (budget) | {head} |", "|---|---|" + "---|" * per * len(criteria)]
    keys = sorted({(r["model"], r["budget"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    for model, budget in keys:
        cells = []
        for c in criteria:
            match = [r for r in rows if r["model"] == model and r["budget"] == budget and r["criterion"] == c]
            if match:
                cells += [f"{100 * match[0]['accuracy_pruned']:.2f}%",
                          f"**{100 * match[0]['reconstructed']['accuracy']:.2f}%**"]
                if select:
                    sel = match[0]["refit_select"]
                    widths = "-".join(str(w) for w in sel["widths"].values())
                    cells += [f"**{100 * sel['accuracy']:.2f}%**",
                              f"{sel['chosen']} ({widths})" if sel["ran"] else f"not run: {sel['reason']}"]
            else:
                cells += [""] * per
        dense = next(r["accuracy_dense"] for r in rows if r["model"] == model)
        lines.append(f"| {model} ({100 * dense:.2f}% dense) | {budget:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(rows: list[dict[str, Any]]) -> str:
    labels = list(ABLATION)
    lines = ["| model | budget | criterion | default | " + " | ".join(labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{100 * r['ablation'][label]['accuracy']:.2f}%" for label in labels]
        lines.append(f"| {r['model']} | {r['budget']:.2f} | {r['criterion']} | "
                     f"{100 * r['reconstructed']['accuracy']:.2f}% | " + " | ".join(cells) + " |")
    means = [sum(r["ablation"][label]["accuracy"] for r in rows) / len(rows) for label in labels]
    default = sum(r["reconstructed"]["accuracy"] for r in rows) / len(rows)
    lines.append(f"| mean | | | {100 * default:.2f}% | " + " | ".join(f"{100 * m:.2f}%" for m in means) + " |")
    return "\n".join(lines)


def single_group_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | budget | pruned group (kept/size) | no reconstruct | layers=readers | layers=all |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['budget']:.2f} | {r['group']} ({r['kept']}/{r['size']}) | "
                     f"{100 * r['accuracy_pruned']:.2f}% | {100 * r['readers']['accuracy']:.2f}% | "
                     f"{100 * r['all']['accuracy']:.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="shipped examples")
    parser.add_argument("--family", default=None, help="family members instead (benchmarks/family.py names)")
    parser.add_argument("--budgets", default="0.5,0.3,0.15")
    parser.add_argument("--criteria", default="l1")
    parser.add_argument("--samples", type=int, default=None, help="reconstruct samples (default: the pass's)")
    parser.add_argument("--ridge", type=float, default=None, help="reconstruct ridge (default: the pass's)")
    parser.add_argument("--ablation", action="store_true", help="also other pass options on every row")
    parser.add_argument("--single-group", action="store_true", help="also the layers=readers vs all experiment")
    parser.add_argument("--refit-select", action="store_true",
                        help="compile with the refit selection too (before and after it, one MILP solve)")
    parser.add_argument("--refit-work-macs", type=float, default=None,
                        help="override the refit selection's cost limit (plan_refit.WORK_MACS): an experiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = args.family.split(",") if args.family else args.models.split(",")

    def networks() -> Iterator[Network]:
        return family_members(models) if args.family else shipped(models)

    criteria = args.criteria.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    options = {k: v for k, v in (("samples", args.samples), ("ridge", args.ridge)) if v is not None}
    if args.refit_work_macs is not None:
        from oamipc.passes import plan_refit

        plan_refit.WORK_MACS = args.refit_work_macs
    rows = run(networks(), budgets, criteria, options, args.seed, args.ablation, args.refit_select)
    result: dict[str, Any] = {
        "setting": {"models": models, "budgets": budgets, "criteria": criteria,
                    "reconstruct": dataclasses.asdict(ReconstructPass(**options)),
                    "refit_select": args.refit_select, "refit_work_macs": args.refit_work_macs,
                    "seed": args.seed, "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(), "cpu": cpu_model()},
        "rows": rows}
    print(table(rows, criteria))
    if args.ablation:
        print()
        print(ablation_table(rows))
    if args.single_group:
        result["single_group"] = single_group(networks(), budgets, args.seed)
        print()
        print(single_group_table(result["single_group"]))
    prefix = "reconstruct_family" if args.family else "reconstruct"
    out = args.out or ROOT / "benchmarks" / "results" / f"{prefix}_{'_'.join(criteria)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()

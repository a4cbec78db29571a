"""Does the MILP choose better units than the cheap criteria?  Test accuracy at equal MACs.

For each shipped example model and each MAC budget (fraction of the original MACs kept), the
model is compiled with every criterion (``mip`` and the solver-free baselines) at the same
``--flops-budget``, and the pruned network's test accuracy is measured WITHOUT fine-tuning.
The ``mip`` rows also record the held-out calibration loss before/after the MILP, the time, and
how each sub-problem ended.

Run::

    python benchmarks/mip_quality.py                                   # digits MLP and CNN
    python benchmarks/mip_quality.py --models fashion_lenet5,fashion_mlp  # needs dataset-fashion-mnist
    python benchmarks/mip_quality.py --budgets 0.3 --criteria l2,mip --time-limit 2   # quick look

Criteria: the solver-free ones, ``mip`` (the default ``budget`` formulation), ``mip_mr`` (the same
with ``--mean-replacement``), ``mip_paper`` (the
thesis's formulation, one sample per class) and ``mip_paper_lp`` (its LP relaxation, ``--relax``).

It prints a Markdown table and writes JSON (default ``benchmarks/results/mip_quality_<models>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.hardware import cpu_model  # plans can differ in the last bits of float kernels between CPUs

ROOT = Path(__file__).resolve().parent.parent
DATA = {"digits": "digits", "fashion": "fashion-mnist"}
# Criteria names that run importance "mip" with these options on top of the command line's.
MIP_VARIANTS: dict[str, dict[str, Any]] = {"mip": {}, "mip_mr": {"mean_replacement": True},
                                           "mip_nospend": {"spend_budget": False},
                                           "mip_paper": {"formulation": "paper"},
                                           "mip_paper_lp": {"formulation": "paper", "relax": True}}


def run(models: list[str], budgets: list[float], criteria: list[str], mip_options: dict[str, Any],
        seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in models:
        model = oamipc.load_model(ROOT / "examples" / f"{name}.pt")
        data = oamipc.load_data(DATA[name.split("_")[0]])
        example = torch.zeros(1, *data.train.x.shape[1:])
        for budget in budgets:
            for criterion in criteria:
                start = time.perf_counter()
                opts = None
                if criterion in MIP_VARIANTS:
                    opts = dict(mip_options) | MIP_VARIANTS[criterion]
                    if "paper" in criterion:
                        opts.pop("samples", None)  # the paper's one sample per class
                res = oamipc.compile(model, example, data=data, importance="mip" if opts else criterion,
                                     flops_budget=budget, seed=seed, mip_options=opts)
                rep = res.report
                row = {"model": name, "budget": budget, "criterion": criterion,
                       "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                       "accuracy_before": rep["accuracy"]["before"], "accuracy_after": rep["accuracy"]["after"],
                       "seconds": time.perf_counter() - start,
                       # The applied plan (kept unit indices per group): restructurings must keep it.
                       "plan": {g.name: g.kept for g in res.plan.groups} if res.plan is not None else None}
                if "paper" in criterion:
                    mip = rep["mip"]
                    row["mip"] = {"threshold_rule": mip["threshold_rule"], "seconds": mip["seconds"],
                                  "classes": [{"label": c["label"], "status": c["status"], "gap": c["solve"].get("gap"),
                                               "binaries": c["solve"].get("n_binaries"),
                                               "constraints": c["solve"].get("n_constraints"),
                                               "solve_seconds": c["solve"].get("seconds")} for c in mip["classes"]]}
                elif criterion in MIP_VARIANTS:
                    mip = rep["mip"]
                    row["mip"] = {"warm_start": mip["warm_start"]["chosen"], "holdout_loss": mip["holdout_loss"],
                                  "seconds": mip["seconds"], "reproducible": mip["reproducible"],
                                  "mean_replacement": mip["mean_replacement"],
                                  "subproblems": [{k: s[k] for k in ("group", "free_units", "outcome", "build_seconds")}
                                                  | {"status": s["solve"].get("status"), "gap": s["solve"].get("gap"),
                                                     "solve_seconds": s["solve"].get("seconds"),
                                                     "binaries": s["solve"].get("n_binaries"),
                                                     "constraints": s["solve"].get("n_constraints")}
                                                  for s in mip["subproblems"]],
                                  "joint_rounds": [{k: r[k] for k in ("radius", "flips", "outcome", "holdout_before",
                                                                      "holdout_after")}
                                                   | {"status": r["solve"].get("status"), "gap": r["solve"].get("gap"),
                                                      "solve_seconds": r["solve"].get("seconds"),
                                                      "time_limited": r["time_limited"], "candidates": r["candidates"]}
                                                   for r in mip["joint_rounds"]]}
                rows.append(row)
                print(f"  {name} budget {budget:.2f} {criterion:10s} acc {row['accuracy_after']:.4f} "
                      f"macs {row['macs_kept']:.3f} ({row['seconds']:.1f} s)", file=sys.stderr)
    return rows


def _versions() -> dict[str, str]:
    """Versions of the libraries a plan depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "pulp", "highspy", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def table(rows: list[dict[str, Any]], criteria: list[str]) -> str:
    lines = ["| model | MACs kept (budget) | " + " | ".join(criteria) + " |",
             "|---|---|" + "---|" * len(criteria)]
    keys = sorted({(r["model"], r["budget"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    for model, budget in keys:
        cells = []
        for c in criteria:
            match = [r for r in rows if r["model"] == model and r["budget"] == budget and r["criterion"] == c]
            cells.append(f"{100 * match[0]['accuracy_after']:.2f}%" if match else "")
        before = next(r["accuracy_before"] for r in rows if r["model"] == model)
        lines.append(f"| {model} ({100 * before:.2f}% dense) | {budget:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_mlp,digits_cnn")
    parser.add_argument("--budgets", default="0.5,0.3,0.15")
    parser.add_argument("--criteria", default="mip,mip_mr,mip_paper,mip_paper_lp,l1,l2,taylor,activation,random")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per MILP solve (a safety net)")
    parser.add_argument("--total-time-limit", type=float, default=120.0)
    parser.add_argument("--mip-samples", type=int, default=64, help="budget formulation (paper: one per class)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the paper's class problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    criteria = args.criteria.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    opts = {"time_limit": args.time_limit, "total_time_limit": args.total_time_limit, "samples": args.mip_samples,
            "jobs": args.jobs}
    rows = run(models, budgets, criteria, opts, args.seed)
    result = {"setting": {"models": models, "budgets": budgets, "criteria": criteria, "mip_options": opts,
                          "seed": args.seed, "torch": torch.__version__, "python": platform.python_version(),
                          "machine": platform.machine(), "threads": torch.get_num_threads(),
                          "cpu": cpu_model(), "versions": _versions()},
              "rows": rows}
    print(table(rows, criteria))
    out = args.out or ROOT / "benchmarks" / "results" / f"mip_quality_{'_'.join(models)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()

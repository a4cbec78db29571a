"""How long the default ``mip`` compile of a shipped example takes (issue 13: LeNet-5 within 90 s).

For each MAC budget, ``oamipc.compile(model, x, data=..., importance="mip", flops_budget=b)`` with
every other option at its default (reconstruction on, MIP defaults): the wall time of the whole
call and the CPU time of the process during it (``time.process_time``: all its threads), the MIP
analysis's own seconds, the test accuracy, how many held-out samples judged the moves, which plan
was returned (``mip.selection``) and a hash of the plan (its JSON as ``--save-plan`` writes it),
so that two versions can be checked for the same plan.  Timings on a shared machine are noisy:
compare two versions only when run one after the other on the same machine (alternating them,
several times), and compare CPU seconds as well as wall seconds.  ``--threads N`` sets torch's
intra-op threads first (default: torch's own choice).

Run::

    python benchmarks/mip_compile_time.py                                  # LeNet-5 / Fashion-MNIST
    python benchmarks/mip_compile_time.py --model digits_mlp --data digits --budgets 0.3
    python benchmarks/mip_compile_time.py --budgets 0.5 --repeat 3 --threads 1

It prints a Markdown table and writes JSON (default ``benchmarks/results/mip_compile_time.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import oamipc

ROOT = Path(__file__).resolve().parent.parent


def measure(model_name: str, data_name: str, budgets: list[float], repeat: int = 1) -> list[dict[str, Any]]:
    model = oamipc.load_model(ROOT / "examples" / f"{model_name}.pt")
    data = oamipc.load_data(data_name)
    example = torch.zeros(1, *data.train.x.shape[1:])
    rows = []
    for _ in range(repeat):
        for budget in budgets:
            start, cpu = time.perf_counter(), time.process_time()
            res = oamipc.compile(model, example, data=data, importance="mip", flops_budget=budget)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            mip = res.report["mip"]
            assert res.plan is not None
            plan = json.dumps(res.plan.to_dict(), indent=1)  # as Plan.save writes it
            rows.append({"model": model_name, "budget": budget, "wall_s": wall, "cpu_s": cpu, "mip_s": mip["seconds"],
                         "timings_s": res.report["timings_s"], "accuracy": res.report["accuracy"]["after"],
                         "holdout_samples": mip.get("holdout_samples"), "selection": mip.get("selection"),
                         "reproducible": mip["reproducible"], "joint_rounds": len(mip.get("joint_rounds", [])),
                         "plan_sha256": hashlib.sha256(plan.encode()).hexdigest(), "threads": torch.get_num_threads()})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fashion_lenet5", help="a shipped example (examples/NAME.pt)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--budgets", default="0.5,0.3,0.15")
    parser.add_argument("--repeat", type=int, default=1, help="compile every budget this many times")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mip_compile_time.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = measure(args.model, args.data, [float(b) for b in args.budgets.split(",")], args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "python": platform.python_version(),
                                    "threads": torch.get_num_threads()}, indent=1))
    print("| model | MACs kept | compile s | CPU s | mip s | test accuracy | held-out samples | plan |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['mip_s']:.1f} | "
              f"{100 * r['accuracy']:.2f}% | {r['holdout_samples']} | {r['plan_sha256'][:12]} |")
    return rows


if __name__ == "__main__":
    main()

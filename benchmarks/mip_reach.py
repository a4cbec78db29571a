"""How far does the MIP analysis reach?  Size and time on a VGG-style 32x32 net and a ResNet-style net.

Quality needs trained networks and matching data, which these machines cannot download; this
script measures *reach* only: untrained (seeded) networks on seeded random 32x32 inputs, labels
taken from the network's own predictions (the MILP needs no labels).  For each network and MAC
budget it records the total compile time, how every layer sub-problem ended (solved, skipped
because of its ReLU/max-pool binaries, time limit) and how many joint rounds ran in the time given.

Run::

    python benchmarks/mip_reach.py                        # both nets, budget 0.5
    python benchmarks/mip_reach.py --nets vgg32 --budgets 0.5,0.3 --total-time-limit 60

It prints a Markdown table and writes JSON (default ``benchmarks/results/mip_reach.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oamipc
from oamipc.models import SmallResNet, SmallVGG

ROOT = Path(__file__).resolve().parent.parent

# The 32x32 RGB variants of the zoo's VGG- and ResNet-style nets (oamipc.models): VGG with
# (conv-BN-ReLU x2, maxpool) x3 at 16/32/64 channels, FC 128, FC 10; ResNet with a 16-channel stem
# and basic blocks to 16, 32 (stride 2), 64 (stride 2), global pool, FC 10.
NETS: dict[str, Callable[[], nn.Module]] = {
    "vgg32": lambda: SmallVGG(in_channels=3, image_size=32),
    "resnet32": lambda: SmallResNet(in_channels=3),
}


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = NETS[name]()
    # Give BatchNorm non-trivial statistics (as a trained net has), with one pass in train mode.
    model.train()
    with torch.no_grad():
        model(torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def run(nets: list[str], budgets: list[float], opts: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    x = torch.randn(600, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name in nets:
        model = _net(name)
        for budget in budgets:
            start = time.perf_counter()
            res = oamipc.compile(model, x[:1], data=x, importance="mip", flops_budget=budget, mip_options=opts)
            mip = res.report["mip"]
            row = {"net": name, "budget": budget, "seconds": time.perf_counter() - start,
                   "macs": res.report["before"]["macs"], "units": res.report["units"]["units"],
                   "macs_kept": res.report["after"]["macs"] / res.report["before"]["macs"],
                   "warm_start": mip["warm_start"]["chosen"], "holdout_loss": mip["holdout_loss"],
                   "subproblems": [{"group": s["group"], "free_units": s["free_units"], "outcome": s["outcome"],
                                    "status": s["solve"].get("status"), "binaries": s["solve"].get("n_binaries"),
                                    "constraints": s["solve"].get("n_constraints"),
                                    "build_seconds": s["build_seconds"], "solve_seconds": s["solve"].get("seconds")}
                                   for s in mip["subproblems"]],
                   "joint_rounds": [{k: r[k] for k in ("radius", "flips", "outcome", "time_limited")}
                                    | {"solve_seconds": r["solve"].get("seconds")} for r in mip["joint_rounds"]]}
            rows.append(row)
            print(f"  {name} budget {budget:.2f}: {row['seconds']:.1f} s", file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| net | MACs | units | budget | compile s | layer sub-problems (solved / skipped) | joint rounds "
              "(improved / all) | held-out hinge (warm -> final) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        solved = sum(s["outcome"] in ("improved", "unchanged", "rejected") for s in r["subproblems"])
        improved = sum(j["outcome"] == "improved" for j in r["joint_rounds"])
        h = r["holdout_loss"]
        lines.append(f"| {r['net']} | {r['macs']:,.0f} | {r['units']} | {r['budget']:.2f} | {r['seconds']:.0f} | "
                     f"{solved} / {len(r['subproblems']) - solved} | {improved} / {len(r['joint_rounds'])} | "
                     f"{h['warm_start']:.3f} -> {h['final']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="vgg32,resnet32")
    parser.add_argument("--budgets", default="0.5")
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--total-time-limit", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mip_reach.json")
    args = parser.parse_args(argv)
    opts = {"time_limit": args.time_limit, "total_time_limit": args.total_time_limit}
    rows = run(args.nets.split(","), [float(b) for b in args.budgets.split(",")], opts)
    result = {"setting": {"mip_options": opts, "torch": torch.__version__, "python": platform.python_version(),
                          "threads": torch.get_num_threads()}, "rows": rows}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()

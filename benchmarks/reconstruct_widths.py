"""Does the split of a MAC budget across layers matter once the layers are refit?

The criteria and the MILP choose units for the pruned network *without* refit; the ``reconstruct``
pass then refits every layer.  This benchmark fixes the units' ranking inside each layer (the L2
norm of a unit's incoming weights, as the ``l2`` criterion does) and varies only how many units
each hidden layer keeps, at about the same MACs, and measures test accuracy without and with the
refit (no fine-tuning).  If plans that are poor without refit become the best with it, a
selection that does not know about the refit cannot find them.

Run::

    python benchmarks/reconstruct_widths.py                       # the family's digits-mlp4x64, both seeds
    python benchmarks/reconstruct_widths.py --members digits-mlp4x64-s0 --widths 19-19-19-19,24-16-14-14

Members are the trained-network family's (``benchmarks/family.py``); ``--widths`` lists the kept
units per hidden Linear layer, first to last (the head keeps all its outputs).  Prints a Markdown
table and writes JSON (default ``benchmarks/results/reconstruct_widths.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.atomic import atomic_output
from oamipc.passes import ReconstructPass

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the family's networks are defined in their own module
    sys.path.insert(0, str(HERE))
import family  # noqa: E402

#: Widths near 15% of digits-mlp4x64's MACs (2,554 of 17,024): uniform, front-heavy, back-heavy.
WIDTHS = "19-19-19-19,22-18-16-14,24-16-14-14,26-15-13-12,20-20-19-16,17-21-22-20,16-22-22-21,14-24-24-21"


def run(member_names: list[str], widths: list[tuple[int, ...]], seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for member in family.members("all", names=tuple(member_names)):
        model, _ = family.network(member)
        data, example = family.splits(member.data), family.example_input(member)
        base = oamipc.compile(model, example, data=data, importance="l2", flops_budget=0.15, seed=seed,
                              reconstruct=False).plan
        assert base is not None
        state = model.state_dict()
        hidden = [g for g in base.groups if len(g.kept) < g.size]
        for split in widths:
            if len(split) != len(hidden):
                raise SystemExit(f"{member.name}: {len(hidden)} pruned layers, widths {split} name {len(split)}")
            plan = copy.deepcopy(base)
            for group, k in zip([g for g in plan.groups if len(g.kept) < g.size], split, strict=True):
                norms = state[f"{group.name}.weight"].norm(dim=1)
                group.kept = sorted(torch.argsort(norms, descending=True)[:k].tolist())
            plain = oamipc.compile(model, example, data=data, plan=plan, seed=seed, reconstruct=False)
            refit = oamipc.compile(model, example, data=data, plan=plan, seed=seed, reconstruct=ReconstructPass())
            rep = refit.report
            row = {"model": member.name, "widths": list(split),
                   "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                   "accuracy_dense": rep["accuracy"]["before"], "accuracy_pruned": plain.report["accuracy"]["after"],
                   "accuracy_reconstructed": rep["accuracy"]["after"]}
            rows.append(row)
            print(f"  {member.name} {split} MACs {row['macs_kept']:.3f}: {row['accuracy_pruned']:.4f} -> "
                  f"{row['accuracy_reconstructed']:.4f}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="digits-mlp4x64", help="family architectures or members")
    parser.add_argument("--widths", default=WIDTHS, help="comma list of dash-separated hidden widths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reconstruct_widths.json")
    args = parser.parse_args(argv)
    widths = [tuple(int(k) for k in w.split("-")) for w in args.widths.split(",") if w.strip()]
    rows = run([m.strip() for m in args.members.split(",") if m.strip()], widths, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps({"setting": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    print("| network (dense) | hidden widths | MACs kept | no refit | refit |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({100 * r['accuracy_dense']:.2f}%) | {'-'.join(map(str, r['widths']))} | "
              f"{r['macs_kept']:.3f} | {100 * r['accuracy_pruned']:.2f}% | {100 * r['accuracy_reconstructed']:.2f}% |")
    return rows


if __name__ == "__main__":
    main()

"""Are two runs of the quality benchmark the same plans?  The check behind every restructuring.

``benchmarks/mip_quality.py`` records each applied plan (kept unit indices per group).  This
script compares two of its JSON files row by row (model, budget, criterion) and prints a
Markdown table: identical plans, or how many units differ.  A row whose MIP was stopped by a
clock (``reproducible`` false in either run) can differ between runs of the same code; it is
marked so and does not count as a difference.

Run::

    python benchmarks/compare_plans.py before.json after.json [--out diff.json]

Exit status 1 when a reproducible row differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _key(row: dict[str, Any]) -> tuple[str, float, str]:
    return row["model"], float(row["budget"]), row["criterion"]


def _units_differing(a: dict[str, list[int]], b: dict[str, list[int]]) -> int:
    return sum(len(set(a.get(g, [])) ^ set(b.get(g, []))) for g in set(a) | set(b))


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per row present in both runs: same plan or not, and whether it could vary."""
    rows_b = {_key(r): r for r in after["rows"]}
    out = []
    for row in before["rows"]:
        other = rows_b.get(_key(row))
        if other is None:
            continue
        reproducible = all(r.get("mip", {}).get("reproducible", True) for r in (row, other))
        plans = row.get("plan"), other.get("plan")
        if plans[0] is None or plans[1] is None:
            raise SystemExit(f"{_key(row)}: a run has no plan; make both with a mip_quality.py that records plans")
        diff = _units_differing(plans[0], plans[1])
        out.append({"model": row["model"], "budget": row["budget"], "criterion": row["criterion"],
                    "same_plan": diff == 0, "units_differing": diff, "reproducible": reproducible,
                    "accuracy_before": row["accuracy_after"], "accuracy_after": other["accuracy_after"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    print("| model | budget | criterion | same plan | units differing | clock-free in both runs | accuracy A "
          "| accuracy B |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']:.2f} | {r['criterion']} | {'yes' if r['same_plan'] else 'no'} | "
              f"{r['units_differing']} | {'yes' if r['reproducible'] else 'no'} | {100 * r['accuracy_before']:.2f}% | "
              f"{100 * r['accuracy_after']:.2f}% |")
    if args.out:
        args.out.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "rows": rows}, indent=1))
    bad = [r for r in rows if r["reproducible"] and not r["same_plan"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a change to the layer reconstruction leave the shipped examples' fits as they were?

``save DIR`` compiles every shipped example with reconstruction on (``l1`` at half the MACs and
``taylor`` at 30%, the example's own data set) and writes, per case, the reconstructed network's
state dict (``DIR/<case>.pt``) and the report's ``reconstruct`` section without its seconds
(``DIR/sections.json``).  Run it with the code before a change and with the code after it (each
in its own checkout), then ``compare DIR_BEFORE DIR_AFTER`` prints, per case, whether the
sections are equal (keys only the newer report has left out) and whether every tensor of the
state dicts is equal to the bit, and writes that as JSON (``--out``).

Run::

    python benchmarks/reconstruct_identity.py save /tmp/before      # with the code before
    python benchmarks/reconstruct_identity.py save /tmp/after       # with the code after
    python benchmarks/reconstruct_identity.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.atomic import atomic_output

ROOT = Path(__file__).resolve().parent.parent
CASES = (("fashion_lenet5", "fashion-mnist"), ("digits_cnn", "digits"), ("digits_mlp", "digits"),
         ("fashion_mlp", "fashion-mnist"), ("fashion_vit", "fashion-mnist"), ("digits_seq", "digits"))
CRITERIA = (("l1", 0.5), ("taylor", 0.3))


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, Any] = {}
    for name, data in CASES:
        model = oamipc.load_model(ROOT / "examples" / f"{name}.pt")
        splits = oamipc.load_data(data)
        for criterion, budget in CRITERIA:
            res = oamipc.compile(model, splits.train.x[:1], data=splits, importance=criterion, flops_budget=budget)
            case = f"{name}_{criterion}"
            torch.save({k: v.clone() for k, v in res.module.state_dict().items()}, out / f"{case}.pt")
            section = dict(res.report["reconstruct"])
            section.pop("seconds")
            sections[case] = section
            print(f"{case}: {section['samples']} samples, output error {section['output_error_before']:.6g} -> "
                  f"{section['output_error_after']:.6g}", flush=True)
    with atomic_output(out / "sections.json") as tmp:
        tmp.write_text(json.dumps(sections, indent=1))


def compare(before: Path, after: Path, out: Path) -> None:
    old = json.loads((before / "sections.json").read_text())
    new = json.loads((after / "sections.json").read_text())
    rows = []
    for case, section in old.items():
        newer = {k: v for k, v in new[case].items() if k in section}
        a, b = torch.load(before / f"{case}.pt"), torch.load(after / f"{case}.pt")
        weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows.append({"case": case, "section_equal": newer == section, "weights_equal": weights,
                     "samples": section["samples"], "output_error_after": section["output_error_after"]})
    print("| case | samples | output error after | report section equal | weights equal to the bit |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['samples']} | {r['output_error_after']:.6g} | {r['section_equal']} | "
              f"{r['weights_equal']} |")
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps({"rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstruct_identity.json")
    args = parser.parse_args()
    if args.mode == "save":
        save(args.dirs[0])
    else:
        compare(args.dirs[0], args.dirs[1], args.out)


if __name__ == "__main__":
    main()

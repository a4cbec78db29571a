"""What building one big layer sub-problem costs: MobileNetV2's head, 1280 keep variables, 1000 classes.

The budget formulation's sub-problem for MobileNetV2's last 1x1 convolution (group ``head.0``)
reads 1280 free units straight into the 1000-class classifier, so every hinge row of every MILP
sample carries about 1280 terms: 64 samples make 64,000 rows and 82 million matrix entries.  This
builds that sub-problem's parts one after the other, as :meth:`BudgetSolver.solve_group` does, on
seeded random images, and records the resident memory (``VmRSS``, peak ``VmHWM`` from
``/proc/self/status``) and seconds after each: the encoder's walk (``logits``), the hinge rows
(``margin_hinge``) and the HiGHS model (``buildSolverModel``).  The rows' SHA-256 (names, terms in
order with their values and types, constants) tells whether two versions build the same problem.

Run::

    python benchmarks/mip_head_build.py --size 64 --samples 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pulp
import torch

from oamipc.atomic import atomic_output
from oamipc.models import MobileNetV2
from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.encoder import Encoder, margin_hinge
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.solver.highs import _HighsSolver
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parent.parent


def _memory() -> dict[str, float]:
    """This process's resident and peak resident memory in GiB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 2**20
    return out


def _rows_sha(prob: pulp.LpProblem) -> str:
    digest = hashlib.sha256()
    for name, row in prob.constraints.items():
        digest.update(repr((name, [(v.name, a) for v, a in row.items()], row.constant, row.sense)).encode())
    return digest.hexdigest()


def measure(size: int, samples: int) -> dict[str, Any]:
    model = MobileNetV2(seed=0).eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    gm = trace(model, (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    group = next(g for g in graph.groups if g.name == "head.0")
    pinned = graph.pinned_mask()
    with torch.no_grad():
        y = model(x).argmax(1)
    prob = pulp.LpProblem("head", pulp.LpMinimize)
    free = {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in group.units if not pinned[u]}
    steps: list[dict[str, Any]] = [{"step": "start", "seconds": 0.0, **_memory()}]
    start = time.perf_counter()
    enc = Encoder(gm, graph, x, graph.all_kept(), free, prob, name="g")
    logits = enc.logits()
    steps.append({"step": "logits", "seconds": time.perf_counter() - start, **_memory()})
    start = time.perf_counter()
    xi = margin_hinge(prob, enc, logits, y, torch.ones(samples, dtype=torch.float64))
    steps.append({"step": "margin_hinge", "seconds": time.perf_counter() - start, **_memory()})
    del logits
    prob += pulp.lpSum(xi)
    solver = _HighsSolver(msg=False)
    solver.mip = True
    solver.createAndConfigureSolver(prob)
    start = time.perf_counter()
    solver.buildSolverModel(prob)
    steps.append({"step": "buildSolverModel", "seconds": time.perf_counter() - start, **_memory()})
    return {"size": size, "samples": samples, "free": len(free), "rows": len(prob.constraints),
            "entries": int(prob.solverModel.getNumNz()), "rows_sha256": _rows_sha(prob), "steps": steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mip_head_build.json")
    args = parser.parse_args(argv)
    row = measure(args.size, args.samples)
    result = {"setting": {"torch": torch.__version__, "python": platform.python_version(),
                          "threads": torch.get_num_threads()}, "row": row}
    print(f"{row['free']} free units, {row['rows']} rows, {row['entries']} entries, rows {row['rows_sha256'][:16]}")
    print("| step | seconds | RSS GiB | peak GiB |\n|---|---|---|---|")
    for s in row["steps"]:
        print(f"| {s['step']} | {s['seconds']:.1f} | {s['VmRSS']:.2f} | {s['VmHWM']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

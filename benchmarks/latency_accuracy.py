"""Is a latency budget a better way to buy speed than a MAC budget?  Accuracy at equal measured latency.

For each trained network (the shipped examples) and each latency budget L, the network is
compiled with ``--latency-budget L`` (at ``--batch``), and its latency ratio r (pruned / dense,
timed interleaved, median of per-round ratios) and test accuracy (no fine-tuning) are measured.
Then the MAC-budget plan of the same measured latency is found: MAC budgets are tried (a grid,
then a secant step on the measured ratios) until one's measured latency ratio is within
``--tolerance`` of r, or the closest one tried is kept; its accuracy is the comparison.  Both
plans use the same criterion (``--criteria``, default ``l1``) and the default ``round_to="auto"``.

The issue this answers asks that the latency plan be at least as accurate as the MAC plan of
the same measured latency.  The rows say how far apart the two ratios ended (``ratio gap``):
ratios are measured on a shared machine, so a gap of a few hundredths is noise.

Run::

    python benchmarks/latency_accuracy.py                                       # shipped examples, L in 0.5, 0.7
    python benchmarks/latency_accuracy.py --models digits_cnn --budgets 0.6 --runs 30   # quick look

It prints a Markdown table and writes JSON (default ``benchmarks/results/latency_accuracy.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.atomic import atomic_output
from oamipc.bench import benchmark, cpu_model
from oamipc.data import accuracy, fashion_mnist_available
from oamipc.errors import PlanError
from oamipc.export import export_onnx
from oamipc.target import Target

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency_accuracy.json"
DATA = {"digits": "digits", "fashion": "fashion-mnist"}
GRID = (0.25, 0.4, 0.55, 0.7, 0.85)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Job:
    """One trained network with its data, dense ONNX file and timing settings."""

    def __init__(self, name: str, scratch: Path, batch: int, runs: int, criterion: str) -> None:
        self.name, self.batch, self.runs, self.criterion = name, batch, runs, criterion
        self.model = oamipc.load_model(ROOT / "examples" / f"{name}.pt")
        self.data = oamipc.load_data(DATA[name.split("_")[0]])
        self.example = torch.zeros(1, *self.data.train.x.shape[1:])
        self.scratch = scratch
        self.dense = scratch / f"{name}_dense.onnx"
        export_onnx(self.model, self.example, self.dense)
        self.count = 0

    def run(self, target: Target) -> dict[str, Any]:
        """Compile at ``target``, time it against the dense network, measure test accuracy."""
        result = oamipc.compile(self.model, self.example, data=self.data, importance=self.criterion, target=target)
        self.count += 1
        path = self.scratch / f"{self.name}_{self.count}.onnx"
        export_onnx(result.module, result.example_inputs, path)
        bench = benchmark([self.dense, path], batch_sizes=(self.batch,), runs=self.runs, warmup=max(3, self.runs // 10))
        rep = result.report
        return {"target": target.to_dict(), "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                "ratio": bench.batches[0].pairwise_ratio, "accuracy": accuracy(result.module, self.data.test),
                "predicted": rep.get("latency_prediction")}


def match_flops(job: Job, ratio: float, tolerance: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The MAC-budget plan whose measured latency ratio is closest to ``ratio`` (grid, then secant)."""
    tried: list[dict[str, Any]] = []

    def attempt(budget: float) -> dict[str, Any] | None:
        budget = min(1.0, max(0.02, budget))
        try:
            row = job.run(Target(flops_budget=budget))
        except PlanError as exc:
            _log(f"  flops {budget:.3f}: {exc}")
            return None
        tried.append(row)
        _log(f"  flops {budget:.3f}: ratio {row['ratio']:.3f}, accuracy {row['accuracy']:.4f}")
        return row

    for budget in GRID:
        attempt(budget)
    for _ in range(3):
        if not tried:
            break
        best = min(tried, key=lambda r: abs(r["ratio"] - ratio))
        if abs(best["ratio"] - ratio) <= tolerance:
            break
        below = [r for r in tried if r["ratio"] <= ratio]
        above = [r for r in tried if r["ratio"] > ratio]
        if not below or not above:
            break
        lo = max(below, key=lambda r: r["ratio"])
        hi = min(above, key=lambda r: r["ratio"])
        f_lo, f_hi = lo["target"]["flops_budget"], hi["target"]["flops_budget"]
        span = hi["ratio"] - lo["ratio"]
        guess = f_lo + (ratio - lo["ratio"]) * (f_hi - f_lo) / span if span > 1e-9 else (f_lo + f_hi) / 2
        if attempt(guess) is None:
            break
    if not tried:
        raise PlanError("no MAC budget could be planned")
    return min(tried, key=lambda r: abs(r["ratio"] - ratio)), tried


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits_cnn,fashion_lenet5,digits_mlp,fashion_mlp")
    parser.add_argument("--budgets", default="0.5,0.7", help="latency budgets (fractions of the dense latency)")
    parser.add_argument("--criteria", default="l1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=60, help="interleaved timing rounds per plan")
    parser.add_argument("--tolerance", type=float, default=0.03, help="ratio gap at which a MAC plan matches")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oamipc-latacc-") as tmp:
        for name in args.models.split(","):
            if name.startswith("fashion") and not fashion_mnist_available():
                _log(f"[{name}] skipped: Fashion-MNIST is not installed (dataset-fashion-mnist)")
                continue
            for criterion in args.criteria.split(","):
                job = Job(name, Path(tmp), args.batch, args.runs, criterion)
                for budget in (float(b) for b in args.budgets.split(",")):
                    _log(f"[{name}] {criterion} latency {budget:g}")
                    try:
                        lat = job.run(Target(latency_budget=budget, latency_batch=args.batch))
                    except PlanError as exc:
                        rows.append({"model": name, "criterion": criterion, "latency_budget": budget,
                                     "error": str(exc)})
                        _log(f"  not reachable: {exc}")
                        continue
                    _log(f"  latency plan: ratio {lat['ratio']:.3f}, accuracy {lat['accuracy']:.4f}")
                    flops, tried = match_flops(job, lat["ratio"], args.tolerance)
                    rows.append({"model": name, "criterion": criterion, "latency_budget": budget,
                                 "latency_plan": lat, "flops_plan": flops, "flops_tried": tried,
                                 "accuracy_gain": lat["accuracy"] - flops["accuracy"],
                                 "ratio_gap": lat["ratio"] - flops["ratio"]})
    result = {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
              "batch": args.batch, "runs": args.runs, "seconds": time.perf_counter() - start, "rows": rows}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp_out:
        Path(tmp_out).write_text(json.dumps(result, indent=1, default=str))
    _log(f"done in {result['seconds']:.0f} s; wrote {args.out}")
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | criterion | latency budget | latency plan: MACs, measured ratio, acc. | MAC plan: budget, "
             "measured ratio, acc. | ratio gap | acc. gain of the latency plan |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['criterion']} | {r['latency_budget']:g} | not reachable | - | - | - |")
            continue
        lat, fl = r["latency_plan"], r["flops_plan"]
        lines.append(f"| {r['model']} | {r['criterion']} | {r['latency_budget']:g} | {lat['macs_kept']:.1%}, "
                     f"{lat['ratio']:.3f}, {lat['accuracy']:.2%} | {fl['target']['flops_budget']:.3f}, "
                     f"{fl['ratio']:.3f}, {fl['accuracy']:.2%} | {r['ratio_gap']:+.3f} | "
                     f"{100 * r['accuracy_gain']:+.2f} pt |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

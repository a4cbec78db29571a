"""Does removing FLOPs buy latency?  FLOPs ratio next to measured latency ratio.

Compiles a shipped example model (default: the digits MLP) at several prune ratios, exports the
original and each pruned network to ONNX, and times each pair interleaved (A, B, A, B, ...) under
onnxruntime at batch 1 and 64 on the CPU (one intra-op thread) or CUDA when a GPU is usable.
The latency ratio is the median over rounds of B_i / A_i (robust to drift on a shared machine),
the same statistic ``oamipc bench`` prints.

Why it matters: on small layers the fixed per-call overhead of the runtime dominates, so a
network with a quarter of the FLOPs need not run four times faster; this table says by how much
it does, per batch size, so nobody has to guess.

Run (well under a minute on 2 cores)::

    python benchmarks/latency_vs_flops.py                       # digits MLP
    python benchmarks/latency_vs_flops.py --model examples/digits_cnn.pt
    python benchmarks/latency_vs_flops.py --runs 20 --out /tmp/smoke.json   # quick smoke run

It prints a Markdown table and writes JSON (default ``benchmarks/results/latency_vs_flops_<model>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.bench import benchmark
from oamipc.data import load_data
from oamipc.export import export_onnx, onnx_size_bytes
from oamipc.loading import load_model

ROOT = Path(__file__).resolve().parent.parent


def measure(model_path: Path, ratios: list[float], batches: list[int], runs: int, importance: str,
            device: str) -> dict[str, Any]:
    """Compile at each ratio and time original vs pruned; return the rows and the setting."""
    model = load_model(model_path)
    data = load_data("digits")
    shape = (1, *data.train.x.shape[1:])
    example = torch.zeros(shape)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oamipc-bench-") as scratch:
        original = Path(scratch) / "original.onnx"
        base = oamipc.compile(model, example, data=data, importance=importance, prune_ratio=0.0)
        export_onnx(base.original, base.example_inputs, original)
        env: dict[str, Any] = {}
        for ratio in ratios:
            res = oamipc.compile(model, example, data=data, importance=importance, prune_ratio=ratio)
            pruned = Path(scratch) / f"pruned_{ratio}.onnx"
            export_onnx(res.module, res.example_inputs, pruned)
            bench = benchmark([original, pruned], batch_sizes=batches, runs=runs, warmup=max(runs // 10, 5),
                              device=device)  # type: ignore[arg-type]
            env = {"provider": bench.provider, "device": bench.device, "cpu": bench.cpu,
                   "onnxruntime": bench.onnxruntime_version, "intra_op_threads": bench.intra_op_threads}
            rep = res.report
            row: dict[str, Any] = {
                "prune_ratio": ratio,
                "macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
                "flops_ratio": rep["after"]["macs"] / rep["before"]["macs"],
                "params_ratio": rep["after"]["params"] / rep["before"]["params"],
                "onnx_bytes_ratio": onnx_size_bytes(pruned) / onnx_size_bytes(original),
                "accuracy_before": rep.get("accuracy", {}).get("before"),
                "accuracy_after": rep.get("accuracy", {}).get("after"),
                "widths": {k: v["after"] for k, v in rep["widths"].items()},
                "batches": {},
            }
            for br in bench.rows():
                row["batches"][str(br["batch"])] = {
                    "a_median_ms": br["a_median_ms"], "b_median_ms": br["b_median_ms"],
                    "latency_ratio": br["pairwise_ratio"], "ratio_of_medians": br["latency_ratio"],
                }
            rows.append(row)
            print(f"  ratio {ratio:.2f} done", file=sys.stderr)
    return {"model": str(model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT) else model_path),
            "importance": importance, "runs": runs, "batches": batches, "python": platform.python_version(),
            "torch": torch.__version__, **env, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """The table RESULTS.md shows."""
    batches = result["batches"]
    head = ["prune ratio", "FLOPs kept", "params kept"]
    for b in batches:
        head += [f"latency kept, batch {b}", f"median ms (A -> B), batch {b}"]
    head.append("accuracy (before -> after)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [f"{r['prune_ratio']:.2f}", f"{r['flops_ratio']:.3f}", f"{r['params_ratio']:.3f}"]
        for b in batches:
            m = r["batches"][str(b)]
            cells += [f"{m['latency_ratio']:.3f}", f"{m['a_median_ms']:.4f} -> {m['b_median_ms']:.4f}"]
        acc = (f"{r['accuracy_before']:.2%} -> {r['accuracy_after']:.2%}" if r["accuracy_after"] is not None else "-")
        cells.append(acc)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "digits_mlp.pt")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--runs", type=int, default=2000, help="timed rounds per model, batch and ratio")
    parser.add_argument("--importance", default="l1")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    result = measure(args.model.resolve(), ratios, batches, args.runs, args.importance, args.device)
    out = args.out or ROOT / "benchmarks" / "results" / f"latency_vs_flops_{args.model.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['model']} ({result['importance']}), onnxruntime {result.get('onnxruntime')} on "
          f"{result.get('provider')} ({result.get('cpu')}), {result.get('intra_op_threads')} thread(s), "
          f"{args.runs} interleaved rounds; latency kept = median over rounds of pruned/original")
    print(markdown(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

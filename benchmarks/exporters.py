"""Could the dynamo exporter be the default?  Export time, file size and onnxruntime latency of
the two ONNX exporters on the same networks.

For each network (the shipped examples and the test zoo's architectures, random weights for the
zoo) the module is traced as ``oamipc compile`` traces it, exported once by each exporter (wall
time of the export call, which includes the exporter's own checks), verified against the module
with onnxruntime, and the two files are timed interleaved (A = torchscript, B = dynamo) at batch
1 and 64 on the CPU with one intra-op thread.  A network that one exporter refuses is listed with
the first line of its error.

Run (about 2 minutes on 2 shared cores)::

    python benchmarks/exporters.py
    python benchmarks/exporters.py --runs 20 --out /tmp/smoke.json   # quick smoke run

It prints a Markdown table and writes JSON (default ``benchmarks/results/exporters.json``).
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

from oamipc.bench import benchmark
from oamipc.errors import OamipcError
from oamipc.export import export, onnx_size_bytes, verify_onnx
from oamipc.loading import load_model
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.models import ZOO, build, example_input  # noqa: E402 - the repository root must be on the path first

EXAMPLES = {"digits_mlp": (1, 64), "digits_cnn": (1, 1, 8, 8), "fashion_lenet5": (1, 1, 28, 28),
            "fashion_mlp": (1, 1, 28, 28)}


def networks() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """The shipped examples (trained weights) and the zoo (random weights), each with an example input."""
    out = []
    for name, shape in EXAMPLES.items():
        model = load_model(ROOT / "examples" / f"{name}.pt")
        out.append((name, model, torch.zeros(shape)))
    for name in sorted(ZOO):
        out.append((f"zoo:{name}", build(name), example_input(name, batch=1)))
    return out


def measure(runs: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oamipc-exporters-") as scratch:
        for name, model, x in networks():
            gm = trace(model.eval(), (x,))
            row: dict[str, Any] = {"network": name}
            paths = {}
            for exporter in ("torchscript", "dynamo"):
                path = Path(scratch) / f"{name.replace(':', '_')}_{exporter}.onnx"
                start = time.perf_counter()
                try:
                    export(gm, (x,), path, exporter=exporter)
                except OamipcError as exc:
                    row[exporter] = {"error": str(exc).split(": ", 1)[-1][:200]}
                    continue
                seconds = time.perf_counter() - start
                check = verify_onnx(path, gm, (torch.cat([x] * 4),))
                row[exporter] = {"export_s": seconds, "bytes": onnx_size_bytes(path), "verified": check.passed,
                                 "max_abs_err": check.max_abs_err}
                paths[exporter] = path
            if len(paths) == 2:
                bench = benchmark([paths["torchscript"], paths["dynamo"]], batch_sizes=(1, 64), runs=runs,
                                  warmup=max(runs // 10, 5)).to_dict()
                row["latency"] = [{"batch": r["batch"], "torchscript_ms": r["a_median_ms"],
                                   "dynamo_ms": r["b_median_ms"], "dynamo_over_torchscript": r["pairwise_ratio"]}
                                  for r in bench["rows"]]
            rows.append(row)
            print(f"done {name}", file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| network | export s torchscript | export s dynamo | bytes dynamo/ts | latency b1 dynamo/ts | "
             "latency b64 dynamo/ts | verified |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ts, dy = r["torchscript"], r["dynamo"]

        def cell(d: dict[str, Any]) -> str:
            return f"{d['export_s']:.2f}" if "export_s" in d else f"refused: {d['error'][:60]}"

        size = f"{dy['bytes'] / ts['bytes']:.3f}" if "bytes" in ts and "bytes" in dy else "-"
        lat = {x["batch"]: x["dynamo_over_torchscript"] for x in r.get("latency", [])}
        ok = " / ".join(str(d.get("verified", "-")) for d in (ts, dy))
        lines.append(f"| {r['network']} | {cell(ts)} | {cell(dy)} | {size} | "
                     f"{lat.get(1, float('nan')):.3f} | {lat.get(64, float('nan')):.3f} | {ok} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed rounds per batch size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "exporters.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.runs)
    print(table(rows))
    data = {"rows": rows, "runs": args.runs, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

"""The shipped sequence model (``examples/digits_seq.pt``) at a MAC budget: accuracy of the ONNX file per criterion.

``DigitsSeq`` reads each row of an 8x8 digit as a token and runs torch's own
``nn.TransformerEncoder`` (2 pre-norm layers of 4 heads, width 32, FFN 64).  For each criterion the
model is compiled to ``--budget`` of its MACs (``flops_budget``, the default reconstruction on),
exported to ONNX, and the ONNX file's top-1 accuracy is measured with onnxruntime on the
539-image test split; the attention heads and FFN units kept per layer come from the pruned
module.  MACs are those of the Linear layers (the cost model's); the attention matmuls (QK^T and
AV) are not counted.

Run::

    python benchmarks/digits_seq.py                     # l1,l2,taylor,activation,random,mip; ~2 min

It prints a Markdown table and writes JSON (default ``benchmarks/results/digits_seq.json``).
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

import numpy as np
import onnxruntime as ort
import torch

import oamipc
from oamipc.atomic import atomic_output
from oamipc.errors import OamipcError
from oamipc.export import export_onnx
from oamipc.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CRITERIA = "l1,l2,taylor,activation,random,mip"


def _structure(module: torch.nn.Module, head_dim: int, layers: int) -> dict[str, list[int]]:
    """Heads and FFN hidden units per encoder layer of a (pruned) DigitsSeq."""
    prefix = [f"encoder.layers.{i}" for i in range(layers)]
    heads = [module.get_submodule(f"{p}.self_attn.q_proj").out_features // head_dim for p in prefix]
    return {"heads": heads, "ffn": [module.get_submodule(f"{p}.linear1").out_features for p in prefix]}


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the ONNX file at ``path`` under onnxruntime (CPU, one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((np.argmax(logits, axis=1) == y.numpy()).mean())


def run(path: Path, criteria: list[str], budget: float, seed: int) -> list[dict[str, Any]]:
    model = oamipc.load_model(path).eval()
    layers = len(model.encoder.layers)
    head_dim = model.encoder.layers[0].self_attn.head_dim
    data = oamipc.load_data("digits")
    example = data.test.x[:1]
    dense = {"dense": True, "criterion": "(dense)"}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, (example,), Path(tmp) / "dense.onnx")
        dense["onnx_accuracy"] = onnx_accuracy(Path(tmp) / "dense.onnx", data.test.x, data.test.y)
    dense["structure"] = {"heads": [model.encoder.layers[i].self_attn.num_heads for i in range(layers)],
                          "ffn": [model.encoder.layers[i].linear1.out_features for i in range(layers)]}
    rows: list[dict[str, Any]] = [dense]
    for criterion in criteria:
        start = time.perf_counter()
        row: dict[str, Any] = {"criterion": criterion, "budget": budget}
        try:
            res = oamipc.compile(model, example, data=data, importance=criterion, flops_budget=budget, seed=seed)
        except OamipcError as exc:
            rows.append(row | {"error": str(exc)})
            print(f"  {criterion}: refused: {exc}", file=sys.stderr, flush=True)
            continue
        rep = res.report
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "pruned.onnx"
            export_onnx(res.module, (example,), onnx_path)
            acc = onnx_accuracy(onnx_path, data.test.x, data.test.y)
        row.update({"macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                    "params_kept": rep["after"]["params"] / rep["before"]["params"],
                    "accuracy_torch": rep["accuracy"]["after"], "onnx_accuracy": acc,
                    "structure": _structure(res.module, head_dim, layers),
                    "compile_seconds": time.perf_counter() - start})
        rows.append(row)
        print(f"  {criterion}: ONNX {100 * acc:.2f}% {row['structure']} ({row['compile_seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| criterion | MACs kept | params kept | ONNX test accuracy | heads kept per layer "
             "| FFN units kept per layer |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['criterion']} | refused: {r['error'][:140]} | | | | |")
        elif r.get("dense"):
            s = r["structure"]
            lines.append(f"| (dense) | 1 | 1 | {100 * r['onnx_accuracy']:.2f}% | {s['heads']} | {s['ffn']} |")
        else:
            s = r["structure"]
            lines.append(f"| {r['criterion']} | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
                         f"**{100 * r['onnx_accuracy']:.2f}%** | {s['heads']} | {s['ffn']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "digits_seq.pt")
    parser.add_argument("--criteria", default=CRITERIA)
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "digits_seq.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = run(args.model, args.criteria.split(","), args.budget, args.seed)
    result = {"command": "python benchmarks/digits_seq.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
              "threads": torch.get_num_threads(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(table(rows))
    return result


if __name__ == "__main__":
    main()

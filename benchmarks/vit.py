"""The shipped ViT (``examples/fashion_vit.pt``) at a MAC budget: which heads and FFN units go, and what it costs.

For each criterion the model is compiled to ``--budget`` of its MACs (``flops_budget``, the
default reconstruction on), with the test accuracy of the pruned network, the attention heads
and FFN hidden units kept per block, and the onnxruntime latency of the pruned file against the
dense one (A/B interleaved, one thread, batch 1 and 64).  With ``--finetune-samples N`` the
same pruned network is also fine-tuned for ``--finetune-epochs`` (default one) on the first N samples of a
seeded permutation of the train split (AdamW, ``--finetune-lr``, default 5e-4, cosine), a short
fine-tune on 2 cores, the same for every row.  ``--embed-criteria`` adds rows compiled with
``prune_embed`` (the residual stream pruned too: embedding, class token, positional embedding,
LayerNorms); the ``stream`` column is its width.  A criterion that refuses the model is reported
with its one-line error.

MACs are those of the Linear and Conv layers (the cost model's); the two attention matmuls
(QK^T and AV, about 6% of the dense ViT's MACs at 17 tokens) are not counted.

Run::

    python benchmarks/vit.py                                  # l1,l2,taylor,activation,random,mip; ~10 min
    python benchmarks/vit.py --criteria l1 --finetune-samples 10000
    python benchmarks/vit.py --criteria l1,mip --embed-criteria l1,mip --finetune-samples 6000

It prints a Markdown table and writes JSON (default ``benchmarks/results/vit_fashion.json``).
"""

from __future__ import annotations

import argparse
import copy
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
from oamipc.bench import benchmark
from oamipc.data import Dataset, DataSplits
from oamipc.errors import OamipcError
from oamipc.export import export_onnx
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.hardware import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CRITERIA = "l1,l2,taylor,activation,random,mip"


def _subset(data: DataSplits, n: int, seed: int) -> DataSplits:
    """The first ``n`` samples of a seeded permutation of the train split, the whole test split."""
    order = torch.randperm(len(data.train.x), generator=torch.Generator().manual_seed(seed))[:n]
    y = data.train.y[order] if data.train.y is not None else None
    return DataSplits(Dataset(f"{data.train.name}[{n}]", data.train.x[order], y), data.test)


def _structure(module: torch.nn.Module, head_dim: int) -> dict[str, list[int]]:
    """Heads and FFN hidden units per block of a (pruned) ViT."""
    blocks = sorted({name.split(".")[1] for name, _ in module.named_modules() if name.startswith("blocks.")
                     and name.count(".") >= 1}, key=int)
    heads = [module.get_submodule(f"blocks.{b}.attn.q").out_features // head_dim for b in blocks]
    ffn = [module.get_submodule(f"blocks.{b}.fc1").out_features for b in blocks]
    stream = int(module.get_parameter("pos_embed").shape[-1])
    return {"heads": heads, "ffn": ffn, "stream": stream}


def _latency(dense: torch.nn.Module, pruned: torch.nn.Module, example: torch.Tensor) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx"
        export_onnx(dense, (example,), a)
        export_onnx(pruned, (example,), b)
        res = benchmark([a, b], batch_sizes=(1, 64), runs=200)
    return {f"batch{r.batch}": {"dense_ms": r.stats[0].median_ms, "pruned_ms": r.stats[1].median_ms,
                                "ratio": r.pairwise_ratio} for r in res.batches}


def _write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


def run(path: Path, criteria: list[str], budget: float, finetune_samples: int, seed: int,
        done: Any = None, *, embed_criteria: tuple[str, ...] = (), finetune_epochs: int = 1,
        finetune_lr: float = 5e-4) -> list[dict[str, Any]]:
    """One row per criterion, then one per ``embed_criteria`` with ``prune_embed``; ``done(rows)``
    after each (the JSON is rewritten as rows come)."""
    model = oamipc.load_model(path)
    head_dim = model.blocks[0].attn.head_dim
    data = oamipc.load_data("fashion-mnist")
    example = data.test.x[:1]
    rows = []
    for criterion, embed in [*((c, False) for c in criteria), *((c, True) for c in embed_criteria)]:
        start = time.perf_counter()
        row: dict[str, Any] = {"criterion": criterion, "budget": budget, "prune_embed": embed}
        try:
            res = oamipc.compile(model, example, data=data, importance=criterion, flops_budget=budget, seed=seed,
                                 prune_embed=embed)
        except OamipcError as exc:
            row["error"] = str(exc)
            rows.append(row)
            if done is not None:
                done(rows)
            print(f"  {criterion}: refused: {exc}", file=sys.stderr, flush=True)
            continue
        rep = res.report
        row.update({"macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                    "params_kept": rep["after"]["params"] / rep["before"]["params"],
                    "accuracy_dense": rep["accuracy"]["before"], "accuracy_pruned": rep["accuracy"]["after"],
                    "dense": _structure(model, head_dim), "pruned": _structure(res.module, head_dim),
                    "compile_seconds": time.perf_counter() - start,
                    "latency": _latency(model.eval(), res.module, example)})
        if finetune_samples:  # the very network measured above, fine-tuned (a copy)
            config = FinetuneConfig(epochs=finetune_epochs, lr=finetune_lr, optimizer="adamw", weight_decay=0.05,
                                    seed=seed)
            history = finetune(copy.deepcopy(res.module), _subset(data, finetune_samples, seed).train, config,
                               eval_data=data.test)
            row["accuracy_finetuned"] = history.final_eval_accuracy
            row["finetune"] = {"samples": finetune_samples, "epochs": finetune_epochs, "lr": finetune_lr,
                               "seconds": history.seconds}
        rows.append(row)
        if done is not None:
            done(rows)
        print(f"  {_label(row)}: {100 * row['accuracy_pruned']:.2f}% heads {row['pruned']['heads']} "
              f"ffn {row['pruned']['ffn']} ({row['compile_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def _label(row: dict[str, Any]) -> str:
    return f"{row['criterion']} + prune-embed" if row.get("prune_embed") else row["criterion"]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| criterion | MACs kept | params kept | test acc. (dense -> pruned) | + fine-tune | "
             "heads kept per block | FFN units kept per block | stream | latency b1 / b64 (pruned/dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {_label(r)} | refused: {r['error'][:140]} | | | | | | | |")
            continue
        tuned = f"{100 * r['accuracy_finetuned']:.2f}%" if "accuracy_finetuned" in r else "-"
        lat = r["latency"]
        lines.append(f"| {_label(r)} | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
                     f"{100 * r['accuracy_dense']:.2f}% -> **{100 * r['accuracy_pruned']:.2f}%** | {tuned} | "
                     f"{r['pruned']['heads']} of {r['dense']['heads']} | {r['pruned']['ffn']} of {r['dense']['ffn']} | "
                     f"{r['pruned']['stream']} of {r['dense']['stream']} | "
                     f"{lat['batch1']['ratio']:.3f} / {lat['batch64']['ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "fashion_vit.pt")
    parser.add_argument("--criteria", default=CRITERIA)
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--finetune-samples", type=int, default=0, help="fine-tune on this many train samples")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--embed-criteria", default="", help="criteria also run with prune_embed (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vit_fashion.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {
        "command": "python benchmarks/vit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "rows": []}
    rows = run(args.model, [c for c in args.criteria.split(",") if c], args.budget, args.finetune_samples, args.seed,
               done=lambda rows: _write(args.out, result | {"rows": rows}),
               embed_criteria=tuple(c for c in args.embed_criteria.split(",") if c),
               finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
    print(table(rows))
    return result | {"rows": rows}


if __name__ == "__main__":
    main()

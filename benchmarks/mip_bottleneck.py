"""Why ``mip`` fine-tunes worse on the ResNet of the sweep: its plan leaves a bottleneck.

The sweep (``benchmarks/sweep.py``) finds ``mip`` best before fine-tuning but far behind after a
short fine-tune on ``SmallResNet``.  This script takes the sweep's dense network (trained, or
loaded from the sweep's cache, with the sweep's settings) and, at one MAC budget, compiles:

* ``warm``: the cheap criterion the MIP chose as its warm start (reported by the MIP);
* ``mip no-spend``: the MIP with the sweep's solve limits and ``spend_budget`` off (the default
  until the measurements here);
* ``mip+fill``: that plan with every group that it shrank below the warm start's count filled
  back with the warm start's own units (highest-ranked first), everything else unchanged;
* ``mip``: the default MIP, with ``spend_budget`` (no MILP may lower the MACs of its starting plan);

then measures test accuracy before and after the sweep's fine-tune (and a longer one), and the
fraction of MACs kept.  It prints a Markdown table and writes ``--out`` (JSON).  The point is a
measured answer to "is it the units the MIP picks, or how many it keeps?".

Run::

    python benchmarks/mip_bottleneck.py                       # SmallResNet / digits, budget 0.5
    python benchmarks/mip_bottleneck.py --model vgg --data fashion-mnist --budget 0.25
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep

import oamipc
from oamipc.atomic import atomic_output
from oamipc.data import DataSplits, accuracy
from oamipc.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parent.parent


def _measure(name: str, result: oamipc.CompileResult, splits: DataSplits, epochs: tuple[int, ...],
             settings: sweep.Settings) -> dict[str, Any]:
    rep = result.report
    row: dict[str, Any] = {"plan": name, "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                           "widths": {k: v["after"] for k, v in rep["widths"].items()},
                           "accuracy": accuracy(result.module, splits.test), "finetuned": {}}
    for n in epochs:
        module = copy.deepcopy(result.module)
        config = FinetuneConfig(epochs=n, lr=settings.finetune_lr, batch_size=settings.batch_size, optimizer="adam",
                                schedule="cosine", seed=settings.seed)
        row["finetuned"][str(n)] = finetune(module, splits.train, config, eval_data=splits.test).final_eval_accuracy
    print(f"{name}: MACs {row['macs_kept']:.3f}, accuracy {row['accuracy']:.4f}, fine-tuned {row['finetuned']}",
          file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="resnet", choices=sorted(sweep.MODELS))
    parser.add_argument("--data", default="digits", choices=sorted(sweep.DATA))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--epochs", default="", help="fine-tuning epochs to try (default: the sweep's, and 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mip_bottleneck.json")
    args = parser.parse_args(argv)
    settings, _, cache = sweep.parse_settings(["--models", args.model, "--data", args.data])
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    splits = sweep.prepare_data(args.data, settings)
    if splits is None:
        raise SystemExit(f"{args.data} is not installed")
    epochs = tuple(int(e) for e in args.epochs.split(",") if e) or (settings.finetune_epochs_for(args.data), 5)
    net, _ = sweep.dense_network(args.model, args.data, splits.train, settings, cache)
    calib = splits.train.stratified_sample(min(settings.calib_samples, len(splits.train)), seed=settings.seed)
    example = splits.test.x[:1]
    common = {"data": DataSplits(calib, calib), "flops_budget": args.budget, "seed": settings.seed,
              "calib_samples": len(calib)}
    mip = oamipc.compile(net, example, importance="mip", mip_options={**settings.mip_options, "spend_budget": False},
                         **common)
    warm_name = mip.report["mip"]["warm_start"]["chosen"]
    warm = oamipc.compile(net, example, importance=warm_name, **common)
    assert mip.plan is not None and warm.plan is not None
    filled = copy.deepcopy(mip.plan)
    warm_kept = {g.key: g.kept for g in warm.plan.groups}
    refilled: dict[str, list[int]] = {}
    for g in filled.groups:
        want = warm_kept[g.key]
        if len(g.kept) < len(want):
            extra = [u for u in want if u not in g.kept][: len(want) - len(g.kept)]
            g.kept = sorted(set(g.kept) | set(extra))
            refilled[g.name] = [len(g.kept) - len(extra), len(g.kept)]
    fill = oamipc.compile(net, example, plan=filled, data=common["data"])
    spend = oamipc.compile(net, example, importance="mip", mip_options=settings.mip_options, **common)
    arms = [(f"warm ({warm_name})", warm), ("mip no-spend", mip), ("mip no-spend+fill", fill), ("mip", spend)]
    rows = [_measure(label, arm, splits, epochs, settings) for label, arm in arms]
    result = {"model": args.model, "data": args.data, "budget": args.budget, "mip_options": settings.mip_options,
              "mip_reproducible": {"no_spend": mip.report["mip"].get("reproducible"),
                                   "spend": spend.report["mip"].get("reproducible")},
              "refilled": refilled, "rows": rows,
              "seconds": time.perf_counter() - start}
    heads = " | ".join(f"fine-tuned {e} ep" for e in epochs)
    lines = [f"| plan | MACs kept | accuracy | {heads} |", "|---" * (3 + len(epochs)) + "|"]
    for r in rows:
        ft = " | ".join(f"{100 * r['finetuned'][str(e)]:.2f}%" for e in epochs)
        lines.append(f"| {r['plan']} | {100 * r['macs_kept']:.1f}% | {100 * r['accuracy']:.2f}% | {ft} |")
    print("\n".join(lines))
    print(f"refilled groups (kept by mip -> after the fill): {refilled}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()

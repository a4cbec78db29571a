"""How many samples does reconstruction need on a bigger network, and what do they cost?

The default sample count of the ``reconstruct`` pass (4096) was chosen on the shipped examples,
which are cheap to run forward.  On a VGG- or ResNet-style net the pass's forward passes (about
one per refit layer) dominate its time, so the default is lowered there by a rule that counts
MACs (:func:`oamipc.passes.reconstruct.auto_samples`).  This script measures what that costs in
accuracy: SmallVGG and SmallResNet (``oamipc.models``, 28x28) are trained here on a stratified
10,000-sample subset of the Fashion-MNIST train split (4 epochs, Adam, seed 0; cached under
``--cache``), pruned with ``l1`` to 30% of the MACs, and reconstructed with 512, 1024, 2048,
4096 samples and the automatic count.  Test accuracy on the whole test split, no fine-tuning.

Run::

    python benchmarks/reconstruct_samples.py          # ~10 minutes (training included, once)

It prints a Markdown table and writes ``benchmarks/results/reconstruct_samples.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import oamipc
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.hardware import cpu_model
from oamipc.models import SmallResNet, SmallVGG
from oamipc.passes import ReconstructPass, count_costs
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"vgg": SmallVGG, "resnet": SmallResNet}
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oamipc" / "reconstruct"


def trained(name: str, train: oamipc.Dataset, cache: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    net = MODELS[name]()
    path = cache / f"{name}_fashion_10k_4ep.pt"
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        finetune(net, train, FinetuneConfig(epochs=4, lr=3e-3, batch_size=64, seed=0))
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return net.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--samples", default="512,1024,2048,4096,auto")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstruct_samples.json")
    args = parser.parse_args(argv)
    data = oamipc.load_data("fashion-mnist")
    train = data.train.stratified_sample(10000, seed=0)
    example = torch.zeros(1, 1, 28, 28)
    rows = []
    for name in MODELS:
        net = trained(name, train, args.cache)
        plain = oamipc.compile(net, example, data=data, importance="l1", flops_budget=args.budget, reconstruct=False)
        dense_macs = count_costs(trace(net, (example,))).macs
        row: dict[str, Any] = {"model": name, "budget": args.budget, "dense_macs": dense_macs,
                               "accuracy_dense": plain.report["accuracy"]["before"],
                               "accuracy_pruned": plain.report["accuracy"]["after"], "runs": []}
        for choice in args.samples.split(","):
            samples = None if choice == "auto" else int(choice)
            start = time.perf_counter()
            res = oamipc.compile(net, example, data=data, plan=plain.plan, reconstruct=ReconstructPass(samples=samples))
            rec, acc = res.report["reconstruct"], res.report["accuracy"]["after"]
            row["runs"].append({"option": choice, "samples": rec["samples"], "accuracy": acc,
                                "reconstruct_seconds": rec["seconds"], "seconds": time.perf_counter() - start})
            print(f"  {name} {choice}: {rec['samples']} samples, acc {res.report['accuracy']['after']:.4f}, "
                  f"{rec['seconds']:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    lines = ["| model (dense) | MACs kept | no reconstruct | " + " | ".join(args.samples.split(",")) + " |",
             "|---|---|---|" + "---|" * len(args.samples.split(","))]
    for row in rows:
        cells = [f"{100 * r['accuracy']:.2f}% ({r['samples']}, {r['reconstruct_seconds']:.0f} s)" for r in row["runs"]]
        lines.append(f"| {row['model']} ({100 * row['accuracy_dense']:.2f}%) | {row['budget']:.2f} | "
                     f"{100 * row['accuracy_pruned']:.2f}% | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    result = {"setting": {"budget": args.budget, "train_samples": 10000, "epochs": 4, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cpu": cpu_model()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()

"""Peak memory of the MIP's warm-start criteria on an ImageNet-size network, one criterion per process.

The default ``mip`` compile scores the solver-free criteria (``WARM_CRITERIA``: l2, l1, taylor,
activation) on all calibration samples before its MILP.  This runs each of them alone on a seeded
network of :mod:`oamipc.models` (seeded weights and batch-norm statistics) with ``samples`` seeded
random ``size`` x ``size`` images labelled by the network (as ``mip_scale.py`` does; ``--labels
random``: seeded random labels, since a seeded network's softmax is saturated on its own labels,
which makes every Taylor score 0), each criterion in its own process so that its
peak resident memory (``VmHWM`` of ``/proc/self/status``) is its own; the peak before scoring
(model, images, tracing) is reported beside it.  A SHA-256 of the scores lets two code versions
be compared.

Run::

    python benchmarks/warm_start_memory.py                          # ResNet-50, 224x224, 256 samples
    python benchmarks/warm_start_memory.py --net resnet18 --size 112 --samples 64

It prints a Markdown table and writes JSON (default ``benchmarks/results/warm_start_memory.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the scale benchmarks' shared parts live beside them
    sys.path.insert(0, str(HERE))
import imagenet_common as common  # noqa: E402

CRITERIA = ("l2", "l1", "taylor", "activation")


def one(net: str, size: int, samples: int, criterion: str, labels: str = "network") -> dict[str, Any]:
    """Score ``criterion`` once in this process; the row with this process's peaks."""
    from oamipc.passes import UnitGroupAnalysis, get_criterion
    from oamipc.passmanager import AnalysisManager, CompileContext
    from oamipc.tracing import trace

    model = common.NETS[net]().eval()
    x, y = common.labelled_images(model, samples, size)
    if labels == "random":
        y = torch.randint(0, int(model(x[:1]).shape[1]), (samples,), generator=torch.Generator().manual_seed(2))
    gm = trace(model, (x[:1],))
    am = AnalysisManager(CompileContext((x[:1],), x, y, seed=0))
    am.get(UnitGroupAnalysis(), gm)
    before = common.peak_rss_gib()
    start, cpu = time.perf_counter(), time.process_time()
    scores = am.get(get_criterion(criterion), gm)
    return {"net": net, "size": size, "samples": samples, "criterion": criterion, "labels": labels,
            "nonzero_scores": int((scores != 0).sum()), "units": int(scores.size),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "peak_before_gib": before, "peak_gib": common.peak_rss_gib(),
            "scores_sha256": hashlib.sha256(scores.tobytes()).hexdigest()[:16],
            "load_average": common.load_average()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet50", choices=sorted(common.NETS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--labels", default="network", choices=("network", "random"))
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--out", type=Path, default=common.RESULTS / "warm_start_memory.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.net, args.size, args.samples, args.one, args.labels)))
        return
    rows = [common.run_child(__file__, ["--net", args.net, "--size", str(args.size), "--samples", str(args.samples),
                                 "--labels", args.labels, "--one", criterion], f"{args.net} {criterion}")
            for criterion in args.criteria.split(",")]
    print("| net | input | samples | criterion | peak GiB before scoring | peak GiB | seconds (wall) | CPU s "
          "| nonzero scores | scores sha256 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['size']}x{r['size']} | {r['samples']} | {r['criterion']} "
              f"| {r['peak_before_gib']:.2f} | {r['peak_gib']:.2f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
              f"| {r['nonzero_scores']}/{r['units']} | {r['scores_sha256']} |")
    common.write_json(args.out, {"rows": rows, "torch": torch.__version__, "command": sys.argv})


if __name__ == "__main__":
    main()

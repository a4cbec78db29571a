"""The layer reconstruction alone on an ImageNet-size network: seconds, CPU seconds, peak memory.

A seeded network of :mod:`oamipc.models` (``--net``), ``--samples`` seeded random images at
``--size`` x ``--size`` labelled by the network, is pruned to half its MACs with ``l1`` (no
lossless pass: the plan is only the occasion), and that plan is replayed with reconstruction on,
in a process of its own, so that the replay's peak resident memory (sampled every 50 ms) is the
reconstruction's and not the planner's.  The row: the pass's wall and CPU seconds (the report's
``reconstruct`` section: on a shared machine the CPU seconds say more), the process's peak
memory during the replay, samples, samples per forward pass, forward passes started, and the
network output's relative error against the dense one before and after the refit.

Run::

    python benchmarks/reconstruct_scale.py --net mobilenetv2 --size 112 --samples 64
    python benchmarks/reconstruct_scale.py --net mobilenetv2 --size 224 --samples 256

It prints a Markdown table and writes JSON (default ``benchmarks/results/reconstruct_scale.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import oamipc

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the scale benchmarks' shared parts live beside them
    sys.path.insert(0, str(HERE))
import imagenet_common as common  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(net: str, size: int, samples: int) -> dict[str, Any]:
    """Plan with ``l1``, then replay the plan with reconstruction while sampling the memory."""
    model = common.NETS[net]().eval()
    x, y = common.labelled_images(model, samples, size)
    data = common.random_image_splits(x, y)
    planned = oamipc.compile(model, x[:1], data=data, importance="l1", flops_budget=0.5, reconstruct=False,
                             lossless=False)
    peak, done = [_rss()], threading.Event()

    def sample() -> None:  # the replay's own peak: the planner's high-water mark is not the pass's
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    res = oamipc.compile(model, x[:1], data=data, plan=planned.plan, reconstruct=True, lossless=False)
    done.set()
    watcher.join()
    rec = res.report["reconstruct"]
    return {"net": net, "size": size, "samples": samples, "seconds": rec["seconds"],
            "cpu_seconds": rec.get("cpu_seconds"), "peak_rss_gib": peak[0] / 2**30,
            "fit_samples": rec["samples"], "forward_batch": rec.get("forward_batch"),
            "forward_passes": rec.get("forward_passes"), "layers_refit": rec["layers_refit"],
            "output_error_before": rec["output_error_before"], "output_error_after": rec["output_error_after"],
            "load_average": common.load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="mobilenetv2", choices=sorted(common.NETS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "reconstruct_scale.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child: its row as the last line
        print(json.dumps(one(args.net, args.size, args.samples)))
        return
    start = time.perf_counter()
    child = ["--one", "--net", args.net, "--size", str(args.size), "--samples", str(args.samples)]
    row = common.run_child(__file__, child, args.net) | {"process_seconds": time.perf_counter() - start}
    print("| net | input | samples | reconstruct s | CPU s | peak GiB | per forward pass | passes started | "
          "output error before -> after | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['net']} | {row['size']}x{row['size']} | {row['fit_samples']} | {row['seconds']:.0f} | "
          f"{row['cpu_seconds']:.0f} | {row['peak_rss_gib']:.2f} | {row['forward_batch']} | {row['forward_passes']} | "
          f"{row['output_error_before']:.4f} -> {row['output_error_after']:.4f} | {row['common.load_average']:.1f} |")
    common.write_json(args.out, {"rows": [row], "torch": torch.__version__, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()

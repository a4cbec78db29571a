"""Does ``mip`` finish on ImageNet-size networks?  Wall time and peak memory of whole compiles.

For each network (seeded weights and batch-norm statistics, :mod:`oamipc.models`; time and
memory do not need trained ones), ``samples`` seeded random images at ``size`` x ``size``,
labelled with the network's own predictions, are the calibration data; the network is compiled
with ``importance="mip"`` at ``--flops-budget`` (the whole :func:`oamipc.compile`: lossless
pass, warm start, layer sub-problems, joint stage, pruning, reconstruction, checks).  Each
compile runs in its own process, so its peak resident memory (``ru_maxrss``) is its own.

Per row: the compile's wall time, CPU time (user + system, all threads: on a shared machine the
wall time says more about the other jobs than about this one; the load average is recorded) and
peak memory, the MIP analysis's own seconds, the layer reconstruction's own seconds (its report figures are in
the JSON row's `reconstruct_summary`: samples, samples per forward pass, forward passes started), the joint
stage's rounds, and its flip effects: how many were measured exactly per plan out of how many
free units, and how well the first-order screen ranked them (Spearman correlation of predicted
and exact single-flip hinge changes over the measured units; the share of the exact best
quarter of the candidates that the screen also put in its best quarter).

Run::

    python benchmarks/mip_scale.py                                  # ResNet-18, 224x224, 256 samples
    python benchmarks/mip_scale.py --nets resnet18,resnet50,mobilenetv2
    python benchmarks/mip_scale.py --nets resnet18 --size 64 --samples 32   # a quick look
    python benchmarks/mip_scale.py --device cuda                    # the analysis on a GPU
    python benchmarks/mip_scale.py --no-reconstruct                 # without layer reconstruction
    python benchmarks/mip_scale.py --executor ray --jobs 1,2,4 --total-time-limit 3600   # Ray workers

With ``--jobs`` listing several counts, each net is compiled once per count (``--executor ray``:
the MIP's flip effects, layer sub-problems and joint radii as Ray tasks on an embedded local Ray
with that many CPUs) and the table adds each row's speed-up over the first count's row, for the
whole compile and for the MIP analysis, and whether the plan is the first row's.  Give a
``--total-time-limit`` the analysis does not reach: under the default wall-clock limit more
workers do more work in the same time instead of the same work faster.  Peak memory is the
compiling process's; Ray workers are separate processes and not counted in it.

It prints a Markdown table and writes JSON (default ``benchmarks/results/mip_scale.json``).
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

import torch

import oamipc
from oamipc.hardware import cpu_model

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the scale benchmarks' shared parts live beside them
    sys.path.insert(0, str(HERE))
import imagenet_common as common  # noqa: E402


def one(net: str, size: int, samples: int, budget: float, opts: dict[str, Any], reconstruct: bool = True
        ) -> dict[str, Any]:
    """Compile ``net`` once in this process; the row, with this process's peak memory."""
    model = common.NETS[net]().eval()
    x, y = common.labelled_images(model, samples, size)
    data = common.random_image_splits(x, y)
    start, start_cpu = time.perf_counter(), common.cpu_seconds()
    res = oamipc.compile(model, x[:1], data=data, importance="mip", flops_budget=budget, calib_samples=samples,
                         mip_options=opts, reconstruct="auto" if reconstruct else False)
    seconds = time.perf_counter() - start
    mip = res.report["mip"]
    effects = mip.get("joint_effects", [])
    plan = json.dumps(res.plan.to_dict() if res.plan else None, sort_keys=True)
    return {"net": net, "reconstruct": reconstruct, "executor": opts.get("executor", "local"),
            "jobs": opts.get("jobs", 1), "plan_sha256": hashlib.sha256(plan.encode()).hexdigest(),
            "size": size, "samples": samples, "budget": budget,
            "seconds": seconds,
            "peak_rss_gib": common.peak_rss_gib(),
            "cpu_seconds": common.cpu_seconds(start_cpu), "load_average": common.load_average(),
            "mip_seconds": mip["seconds"], "device": mip.get("device", "cpu"),
            "macs": res.report["before"]["macs"],
            "macs_kept": res.report["after"]["macs"] / res.report["before"]["macs"],
            "units": res.report["units"]["units"], "reproducible": mip["reproducible"],
            "warm_start": mip["warm_start"]["chosen"], "holdout_loss": mip["holdout_loss"],
            "subproblems": [{"group": s["group"], "outcome": s["outcome"], "build_seconds": s["build_seconds"],
                             "solve_seconds": s["solve"].get("seconds")} for s in mip["subproblems"]],
            "joint_rounds": [{k: r[k] for k in ("radius", "flips", "outcome", "candidates", "time_limited")}
                             | {"solve_seconds": r["solve"].get("seconds")} for r in mip["joint_rounds"]],
            "joint_effects": effects, "timings_s": res.report["timings_s"],
            "reconstruct_summary": _reconstruct_summary(res.report.get("reconstruct"))}


def _reconstruct_summary(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The layer reconstruction's own figures from the report (None when it did not run)."""
    if section is None:
        return None
    keys = ("seconds", "cpu_seconds", "samples", "layers_refit", "forward_batch", "forward_passes",
            "output_error_before", "output_error_after")
    return {k: section.get(k) for k in keys}


def _reconstruct_seconds(row: dict[str, Any]) -> str:
    seconds = (row.get("reconstruct_summary") or {}).get("seconds", row["timings_s"].get("reconstruct"))
    return f"{seconds:.0f}" if seconds is not None else "-"


def _child(net: str, args: argparse.Namespace, opts: dict[str, Any]) -> dict[str, Any]:
    spec = json.dumps({"net": net, "size": args.size, "samples": args.samples, "budget": args.budget, "opts": opts,
                       "reconstruct": args.reconstruct})
    return common.run_child(__file__, ["--one", spec], net)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| net | input | samples | device | executor x workers | compile s | CPU s | peak GiB | mip s | "
             "reconstruct s | load average | "
             "speed-up compile / mip | same plan | "
             "joint rounds (improved / all) | exact effects per plan / free units | screen Spearman (median) | "
             "held-out hinge (warm -> final) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        base = first.setdefault(r["net"], r)
        eff = r["joint_effects"]
        exact = "/".join(str(e["exact"]) for e in eff[:3]) + ("/..." if len(eff) > 3 else "")
        rhos = sorted(e["spearman"] for e in eff if e["spearman"] is not None)
        rho = f"{rhos[len(rhos) // 2]:.2f}" if rhos else "-"
        improved = sum(j["outcome"] == "improved" for j in r["joint_rounds"])
        h = r["holdout_loss"]
        lines.append(f"| {r['net']} | {r['size']}x{r['size']} | {r['samples']} | {r['device']} | "
                     f"{r.get('executor', 'local')} x {r.get('jobs', 1)} | {r['seconds']:.0f} | "
                     f"{r['cpu_seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['mip_seconds']:.0f} | "
                     f"{_reconstruct_seconds(r)} | {r['load_average']:.1f} | "
                     f"{base['seconds'] / r['seconds']:.2f} / {base['mip_seconds'] / r['mip_seconds']:.2f} | "
                     f"{'yes' if r.get('plan_sha256') == base.get('plan_sha256') else 'no'} | "
                     f"{improved} / {len(r['joint_rounds'])} | "
                     f"{exact or '-'} of {eff[0]['free'] if eff else '-'} | {rho} | "
                     f"{h['warm_start']:.3f} -> {h['final']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", help="the MIP analysis's device: cpu | cuda | auto")
    parser.add_argument("--total-time-limit", type=float, default=None)
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                        help="compile without layer reconstruction (the MIP analysis's share alone)")
    parser.add_argument("--executor", default="local", help="where the MIP's tasks run: local | ray")
    parser.add_argument("--jobs", default="1", help="worker counts, comma-separated (one compile each)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "mip_scale.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one compile, its row as the last line of stdout
        spec = json.loads(args.one)
        print(json.dumps(one(spec["net"], spec["size"], spec["samples"], spec["budget"], spec["opts"],
                             spec["reconstruct"])))
        return {}
    opts: dict[str, Any] = {"device": args.device}
    if args.total_time_limit is not None:
        opts["total_time_limit"] = args.total_time_limit
    if args.executor != "local":
        opts["executor"] = args.executor
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for net in args.nets.split(","):
        if net not in common.NETS:
            parser.error(f"unknown net {net!r}; known: {', '.join(common.NETS)}")
        for jobs in (int(j) for j in args.jobs.split(",")):
            rows.append(_child(net, args, opts | {"jobs": jobs}))
            print(f"  {net} ({args.executor} x {jobs}): {rows[-1]['seconds']:.0f} s, "
                  f"{rows[-1]['peak_rss_gib']:.2f} GiB", file=sys.stderr)
            common.write_json(args.out.with_suffix(".partial.json"), {"rows": rows})  # kept should a later row fail
    result = {"setting": {"reconstruct": args.reconstruct, "size": args.size, "samples": args.samples,
                          "budget": args.budget, "mip_options": opts,
                          "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
                          "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "rows": rows}
    print(table(rows))
    common.write_json(args.out, result)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()

"""Is the pruned network faster than the dense one?  round_to=1 against round_to="auto", per network.

onnxruntime's fast CPU convolutions work on blocks of channels (16 with AVX-512, 8 with AVX2;
:func:`oamipc.hardware.cpu_channel_block`).  A network pruned to widths that are not multiples
of the block falls back to slower kernels and can run slower than the dense original even with
half its MACs.  ``round_to="auto"`` (the default) rounds the kept widths of convolutions to
the block, or to the alignment the blocked kernels need (:func:`oamipc.target.granularity`).  This
script measures both, on the sweep's five networks and on two standard ImageNet networks:

* ``mlp3``, ``mlp4``, ``lenet5``, ``vgg``, ``resnet``: the networks of ``benchmarks/sweep.py``
  (its ``MODELS``, the same constructors), at the sweep's input size 1x28x28, batches 1 and 64;
* ``resnet18`` and ``mobilenetv2``: :class:`oamipc.models.ResNet18` and
  :class:`oamipc.models.MobileNetV2` at 3x224x224 with 1000 classes, batches 1 and 8 (batch 64
  of a 224x224 network takes seconds per run on one thread; ``--large-batches`` changes it).

Weights are seeded, not trained: latency does not depend on the values, and the l1 criterion
only needs weights that differ per channel (the sweep networks are drawn with
``torch.manual_seed(seed)`` before their constructor, as the sweep does before training; the
two ImageNet networks draw from their own ``seed`` argument).  For each network and each
``round_to`` in (1, "auto") the network is compiled with importance ``l1`` at ``--budget``
(fraction of the dense MACs kept), the dense and the pruned networks are exported to ONNX in a
temporary directory, and the pair is timed interleaved (A = dense, B = pruned; A, B, A, B, ...)
with :func:`oamipc.bench.benchmark` on onnxruntime's CPU provider with one intra-op thread.
Ratios are B/A: the ratio of the medians and the median of the per-round ratios ("pairwise",
the robust one on a shared machine); below 1 the pruned network is faster, and a batch where
the pairwise ratio is above 1 is marked slower.

A budget that a ``round_to`` cannot reach is not an error of the run: the row records the
planner's message under ``error`` and the table says "not reached".  (``"auto"``, the default,
lets block-rounded groups go below the block where a MAC budget would otherwise force a group
below a useful width, so it reaches every budget that ``round_to=1`` reaches.)

Run::

    python benchmarks/latency.py                                  # everything (see RESULTS.md for the time)
    python benchmarks/latency.py --networks vgg,resnet18 --budget 0.3
    python benchmarks/latency.py --quick --out /tmp/latency.json  # a seconds-long smoke run

It prints a Markdown table and writes JSON (default ``benchmarks/results/latency.json``,
atomically: a temporary file renamed into place).  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oamipc
from oamipc.atomic import atomic_output
from oamipc.bench import benchmark, cpu_model
from oamipc.errors import PlanError
from oamipc.export import export_onnx
from oamipc.hardware import cpu_channel_block, unaligned_widths
from oamipc.models import MobileNetV2, ResNet18
from oamipc.passes import latency_model
from oamipc.target import Target

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sweep's networks are imported from its script, not copied
    sys.path.insert(0, str(HERE))
import below_block_option  # noqa: E402
import sweep  # noqa: E402

DEFAULT_OUT = HERE / "results" / "latency.json"
ROUND_TO: tuple[int | str, ...] = (1, "auto")


@dataclass(frozen=True)
class Network:
    """One measured network: a seeded constructor, its per-sample input shape, batches, description."""

    make: Callable[[int], nn.Module]  # seed -> network
    sample_shape: tuple[int, ...]
    large: bool  # a 224x224 network: timed at --large-batches with --runs-large
    description: str


def _sweep_network(name: str) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return sweep.MODELS[name].make()
    return make


NETWORKS: dict[str, Network] = {
    **{name: Network(_sweep_network(name), sweep.INPUT_SHAPE, False, spec.description)
       for name, spec in sweep.MODELS.items()},
    "resnet18": Network(lambda seed: ResNet18(seed=seed), (3, 224, 224), True,
                        "ResNet-18 (oamipc.models.ResNet18), 1000 classes"),
    "mobilenetv2": Network(lambda seed: MobileNetV2(seed=seed), (3, 224, 224), True,
                           "MobileNetV2 1.0 (oamipc.models.MobileNetV2), 1000 classes"),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def variants(budget: float, latency_budget: float | None, latency_batch: int, methods: Sequence[str] = ("context",),
             flops_rows: bool = True, round_tos: Sequence[int | str] = ROUND_TO) -> list[tuple[int | str, Target, str]]:
    """The plans measured per network: the MAC budget with each ``round_to`` (unless not
    ``flops_rows``), and with ``--latency-budget`` a latency target (auto rounding) at the largest
    batch measured, once per latency-model method (the layers timed in context or alone)."""
    out: list[tuple[int | str, Target, str]] = []
    if flops_rows:
        out += [(r, Target(flops_budget=budget, round_to=r), "") for r in round_tos]
    if latency_budget is not None:
        for method in methods:
            label = f"latency {latency_budget:g}" + (f" ({method})" if len(methods) > 1 else "")
            out.append((label, Target(latency_budget=latency_budget, latency_batch=latency_batch, round_to="auto"),
                        method))
    return out


def measure_network(name: str, *, budget: float, batches: Sequence[int], runs: int, warmup: int, seed: int,
                    scratch: Path, latency_budget: float | None = None, methods: Sequence[str] = ("context",),
                    flops_rows: bool = True, round_tos: Sequence[int | str] = ROUND_TO) -> list[dict[str, Any]]:
    """Compile ``name`` for each variant (a ``round_to`` at the MAC ``budget``, or a latency target)
    and time dense vs pruned: one row per variant."""
    spec = NETWORKS[name]
    net = spec.make(seed).eval()
    example = torch.randn((1, *spec.sample_shape), generator=torch.Generator().manual_seed(seed))
    dense = scratch / f"{name}_dense.onnx"
    export_onnx(net, example, dense)
    rows: list[dict[str, Any]] = []
    for round_to, target, method in variants(budget, latency_budget, max(batches), methods, flops_rows, round_tos):
        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        latency_model.DEFAULT_METHOD = method or "context"
        try:
            result = oamipc.compile(net, example, importance="l1", target=target, seed=seed)
        except PlanError as exc:  # e.g. round_to="auto" on a net too narrow to reach the budget
            rows.append({"network": name, "input_shape": [1, *spec.sample_shape], "round_to": round_to,
                         "budget": budget, "importance": "l1", "channel_block": cpu_channel_block(),
                         "error": str(exc), "batches": {}, "slower_batches": []})
            _log(f"[{name}] round_to {round_to}: not measured: {exc}")
            continue
        compile_s = time.perf_counter() - start
        rep = result.report
        pruned = scratch / f"{name}_round{round_to}.onnx"
        export_onnx(result.module, result.example_inputs, pruned)
        t0 = time.perf_counter()
        bench = benchmark([dense, pruned], batch_sizes=batches, runs=runs, warmup=warmup, device="cpu",
                          intra_op_threads=1, seed=seed)
        bench_s = time.perf_counter() - t0
        pruned.unlink()
        widths = {layer: [int(w["before"]), int(w["after"])] for layer, w in rep["widths"].items()}
        block = cpu_channel_block()
        # Only convolutions have a channel block (Linear layers run on GEMM kernels, and auto leaves them alone).
        convs = {n for n, m in result.original.named_modules() if isinstance(m, nn.Conv2d)}
        unaligned = {k: list(v) for k, v in unaligned_widths(rep["widths"], block).items() if k in convs}
        per_batch = {
            str(r["batch"]): {"a_median_ms": r["a_median_ms"], "b_median_ms": r["b_median_ms"],
                              "latency_ratio": r["latency_ratio"], "pairwise_ratio": r["pairwise_ratio"],
                              "slower": r["pairwise_ratio"] > 1.0}
            for r in bench.rows()
        }
        row: dict[str, Any] = {
            "network": name, "input_shape": [1, *spec.sample_shape], "round_to": round_to, "budget": budget,
            "importance": "l1", "channel_block": block,
            "macs": {"before": int(rep["before"]["macs"]), "after": int(rep["after"]["macs"])},
            "params": {"before": int(rep["before"]["params"]), "after": int(rep["after"]["params"])},
            "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
            "params_kept": rep["after"]["params"] / rep["before"]["params"],
            "batches": per_batch,
            "slower_batches": [int(b) for b, m in per_batch.items() if m["slower"]],
            "widths": widths,
            "unaligned": unaligned,
            "provider": bench.provider, "cpu": bench.cpu, "onnxruntime": bench.onnxruntime_version,
            "runs": runs, "warmup": warmup,
            "seconds": {"compile": compile_s, "bench": bench_s}, "error": None,
            "latency_method": method or None, "load_average": [load_before, os.getloadavg()[0]],
        }
        predicted = rep.get("latency_prediction")
        if predicted:  # the latency model's prediction against the measured pruned latency, same batch
            measured = per_batch.get(str(predicted["batch"]), {}).get("b_median_ms")
            pairwise = per_batch.get(str(predicted["batch"]), {}).get("pairwise_ratio")
            ratio = predicted["predicted_ms"] / predicted["dense_ms"]
            row["latency_model"] = {**predicted, "measured_ms": measured,
                                    "error": predicted["predicted_ms"] / measured - 1 if measured else None,
                                    "predicted_ratio": ratio, "measured_ratio": pairwise,
                                    "ratio_error": ratio / pairwise - 1 if pairwise else None}
        rows.append(row)
        ratios = ", ".join(f"b{b} x{m['pairwise_ratio']:.2f}" for b, m in per_batch.items())
        if "latency_model" in row:
            ratios += f", predicted x{row['latency_model']['predicted_ratio']:.3f}"
        _log(f"[{name}] round_to {round_to}: MACs kept {row['macs_kept']:.3f}, {ratios} "
             f"(compile {compile_s:.1f} s, timing {bench_s:.1f} s)")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: one line per network, round_to and batch size."""
    lines = ["| network | input | round_to | MACs kept | params kept | batch | dense ms | pruned ms | B/A | "
             "pairwise B/A | slower | unaligned convs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(str(d) for d in r["input_shape"][1:])
        if r.get("error"):
            lines.append(f"| {r['network']} | {shape} | {r['round_to']} | not reached | - | - | - | - | - | - | - | "
                         f"- |")
            continue
        for batch, m in r["batches"].items():
            lines.append(f"| {r['network']} | {shape} | {r['round_to']} | {100 * r['macs_kept']:.1f}% | "
                         f"{100 * r['params_kept']:.1f}% | {batch} | {m['a_median_ms']:.3f} | {m['b_median_ms']:.3f} | "
                         f"{m['latency_ratio']:.2f} | {m['pairwise_ratio']:.2f} | "
                         f"{'**SLOWER**' if m['slower'] else 'no'} | {len(r['unaligned'])} |")
    return "\n".join(lines)


def latency_table(rows: Sequence[dict[str, Any]]) -> str:
    """The latency plans' Markdown table: the model's predicted ratio against the measured one."""
    lines = ["| network | plan | MACs kept | target batch | predicted ratio | measured ratio (pairwise) | "
             "ratio error | "
             "predicted ms | measured ms | error | rounds (predicted, measured) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("latency_model")
        if not m or m.get("budget_ms") is None:
            continue
        rounds = ", ".join(f"({c['predicted_ratio']:.3f}, {c['measured_ratio']:.3f})" for c in m.get("calibration", []))
        err = "-" if m["ratio_error"] is None else f"{100 * m['ratio_error']:+.1f}%"
        abs_err = "-" if m["error"] is None else f"{100 * m['error']:+.1f}%"
        load = r.get("load_average") or [float("nan")] * 2
        lines.append(f"| {r['network']} | {r['round_to']} | {100 * r['macs_kept']:.1f}% | {m['batch']} | "
                     f"{m['predicted_ratio']:.3f} | {m['measured_ratio']:.3f} | {err} | {m['predicted_ms']:.3f} | "
                     f"{m['measured_ms']:.3f} | {abs_err} | {rounds} | {load[0]:.1f}-{load[1]:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _names(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in NETWORKS]
    if unknown or not names:
        raise SystemExit(f"unknown network(s) {', '.join(unknown) or '(none given)'}: "
                         f"choose from {', '.join(NETWORKS)}")
    return names


def _batches(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        out = ()
    if not out or any(b < 1 for b in out):
        raise SystemExit(f"batch sizes must be a comma list of positive integers, got {value!r}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure what the command line asks for; return the result (also written as JSON)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"comma list of {', '.join(NETWORKS)} "
                                                                       "(default: all)")
    parser.add_argument("--budget", "--flops-budget", type=float, default=0.5,
                        help="fraction of the dense MACs kept (default 0.5)")
    parser.add_argument("--runs", type=int, default=200,
                        help="timed interleaved rounds per batch size, 28x28 networks (default 200)")
    parser.add_argument("--runs-large", type=int, default=30,
                        help="timed rounds per batch size, 224x224 networks (default 30)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds per batch size (default: a tenth of the runs, at least 3)")
    parser.add_argument("--batches", default="1,64", help="batch sizes, 28x28 networks (default 1,64)")
    parser.add_argument("--large-batches", default="1,8", help="batch sizes, 224x224 networks (default 1,8)")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="also plan each network for this fraction of its dense latency at the largest "
                             "batch (a measured latency model, round_to auto)")
    parser.add_argument("--latency-methods", default="context",
                        help="with --latency-budget: comma list of the latency model's methods, each its own row, "
                             "in turn per network: context (layers timed in whole-network profiles, the default) "
                             "and alone (each layer timed as a one-node graph, the model before)")
    parser.add_argument("--latency-only", action="store_true",
                        help="with --latency-budget: leave out the MAC-budget rows")
    parser.add_argument("--round-to", default="1,auto",
                        help="the MAC-budget rows' round_to values, a comma list of 1 and auto (default 1,auto)")
    below_block_option.add(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: lenet5 only, 5 runs, 1 warmup (explicit options still win)")
    args = parser.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.quick:
        if "--networks" not in given:
            args.networks = "lenet5"
        if "--runs" not in given:
            args.runs = 5
        if "--runs-large" not in given:
            args.runs_large = 5
        if args.warmup is None:
            args.warmup = 1
    if not 0.0 < args.budget <= 1.0:
        raise SystemExit(f"--budget must be a fraction in (0, 1], got {args.budget}")
    if args.runs < 1 or args.runs_large < 1:
        raise SystemExit("--runs and --runs-large must be at least 1")
    names = _names(args.networks)
    methods = tuple(m.strip() for m in args.latency_methods.split(",") if m.strip())
    if not methods or any(m not in ("context", "alone") for m in methods):
        raise SystemExit(f"--latency-methods must be a comma list of context and alone, got {args.latency_methods!r}")
    batches, large_batches = _batches(args.batches), _batches(args.large_batches)
    round_tos: tuple[int | str, ...] = tuple(r for r in ROUND_TO if str(r) in args.round_to.split(","))
    if not round_tos or set(args.round_to.split(",")) - {str(r) for r in ROUND_TO}:
        raise SystemExit(f"--round-to must be a comma list of 1 and auto, got {args.round_to!r}")
    max_blocks = below_block_option.value(args)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with below_block_option.applied(max_blocks), tempfile.TemporaryDirectory(prefix="oamipc-latency-") as tmp:
        for name in names:
            large = NETWORKS[name].large
            runs = args.runs_large if large else args.runs
            warmup = args.warmup if args.warmup is not None else max(3, runs // 10)
            rows += measure_network(name, budget=args.budget, batches=large_batches if large else batches,
                                    runs=runs, warmup=warmup, seed=args.seed, scratch=Path(tmp),
                                    latency_budget=args.latency_budget, methods=methods,
                                    flops_rows=not (args.latency_only and args.latency_budget is not None),
                                    round_tos=round_tos)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])]),
        "budget": args.budget, "latency_budget": args.latency_budget, "importance": "l1",
        "round_to": list(round_tos), "below_block_max_blocks": max_blocks,
        "networks": list(names),
        "descriptions": {n: NETWORKS[n].description for n in names},
        "cpu": cpu_model(), "channel_block": cpu_channel_block(),
        "onnxruntime": next((r["onnxruntime"] for r in rows if "onnxruntime" in r), None),
        "provider": "CPUExecutionProvider",
        "intra_op_threads": 1, "torch": torch.__version__, "python": platform.python_version(),
        "seed": args.seed, "seconds": seconds, "rows": rows, "latency_methods": list(methods),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp_path:
        tmp_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"l1 at --budget {args.budget:g}; {cpu_model()} (channel block {cpu_channel_block()}), onnxruntime "
          f"{result['onnxruntime']}, CPU provider, 1 intra-op thread; B/A = pruned / dense latency")
    print(table(rows))
    latency_rows = latency_table(rows)
    if latency_rows:
        print()
        print(latency_rows)
    _log(f"done in {seconds:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""Does a narrow first convolution get cheaper when it is pruned?  onnxruntime's layouts, width by width.

LeNet-5's first convolution (1 -> 6 channels, 5x5, padding 2, 28x28) is about half of the dense
network's time at batch 64 on the CPU provider, and pruning it saves little: onnxruntime's NCHWc
layout transform (graph optimisation level ``ORT_ENABLE_ALL``, the default) runs it on a blocked
kernel whose output is padded up to the channel block (16 with AVX-512) at any width.  This
script times a one-convolution ONNX graph ``1 -> k`` (``k = 1 .. --max-width``) at ``--batch``,
optionally followed by LeNet-5's ReLU and 2x2 max pool (``--front``), in two sessions per width:

* ``all``: the default optimisation level (the NCHWc transform applies);
* ``extended``: ``ORT_ENABLE_EXTENDED``, where the NCHWc transform is not applied and the
  convolution runs on the generic (im2col + GEMM) kernel,

all timed in interleaved rounds (every session once per round), one intra-op thread.  It answers
whether some width, or a form of the layer that the transform leaves alone, would make a pruned
first convolution cheaper.  Weights are seeded; the timing does not depend on their values.

Run (seconds)::

    python benchmarks/first_conv_layout.py                     # conv alone, batch 64
    python benchmarks/first_conv_layout.py --front             # conv + ReLU + max pool

It prints a Markdown table and writes JSON (default ``benchmarks/results/first_conv_layout.json``,
or ``first_conv_layout_front.json`` with ``--front``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from oamipc.atomic import atomic_output
from oamipc.bench import cpu_model
from oamipc.runtime import import_onnxruntime

HERE = Path(__file__).resolve().parent
LEVELS = ("all", "extended")


def conv_graph(width: int, batch: int, front: bool, side: int = 28, kernel: int = 5) -> bytes:
    """A ``1 -> width`` convolution (``kernel`` x ``kernel``, same padding, bias) on ``side`` x
    ``side`` inputs, with ReLU and a 2x2 max pool after it when ``front``."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((width, 1, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal((width,)).astype(np.float32)
    pad = kernel // 2
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel, kernel], pads=[pad] * 4)]
    out = "c"
    if front:
        nodes += [helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2])]
        out = "p"
    graph = helper.make_graph(
        nodes, "first_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, side, side])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def session(model: bytes, level: str, optimized_to: str | None = None) -> Any:
    """A one-thread CPU session at ``level`` (``all`` or ``extended``); ``optimized_to``: where
    onnxruntime writes the graph it optimised (for checking which kernels it chose)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # it warns that an optimised model is machine-specific: that is the point
    if optimized_to is not None:
        opts.optimized_model_filepath = optimized_to
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def measure(batch: int, front: bool, max_width: int, runs: int) -> list[dict[str, Any]]:
    """Median milliseconds per width and level, from ``runs`` interleaved rounds."""
    x = np.random.default_rng(1).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    widths = range(1, max_width + 1)
    sessions = {(k, lv): session(conv_graph(k, batch, front), lv) for k in widths for lv in LEVELS}
    times: dict[tuple[int, str], list[float]] = {key: [] for key in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"x": x})
    for _ in range(runs):
        for key, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"x": x})
            times[key].append(time.perf_counter() - start)
    rows = []
    for k in widths:
        ms = {lv: float(np.median(times[(k, lv)])) * 1e3 for lv in LEVELS}
        rows.append({"width": k, "all_ms": ms["all"], "extended_ms": ms["extended"],
                     "extended_over_all": ms["extended"] / ms["all"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| width | ORT_ENABLE_ALL (NCHWc) ms | ORT_ENABLE_EXTENDED ms | extended / all |", "|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['all_ms']:.3f} | {r['extended_ms']:.3f} | {r['extended_over_all']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--front", action="store_true", help="time conv + ReLU + 2x2 max pool (LeNet-5's first stage)")
    parser.add_argument("--max-width", type=int, default=16)
    parser.add_argument("--runs", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.max_width < 1 or args.runs < 1:
        parser.error("--batch, --max-width and --runs must be positive")
    out = args.out or HERE / "results" / f"first_conv_layout{'_front' if args.front else ''}.json"
    ort = import_onnxruntime()
    rows = measure(args.batch, args.front, args.max_width, args.runs)
    result = {"batch": args.batch, "front": args.front, "runs": args.runs, "cpu": cpu_model(),
              "onnxruntime": ort.__version__, "python": platform.python_version(), "intra_op_threads": 1,
              "rows": rows}
    with atomic_output(out) as tmp_path:
        tmp_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    what = "conv 1->k 5x5 + ReLU + max pool" if args.front else "conv 1->k 5x5"
    print(f"{what}, 28x28, batch {args.batch}; {cpu_model()}, onnxruntime {ort.__version__}, CPU provider, "
          f"1 thread; median of {args.runs} interleaved rounds")
    print(table(rows))


if __name__ == "__main__":
    main()

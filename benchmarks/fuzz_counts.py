"""How much one fuzz run checks: runs the fuzz tests and writes the counts they print as JSON.

The hardening numbers in ``benchmarks/RESULTS.md`` are counts from a test run, not a benchmark
of their own: this script runs exactly::

    python -m pytest -q -s -p no:cacheprovider --hypothesis-show-statistics \\
        tests/test_fuzz.py tests/test_loading_fuzz.py

with ``OAMIPC_FUZZ_EXAMPLES`` and ``OAMIPC_FUZZ_SEED`` set from ``--examples`` and ``--seed``, and
collects from its output:

* per property of ``tests/test_fuzz.py`` (``analysis``, ``identity``, ``plan``, ``onnx``, ``data``,
  and the same four on sequence networks: ``seq_analysis``, ``seq_identity``, ``seq_plan``,
  ``seq_onnx``): the distinct examples and the distinct networks (or data files) that ran, as the
  test prints them, and for ``onnx``/``seq_onnx`` how many networks the TorchScript exporter
  refused (since the default exporter falls back to dynamo, these were written by dynamo and
  verified, or refused by both exporters with one line);
* per test of ``tests/test_loading_fuzz.py``: hypothesis's count of passing, failing and invalid
  examples (``--hypothesis-show-statistics``);
* pytest's summary (passed / failed / skipped), its exit code and the wall time.

Run::

    python benchmarks/fuzz_counts.py                     # the CI counts (about a minute)
    python benchmarks/fuzz_counts.py --examples 5 --seed 1   # a 5x longer run with other seeds

It prints a Markdown table and writes JSON (default
``benchmarks/results/fuzz_counts_x<examples>_seed<seed>.json``).  The counts depend on the
generators (``tests/fuzz_nets.py``) and on hypothesis's version, both recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_fuzz.py", "tests/test_loading_fuzz.py"]
COMMAND = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
           *TESTS]

# pytest's progress dots can precede a printed line, so the lines are matched after any dots.
_PROPERTY = re.compile(r"^\.*(\w+): (\d+) distinct examples, (\d+) distinct (networks|inputs)$", re.M)
_REFUSED = re.compile(r"^\.*(\w*onnx): (\d+) refused by the torchscript exporter$", re.M)
_STATS_HEAD = re.compile(r"^(tests/\S+::\w+):\s*$", re.M)
# "30 passing, 0 failing, and 1 invalid test cases" (older hypothesis: "30 passing examples, ...").
_STATS_LINE = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,(?: and)? (\d+) invalid")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse(output: str) -> dict[str, Any]:
    """The counts in the output of :data:`COMMAND`."""
    properties = {m.group(1): {"distinct_examples": int(m.group(2)), f"distinct_{m.group(4)}": int(m.group(3))}
                  for m in _PROPERTY.finditer(output)}
    for refused in _REFUSED.finditer(output):
        if refused.group(1) in properties:
            properties[refused.group(1)]["refused_by_exporter"] = int(refused.group(2))
    loader: dict[str, dict[str, int]] = {}
    heads = list(_STATS_HEAD.finditer(output))
    for i, head in enumerate(heads):
        block = output[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(output)]
        counts = {"passing": 0, "failing": 0, "invalid": 0}
        for m in _STATS_LINE.finditer(block):
            counts["passing"] += int(m.group(1))
            counts["failing"] += int(m.group(2))
            counts["invalid"] += int(m.group(3))
        if head.group(1).startswith("tests/test_loading_fuzz.py"):
            loader[head.group(1).split("::", 1)[1]] = counts
    last = [line for line in output.strip().splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    summary = {kind if not kind.startswith("error") else "errors": int(n)
               for n, kind in _SUMMARY.findall(last[-1])} if last else {}
    return {"properties": properties, "loader": loader, "pytest_summary": summary}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| what | distinct examples | distinct networks / inputs | notes |", "|---|---|---|---|"]
    for name, p in result["properties"].items():
        nets = p.get("distinct_networks", p.get("distinct_inputs"))
        note = f"{p['refused_by_exporter']} refused by the exporter" if "refused_by_exporter" in p else ""
        lines.append(f"| {name} | {p['distinct_examples']} | {nets} | {note} |")
    for name, c in result["loader"].items():
        lines.append(f"| loader: {name} | {c['passing'] + c['failing']} | - | "
                     f"{c['passing']} passing, {c['failing']} failing, {c['invalid']} invalid |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--examples", type=int, default=1, help="OAMIPC_FUZZ_EXAMPLES: multiplies every count")
    parser.add_argument("--seed", type=int, default=0, help="OAMIPC_FUZZ_SEED: changes the network fuzz's seeds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    env = dict(os.environ, OAMIPC_FUZZ_EXAMPLES=str(args.examples), OAMIPC_FUZZ_SEED=str(args.seed))
    start = time.perf_counter()
    proc = subprocess.run(COMMAND, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    import hypothesis
    import torch

    result = {
        "setting": {"command": f"OAMIPC_FUZZ_EXAMPLES={args.examples} OAMIPC_FUZZ_SEED={args.seed} "
                               + " ".join(["python", *COMMAND[1:]]),
                    "examples": args.examples, "seed": args.seed, "commit": _git("rev-parse", "HEAD"),
                    "dirty": bool(_git("status", "--porcelain", "--", "oamipc", "passes", "tests")),
                    "hypothesis": hypothesis.__version__, "torch": torch.__version__,
                    "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "returncode": proc.returncode,
        "seconds": seconds,
        **parse(output),
    }
    if proc.returncode != 0:
        result["output_tail"] = output[-4000:]
    print(markdown(result))
    print(f"pytest exit code {proc.returncode}, {seconds:.0f} s", file=sys.stderr)
    out = args.out or ROOT / "benchmarks" / "results" / f"fuzz_counts_x{args.examples}_seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()

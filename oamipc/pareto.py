"""The accuracy-latency front over MAC budgets: what ``oamipc pareto`` runs.

A user rarely knows which budget to ask for; what they know is how much accuracy they can give
up and how fast the network must be.  :func:`run_pareto` compiles the model at every budget of
``budgets`` (fraction of the MACs kept, each exactly as ``oamipc compile --flops-budget B``
with the same options would), and for each compiled network records

* its test accuracy (the compile's measurement of the pruned network, which the exported file
  reproduces: every file is verified against onnxruntime as in ``compile``),
* its MACs and parameters, and
* its onnxruntime latency at ``batch``, timed A/B against the dense network's ONNX file, one
  pair at a time and interleaved, so every ratio is measured side by side.

A point is on the **front** when no other point (the dense network is one) is at least as
accurate and at least as fast, and strictly better in one of the two.  The front is what a user
chooses from; ``pick`` copies the chosen budget's ONNX file to an output path.

Compiles are independent and run on an executor (:mod:`oamipc.executor`: ``workers`` local
processes by default, or Ray tasks); the files are the same for any number of workers.  Timing
is never parallel, since it would measure the contention.  Everything is written
into ``out_dir``: ``original.onnx``, one ``budget-0.50.onnx`` and ``budget-0.50.json`` (the
compile report) per budget, ``pareto.json`` and ``pareto.html``.  Every file is written
atomically.  A point whose report says it was made from the same model file, data and options
(a SHA-256 key) and whose ONNX file is intact is reused rather than compiled again, so a second
call with ``--pick`` costs only the timing and the copy, and an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oamipc.atomic import atomic_output
from oamipc.errors import DataError, PlanError, UsageError
from oamipc.executor import executor

log = logging.getLogger(__name__)

#: Budgets of ``oamipc pareto`` when none are given.
DEFAULT_BUDGETS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Version of the point key; bump when what a point depends on changes.
KEY_VERSION = 1


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.2,0.3,0.5"`` as sorted, distinct fractions in (0, 1]; a UsageError naming the flag otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--budgets must be comma-separated fractions like 0.2,0.5,0.8, got {text!r}") from None
    if not values:
        raise UsageError("--budgets is empty; give fractions of the MACs to keep, e.g. 0.2,0.5,0.8")
    bad = [v for v in values if not 0 < v <= 1]
    if bad:
        raise UsageError(f"--budgets must lie in (0, 1] (fractions of the MACs kept), got {bad[0]:g}")
    if len(set(values)) != len(values):
        raise UsageError(f"--budgets lists a budget twice: {text!r}")
    return tuple(sorted(values))


def budget_name(budget: float) -> str:
    """The file stem of one budget's outputs (``budget-0.50``); distinct for budgets 0.001 apart."""
    text = f"{budget:.3f}".rstrip("0")
    return f"budget-{text}{'0' * max(0, 4 - len(text))}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


@dataclass(frozen=True)
class ParetoJob:
    """One front: the model and data (a :class:`~oamipc.driver.ModelSource`), the budgets, where to
    write, and the options of :func:`oamipc.compile` every point is compiled with (no target:
    each point's is its budget)."""

    source: Any  # oamipc.driver.ModelSource (imported lazily: worker processes import this module)
    budgets: tuple[float, ...]
    out_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    batch: int = 64
    runs: int = 30
    workers: int = 1
    executor: str = "local"  # local | ray (oamipc.executor)
    ray_address: str | None = None
    exporter: str = "auto"  # as compile: torchscript, dynamo where it fails (oamipc.export)

    def options_dict(self) -> dict[str, Any]:
        """The compile options as JSON data (dataclasses such as MipOptions as their fields)."""
        return _jsonable({k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                          for k, v in sorted(self.options.items())})

    def key(self, budget: float) -> str:
        """What a point depends on, hashed: model and data files' bytes, options, budget, version."""
        from oamipc import __version__

        src = self.source
        files = {}
        for label, name in (("model", src.model), ("data", src.data)):
            if name and Path(name).is_file():
                files[label] = _sha256(Path(name))
        what = {"v": KEY_VERSION, "oamipc": __version__, "budget": budget, "files": files, "exporter": self.exporter,
                "source": _jsonable(dataclasses.asdict(src) | {"model": None}),
                "options": self.options_dict()}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _compile_task(job: ParetoJob, budget_key: tuple[float, str]) -> dict[str, Any]:
    """Compile one budget into ``out_dir`` (an executor's task); return its point record.

    A budget the planner cannot reach becomes a point with an ``error``, not a failed front.
    """
    from oamipc.driver import FileJob, compile_file
    from oamipc.target import Target

    budget, key = budget_key
    stem = budget_name(budget)
    onnx_path = job.out_dir / f"{stem}.onnx"
    record: dict[str, Any] = {"budget": budget, "key": key, "onnx": onnx_path.name}
    try:
        report = compile_file(FileJob(job.source, str(onnx_path), bench=False, exporter=job.exporter),
                              target=Target(flops_budget=budget), **job.options)
    except PlanError as exc:
        record["error"] = str(exc)
        report = {"error": str(exc)}
    else:
        record["onnx_sha256"] = _sha256(onnx_path)
        record.update(_point_numbers(report))
    with atomic_output(job.out_dir / f"{stem}.json") as tmp:  # written last: it marks the point complete
        tmp.write_text(json.dumps({"pareto_point": record, "report": report}, indent=1, default=str))
    return record


def _point_numbers(report: Mapping[str, Any]) -> dict[str, Any]:
    """The costs and accuracy of one compile report, with the dense network's for reference."""
    before, after = report.get("before", {}), report.get("after", {})
    acc = report.get("accuracy", {})
    return {"macs": after.get("macs"), "params": after.get("params"), "macs_before": before.get("macs"),
            "params_before": before.get("params"), "accuracy": acc.get("after"),
            "accuracy_before": acc.get("before"), "onnx_max_abs_err": report.get("onnx", {}).get("max_abs_err")}


def _reusable(job: ParetoJob, budget: float, key: str) -> dict[str, Any] | None:
    """The recorded point of ``budget`` when it was made with ``key`` and its ONNX file is intact."""
    meta = job.out_dir / f"{budget_name(budget)}.json"
    try:
        record = json.loads(meta.read_text())["pareto_point"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if "error" in record:
        return record
    onnx = job.out_dir / str(record.get("onnx", ""))
    if not onnx.is_file() or _sha256(onnx) != record.get("onnx_sha256"):
        return None
    return record


def front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (latency, accuracy) points no other point dominates (as fast or faster and as
    accurate or more, strictly better in one); ties are all kept."""
    flags = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(j != i and ol <= lat and oa >= acc and (ol < lat or oa > acc)
                        for j, (ol, oa) in enumerate(points))
        flags.append(not dominated)
    return flags


def _export_original(job: ParetoJob) -> Path:
    from oamipc.driver import load_job
    from oamipc.export import export_onnx

    path = job.out_dir / "original.onnx"
    loaded = load_job(job.source, seed=int(job.options.get("seed", 0)))
    with atomic_output(path) as tmp:
        export_onnx(loaded.model.eval(), loaded.example_inputs, tmp, exporter=job.exporter)
    return path


def _time_points(job: ParetoJob, original: Path, points: list[dict[str, Any]],
                 progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """Time every compiled point A/B against the dense file (pairs interleaved, one after another)."""
    from oamipc.bench import benchmark

    timed = [p for p in points if "error" not in p]
    dense_ms: list[float] = []
    provider = ""
    for i, point in enumerate(timed):
        if progress:
            progress("latency", i, len(timed))
        result = benchmark([original, job.out_dir / point["onnx"]], batch_sizes=(job.batch,), runs=job.runs)
        row = result.rows()[0]
        point["latency_ms"] = row["b_median_ms"]
        point["latency_ratio"] = row["pairwise_ratio"]
        dense_ms.append(row["a_median_ms"])
        provider = result.provider
    if progress:
        progress("latency", len(timed), len(timed))
    dense = sorted(dense_ms)[len(dense_ms) // 2] if dense_ms else None
    return {"batch": job.batch, "runs": job.runs, "provider": provider, "dense_ms": dense}


def run_pareto(job: ParetoJob, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compile every budget (reusing intact points), time them, mark the front, write
    ``pareto.json`` and ``pareto.html`` into ``job.out_dir``; return the result dict."""
    if job.batch < 1 or job.runs < 1:
        raise UsageError(f"--batch and --runs must be positive, got {job.batch} and {job.runs}")
    if not job.source.data:
        raise UsageError("the front plots accuracy: give labelled data with --data (e.g. --data digits)")
    job.out_dir.mkdir(parents=True, exist_ok=True)
    keys = {b: job.key(b) for b in job.budgets}
    records: dict[float, dict[str, Any]] = {}
    todo = []
    for b in job.budgets:
        reused = _reusable(job, b, keys[b])
        if reused is not None:
            records[b] = reused | {"reused": True}
        else:  # compiled below; "reused" is set then
            todo.append(b)
    log.info("pareto: %d budget(s) to compile, %d reused", len(todo), len(records))
    if progress:
        progress("compile", 0, len(todo))
    with executor(job.executor, job.workers, job.ray_address) as ex:
        made = ex.map(_compile_task, job, [(b, keys[b]) for b in todo],
                      done=(lambda n: progress("compile", n, len(todo))) if progress else None)
    records.update(zip(todo, made))
    points = [{"reused": False} | records[b] for b in job.budgets]
    if all("error" in p for p in points):
        raise PlanError(f"no budget of {', '.join(f'{b:g}' for b in job.budgets)} could be compiled: "
                        f"{points[0]['error']}")
    accuracy_before = next((p["accuracy_before"] for p in points if p.get("accuracy_before") is not None), None)
    if accuracy_before is None:
        raise DataError(f"--data {job.source.data} has no labels, so the front has no accuracy; give labelled data")
    latency = _time_points(job, _export_original(job), points, progress)
    ok = [p for p in points if "error" not in p]
    dense = {"budget": 1.0, "accuracy": accuracy_before, "latency_ratio": 1.0, "latency_ms": latency["dense_ms"],
             "macs": ok[0]["macs_before"], "params": ok[0]["params_before"], "onnx": "original.onnx"}
    flags = front([(p["latency_ratio"], p["accuracy"]) for p in [dense, *ok]])
    dense["front"] = flags[0]
    for p, flag in zip(ok, flags[1:]):
        p["front"] = flag
    result = {"model": job.source.model, "data": job.source.data, "out_dir": str(job.out_dir),
              "budgets": list(job.budgets),
              "options": job.options_dict(),
              "latency": latency, "dense": dense, "points": points}
    from oamipc.report_html import render_pareto_html

    with atomic_output(job.out_dir / "pareto.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    with atomic_output(job.out_dir / "pareto.html") as tmp:
        tmp.write_text(render_pareto_html(result), encoding="utf-8")
    return result


def pick(result: Mapping[str, Any], budget: float, output: Path) -> dict[str, Any]:
    """Copy the ONNX file of ``budget``'s point to ``output`` (atomically); return the point."""
    points = {round(float(p["budget"]), 6): p for p in result["points"]}
    point = points.get(round(budget, 6))
    if point is None:
        raise UsageError(f"--pick {budget:g} is not one of --budgets ({', '.join(f'{b:g}' for b in points)}); "
                         "pick one of them")
    if "error" in point:
        raise PlanError(f"--pick {budget:g}: that budget was not compiled ({point['error']})")
    with atomic_output(output) as tmp:
        shutil.copyfile(Path(str(result["out_dir"])) / point["onnx"], tmp)
    return point

"""Accuracy, size and speed of pruned networks: models x data x criteria x FLOPs budgets.

For every (model, data) pair the dense network is first trained here, seeded and deterministic
(Adam, cosine schedule, :func:`oamipc.finetune.finetune`; the state dict is cached under
``--cache``, keyed by model, data, train samples, epochs and seed, so reruns skip training).
Then, for every MAC budget (fraction of the dense MACs kept) and importance criterion, the
dense network is compiled with ``flops_budget`` and measured:

* test accuracy of the pruned network as it comes out of the compiler, and after a short
  fine-tune (``--finetune-epochs`` on the same train samples, the same seed for every criterion);
* parameters and MACs, and the fractions of the dense network's kept;
* onnxruntime latency (median, one intra-op thread) at batch 1 and 64, the pruned ONNX file
  timed interleaved with the dense one (A/B, as ``oamipc bench`` does) so the speed-up is the
  median of per-round ratios and robust to a busy machine; the dense file is also timed alone
  once per pair;
* seconds for the compile (for ``mip``: the MILP's own seconds and whether its plan is
  reproducible, i.e. no solve stopped on a wall-clock limit), the fine-tune and the timing.

Data: ``digits`` (scikit-learn's 8x8 digits, upsampled to 28x28 with
:func:`oamipc.transfer.fit_to_shape`, an antialiased bilinear resize, so every model sees
1x28x28 inputs) and ``fashion-mnist`` (skipped with a message when its files are absent).
Fashion-MNIST is cut to stratified subsets by default (5,000 train and 5,000 test samples:
``--train-samples``, ``--test-samples``) and the epochs differ per data set (``DATA``) so that
the full sweep stays under 30 minutes on two shared CPU cores.  The compiler gets only the
calibration samples (``--calib-samples``, a stratified draw from the train samples); test
accuracy is measured here.  Torch runs on one thread by default (``--threads``): on a busy
two-core machine two threads made training many times slower, not faster.

Run::

    python benchmarks/sweep.py                          # the full sweep (see RESULTS.md for its time)
    python benchmarks/sweep.py --quick --out /tmp/sweep  # a seconds-long smoke run
    python benchmarks/sweep.py --models lenet5,vgg --data digits --criteria mip,l1 --budgets 0.3

It writes, under ``--out`` (default ``benchmarks/results/sweep/``), one JSON per (model, data)
``<model>_<data>.json``, one plot per pair ``<model>_<data>.svg`` (test accuracy against the
fraction of MACs kept per criterion, with and without fine-tuning, drawn by
:func:`oamipc.report_html.sweep_svg`), ``summary.json`` and ``README.md`` (the Markdown table,
also printed to stdout, and the rows where another criterion beats ``mip``).  Progress goes to
stderr.  Every file is written atomically.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oamipc
from oamipc import passes
from oamipc.atomic import atomic_output
from oamipc.bench import BenchResult, benchmark, cpu_model
from oamipc.data import (
    Dataset,
    DataSplits,
    accuracy,
    fashion_mnist_available,
    load_data,
)
from oamipc.errors import DataError
from oamipc.export import export_onnx
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.models import LeNet5, PaperMLP, SmallResNet, SmallVGG
from oamipc.report_html import sweep_svg
from oamipc.tracing import trace
from oamipc.training import load_or_train
from oamipc.transfer import fit_to_shape

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sweep"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oamipc" / "sweep"
INPUT_SHAPE = (1, 28, 28)
BATCHES = (1, 64)
CRITERIA = ("mip", "l1", "taylor", "activation", "random")


@dataclass(frozen=True)
class ModelSpec:
    """A network of the sweep: its constructor (unseeded: the caller seeds) and a description."""

    make: Callable[[], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {
    "mlp3": ModelSpec(PaperMLP, "PaperMLP FC-3, 784-300-100-10"),
    "mlp4": ModelSpec(lambda: PaperMLP(hidden=PaperMLP.FC4), "PaperMLP FC-4, 784-200-100-100-10"),
    "lenet5": ModelSpec(LeNet5, "LeNet-5 (ReLU, max pool)"),
    "vgg": ModelSpec(SmallVGG, "SmallVGG, (conv-BN-ReLU x2, max pool) x3 at 16/32/64, FC 128"),
    "resnet": ModelSpec(SmallResNet, "SmallResNet, stem 16, basic blocks 16/32/64, global pool"),
}


@dataclass(frozen=True)
class DataSpec:
    """A data set of the sweep and its defaults (each can be overridden on the command line).

    ``train_samples`` / ``test_samples``: a stratified subset of that size (None: the whole
    split).  The epochs give training and fine-tuning a few hundred and a few dozen optimizer
    steps (batch 64) on both data sets: digits has only 1,258 train samples.
    """

    spec: str  # for oamipc.data.load_data
    transform: str  # how the samples reach 1x28x28
    train_epochs: int
    finetune_epochs: int
    train_samples: int | None
    test_samples: int | None


DATA: dict[str, DataSpec] = {
    "digits": DataSpec("digits", "8x8 -> 28x28 antialiased bilinear resize (oamipc.transfer.fit_to_shape)",
                       train_epochs=15, finetune_epochs=2, train_samples=None, test_samples=None),
    "fashion-mnist": DataSpec("fashion-mnist", "none (28x28)", train_epochs=5, finetune_epochs=1,
                              train_samples=5000, test_samples=5000),
}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers of a sweep (written into every JSON)."""

    models: tuple[str, ...]
    data: tuple[str, ...]
    criteria: tuple[str, ...]
    budgets: tuple[float, ...]
    # Overrides of the data sets' defaults (DATA); None: the default, 0 samples: the whole split.
    train_epochs: int | None
    train_samples: int | None
    test_samples: int | None
    finetune_epochs: int | None
    calib_samples: int
    mip_options: dict[str, Any]
    bench_runs: int
    bench_warmup: int
    seed: int
    threads: int
    quick: bool = False
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    batch_size: int = 64

    def epochs_for(self, data: str) -> int:
        """Dense training epochs on ``data``."""
        return self.train_epochs if self.train_epochs is not None else DATA[data].train_epochs

    def finetune_epochs_for(self, data: str) -> int:
        """Fine-tuning epochs on ``data`` (0: no fine-tune)."""
        return self.finetune_epochs if self.finetune_epochs is not None else DATA[data].finetune_epochs

    def samples_for(self, data: str) -> tuple[int | None, int | None]:
        """(train, test) subset sizes on ``data``; None: the whole split."""
        train = self.train_samples if self.train_samples is not None else DATA[data].train_samples
        test = self.test_samples if self.test_samples is not None else DATA[data].test_samples
        return train or None, test or None


# ------------------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def prepare_data(name: str, settings: Settings) -> DataSplits | None:
    """Train (optionally a stratified subset) and test splits at 1x28x28, or None when unavailable."""
    spec = DATA[name].spec
    if spec == "fashion-mnist" and not fashion_mnist_available():
        _log("skipping fashion-mnist: its IDX files are not installed (see oamipc.data.load_data; "
             "apt-get install dataset-fashion-mnist or set the data directory)")
        return None
    splits = load_data(spec)
    train = fit_to_shape(splits.train, INPUT_SHAPE)
    test = fit_to_shape(splits.test, INPUT_SHAPE)
    n_train, n_test = settings.samples_for(name)
    if n_train is not None and n_train < len(train):
        train = train.stratified_sample(n_train, seed=settings.seed)
    if n_test is not None and n_test < len(test):
        test = test.stratified_sample(n_test, seed=settings.seed)
    return DataSplits(train, test)


def _train_config(settings: Settings, data: str) -> FinetuneConfig:
    return FinetuneConfig(epochs=settings.epochs_for(data), lr=settings.lr, batch_size=settings.batch_size,
                          optimizer="adam", schedule="cosine", seed=settings.seed)


def dense_network(model: str, data: str, train: Dataset, settings: Settings,
                  cache: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The dense ``model`` trained on ``train``: from the cache when there, else trained and cached.

    The initial weights come from ``torch.manual_seed(seed)``; training is
    :func:`oamipc.finetune.finetune` with one seed, so the same key gives the same weights (on
    the same torch build and thread count).  A cached file that no longer fits the
    architecture is ignored and overwritten.
    """
    config = _train_config(settings, data)
    key = f"{model}_{data}_n{len(train)}_e{config.epochs}_b{config.batch_size}_lr{config.lr:g}_s{settings.seed}"

    def make() -> nn.Module:
        torch.manual_seed(settings.seed)
        return MODELS[model].make()

    def fit(net: nn.Module) -> dict[str, Any]:
        _log(f"[{model}/{data}] training the dense network: {config.epochs} epochs on {len(train)} samples")
        history = finetune(net, train, config)
        return {"config": config.to_dict(), "train_samples": len(train), "seconds": history.seconds,
                "history": history.to_dict(), "key": key}

    return load_or_train(cache / f"{key}.pt", make, fit)


def _latency(bench: BenchResult, index: int) -> dict[str, float]:
    """Median ms per batch size of model ``index`` of ``bench`` (keys are the batch sizes as str)."""
    return {str(b.batch): b.stats[index].median_ms for b in bench.batches}


def _costs(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    costs = passes.count_costs(module if isinstance(module, torch.fx.GraphModule) else trace(module, (example,)))
    return int(costs.params), int(costs.macs)


# ------------------------------------------------------------------------------------- the sweep


def run_row(net: nn.Module, splits: DataSplits, calib: Dataset, dense_onnx: Path, scratch: Path, *, model: str,
            data: str, budget: float, criterion: str, dense: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Compile ``net`` with one criterion and budget, then measure it (one row of the table)."""
    start = time.perf_counter()
    example = splits.test.x[:1]
    result = oamipc.compile(net, example, data=DataSplits(calib, calib), importance=criterion,
                            flops_budget=budget, seed=settings.seed, calib_samples=len(calib),
                            mip_options=settings.mip_options if criterion == "mip" else None)
    compile_s = time.perf_counter() - start
    rep = result.report
    module = result.module
    params, macs = int(rep["after"]["params"]), int(rep["after"]["macs"])
    row: dict[str, Any] = {
        "model": model, "data": data, "budget": budget, "criterion": criterion,
        "params": params, "macs": macs, "params_kept": params / dense["params"], "macs_kept": macs / dense["macs"],
        "widths": {name: w["after"] for name, w in rep["widths"].items()},
        "accuracy": accuracy(module, splits.test),
        "calib_accuracy": rep["accuracy"]["after"],  # the compiler saw only the calibration samples
    }
    if criterion == "mip":
        mip = rep["mip"]
        row["mip"] = {"reproducible": mip.get("reproducible"), "seconds": mip.get("seconds"),
                      "warm_start": (mip.get("warm_start") or {}).get("chosen"),
                      "holdout_loss": mip.get("holdout_loss")}
    ft_s = 0.0
    row["accuracy_finetuned"] = None
    if settings.finetune_epochs_for(data) > 0:
        config = FinetuneConfig(epochs=settings.finetune_epochs_for(data), lr=settings.finetune_lr,
                                batch_size=settings.batch_size, optimizer="adam", schedule="cosine",
                                seed=settings.seed)
        history = finetune(module, splits.train, config, eval_data=splits.test)
        row["accuracy_finetuned"] = history.final_eval_accuracy
        ft_s = history.seconds
    t0 = time.perf_counter()
    pruned_onnx = scratch / f"{criterion}_{budget:g}.onnx"
    export_onnx(module, example, pruned_onnx)
    bench = benchmark([dense_onnx, pruned_onnx], batch_sizes=BATCHES, runs=settings.bench_runs,
                      warmup=settings.bench_warmup, seed=settings.seed)
    pruned_onnx.unlink()
    row["latency_ms"] = _latency(bench, 1)
    row["dense_latency_ms"] = _latency(bench, 0)
    # B/A per round, median over rounds: below 1 when the pruned file is faster.
    row["latency_ratio"] = {str(b.batch): b.pairwise_ratio for b in bench.batches}
    row["seconds"] = {"compile": compile_s, "finetune": ft_s, "bench": time.perf_counter() - t0,
                      "total": time.perf_counter() - start}
    ft = row["accuracy_finetuned"]
    _log(f"[{model}/{data}] budget {budget:.2f} {criterion:10s} MACs {row['macs_kept']:.3f} "
         f"acc {row['accuracy']:.4f} -> {'-' if ft is None else f'{ft:.4f}'} fine-tuned, "
         f"b64 x{row['latency_ratio'][str(BATCHES[-1])]:.2f} ({row['seconds']['total']:.1f} s)")
    return row


def run_pair(model: str, data: str, splits: DataSplits, settings: Settings, cache: Path) -> dict[str, Any]:
    """Train (or load) the dense network of one (model, data) and sweep criteria x budgets on it."""
    start = time.perf_counter()
    net, training = dense_network(model, data, splits.train, settings, cache)
    example = splits.test.x[:1]
    params, macs = _costs(net, example)
    dense: dict[str, Any] = {"params": params, "macs": macs, "accuracy": accuracy(net, splits.test)}
    calib = splits.train.stratified_sample(min(settings.calib_samples, len(splits.train)), seed=settings.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="oamipc-sweep-") as tmp:
        scratch = Path(tmp)
        dense_onnx = scratch / "dense.onnx"
        export_onnx(net, example, dense_onnx)
        bench = benchmark([dense_onnx], batch_sizes=BATCHES, runs=settings.bench_runs, warmup=settings.bench_warmup,
                          seed=settings.seed)
        dense["latency_ms"] = _latency(bench, 0)
        _log(f"[{model}/{data}] dense: {params:,} params, {macs:,} MACs, accuracy {dense['accuracy']:.4f}, "
             f"b1 {dense['latency_ms']['1']:.3f} ms, b64 {dense['latency_ms']['64']:.3f} ms")
        for budget in settings.budgets:
            for criterion in settings.criteria:
                rows.append(run_row(net, splits, calib, dense_onnx, scratch, model=model, data=data, budget=budget,
                                    criterion=criterion, dense=dense, settings=settings))
    return {
        "model": model, "model_description": MODELS[model].description, "data": data,
        "transform": DATA[data].transform, "input_shape": [1, *INPUT_SHAPE],
        "train_samples": len(splits.train), "test_samples": len(splits.test), "calib_samples": len(calib),
        "finetune_epochs": settings.finetune_epochs_for(data),
        "training": training, "dense": dense, "rows": rows,
        "setting": _setting_dict(settings), "seconds": time.perf_counter() - start,
    }


def _setting_dict(settings: Settings) -> dict[str, Any]:
    return {**asdict(settings), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "bench_intra_op_threads": 1}


# ------------------------------------------------------------------------------------- reporting


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table(results: Sequence[dict[str, Any]]) -> str:
    """One Markdown table: a dense row per (model, data), then one row per budget and criterion."""
    lines = [("| model | data | budget | criterion | MACs kept | params kept | accuracy | fine-tuned | "
              "b1 ms | b64 ms | b1 B/A | b64 B/A | seconds |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        d = res["dense"]
        train_s = res["training"].get("seconds")
        lines.append(f"| {res['model']} | {res['data']} | dense | - | {d['macs']:,} MACs | {d['params']:,} params | "
                     f"{_pct(d['accuracy'])} | - | {d['latency_ms']['1']:.3f} | {d['latency_ms']['64']:.3f} | - | - | "
                     f"{'-' if train_s is None else f'{train_s:.1f}'} |")
        for r in res["rows"]:
            lat, ratio = r["latency_ms"], r["latency_ratio"]
            lines.append(f"| {r['model']} | {r['data']} | {r['budget']:.2f} | {r['criterion']} | "
                         f"{_pct(r['macs_kept'])} | {_pct(r['params_kept'])} | {_pct(r['accuracy'])} | "
                         f"{_pct(r['accuracy_finetuned'])} | {lat['1']:.3f} | {lat['64']:.3f} | {ratio['1']:.2f} | "
                         f"{ratio['64']:.2f} | {r['seconds']['total']:.1f} |")
    return "\n".join(lines)


def mip_losses(results: Sequence[dict[str, Any]], key: str = "accuracy") -> list[dict[str, Any]]:
    """Per (model, data, budget): where a criterion beats ``mip`` on ``key`` (best such rival)."""
    out = []
    for res in results:
        for budget in sorted({r["budget"] for r in res["rows"]}, reverse=True):
            rows = [r for r in res["rows"] if r["budget"] == budget and r[key] is not None]
            mip = next((r for r in rows if r["criterion"] == "mip"), None)
            rivals = [r for r in rows if r["criterion"] != "mip"]
            if mip is None or not rivals:
                continue
            best = max(rivals, key=lambda r: r[key])
            if best[key] > mip[key]:
                out.append({"model": res["model"], "data": res["data"], "budget": budget, "mip": mip[key],
                            "winner": best["criterion"], "winner_accuracy": best[key],
                            "beaten_by": sorted(r["criterion"] for r in rivals if r[key] > mip[key])})
    return out


def _losses_md(losses: list[dict[str, Any]], what: str) -> str:
    if not losses:
        return f"No criterion beats `mip` {what}."
    lines = [f"Where another criterion beats `mip` {what}:", "",
             "| model | data | budget | mip | best rival | its accuracy | all that beat mip |",
             "|---|---|---|---|---|---|---|"]
    for loss in losses:
        lines.append(f"| {loss['model']} | {loss['data']} | {loss['budget']:.2f} | {_pct(loss['mip'])} | "
                     f"{loss['winner']} | {_pct(loss['winner_accuracy'])} | {', '.join(loss['beaten_by'])} |")
    return "\n".join(lines)


def _first_per_data(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for res in results:
        seen.setdefault(res["data"], res)
    return list(seen.values())


def _data_line(res: dict[str, Any]) -> str:
    """How one data set was used, from a run's JSON (samples, epochs, transform)."""
    return (f"{res['data']}: {res['train_samples']:,} train samples, {res['test_samples']:,} test samples, "
            f"{res['training']['config']['epochs']} training epochs, {res['finetune_epochs']} fine-tuning epoch(s), "
            f"transform {res['transform']}")


def readme(results: Sequence[dict[str, Any]], settings: Settings, seconds: float, skipped: list[str]) -> str:
    """The Markdown page written next to the JSON files."""
    mip = settings.mip_options
    parts = [
        "# Sweep: models x data x criteria x FLOPs budgets",
        "",
        (f"Written by `python benchmarks/sweep.py{' --quick' if settings.quick else ''}` in {seconds:.0f} s "
         f"({seconds / 60:.1f} min) on {cpu_model()} with {settings.threads} torch thread(s); "
         f"torch {torch.__version__}."),
        "",
        f"Dense training: Adam lr {settings.lr:g}, cosine, batch {settings.batch_size}, seed {settings.seed}. "
        f"Fine-tune: Adam lr {settings.finetune_lr:g}, cosine, the same train samples and seed for every criterion. "
        "Per data set: " + "; ".join(_data_line(res) for res in _first_per_data(results)) + ". "
        f"Calibration: {settings.calib_samples} stratified train samples. "
        f"MIP: time limit {mip.get('time_limit')} s per solve, {mip.get('total_time_limit')} s in all"
        + (f", {mip['samples']} samples" if mip.get("samples") else "") + ".",
        "",
        ("Columns: budget = fraction of the dense MACs allowed; MACs/params kept = fractions of the dense network's; "
         "accuracy = test accuracy straight after pruning, fine-tuned = after the fine-tune; b1/b64 ms = median "
         f"onnxruntime latency (1 intra-op thread, {settings.bench_runs} runs) at batch 1/64; B/A = the pruned "
         "file's latency over the dense one's, timed interleaved (median of per-round ratios; below 1 is faster); "
         "seconds = compile + fine-tune + timing (dense row: its training, also when loaded from the cache)."),
        "",
        table(results),
        "",
        _losses_md(mip_losses(results, "accuracy"), "without fine-tuning"),
        "",
        _losses_md(mip_losses(results, "accuracy_finetuned"), "after fine-tuning"),
        "",
        "Plots (test accuracy against MACs kept, per criterion, solid before and dashed after fine-tuning): "
        + ", ".join(f"[{r['model']}/{r['data']}]({r['model']}_{r['data']}.svg)" for r in results) + ".",
    ]
    unreproducible = [f"{r['model']}/{r['data']} {r['budget']:.2f}" for res in results for r in res["rows"]
                      if r.get("mip") and r["mip"]["reproducible"] is False]
    if unreproducible:
        parts += ["", "MIP plans that hit a wall-clock limit (may differ between runs): " + ", ".join(unreproducible)
                  + "."]
    if skipped:
        parts += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------- CLI

#: Defaults of the full sweep and of --quick (an explicit option wins over both).
FULL: dict[str, Any] = {
    "models": "mlp3,mlp4,lenet5,vgg,resnet", "data": "digits,fashion-mnist", "criteria": ",".join(CRITERIA),
    "budgets": "0.5,0.25", "train_epochs": None, "train_samples": None, "test_samples": None,
    "finetune_epochs": None, "calib_samples": 512, "mip_time_limit": 5.0, "mip_total_time_limit": 10.0,
    "mip_samples": None, "bench_runs": 20, "bench_warmup": 5,
}
QUICK: dict[str, Any] = {
    "models": "mlp3", "data": "digits", "criteria": "mip,l1", "budgets": "0.5", "train_epochs": 3,
    "train_samples": 500, "test_samples": None, "finetune_epochs": 1, "calib_samples": 128,
    "mip_time_limit": 1.0, "mip_total_time_limit": 2.0, "mip_samples": 16, "bench_runs": 5, "bench_warmup": 1,
}


def _defaults(key: str) -> str:
    """The per-data-set defaults of one option, for --help."""
    return ", ".join(f"{name} {getattr(spec, key) or 'all'}" for name, spec in DATA.items())


def _names(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {', '.join(unknown) or '(none given)'}: choose from {', '.join(known)}")
    return names


def parse_settings(argv: list[str] | None) -> tuple[Settings, Path, Path]:
    """The command line as :class:`Settings`, the output directory and the cache directory."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI-speed smoke run (one small model on digits)")
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--data", help=f"comma list of {', '.join(DATA)} (default: both)")
    parser.add_argument("--criteria", help=f"comma list of importance criteria (default: {','.join(CRITERIA)})")
    parser.add_argument("--budgets", help=f"comma list of MAC fractions kept (default: {FULL['budgets']})")
    parser.add_argument("--train-epochs", type=int,
                        help="dense training epochs (default: " + _defaults("train_epochs") + ")")
    parser.add_argument("--train-samples", type=int,
                        help="stratified train subset for training, calibration and fine-tuning, 0: all "
                             "(default: " + _defaults("train_samples") + ")")
    parser.add_argument("--test-samples", type=int,
                        help="stratified test subset, 0: all (default: " + _defaults("test_samples") + ")")
    parser.add_argument("--finetune-epochs", type=int,
                        help="0: no fine-tune (default: " + _defaults("finetune_epochs") + ")")
    parser.add_argument("--calib-samples", type=int, help=f"default {FULL['calib_samples']}")
    parser.add_argument("--mip-time-limit", type=float,
                        help=f"seconds per MILP solve (default {FULL['mip_time_limit']})")
    parser.add_argument("--mip-total-time-limit", type=float,
                        help=f"seconds for all MILP solves of one compile (default {FULL['mip_total_time_limit']})")
    parser.add_argument("--mip-samples", type=int, help="MILP samples (default: the MIP pass's)")
    parser.add_argument("--bench-runs", type=int, help=f"timed rounds per batch size (default {FULL['bench_runs']})")
    parser.add_argument("--bench-warmup", type=int, help=f"untimed rounds (default {FULL['bench_warmup']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for training, compile and accuracy (default 1: on a shared machine more "
                             "threads can be many times slower, and results are deterministic per thread count)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"trained dense networks (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    opt = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in base}
    mip: dict[str, Any] = {"time_limit": opt["mip_time_limit"], "total_time_limit": opt["mip_total_time_limit"]}
    if opt["mip_samples"]:
        mip["samples"] = opt["mip_samples"]
    budgets = tuple(float(b) for b in str(opt["budgets"]).split(",") if b.strip())
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets must be fractions in (0, 1], got {opt['budgets']}")
    settings = Settings(
        models=_names(opt["models"], tuple(MODELS), "model(s)"), data=_names(opt["data"], tuple(DATA), "data"),
        criteria=_names(opt["criteria"], tuple(passes.importance_names()), "criteria"), budgets=budgets,
        train_epochs=opt["train_epochs"], train_samples=opt["train_samples"], test_samples=opt["test_samples"],
        finetune_epochs=opt["finetune_epochs"],
        calib_samples=int(opt["calib_samples"]), mip_options=mip, bench_runs=int(opt["bench_runs"]),
        bench_warmup=int(opt["bench_warmup"]), seed=args.seed, threads=args.threads, quick=args.quick)
    return settings, args.out, args.cache


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep the command line asks for; return the summary (also written as summary.json)."""
    settings, out, cache = parse_settings(argv)
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for data in settings.data:
        splits = prepare_data(data, settings)
        if splits is None:
            skipped.append(f"{data} (data files not installed)")
            continue
        for model in settings.models:
            res = run_pair(model, data, splits, settings, cache)
            results.append(res)
            _write_json(out / f"{model}_{data}.json", res)
            plot_rows = [{"criterion": r["criterion"], "flops_kept": r["macs_kept"], "accuracy": r["accuracy"],
                          "accuracy_finetuned": r["accuracy_finetuned"]} for r in res["rows"]]
            try:
                _write_text(out / f"{model}_{data}.svg", sweep_svg(plot_rows, accuracy_before=res["dense"]["accuracy"]))
            except DataError as exc:
                _log(f"[{model}/{data}] no plot: {exc}")
            _log(f"[{model}/{data}] done in {res['seconds']:.0f} s (total {time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    text = table(results)
    print(text)
    _write_text(out / "README.md", readme(results, settings, seconds, skipped))
    summary = {"setting": _setting_dict(settings), "seconds": seconds, "skipped": skipped,
               "runs": [f"{r['model']}_{r['data']}.json" for r in results],
               "mip_losses": mip_losses(results, "accuracy"),
               "mip_losses_finetuned": mip_losses(results, "accuracy_finetuned")}
    _write_json(out / "summary.json", summary)
    _log(f"sweep finished in {seconds:.0f} s ({seconds / 60:.1f} min): {out}")
    return summary


if __name__ == "__main__":
    main()

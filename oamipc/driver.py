"""The driver: assembles the default passes into the compile pipeline.

Data flows one way::

    load -> trace (shapes) -> unit groups -> importance -> plan -> prune -> reconstruct -> export -> verify -> bench

:func:`compile` is the Python API (module in, pruned GraphModule and report out).
:func:`compile_file` is what ``oamipc compile`` runs: it adds loading, ONNX export of the
original and the pruned model, verification with onnxruntime, and an A/B latency measurement.
This module and the CLI are the only places that import the pass library.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from oamipc import passes
from oamipc.atomic import is_disk_full
from oamipc.data import Dataset, DataSplits, accuracy
from oamipc.errors import DataError, ExportError, OutputError, SpeedupError, UsageError, describe, first_line
from oamipc.finetune import FinetuneConfig
from oamipc.finetune import finetune as finetune_module
from oamipc.hardware import speed_verdict
from oamipc.notices import notices, opaque_notices, unprunable_notice
from oamipc.passmanager import Analysis, AnalysisManager, CompileContext, InputRange, Pass, PassManager
from oamipc.pipeline import parse_pipeline
from oamipc.plan import Plan
from oamipc.target import Target
from oamipc.tracing import propagate_shapes, trace

log = logging.getLogger(__name__)

DEFAULT_CALIB_SAMPLES = 512
#: Whether ``reconstruct="auto"`` refits the pruned layers when data is given (benchmarks/RESULTS.md).
RECONSTRUCT_BY_DEFAULT = True
#: Whether ``refit_select=None`` compares candidate plans after the refit when the refit runs
#: (:class:`oamipc.passes.PlanRefitSelectAnalysis`; benchmarks/RESULTS.md).
REFIT_SELECT_BY_DEFAULT = True


@dataclass
class CompileResult:
    """The pruned GraphModule, the plan that was applied, and the report (JSON-ready dict)."""

    module: fx.GraphModule
    report: dict[str, Any]
    plan: Plan | None
    original: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...] = field(default=())


def _as_splits(data: Any) -> DataSplits | None:
    """Accept DataSplits, a Dataset, an (x, y) tuple or a tensor x."""
    if data is None or isinstance(data, DataSplits):
        return data
    if isinstance(data, Dataset):
        return DataSplits(data, data)
    if isinstance(data, torch.Tensor):
        ds = Dataset("tensor", data.float(), None)
        return DataSplits(ds, ds)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        ds = Dataset("tensors", torch.as_tensor(data[0]).float(), torch.as_tensor(data[1]).long())
        return DataSplits(ds, ds)
    raise DataError(f"data must be a DataSplits, Dataset, (x, y) tuple or tensor, got {type(data).__name__}")


def _fit(ds: Dataset, sample_shape: tuple[int, ...]) -> Dataset:
    return ds if tuple(ds.x.shape[1:]) == sample_shape else ds.reshaped(sample_shape)


def compile(  # noqa: A001 - the product's verb
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    data: Any = None,
    importance: str = "auto",
    prune_ratio: float | None = None,
    flops_budget: float | None = None,
    min_keep: int = 1,
    round_to: int | str = "auto",
    target: Target | None = None,
    leaf_modules: Sequence[str] = (),
    prune_embed: bool = False,
    pipeline: str | Sequence[Pass | Analysis[Any]] | None = None,
    plan: Plan | None = None,
    seed: int = 0,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    mip_options: passes.MipOptions | Mapping[str, Any] | None = None,
    lossless: bool | None = None,
    lossless_box: str = "feature",
    verify: bool = True,
    finetune: FinetuneConfig | None = None,
    reconstruct: bool | str | passes.ReconstructPass = "auto",
    refit_select: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CompileResult:
    """Trace ``model``, choose units with ``importance`` and remove them; return the result.

    Give ``prune_ratio`` (fraction of units removed per group) or ``flops_budget`` (fraction of
    MACs kept), with ``min_keep`` and ``round_to``, or all of them as one ``target``
    (:class:`oamipc.Target`), or a saved ``plan`` to replay, or a full ``pipeline``.  ``data`` provides
    calibration samples for data-driven criteria and accuracy before/after when labelled.
    ``importance="auto"`` (the default) is ``mip`` when ``data`` is given (the MILP needs
    calibration samples) and ``l1`` otherwise; the report says which one ran.
    ``mip_options`` configures ``importance="mip"``: an ``oamipc.passes.MipOptions`` or a mapping
    of its field names (formulation, solver, time_limit, total_time_limit, gap, threads, samples, ...;
    ``{"executor": "ray", "jobs": 4}`` runs the MIP's independent tasks as Ray tasks, same plan).
    ``lossless`` removes the units that are provably dead on the data's box (per input feature, or
    per channel with ``lossless_box="channel"``) before the criterion runs, for free (see
    :mod:`oamipc.passes.lossless`); ``None`` (the default) turns it on when ``data`` is given and
    the plan is chosen here (not replayed, no ``pipeline``: there, planners take ``lossless=true``).
    The target and the MIP options are validated here, before any work.
    ``reconstruct`` refits the pruned layers to the original network's layer outputs after
    pruning (:class:`oamipc.passes.ReconstructPass`; a pass instance sets its options): ``"auto"``
    does so when ``data`` is given and no ``pipeline`` is (a pipeline names ``reconstruct`` itself),
    ``True`` requires data; the report then has a ``reconstruct`` section.
    ``refit_select`` compares the planner's plan with the solver-free plans and width splits of
    them by held-out accuracy after a refit (:class:`oamipc.passes.PlanRefitSelectAnalysis`) and
    prunes the best; ``None`` (the default) does so when the refit runs and the plan is chosen here,
    when it is cheap enough (the analysis's cost rule); the report then has a ``refit_select`` section.
    ``finetune`` trains the pruned network afterwards on all of ``data``'s (labelled) train split
    and measures it on the test split (see :mod:`oamipc.finetune`); the report then has a
    ``finetune`` section and ``accuracy`` gains ``after_prune`` (``after`` is the fine-tuned net).
    With ``importance="mip"`` and ``finetune.select`` (the default), the solver-free criteria's
    networks are probed beside the MILP's and the one that fine-tunes best on held-out train
    samples is fine-tuned (:mod:`oamipc.finetune_select`; the report's ``finetune_select``).
    ``prune_embed`` makes a transformer's residual stream (embeddings, class token, positional
    embedding, every LayerNorm over it, every block's output rows and input columns) one prunable
    group; without it the stream is kept (a LayerNorm over fewer channels computes other
    statistics, so this removal is not exact).  A replayed plan made with it turns it on.
    The input ``model`` is not modified.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if target is None:
        target = Target(prune_ratio=prune_ratio, flops_budget=flops_budget, min_keep=min_keep, round_to=round_to)
    elif (prune_ratio, flops_budget, min_keep, round_to) != (None, None, 1, "auto"):
        raise UsageError("give the target either as target=Target(...) or as prune_ratio/flops_budget/min_keep/"
                         "round_to, not both")
    prune_embed = bool(prune_embed or (plan is not None and plan.settings.get("prune_embed")))
    torch.manual_seed(seed)
    start = time.perf_counter()
    gm = trace(copy.deepcopy(model).eval(), example_inputs, leaf_modules=tuple(leaf_modules))
    original = copy.deepcopy(gm)
    splits = _as_splits(data)
    if finetune is not None and (splits is None or splits.train.y is None or splits.test.y is None):
        raise UsageError("fine-tuning (--finetune-epochs) needs labelled data to train on and to measure: "
                         "give --data with labels (e.g. --data digits)")
    sample_shape = tuple(example_inputs[0].shape[1:])
    calib: Dataset | None = None
    test: Dataset | None = None
    train: Dataset | None = None
    if splits is not None:
        train = _fit(splits.train, sample_shape)
        calib = train.stratified_sample(min(calib_samples, len(splits.train.x)), seed=seed)
        test = _fit(splits.test, sample_shape)
    if importance == "auto":
        importance = "mip" if calib is not None else "l1"
        log.info("importance: %s (%s)", importance, "calibration data given" if calib is not None else "no --data")
    mip = passes.MipOptions.of(mip_options) if importance == "mip" and pipeline is None else None
    lossless_on, lossless_note = _lossless_choice(lossless, calib is not None, plan is not None, pipeline is not None)
    refit = _reconstruct_step(reconstruct, pipeline, calib is not None, len(example_inputs))
    ctx = CompileContext(example_inputs, calib.x if calib else None, calib.y if calib else None, seed=seed,
                         progress=progress,
                         input_range=InputRange.of(train.x, f"{train.name} ({len(train.x)} samples)")
                         if lossless_on and train is not None else None,
                         train_x=train.x if train is not None else None,
                         train_y=train.y if train is not None else None, original=original)
    select_on = _refit_select_choice(refit_select, refit, plan is not None, pipeline is not None)
    steps = _steps(pipeline, plan, importance, target, tuple(leaf_modules), mip, lossless_on, lossless_box,
                   prune_embed, refit if select_on else None) + ([refit] if refit else [])
    am = AnalysisManager(ctx)
    units = am.get(passes.UnitGroupAnalysis(tuple(leaf_modules), prune_embed), gm)
    before = passes.count_costs(gm, leaf_modules)
    unit_summary = units.summary()
    manager = PassManager(steps, verify=verify)
    gm = manager.run(gm, am)
    if not verify:  # costs are read from shape metadata, which only verification refreshes
        propagate_shapes(gm, example_inputs)
    after = passes.count_costs(gm, leaf_modules)
    outcome = next((o for _, o in reversed(manager.outcomes) if isinstance(o, passes.PruneOutcome)), None)
    rebuilt = next((o for _, o in reversed(manager.outcomes) if isinstance(o, passes.ReconstructOutcome)), None)
    report: dict[str, Any] = {
        "settings": {"importance": importance, **target.to_dict(), "seed": seed, "reconstruct": rebuilt is not None,
                     "leaf_modules": list(leaf_modules), "prune_embed": prune_embed,
                     "calib_samples": len(calib.x) if calib else 0,
                     "lossless": lossless_on, "lossless_box": lossless_box, "refit_select": select_on,
                     "mip": mip.to_dict() if mip is not None else {},
                     "pipeline": pipeline if isinstance(pipeline, str) else [s.name for s in steps]},
        "input_shape": list(example_inputs[0].shape),
        "units": unit_summary,
        "before": before.to_dict(),
        "after": after.to_dict(),
        **_plan_sections(outcome),
        **({"reconstruct": rebuilt.to_dict()} if rebuilt is not None else {}),
        "timings_s": dict(am.timings),
    }
    if "lossless" not in report:
        report["lossless"] = {"enabled": False, "note": lossless_note or "the planner ran without it"}
    if "refit_select" not in report and plan is None and pipeline is None:
        report["refit_select"] = {"enabled": False, "note": "turned off (--no-refit-select)" if refit_select is False
                                  else "no reconstruction: plans are judged as pruned"}
    report["widths"] = {name: {"before": layer["out"], "after": after.layers.get(name, {}).get("out", 0)}
                        for name, layer in before.layers.items()}
    if test is not None and test.y is not None:
        report["accuracy"] = {"before": accuracy(original, test), "after": accuracy(gm, test),
                              "dataset": test.name, "samples": len(test.x)}
    chosen_plan = outcome.plan if outcome else None
    if finetune is not None and train is not None and test is not None:
        if finetune.select and importance == "mip" and plan is None and pipeline is None:
            def candidate(criterion: str) -> CompileResult:
                return compile(model, example_inputs, data=splits, importance=criterion, target=target,
                               leaf_modules=leaf_modules, prune_embed=prune_embed, seed=seed,
                               calib_samples=calib_samples, lossless=lossless,
                               lossless_box=lossless_box, verify=verify, reconstruct=reconstruct,
                               refit_select=False)  # the criteria's own plans are the candidates
            gm, report, chosen_plan = _select_for_finetune(importance, gm, report, chosen_plan, candidate, train,
                                                           finetune)
        pruned_acc = report["accuracy"]["after"]
        report["finetune"] = _finetune_section(gm, train, test, finetune, progress, accuracy_before=pruned_acc)
        report["accuracy"] = {"before": report["accuracy"]["before"], "after_prune": pruned_acc,
                              "after": report["finetune"]["accuracy_after"], "dataset": test.name,
                              "samples": len(test.x)}
        report["timings_s"]["finetune"] = report["finetune"]["seconds"]
    report["notices"] = notices(report)
    for text in report["notices"]:  # the CLI prints them under its table; the report keeps them
        log.info("notice: %s", text)
    report["timings_s"]["compile_total"] = time.perf_counter() - start
    return CompileResult(gm, report, chosen_plan, original, example_inputs)


def _select_for_finetune(importance: str, gm: fx.GraphModule, report: dict[str, Any], plan: Plan | None,
                         candidate: Callable[[str], CompileResult], train: Dataset,
                         config: FinetuneConfig) -> tuple[fx.GraphModule, dict[str, Any], Plan | None]:
    """The network to fine-tune: the asked criterion's, or a solver-free criterion's that
    fine-tunes better on held-out train samples (:mod:`oamipc.finetune_select`)."""
    from oamipc import finetune_select

    start = time.perf_counter()
    others = {c: candidate(c) for c in finetune_select.CANDIDATES if c != importance}
    choice = finetune_select.select([(importance, gm), *((c, r.module) for c, r in others.items())], train, config)
    record = choice.to_dict() | {"asked": importance, "seconds": time.perf_counter() - start}
    if choice.chosen:
        picked = others[choice.probes[choice.chosen].criterion]
        asked = report
        gm, plan = picked.module, picked.plan
        report = picked.report | {"settings": picked.report["settings"] | {"importance": importance}}
        report.update({k: v for k, v in asked.items() if k not in report})  # e.g. the MILP's own record
        report["timings_s"] = {**asked["timings_s"], **{f"{k} ({choice.probes[choice.chosen].criterion})": v
                                                        for k, v in picked.report["timings_s"].items()}}
    report["finetune_select"] = record
    return gm, report, plan


def _lossless_choice(asked: bool | None, has_data: bool, replay: bool, pipeline: bool) -> tuple[bool, str | None]:
    """Whether the compile's planner removes the dead units first, and why not when it does not."""
    if asked is None:
        if replay:
            return False, "a saved plan was replayed: it removes what it names"
        if pipeline:
            return False, "a pipeline was given: its planners take lossless=true"
        if not has_data:
            return False, "no data: the input box is the data's range (give --data)"
        return True, None
    if not asked:
        return False, "turned off (--no-lossless)"
    if replay or pipeline:
        raise UsageError("lossless removal applies when oamipc chooses the plan: a replayed plan removes what it "
                         "names, and in a pipeline its planners take lossless=true; drop --lossless")
    if not has_data:
        raise UsageError("lossless removal needs data: its input box is the data's range; give --data, or drop "
                         "--lossless")
    return True, None


def _refit_select_choice(asked: bool | None, refit: passes.ReconstructPass | None, replay: bool,
                         pipeline: bool) -> bool:
    """Whether the compile chooses its plan after the refit (see :func:`compile`)."""
    if asked is None:
        return REFIT_SELECT_BY_DEFAULT and refit is not None and not replay and not pipeline
    if not asked:
        return False
    if replay or pipeline:
        raise UsageError("the refit selection chooses among plans made here: a replayed plan or a pipeline has "
                         "none to choose; drop --refit-select")
    if refit is None:
        raise UsageError("the refit selection judges plans after the refit: it needs reconstruction (data given, "
                         "no --no-reconstruct); drop --refit-select")
    return True


def _steps(pipeline: str | Sequence[Pass | Analysis[Any]] | None, plan: Plan | None, importance: str,
           target: Target, leaf_modules: tuple[str, ...], mip: passes.MipOptions | None, lossless: bool = False,
           lossless_box: str = "feature", prune_embed: bool = False,
           select_after: passes.ReconstructPass | None = None) -> list[Pass | Analysis[Any]]:
    """The passes of one compile: a given pipeline, a plan replay, or the planner for ``importance`` + prune
    (wrapped in the refit selection when ``select_after`` is the refit that will follow)."""
    if pipeline is not None and prune_embed:
        raise UsageError("with a pipeline, give prune-embed=true to its passes instead of --prune-embed")
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if pipeline is not None:
        return list(pipeline)
    if plan is not None:
        return [passes.PruneUnitsPass(leaf_modules=leaf_modules, plan=plan, prune_embed=prune_embed)]
    if not target.is_set:
        raise UsageError("say how much to remove: a prune ratio or a FLOPs budget (CLI: --prune-ratio, "
                         "--flops-budget), a saved plan, or a pipeline")
    extra = {"options": mip} if mip is not None else {}
    planner: passes.PlannerAnalysis = passes.planner_for(importance, target, leaf_modules, lossless=lossless,
                                                          lossless_box=lossless_box, prune_embed=prune_embed, **extra)
    if select_after is not None:
        planner = passes.PlanRefitSelectAnalysis(target=target, leaf_modules=leaf_modules, prune_embed=prune_embed,
                                                 inner=planner, refit=select_after)
    return [planner, passes.PruneUnitsPass(leaf_modules=leaf_modules, prune_embed=prune_embed)]


def _reconstruct_step(reconstruct: bool | str | passes.ReconstructPass,
                      pipeline: str | Sequence[Pass | Analysis[Any]] | None, has_data: bool,
                      n_inputs: int) -> passes.ReconstructPass | None:
    """The reconstruction pass a compile appends after pruning, or None (see :func:`compile`)."""
    if isinstance(reconstruct, str):
        if reconstruct != "auto":
            raise UsageError(f"reconstruct must be True, False, 'auto' or a ReconstructPass, got {reconstruct!r}")
        return passes.ReconstructPass() if (RECONSTRUCT_BY_DEFAULT and has_data and pipeline is None
                                            and n_inputs == 1) else None
    if reconstruct is False:
        return None
    if pipeline is not None:
        raise UsageError("with a pipeline, name the reconstruct pass in it (e.g. 'prune-units{flops-budget=0.5},"
                         "reconstruct') instead of asking for reconstruction separately")
    if not has_data:
        raise UsageError("reconstruction (--reconstruct) refits layers on sample inputs: give --data")
    return reconstruct if isinstance(reconstruct, passes.ReconstructPass) else passes.ReconstructPass()


def reconstruct_option(enabled: bool | None, samples: int | None) -> bool | str | passes.ReconstructPass:
    """The ``reconstruct`` argument of :func:`compile` for the CLI's ``--reconstruct/--no-reconstruct``
    (None: not given, "auto") and ``--reconstruct-samples`` (which asks for reconstruction)."""
    if samples is not None and samples < 0:
        raise UsageError(f"--reconstruct-samples must be 0 (all) or more, got {samples}")
    if enabled is False:
        if samples is not None:
            raise UsageError("--reconstruct-samples has no effect with --no-reconstruct; drop one of them")
        return False
    if samples is None:
        return "auto" if enabled is None else True
    return passes.ReconstructPass(samples=samples)


def _plan_sections(outcome: passes.PruneOutcome | None) -> dict[str, Any]:
    """The report's sections about planning: the planner's own record, unit scores, the applied plan."""
    if outcome is None:
        return {}
    out: dict[str, Any] = {}
    planned = outcome.planned
    if planned is not None and planned.section:
        out[planned.section] = planned.record
    if planned is not None and planned.lossless is not None:
        out["lossless"] = planned.lossless
    if planned is not None and planned.refit_select is not None:
        out["refit_select"] = planned.refit_select
    if planned is not None:
        out["scores"] = planned.scores
        if planned.predicted_latency is not None:
            out["latency_prediction"] = dict(planned.predicted_latency)
    out["prune"] = outcome.to_dict()
    return out


def _finetune_section(module: nn.Module, train: Dataset, test: Dataset, config: FinetuneConfig,
                      progress: Callable[[str, int, int], None] | None, *,
                      accuracy_before: float | None = None) -> dict[str, Any]:
    """Fine-tune ``module`` in place on ``train``, measuring on ``test``; the report's ``finetune`` entry."""
    before = accuracy(module, test) if accuracy_before is None else accuracy_before
    history = finetune_module(module, train, config, eval_data=test, progress=progress)
    after = history.final_eval_accuracy
    log.info("fine-tuning: held-out accuracy %.4f -> %.4f in %.1f s", before, after or 0.0, history.seconds)
    return {"config": config.to_dict(), "epochs": config.epochs, "train_dataset": train.name,
            "train_samples": len(train), "history": history.to_dict(), "accuracy_before": before,
            "accuracy_after": after, "seconds": history.seconds}


def _save_program(module: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], path: Path,
                  label: str) -> None:
    """Write the pruned model as a ``torch.export`` program (loads without unpickling code)."""
    batch = torch.export.Dim("batch", min=1)
    # torch.export specialises a dimension of size 1, so trace the dynamic batch with two samples.
    two = tuple(torch.cat([x[:1], x[:1]]) for x in example_inputs)
    try:
        try:
            program = torch.export.export(module, two,
                                          dynamic_shapes=tuple({0: batch} for _ in example_inputs))
        except Exception:  # noqa: BLE001 - a batch-1 or hard-coded-batch model: export it static
            program = torch.export.export(module, example_inputs)
    except Exception as exc:
        raise ExportError(f"cannot save {label} as a torch.export program: {first_line(exc)}") from exc
    try:
        torch.export.save(program, str(path))
    except OSError:
        raise  # the caller names the directory and says to free space
    except Exception as exc:
        raise ExportError(f"writing {label} as a torch.export program to {path} failed "
                          f"({describe(exc)}); if that disk is full, "
                          f"free space there or set TMPDIR to a directory with room") from exc


@dataclass(frozen=True)
class ModelSource:
    """Where a command's model and data come from; every CLI command that loads a model takes one.

    ``model`` is a file (see :func:`oamipc.loading.load_model` for ``model_class``,
    ``model_args`` and ``trust_pickle``); ``input_shape`` (batch first) or one sample of ``data``
    gives the example input the model is traced with; ``leaf_modules`` stay opaque to the tracer.
    """

    model: str
    model_class: str | None = None
    model_args: Any = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    data: str | None = None
    data_dir: str | None = None
    leaf_modules: tuple[str, ...] = ()


@dataclass
class LoadedJob:
    """A loaded model, its data (when given) and the example input to trace it with."""

    model: nn.Module
    splits: DataSplits | None
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.example_inputs[0].shape[1:])


def load_job(source: ModelSource, *, seed: int = 0) -> LoadedJob:
    """Load the model and data of ``source`` and make the example input (the one loading entry)."""
    from oamipc.data import load_data
    from oamipc.loading import load_model
    from oamipc.tracing import example_inputs_for

    model = load_model(source.model, model_class=source.model_class, model_args=source.model_args,
                       trust_pickle=source.trust_pickle)
    splits = load_data(source.data, data_dir=source.data_dir) if source.data else None
    shape = source.input_shape
    if shape is None:
        if splits is None:
            raise UsageError("give an input shape (--input-shape, e.g. 1,1,28,28) or data (--data) so the model "
                             "can be traced")
        shape = (1, *splits.train.x.shape[1:])
    return LoadedJob(model, splits, example_inputs_for(shape, seed=seed))


@dataclass
class FileJob:
    """Everything a command that writes files needs besides the pruning options: the source, outputs, switches."""

    source: ModelSource
    output: str
    plan_path: str | None = None
    save_plan: str | None = None
    report_path: str | None = None
    save_pt: str | None = None
    bench: bool = True
    bench_batches: tuple[int, ...] = (1, 64)
    bench_runs: int = 50
    require_speedup: float | None = None  # fail (nothing written) below this measured speed-up
    exporter: str = "auto"  # torchscript, and dynamo when torchscript fails (see oamipc.export)
    verify_samples: int = 64

    def check_outputs(self) -> None:
        """Fail before any work when an output path cannot be written."""
        from oamipc.atomic import check_writable

        for out in (self.output, self.save_plan, self.report_path, self.save_pt):
            if out:
                check_writable(out)


def compile_file(job: FileJob, progress: Callable[[str, int, int], None] | None = None,
                 **options: Any) -> dict[str, Any]:
    """``oamipc compile``: load, compile, export, verify, benchmark; return the report.

    ``options`` are the keyword options of :func:`compile` (the leaf modules come from
    ``job.source``).  Output paths are checked before any work is done; every file is written
    atomically.
    """
    job.check_outputs()
    loaded = load_job(job.source, seed=options.get("seed", 0))
    plan = Plan.load(job.plan_path) if job.plan_path else None
    result = compile(loaded.model, loaded.example_inputs, data=loaded.splits, plan=plan, progress=progress,
                     leaf_modules=job.source.leaf_modules, **options)
    report = result.report
    report["model"] = job.source.model
    check = _fit(loaded.splits.test, loaded.sample_shape) if loaded.splits is not None else None
    _write_outputs(job, result.module, result.example_inputs, report, check_data=check, original=result.original,
                   plan=result.plan, progress=progress)
    return report


def finetune_file(job: FileJob, config: FinetuneConfig,
                  progress: Callable[[str, int, int], None] | None = None, *,
                  reconstruct: bool | str | passes.ReconstructPass = "auto") -> dict[str, Any]:
    """``oamipc finetune``: load, (replay the plan,) fine-tune, export, verify; return the report.

    ``job.source.model`` is either a pruned program written by ``compile --save-pt`` (or any
    model to fine-tune as it is), or, with ``job.plan_path``, the original model: the plan is
    replayed with :func:`compile` (``job.source.leaf_modules`` as when the plan was made; with
    ``reconstruct`` as there, so by default the replayed network is refit before training) and the
    pruned network fine-tuned.  Training uses the data's train split, accuracy its test split.
    Outputs are checked before any work and written atomically, all or none, as by
    :func:`compile_file`.
    """
    job.check_outputs()
    if not job.source.data:
        raise UsageError("fine-tuning needs labelled training data: give --data (e.g. --data digits)")
    plan = Plan.load(job.plan_path) if job.plan_path else None
    loaded = load_job(job.source, seed=config.seed)
    splits = loaded.splits
    assert splits is not None
    if splits.train.y is None or splits.test.y is None:
        raise UsageError(f"fine-tuning needs class labels, but --data {job.source.data} has none; give data with a "
                         "'y' array")
    example = loaded.example_inputs
    test = _fit(splits.test, loaded.sample_shape)
    if plan is not None:
        result = compile(loaded.model, example, data=splits, plan=plan, leaf_modules=job.source.leaf_modules,
                         seed=config.seed, finetune=config, progress=progress, reconstruct=reconstruct)
        module, report = result.module, result.report
    else:
        start = time.perf_counter()
        module = trace(loaded.model, example, leaf_modules=job.source.leaf_modules)
        section = _finetune_section(module, _fit(splits.train, loaded.sample_shape), test, config, progress)
        report = {"input_shape": list(example[0].shape), "costs": passes.count_costs(module).to_dict(),
                  "finetune": section,
                  "accuracy": {"before": section["accuracy_before"], "after": section["accuracy_after"],
                               "dataset": test.name, "samples": len(test)},
                  "timings_s": {"finetune": section["seconds"], "total": time.perf_counter() - start}}
    report["model"] = job.source.model
    report["plan_file"] = job.plan_path
    _write_outputs(job, module, example, report, check_data=test, progress=progress)
    return report


def _write_outputs(job: FileJob, module: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                   report: dict[str, Any], *, check_data: Dataset | None, original: nn.Module | None = None,
                   plan: Plan | None = None, progress: Callable[[str, int, int], None] | None = None) -> None:
    """Export ``module`` to ONNX, verify it, and move every requested output into place at once.

    Shared by ``oamipc compile`` and ``oamipc finetune``.  The ONNX file is checked with
    onnxruntime against ``module`` on ``check_data`` (its first ``job.verify_samples`` samples,
    else ``example_inputs``); with ``job.bench`` and an ``original``, both are timed A/B.  The
    report gains ``onnx`` (and ``latency``, ``saved_program``) entries before it is written.
    """
    from oamipc.atomic import atomic_output

    with temp_dir() as scratch:
        try:
            staged = _make_outputs(job, module, example_inputs, report, Path(scratch), check_data=check_data,
                                   original=original, plan=plan, progress=progress)
        except (OSError, ExportError) as exc:
            if isinstance(exc, OSError) or is_disk_full(exc):
                raise OutputError(f"cannot write temporary files in {scratch} ({_os_reason(exc)}); free disk "
                                  f"space there, or set TMPDIR to a directory with room, and run again") from exc
            raise
        # Every requested file was made in scratch space; move them into place only now, so that a
        # failure leaves no output at all, not some of them.
        with contextlib.ExitStack() as stack:
            targets = [(src, stack.enter_context(atomic_output(dest))) for src, dest in staged]
            for src, tmp in targets:
                shutil.copyfile(src, tmp)


def _compare_prediction(report: dict[str, Any]) -> None:
    """Put the measured latency beside the latency model's prediction (same batch), with the error."""
    predicted = report.get("latency_prediction")
    if not predicted:
        return
    row = next((r for r in report["latency"].get("rows", []) if r.get("batch") == predicted["batch"]), None)
    if row is None or not row.get("b_median_ms"):
        predicted["note"] = f"batch {predicted['batch']} was not measured (--batch); no comparison"
        return
    predicted["measured_ms"] = row["b_median_ms"]
    predicted["measured_dense_ms"] = row["a_median_ms"]
    predicted["error"] = predicted["predicted_ms"] / row["b_median_ms"] - 1.0
    predicted["measured_ratio"] = row["b_median_ms"] / row["a_median_ms"]


def _plan_prediction(report: dict[str, Any], original: fx.GraphModule, plan: Plan,
                     example_inputs: tuple[torch.Tensor, ...]) -> dict[str, Any] | None:
    """The latency model's prediction of the plan at the largest measured batch, from the dense
    network's measured latency plus the changed layers' measured differences (every compile
    reports one; latency targets already carry the planner's)."""
    from oamipc.latency import MeasureSetup

    rows = [r for r in report["latency"].get("rows", []) if r.get("a_median_ms")]
    if not rows:
        return None
    row = max(rows, key=lambda r: int(r["batch"]))
    provider = str(report["latency"].get("provider", "CPUExecutionProvider"))
    setup = MeasureSetup(batch=int(row["batch"]), threads=1, device="cuda" if "CUDA" in provider else "cpu")
    leaf = tuple(report.get("settings", {}).get("leaf_modules", ()))
    embed = bool(report.get("settings", {}).get("prune_embed", False))
    try:
        am = AnalysisManager(CompileContext(example_inputs))
        graph = am.get(passes.UnitGroupAnalysis(leaf, embed), original)
        model = passes.plan_latency_model(original, graph, plan.kept_mask(graph), setup, float(row["a_median_ms"]),
                                          provider)
        predicted = model.predict(passes.plan_widths(graph, plan.kept_mask(graph)))
    except Exception as exc:  # noqa: BLE001 - a prediction is information; its failure must not fail the compile
        log.warning("no latency prediction for this plan: %s", first_line(exc))
        return None
    return {"batch": setup.batch, "provider": provider, "dense_ms": model.dense_ms, "predicted_ms": predicted,
            "measurements": model.measured, "from_cache": model.cached, "source": "layers at the plan's widths"}


def _check_speedup(verdict: dict[str, Any], required: float | None) -> None:
    """Fail, before any output is moved into place, when the measured speed-up is below ``required``."""
    low = verdict["min_speedup"]
    if required is None or low is None or low >= required:
        return
    why = f"; {verdict['why']}" if verdict["why"] else ""
    raise SpeedupError(f"the compiled network is {low:.3f}x as fast as the original at its slowest measured batch "
                       f"({verdict['provider']}), below the required speed-up {required:g}{why}; nothing was written")


def _os_reason(exc: BaseException) -> str:
    """The OS's words for the first ``OSError`` in ``exc``'s chain (``No space left on device``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        current = current.__cause__ or current.__context__
    return first_line(exc)


def _make_outputs(job: FileJob, module: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                  report: dict[str, Any], scratch: Path, *, check_data: Dataset | None, original: nn.Module | None,
                  plan: Plan | None, progress: Callable[[str, int, int], None] | None) -> list[tuple[Path, str]]:
    """Make every requested output in ``scratch``; return (made file, destination) pairs."""
    from oamipc.bench import benchmark
    from oamipc.export import export, onnx_size_bytes, verify_onnx

    # Export and verify in scratch space; only a verified file is moved to the output path.
    pruned = Path(scratch) / "pruned.onnx"
    if progress:
        progress("export", 0, 1)
    exported = export(module, example_inputs, pruned, exporter=job.exporter)
    check_inputs = (check_data.x[: job.verify_samples],) if check_data is not None else example_inputs
    report["onnx"] = {"path": str(job.output), "bytes": onnx_size_bytes(pruned), **exported.to_dict(),
                      **verify_onnx(pruned, module, check_inputs).to_dict()}
    if job.bench and original is not None:
        before = Path(scratch) / "original.onnx"
        # The original goes through the exporter that wrote the pruned file, so that the A/B
        # latency compares graphs from one exporter (auto would retry a failing one first).
        export(original, example_inputs, before, exporter=exported.exporter if job.exporter == "auto" else job.exporter)
        report["onnx"]["bytes_before"] = onnx_size_bytes(before)
        bench = benchmark([before, pruned], batch_sizes=job.bench_batches, runs=job.bench_runs,
                          progress=(lambda d, t: progress("bench", d, t)) if progress else None)
        report["latency"] = bench.to_dict()
        before_layers = report.get("before", {}).get("layers", {})
        layer_types = {name: str(layer.get("type", "")) for name, layer in before_layers.items()}
        conv_widths = {name: w for name, w in report.get("widths", {}).items()
                       if layer_types.get(name, "").startswith("Conv")}  # the channel block is a convolution's
        verdict = speed_verdict(report["latency"], conv_widths)
        report["latency"]["verdict"] = verdict
        if not report.get("latency_prediction") and plan is not None and isinstance(original, fx.GraphModule):
            report["latency_prediction"] = _plan_prediction(report, original, plan, example_inputs)
        _compare_prediction(report)
        if verdict["slower_batches"]:
            log.warning("the pruned network is slower than the original at batch %s: %s",
                        ", ".join(map(str, verdict["slower_batches"])), verdict["why"])
        _check_speedup(verdict, job.require_speedup)
    staged: list[tuple[Path, str]] = [(pruned, job.output)]
    if job.save_pt:
        program = Path(scratch) / "pruned.pt2"
        _save_program(module, example_inputs, program, job.save_pt)
        staged.append((program, job.save_pt))
        report["saved_program"] = job.save_pt
    if job.save_plan and plan is not None:
        plan_file = Path(scratch) / "plan.json"
        plan.save(plan_file)
        staged.append((plan_file, job.save_plan))
    if job.report_path:
        if is_html_path(job.report_path):  # the self-contained page with plots
            from oamipc.report_html import render_html

            report_file = Path(scratch) / "report.html"
            report_file.write_text(render_html(report), encoding="utf-8")
        else:
            report_file = Path(scratch) / "report.json"
            report_file.write_text(json.dumps(report, indent=1, default=str))
        staged.append((report_file, job.report_path))
    return staged


def is_html_path(path: str | Path) -> bool:
    """Whether a ``--report`` path asks for the HTML page (``.html``/``.htm``) rather than JSON."""
    return Path(path).suffix.lower() in (".html", ".htm")


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    """A scratch directory for intermediate ONNX files (removed on exit, also on errors)."""
    return tempfile.TemporaryDirectory(prefix="oamipc-")


def inspect_file(source: ModelSource, *, prune_embed: bool = False) -> dict[str, Any]:
    """``oamipc inspect``: graph summary, unit groups, per-layer widths, parameters, MACs, barriers
    (the unit groups as ``compile`` sees them with the same ``prune_embed``)."""
    loaded = load_job(source)
    gm = trace(loaded.model, loaded.example_inputs, leaf_modules=source.leaf_modules)
    am = AnalysisManager(CompileContext(loaded.example_inputs))
    units = am.get(passes.UnitGroupAnalysis(source.leaf_modules, prune_embed), gm)
    costs = passes.count_costs(gm, source.leaf_modules)
    summary = units.summary()
    said = opaque_notices(costs.to_dict())
    said.append(unprunable_notice(summary, costs.to_dict(), name_opaque=not said))
    return {"model": source.model, "input_shape": list(loaded.example_inputs[0].shape), "nodes": len(gm.graph.nodes),
            "params": costs.params, "macs": costs.macs, "macs_total": costs.macs_total, "layers": costs.layers,
            "opaque": costs.opaque, "units": summary, "notices": [n for n in said if n]}


def profile_file(source: ModelSource, target: Target, *, batch: int = 64, threads: int = 1,
                 plot: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """``oamipc profile``: the measured latency model of a model (per layer, latency against width).

    ``target`` supplies the rounding (which widths are worth measuring); ``plot`` writes an SVG
    of every layer's curves, atomically.  Returns the model as plain data.
    """
    from oamipc.atomic import atomic_output, check_writable

    if plot:
        check_writable(plot)
    loaded = load_job(source)
    gm = trace(loaded.model, loaded.example_inputs, leaf_modules=source.leaf_modules)
    am = AnalysisManager(CompileContext(loaded.example_inputs, progress=progress))
    model = am.get(passes.LatencyModelAnalysis(batch=batch, threads=threads, round_to=target.round_to,
                                               channel_block=target.channel_block,
                                               leaf_modules=source.leaf_modules), gm)
    data = {"model": source.model, "input_shape": list(loaded.example_inputs[0].shape), **model.to_dict()}
    if plot:
        from oamipc.report_html import latency_curves_svg

        with atomic_output(plot) as tmp:
            tmp.write_text(latency_curves_svg(data), encoding="utf-8")
    return data

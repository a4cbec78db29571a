"""The lottery-ticket transfer experiment: does a plan found on dataset A train well on dataset B?

The claim to test (the OAMIP paper's "lucky" subnetworks): the units the analysis keeps on a
network trained on A form a subnetwork that, reset to its *initial* weights, trains on another
dataset B as well as the dense network does, and better than a random subnetwork of the same
widths.  :func:`run_transfer` measures exactly that, with three arms trained identically:

1. **source network**: the trained network on A (given, or trained here from the initial weights
   with the same training loop, so the whole experiment can start from one ``*_init.pt`` file);
2. **plan** on A: :func:`oamipc.driver.compile` with the chosen criterion and target (``mip`` by
   default, calibration data from A);
3. the three arms, each from the *same initial weights*:

   * ``dense``: the unpruned network;
   * ``ticket``: the plan replayed on the initial network (same units, initial values);
   * ``random``: a plan keeping, in every unit group, the same number of units chosen at random
     (seeded; units the analysis pins stay kept), replayed the same way;

4. each arm trained on B's train split with one :class:`oamipc.finetune.FinetuneConfig` and seed,
   and evaluated on B's test split.

**Input shapes.**  The network has one input shape: ``input_shape``, or else the source data's
sample shape if the network runs on it, else the target data's.
A dataset of another shape is brought to it by :func:`fit_to_shape`: images with the same
channel count are resized bilinearly (:func:`oamipc.data.resize_images`, e.g. the 8x8 digits
upsampled to 28x28, or Fashion-MNIST shrunk to 8x8 with antialiasing); otherwise a reshape when
the element counts agree; anything else is a :class:`~oamipc.errors.DataError` that says what to
do.  Both datasets need labels and the same number of classes as the network's output.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from oamipc.data import Dataset, DataSplits, accuracy, resize_images
from oamipc.errors import DataError, UsageError
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.ir import first_output
from oamipc.plan import Plan

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def fit_to_shape(ds: Dataset, shape: tuple[int, ...]) -> Dataset:
    """``ds`` with samples of ``shape`` (see the module docstring for the rule)."""
    have = tuple(ds.x.shape[1:])
    if have == tuple(shape):
        return ds
    if len(have) == 3 and len(shape) == 3 and have[0] == shape[0]:
        return resize_images(ds, (shape[1], shape[2]))
    if int(np.prod(have)) == int(np.prod(shape)):
        return ds.reshaped(tuple(shape))
    raise DataError(f"{ds.name}: samples of shape {have} cannot be brought to the network's input {tuple(shape)}; "
                    "give images with the same channel count (they are resized) or the same number of values")


def _runs_on(model: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


def _model_shape(model: nn.Module, source: DataSplits, target: DataSplits) -> tuple[int, ...]:
    """The network's input shape: the source data's, else the target data's (the first that runs)."""
    for splits in (source, target):
        shape = tuple(splits.train.x.shape[1:])
        if _runs_on(model, shape):
            return shape
    raise DataError(f"the network runs on neither {source.train.name} samples {tuple(source.train.x.shape[1:])} nor "
                    f"{target.train.name} samples {tuple(target.train.x.shape[1:])}; give its input shape "
                    "(--input-shape 1,1,28,28)")


def _splits_for(splits: DataSplits, shape: tuple[int, ...], train_samples: int | None, seed: int) -> DataSplits:
    train = fit_to_shape(splits.train, shape)
    if train.y is None or splits.test.y is None:
        raise DataError(f"{splits.train.name}: the transfer experiment trains and evaluates, so it needs labels")
    if train_samples is not None and train_samples < len(train):
        train = train.stratified_sample(train_samples, seed=seed)
    return DataSplits(train, fit_to_shape(splits.test, shape))


def _check_classes(model: nn.Module, example: torch.Tensor, splits: DataSplits, role: str) -> None:
    with torch.no_grad():
        out = first_output(model(example))
    classes = int(out.shape[-1])
    labels = int(max(int(splits.train.y.max()), int(splits.test.y.max()))) + 1  # type: ignore[union-attr]
    if labels > classes:
        raise DataError(f"{role} data {splits.train.name} has {labels} classes but the network outputs {classes}; "
                        "use data with at most as many classes as the network's output")


def random_plan_like(plan: Plan, graph: Any, seed: int) -> Plan:
    """A plan with ``plan``'s kept count in every group, the kept units drawn at random.

    Units the unit analysis pins stay kept (they count towards the group's number); the rest of
    the group's kept units are a seeded uniform draw from its free units.
    """
    rng = np.random.default_rng(seed)
    kept = plan.kept_mask(graph).copy()
    for group in graph.groups:
        want = int(kept[group.units].sum())
        pinned = [u for u in group.units if u in group.pinned]
        free = np.array([u for u in group.units if u not in group.pinned], dtype=np.int64)
        kept[group.units] = False
        kept[pinned] = True
        extra = max(0, want - len(pinned))
        if extra:
            kept[rng.choice(free, size=extra, replace=False)] = True
    return Plan.from_mask(graph, kept, "random (same widths)", {"seed": seed, "like": plan.criterion})


@dataclass
class Arm:
    """One trained network of the experiment (a row of the table)."""

    name: str
    params: int
    macs: int
    accuracy_init: float  # on B's test split, before training on B
    accuracy: float  # on B's test split, after training on B
    seconds: float
    history: list[dict[str, Any]]


def run_transfer(init_model: nn.Module, *, source: DataSplits, target: DataSplits,
                 trained: nn.Module | None = None, input_shape: tuple[int, ...] | None = None,
                 importance: str = "auto", flops_budget: float | None = None, prune_ratio: float | None = None,
                 mip_options: Mapping[str, Any] | None = None, calib_samples: int = 512,
                 train: FinetuneConfig, source_train: FinetuneConfig | None = None,
                 train_samples: int | None = None, seed: int = 0,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment of the module docstring; return a JSON-ready report.

    ``trained`` is the network trained on ``source`` (same architecture as ``init_model``); when
    it is ``None`` it is trained here from ``init_model`` with ``source_train`` (required then).
    ``train`` configures the training of every arm on ``target``; ``train_samples`` caps both
    train splits (a stratified, seeded subset) for quick runs.
    """
    from oamipc import passes
    from oamipc.driver import compile as compile_model
    from oamipc.passmanager import AnalysisManager, CompileContext
    from oamipc.tracing import trace

    if flops_budget is None and prune_ratio is None:
        raise UsageError("say how much to remove: --flops-budget or --prune-ratio")
    if trained is None and source_train is None:
        raise UsageError("no trained network given (--trained): give --source-epochs to train one on the source data")
    start = time.perf_counter()
    shape = tuple(input_shape) if input_shape else _model_shape(init_model, source, target)
    src = _splits_for(source, shape, train_samples, seed)
    dst = _splits_for(target, shape, train_samples, seed)
    example = src.test.x[:1].float()
    init_model = copy.deepcopy(init_model).eval()
    _check_classes(init_model, example, src, "source")
    _check_classes(init_model, example, dst, "target")
    report: dict[str, Any] = {
        "shape": list(shape), "source": source.train.name.split("/")[0], "target": target.train.name.split("/")[0],
        "train_samples": {"source": len(src.train), "target": len(dst.train)},
        "transform": {"source": _transform(source.train, shape), "target": _transform(target.train, shape)},
        "train": asdict(train), "seed": seed,
    }

    # 1. The network trained on A.
    if trained is None:
        assert source_train is not None
        trained = copy.deepcopy(init_model)
        t0 = time.perf_counter()
        hist = finetune(trained, src.train, source_train, eval_data=src.test,
                        progress=_tagged(progress, "train on source"))
        report["source_training"] = {"config": asdict(source_train), "seconds": time.perf_counter() - t0,
                                     "history": hist.to_dict()}
    trained = trained.eval()
    report["source_accuracy"] = accuracy(trained, src.test)

    # 2. The plan on A.  Without the lossless removal: its bias shifts are facts about the trained
    # weights, and the ticket is replayed on the initial ones.
    result = compile_model(trained, example, data=src, importance=importance, flops_budget=flops_budget,
                           prune_ratio=prune_ratio, mip_options=mip_options, seed=seed,
                           calib_samples=calib_samples, progress=progress, lossless=False,
                           reconstruct=False)  # only the plan is used: the arms start from the initial weights
    plan = result.plan
    if plan is None:
        raise UsageError("the compile step produced no plan; give --flops-budget or --prune-ratio")
    report["plan"] = {"criterion": result.report["settings"]["importance"], "widths": plan.widths(),
                      "macs_kept": result.report["after"]["macs"] / result.report["before"]["macs"],
                      "source_accuracy_pruned": result.report.get("accuracy", {}).get("after")}
    if "mip" in result.report:
        report["plan"]["mip_seconds"] = result.report["mip"].get("seconds")

    # 3. The arms, all from the initial weights.
    gm = trace(copy.deepcopy(init_model), (example,))
    graph = AnalysisManager(CompileContext((example,))).get(passes.UnitGroupAnalysis(()), gm)
    arms: dict[str, nn.Module] = {
        "dense": copy.deepcopy(init_model),
        "ticket": compile_model(init_model, example, plan=plan, seed=seed).module,
        "random": compile_model(init_model, example, plan=random_plan_like(plan, graph, seed), seed=seed).module,
    }

    # 4. Train every arm on B the same way.
    rows = []
    for name, net in arms.items():
        costs = passes.count_costs(net if isinstance(net, torch.fx.GraphModule) else trace(net, (example,)))
        before = accuracy(net, dst.test)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        hist = finetune(net, dst.train, train, eval_data=dst.test, progress=_tagged(progress, f"train {name}"))
        rows.append(Arm(name, int(costs.params), int(costs.macs), before, accuracy(net, dst.test),
                        time.perf_counter() - t0, hist.to_dict()))
        log.info("%s: %.4f -> %.4f on %s", name, before, rows[-1].accuracy, dst.test.name)
    report["arms"] = [asdict(r) for r in rows]
    report["seconds"] = time.perf_counter() - start
    return report


def _transform(ds: Dataset, shape: tuple[int, ...]) -> str:
    have = tuple(ds.x.shape[1:])
    if have == tuple(shape):
        return "none"
    if len(have) == 3 and len(shape) == 3 and have[0] == shape[0]:
        return f"bilinear resize {have[1]}x{have[2]} -> {shape[1]}x{shape[2]} (antialiased)"
    return f"reshape {have} -> {tuple(shape)}"


def _tagged(progress: Progress | None, what: str) -> Progress | None:
    if progress is None:
        return None
    def tagged(inner: str, done: int, total: int) -> None:  # keep the live "|description" part
        progress(f"{what}|{inner.split('|', 1)[1]}" if "|" in inner else what, done, total)

    return tagged

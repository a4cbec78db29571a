"""Fine-tuning: a short, seeded training run that recovers the accuracy pruning cost.

Removing units changes what the following layers receive; a few epochs of ordinary training on
the train split let the smaller network re-adjust.  :func:`finetune` trains a module in place
with cross-entropy and returns a :class:`FinetuneHistory` (per-epoch loss and accuracies).

What it can train:

* the pruned ``fx.GraphModule`` that :func:`oamipc.driver.compile` returns (traced from an
  ``nn.Module``: its ``nn.Dropout``/``nn.BatchNorm`` submodules follow ``train()``/``eval()``);
* a ``.pt2`` program loaded with :func:`oamipc.loading.load_model`: the loader rebuilds it as a
  plain GraphModule whose linear, convolution and (eval-mode) batch-norm calls are lifted into
  ``nn.Linear``/``nn.Conv2d``/``nn.BatchNorm2d`` modules, so parameters get gradients and batch
  norm updates its running statistics in training mode (checked on torch 2.13).  Dropout in such
  a program is an ATen call with its mode frozen at export time (off, since oamipc exports in
  eval mode), so it stays off while fine-tuning;
* not the raw ``torch.export.ExportedProgram.module()``: torch 2.13 refuses ``train()`` on it
  ("Calling train() is not supported yet"), and the helper that used to rewrite it
  (``move_exported_model_to_train``) is no longer in ``torch.ao.quantization``.  Such a module is
  rejected with a :class:`~oamipc.errors.UsageError` that says what to do instead.

Any dropout or batch norm left as a *function* call in a graph (its mode fixed when the graph
was made) behaves as at inference while training; :func:`finetune` logs a warning naming them.

Determinism: one ``torch.Generator`` seeded with ``config.seed`` draws the batch order and the
input noise, and the global RNG (dropout modules) is seeded with the same value inside
``torch.random.fork_rng``, so the caller's global RNG state is left as it was.  The same seed,
data, torch build and thread count give bit-identical weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from oamipc.data import Dataset, accuracy
from oamipc.errors import DataError, UsageError, first_line

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
PROGRESS_KEY = "fine-tune"

# Function-call forms of dropout and batch norm: their train/eval mode is an argument fixed when
# the graph was built, so module.train() does not reach them.
_MODE_FROZEN_TARGETS: frozenset[Any] = frozenset({
    nn.functional.dropout, nn.functional.batch_norm,
    torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
    torch.ops.aten.batch_norm.default, torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
})


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; every field is validated on construction (UsageError naming the option).

    ``optimizer``: ``sgd`` (with ``momentum``), ``adam`` or ``adamw`` (decoupled weight decay).
    ``schedule``: ``constant`` learning rate, or ``cosine`` decay to 0 over all steps.
    ``input_noise``: standard deviation of Gaussian noise added to every training batch.
    ``eval_every``: measure held-out accuracy every this many epochs (and always after the last).
    ``select``: when :func:`oamipc.compile` chooses the plan with ``importance="mip"``, first
    probe the solver-free criteria's networks beside the MILP's and fine-tune the one that trains
    best (:mod:`oamipc.finetune_select`).
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    input_noise: float = 0.0
    seed: int = 0
    eval_every: int = 1
    select: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, option: str, rule: str, value: Any) -> None:
            if not ok:
                raise UsageError(f"fine-tuning {option} must be {rule}, got {value!r}")

        need(_is_int(self.epochs) and self.epochs >= 1, "epochs (--epochs / --finetune-epochs)",
             "an integer >= 1", self.epochs)
        need(_is_number(self.lr) and 0 < self.lr < math.inf, "learning rate (--lr)", "a positive number", self.lr)
        need(_is_int(self.batch_size) and self.batch_size >= 1, "batch size (--batch-size)", "an integer >= 1",
             self.batch_size)
        need(self.optimizer in OPTIMIZERS, "optimizer (--optimizer)", f"one of {', '.join(OPTIMIZERS)}",
             self.optimizer)
        need(_is_number(self.momentum) and 0 <= self.momentum < 1, "momentum (--momentum)", "in [0, 1)",
             self.momentum)
        need(_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf, "weight decay (--weight-decay)",
             "a number >= 0", self.weight_decay)
        need(_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             "label smoothing (--label-smoothing)", "in [0, 1)", self.label_smoothing)
        need(self.schedule in SCHEDULES, "schedule (--schedule)", f"one of {', '.join(SCHEDULES)}", self.schedule)
        need(_is_number(self.input_noise) and 0 <= self.input_noise < math.inf, "input noise (--input-noise)",
             "a number >= 0", self.input_noise)
        need(_is_int(self.seed), "seed (--seed)", "an integer", self.seed)
        need(_is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "an integer >= 1", self.eval_every)
        need(isinstance(self.select, bool), "select (--finetune-select)", "true or false", self.select)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (for the report)."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class EpochStats:
    """One epoch: mean training loss, accuracy on the training batches, held-out accuracy.

    ``train_accuracy`` counts the predictions made on the training batches while training (train
    mode, with input noise), so it costs nothing extra; ``eval_accuracy`` is
    :func:`oamipc.data.accuracy` on the held-out data (None when not measured this epoch).
    """

    epoch: int
    loss: float
    train_accuracy: float
    eval_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class FinetuneHistory:
    """What :func:`finetune` did: the config, one :class:`EpochStats` per epoch, total seconds."""

    config: FinetuneConfig
    epochs: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_eval_accuracy(self) -> float | None:
        """Held-out accuracy after the last epoch (None without held-out data)."""
        return self.epochs[-1].eval_accuracy if self.epochs else None

    def to_dict(self) -> list[dict[str, Any]]:
        """The per-epoch rows as JSON-ready dicts."""
        return [asdict(e) for e in self.epochs]


def finetune(
    module: nn.Module,
    train: Dataset,
    config: FinetuneConfig,
    *,
    eval_data: Dataset | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> FinetuneHistory:
    """Train ``module`` in place on ``train`` with cross-entropy; return the per-epoch history.

    ``train`` (and ``eval_data``) must be labelled and shaped like the module's input.  The
    module is in train mode while training and left in eval mode.  ``progress(what, done,
    total)`` is called after every batch with ``what = "fine-tune|<epoch, loss, accuracy>"``: the
    part before ``|`` names the task, the rest is its changing description.
    A non-finite loss stops training with a UsageError (the learning rate is too high).
    """
    if train.y is None:
        raise DataError(f"{train.name} has no labels, and fine-tuning needs class labels; give data with a 'y' array")
    if eval_data is not None and eval_data.y is None:
        raise DataError(f"held-out data {eval_data.name} has no labels, so its accuracy cannot be measured")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (all have requires_grad=False); nothing to fine-tune")
    _enter_train_mode(module)
    _warn_frozen_modes(module)
    steps_per_epoch = -(-len(train) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    opt = _optimizer(params, config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if config.schedule == "cosine" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    gen = torch.Generator().manual_seed(config.seed)
    history = FinetuneHistory(config)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # dropout modules draw from the global RNG
            for epoch in range(1, config.epochs + 1):
                epoch_start = time.perf_counter()
                lr = float(opt.param_groups[0]["lr"])
                loss_sum, correct = _epoch(module, train, train.y, config, opt, sched, loss_fn, gen, epoch,
                                           steps_per_epoch, progress)
                eval_acc = None
                if eval_data is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
                    eval_acc = accuracy(module, eval_data)  # switches to eval mode and back
                stats = EpochStats(epoch, loss_sum / len(train), correct / len(train), eval_acc, lr,
                                   time.perf_counter() - epoch_start)
                history.epochs.append(stats)
                log.info("fine-tune epoch %d/%d: loss %.4f, train accuracy %.4f, held-out accuracy %s",
                         epoch, config.epochs, stats.loss, stats.train_accuracy,
                         "-" if eval_acc is None else f"{eval_acc:.4f}")
    finally:
        module.eval()
    history.seconds = time.perf_counter() - start
    return history


def _epoch(module: nn.Module, data: Dataset, labels: torch.Tensor, config: FinetuneConfig,
           opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: nn.Module,
           gen: torch.Generator, epoch: int, steps_per_epoch: int,
           progress: Callable[[str, int, int], None] | None) -> tuple[float, int]:
    """One pass over ``data`` (``labels`` = its ``y``) in a seeded order; returns (sum of losses, correct)."""
    order = torch.randperm(len(data), generator=gen)
    loss_sum, correct, seen = 0.0, 0, 0
    for step, begin in enumerate(range(0, len(data), config.batch_size)):
        idx = order[begin:begin + config.batch_size]
        xb, yb = data.x[idx], labels[idx]
        if config.input_noise:
            xb = xb + config.input_noise * torch.randn(xb.shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        logits = _forward(module, xb, data, labels, first=epoch == 1 and step == 0)
        loss = loss_fn(logits, yb)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UsageError(f"fine-tuning loss became {value} in epoch {epoch}, batch {step + 1}; "
                             f"lower the learning rate (--lr {opt.param_groups[0]['lr']:g})")
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += value * len(idx)
        correct += int((logits.detach().argmax(dim=-1) == yb).sum())
        seen += len(idx)
        if progress is not None:
            progress(f"{PROGRESS_KEY}|epoch {epoch}/{config.epochs} loss {loss_sum / seen:.4f} "
                     f"acc {100 * correct / seen:.2f}%", (epoch - 1) * steps_per_epoch + step + 1,
                     config.epochs * steps_per_epoch)
    return loss_sum, correct


def _forward(module: nn.Module, xb: torch.Tensor, data: Dataset, labels: torch.Tensor, *,
             first: bool) -> torch.Tensor:
    """``module(xb)`` as class logits; the first batch turns shape and label mismatches into DataError."""
    try:
        out = module(xb)
    except RuntimeError as exc:
        if not first:
            raise
        raise DataError(f"the model rejected samples of shape {data.sample_shape} from {data.name}: "
                        f"{first_line(exc)}; match the data to the model input") from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if first:
        if out.dim() != 2:
            raise DataError(f"fine-tuning needs class logits of shape (batch, classes), but the model returns "
                            f"shape {tuple(out.shape)}")
        if int(labels.max()) >= out.shape[1]:
            raise DataError(f"{data.name} has labels up to {int(labels.max())}, but the model has only "
                            f"{out.shape[1]} outputs; give data whose labels are 0..{out.shape[1] - 1}")
    return out


def _optimizer(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _enter_train_mode(module: nn.Module) -> None:
    """``module.train()``, with an actionable error for modules that refuse it."""
    try:
        module.train()
    except NotImplementedError as exc:
        raise UsageError(
            "this module cannot be put in training mode (a torch.export program's .module() refuses "
            "train()); load the .pt2 file with oamipc.loading.load_model, which rebuilds it as a "
            "trainable GraphModule, or fine-tune the original model with its plan (MODEL --plan plan.json)"
        ) from exc


def _warn_frozen_modes(module: nn.Module) -> None:
    """Log the dropout / batch-norm function calls whose mode train() cannot change."""
    if not isinstance(module, fx.GraphModule):
        return
    frozen = [n.name for n in module.graph.nodes if n.op == "call_function" and n.target in _MODE_FROZEN_TARGETS]
    if frozen:
        log.warning("%d dropout/batch-norm call(s) in the graph have their mode fixed (%s): they act as at "
                    "inference while fine-tuning (dropout off, batch-norm statistics frozen); fine-tune the "
                    "original model with --plan to train them normally", len(frozen), ", ".join(frozen[:3]))

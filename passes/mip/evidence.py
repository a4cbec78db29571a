"""Held-out evidence for the MIP planner: which plan is better on samples the MILP never saw.

Why.  The MILPs minimise a margin hinge on a few dozen samples; a move that lowers that proxy
need not raise accuracy on unseen data (measured on an MLP of the family: every accepted move
lowered the hinge on 448 held-out samples, and the plan still ended below its own warm start on
the test set).  Two things make the judgement hold better:

* **More held-out samples.**  :func:`holdout_order` takes them from the whole train split the
  calibration set was drawn from (``CompileContext.train_x``), less the MILP's own samples, in a
  seeded order; :func:`holdout_size` says how many, from the MACs a forward pass costs (forward
  passes are cheap: a LeNet-5 judges about 5,000 samples per plan).  Without a train split the
  calibration samples the MILP did not use are the pool, as before.
* **A noise-aware rule** (:func:`compare`, ``accept="paired"``, the default).  Both plans run on
  the same samples, so the comparison is paired.  With ``gained``/``lost`` the samples that the
  candidate classifies right/wrong where the current plan does not, and ``d_k`` the per-sample
  drop of the hinge, a candidate is accepted when its accuracy is not lower beyond noise
  (McNemar's statistic ``z_acc = (gained - lost) / sqrt(gained + lost) >= -loss_z``) and either
  accuracy is better beyond noise (``z_acc >= z``) or the hinge is lower beyond noise (the paired
  statistic ``mean(d) / (std(d) / sqrt(N)) >= z``).  ``z`` is ``MipOptions.accept_z`` (1.645:
  one-sided 5%); ``loss_z`` is ``MipOptions.accept_loss_z``.  With ``loss_z = 0`` any loss of
  accuracy refuses a move (``gained >= lost`` is required); with ``loss_z = z`` the test is
  symmetric: only a loss beyond noise refuses, so a move that lowers the hinge beyond noise is
  not held back by a handful of samples that tip the other way (far from a good plan, the moves
  that lower the hinge most can first lose a few).  Either way the final plan is checked against
  the best solver-free plan (:func:`no_worse`), so accepted small losses cannot end below it.
  No randomness: the same plans and samples always give the same verdict.

The older rules stay selectable for comparison: ``hinge`` (any lower mean hinge) and
``accuracy`` (fewer errors, the hinge breaking ties).

Plans are judged by the physically pruned network (:func:`oamipc.surgery.apply_plan`, with the
mean replacement's bias shift folded in when there is one), never by the solver's model.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from oamipc.surgery import apply_plan, fold_bias_shift
from oamipc.units import UnitGraph

from .masked import CPU_BATCH, margins
from .means import bias_shift
from .prefix import PrefixRuns

RULES = ("paired", "hinge", "accuracy")
#: MACs of dense forward passes one held-out judgement may cost (``holdout`` unset): the sample count
#: is this over the network's MACs per sample, within ``[HOLDOUT_MIN, HOLDOUT_MAX]``.
HOLDOUT_WORK_MACS = 2_000_000_000
HOLDOUT_MIN = 448
HOLDOUT_MAX = 8192
_BATCH = 4096  # samples per forward call off the CPU (on the CPU: .masked.CPU_BATCH)
_CACHE = 8  # measured plans kept (the current plan and the last candidates)


def holdout_size(requested: int | None, available: int, macs_per_sample: float) -> int:
    """How many held-out samples to judge on: ``requested`` (a cap), or the work-bounded default."""
    if requested is not None:
        return min(requested, available)
    wanted = int(HOLDOUT_WORK_MACS // max(1.0, macs_per_sample))
    return min(available, max(HOLDOUT_MIN, min(HOLDOUT_MAX, wanted)))


def holdout_order(train_x: torch.Tensor, seen: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices of the train split without the samples in ``seen`` (exact row matches), in a seeded order."""
    flat = train_x.reshape(len(train_x), -1)
    seen_flat = seen.reshape(len(seen), -1).to(flat.dtype)
    direction = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    # A random projection narrows each seen row to the train rows with (nearly) the same key; an
    # exact comparison decides.  The tolerance absorbs the matmul's order-dependent rounding.
    keys = torch.cat([flat[i:i + _BATCH].double() @ direction for i in range(0, len(flat), _BATCH)]) \
        if len(flat) else torch.zeros(0, dtype=torch.float64)
    seen_keys = seen_flat.double() @ direction
    order_k = torch.argsort(keys)
    sorted_k = keys[order_k]
    tol = 1e-9 * (1.0 + float(keys.abs().max())) if len(keys) else 0.0
    lo = torch.searchsorted(sorted_k, seen_keys - tol)
    hi = torch.searchsorted(sorted_k, seen_keys + tol, right=True)
    drop = torch.zeros(len(train_x), dtype=torch.bool)
    for j in range(len(seen)):
        for i in order_k[int(lo[j]):int(hi[j])].tolist():
            drop[i] = drop[i] or bool(torch.equal(flat[i], seen_flat[j]))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(int(seed)))
    return order[~drop[order]]


@dataclass(frozen=True)
class Measure:
    """One plan on the held-out samples: per-sample correctness and hinge."""

    correct: np.ndarray  # bool (N,): the label's logit beats every other
    hinge: np.ndarray  # float (N,): max(0, original margin - margin)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0

    @property
    def mean_hinge(self) -> float:
        return float(self.hinge.mean()) if len(self.hinge) else 0.0

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "hinge": self.mean_hinge}


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate plan beats the current one on the held-out samples, and the evidence."""

    accepted: bool
    rule: str
    samples: int
    gained: int  # samples the candidate gets right and the current plan wrong
    lost: int  # the reverse
    z_accuracy: float  # McNemar's statistic (gained - lost) / sqrt(gained + lost)
    z_hinge: float  # paired statistic of the per-sample hinge drop
    accuracy_before: float
    accuracy_after: float
    hinge_before: float
    hinge_after: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _z_paired(d: np.ndarray) -> float:
    """``mean(d) / (std(d) / sqrt(N))``; +-inf for a difference without spread, 0 for none."""
    mean = float(d.mean()) if len(d) else 0.0
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    if sd <= 1e-15 * max(1.0, abs(mean)):
        return 0.0 if abs(mean) <= 1e-15 else math.copysign(math.inf, mean)
    return mean / (sd / math.sqrt(len(d)))


def compare(before: Measure, after: Measure, rule: str = "paired", z: float = 1.645, loss_z: float = 0.0) -> Verdict:
    """The verdict of ``rule`` on moving from ``before`` to ``after`` (same samples, same order).

    ``paired``: refused when accuracy is lower beyond ``loss_z`` (``z_acc < -loss_z``; 0: any loss),
    accepted when accuracy or the hinge is better beyond ``z``."""
    gained = int((after.correct & ~before.correct).sum())
    lost = int((before.correct & ~after.correct).sum())
    z_acc = (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0
    z_h = _z_paired(before.hinge - after.hinge)
    h0, h1 = before.mean_hinge, after.mean_hinge
    if rule == "hinge":
        ok = h1 < h0 - 1e-12
        reason = "mean hinge lower" if ok else "mean hinge not lower"
    elif rule == "accuracy":
        ok = gained > lost or (gained == lost and h1 < h0 - 1e-12)
        reason = "fewer errors" if gained > lost else ("as many errors, lower hinge" if ok else "not better")
    elif rule == "paired":
        if z_acc < -loss_z:
            ok, reason = False, f"accuracy lower ({gained} gained, {lost} lost, z {z_acc:.2f} < {-loss_z:g})"
        elif z_acc >= z:
            ok, reason = True, f"accuracy higher beyond noise (z {z_acc:.2f} >= {z:g})"
        elif z_h >= z:
            ok, reason = True, f"accuracy not lower, hinge lower beyond noise (z {z_h:.2f} >= {z:g})"
        else:
            ok, reason = False, f"within noise (accuracy z {z_acc:.2f}, hinge z {z_h:.2f} < {z:g})"
    else:
        raise ValueError(f"unknown acceptance rule {rule!r}")
    return Verdict(ok, rule, len(before.correct), gained, lost, z_acc, z_h, before.accuracy, after.accuracy,
                   h0, h1, reason)


def no_worse(plan: Measure, reference: Measure) -> bool:
    """The final check: ``plan`` is at least as accurate as ``reference``, and not worse in hinge at equal accuracy."""
    right, ref = int(plan.correct.sum()), int(reference.correct.sum())
    return right > ref or (right == ref and plan.mean_hinge <= reference.mean_hinge + 1e-12)


class HeldOut:
    """Judges plans of ``gm`` on held-out samples ``x`` with labels ``y`` and hinge targets ``target``.

    ``measure(kept)`` runs the physically pruned network (with the mean replacement's bias shift
    when ``means`` are given) and caches the last few plans; a plan that shares its first layers
    with one measured before starts its passes after them (:mod:`.prefix`: the same values, to the
    last bit); ``judge(candidate, current)`` is
    :func:`compare` under the configured rule.  ``loss(kept)`` is the mean hinge, for reports.
    """

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 *, rule: str = "paired", z: float = 1.645, loss_z: float = 0.0,
                 means: dict[str, torch.Tensor] | None = None, device: torch.device | None = None) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown acceptance rule {rule!r}; known: {', '.join(RULES)}")
        self.gm, self.graph = gm, graph
        self.x, self.y, self.target = x.float(), y, target.double()
        self.rule, self.z, self.loss_z = rule, z, loss_z
        self.means = means or {}
        self.device = device or torch.device("cpu")  # the analysis's device; margins come back to the CPU
        self._cache: OrderedDict[tuple[bytes, bool], Measure] = OrderedDict()
        step = CPU_BATCH if self.device.type == "cpu" else _BATCH
        self.runs = PrefixRuns(self.x, step, self.device)  # plans share the passes of their common prefix

    def __len__(self) -> int:
        return len(self.x)

    def with_means(self, means: dict[str, torch.Tensor] | None) -> HeldOut:
        """The same samples and rule, judging plans with (or without) mean replacement."""
        return HeldOut(self.gm, self.graph, self.x, self.y, self.target, rule=self.rule, z=self.z,
                       loss_z=self.loss_z, means=means, device=self.device)

    def network(self, kept: np.ndarray) -> torch.nn.Module:
        pruned = copy.deepcopy(self.gm)
        if self.means:
            fold_bias_shift(pruned, bias_shift(self.gm, self.graph, kept, self.means))
        if not kept.all():
            apply_plan(pruned, self.graph, kept)
        return pruned.eval()

    def measure(self, kept: np.ndarray) -> Measure:
        key = (np.packbits(kept.astype(bool)).tobytes(), bool(self.means))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        net = self.network(kept).to(self.device)
        step = self.runs.step
        with torch.no_grad():
            outs = self.runs.run(net)
        got = [margins(out.double().cpu(), self.y[i * step:(i + 1) * step]) for i, out in enumerate(outs)]
        m = torch.cat(got) if got else torch.zeros(0, dtype=torch.float64)
        result = Measure((m > 0).numpy(), (self.target - m).clamp(min=0).numpy())
        self._cache[key] = result
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return result

    def loss(self, kept: np.ndarray) -> float:
        return self.measure(kept).mean_hinge

    def judge(self, candidate: np.ndarray, current: np.ndarray) -> Verdict:
        return compare(self.measure(current), self.measure(candidate), self.rule, self.z, self.loss_z)

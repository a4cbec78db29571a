"""Refit-aware selection (``plan-refit-select``): choose the plan that is best *after* the refit.

Why.  Every planner scores plans as they are pruned, without the layer reconstruction that the
default compile runs afterwards (:mod:`.reconstruct`).  The two disagree on how a MAC budget
should be split across layers: measured on the digits MLPs with four hidden layers at 15% of the
MACs (benchmarks/RESULTS.md), plans that keep the first layer wide and the later ones narrow
are at chance before the refit and the best after it, while the back-heavy plans the criteria
and the MILP choose are the worst after it.  A unit the first layer drops is information no
later refit can bring back; a narrow later layer is refit to pass on what it receives.  So when
the refit will run, this analysis compares a few candidate plans by what they are after it.

How:

* **Candidates.**  The inner planner's plan (``inner``: the MILP, or a criterion's greedy plan)
  and the solver-free greedy plans of :data:`WARM_CRITERIA` (the MILP's warm starts; cached
  analyses) come first.  For a MAC budget the refit-aware plan follows (:mod:`.refit_orders`:
  units ranked, and widths split, by how much of their readers' dense outputs a least-squares
  refit could still reproduce without them, measured on the first fitting samples;
  :data:`REFIT_AWARE`: under the cheap judgement), the one candidate built for the refit rather
  than only judged after it.
  Then width splits, built from the best plan so far:
  first :data:`TILTS`, every prunable group keeping a fraction ``s * exp(-t * p)`` of its units
  (``p`` the group's place in graph order scaled to ``[-1, 1]``, first group -1: ``t = 0`` the
  same fraction everywhere, ``t > 0`` front-heavy); then, from the best after those, each group
  in turn grown to :data:`GROW` times its fraction while the others shrink to fit (earliest
  groups first).  Optionally (:data:`GROW_ROUNDS`, off by default: it did not help on the tune
  half) more rounds of growths follow while candidates are left, each from the best plan so far
  and only while the round before found a better one (the other groups before the one the best
  plan grew last): a coordinate search, for splits further from the planner's than one move.
  ``s`` is the largest scale whose plan fits the budget (bisection), after
  which single rounding steps are given back while they fit.  Inside a group a width split keeps
  its source plan's ranking: that plan's kept units first, then by the L2 norm of their
  incoming weights.  Counts respect ``min_keep``, ``round_to``, pinned units, grouped-convolution
  blocks and split/cat floors (the greedy planner's rules).  A one-parameter tilt and one-group
  moves rather than a search over pairs of groups: at most :data:`MAX_CANDIDATES` refits for any
  number of groups, and the width experiment's best splits (a wider first layer, the rest about
  equal) are one move from the uniform split.
* **The judgement.**  A pool of the train split (``CompileContext.train_x``; at most
  :data:`POOL_SAMPLES`, seeded) is dealt into :data:`FOLDS` folds.  For each fold, each
  candidate is pruned and refit with the compile's own reconstruction options on the other
  folds only, then measured on the fold: so every pool sample judges every candidate once, by a
  refit that never saw it (on digits, a single third held out was too few samples to tell the
  splits apart).  The plan with the most correct samples wins, the lower mean hinge (drop of
  the label margin below the dense network's) breaks ties, then candidate order (the inner
  planner's plan first) (:data:`RANK`; the record also holds every candidate's mean
  cross-entropy, a ranking that was measured and not taken).  The final network is refit afterwards as before, on the
  reconstruction's own samples.  The pool is train data the network was trained on, so its
  accuracies run higher than test accuracies; only their order is used.
* **The cheap judgement** (``mode: "split"``), where the folds cost too much (Fashion-MNIST's
  networks: the three folds of 2,048 fitting samples took minutes for LeNet-5) and the train split
  is big: one seeded split, :data:`SPLIT_FIT_SAMPLES` samples to fit on and, disjoint from them,
  :data:`SPLIT_JUDGE_SAMPLES` to judge on (the first samples of the folds' seeded order).  A
  big train split makes a judged set of thousands cheap, and the fits of the plans' narrow layers
  need hundreds of samples, not thousands; the candidates and the rule are the folds'.
* **Cost.**  One candidate costs about ``dense MACs * (layers * fit + judge)`` of forward passes
  per fold.  The folds run while :data:`MIN_CANDIDATES` of them fit within :data:`WORK_MACS`
  (the digits networks); else the one split runs while :data:`SPLIT_MIN_CANDIDATES` of its
  candidates fit within :data:`SPLIT_WORK_MACS` and the train split holds its samples
  (:func:`choose_mode`).  Either takes as many candidates as fit (never more than
  :data:`MAX_CANDIDATES`); otherwise the inner plan is returned as it is and the record says
  why.  A count of MACs, not seconds, so the decision is the same on every machine.  The
  candidates' refits skip the reconstruction's output-error measurement (only their judgement
  is read).
* **Targets.**  A MAC budget gets width splits; a ratio target (fixed counts per group) and a
  latency target (the measured model's plan) compare only the plans the pipeline already has.
* **Bias shifts.**  The inner plan keeps its own (mean replacement, lossless removal); another
  candidate carries none: the refit fits every changed layer's intercept anyway.

No randomness beyond the seeded split: the same inputs give the same choice.  The record
(:attr:`~oamipc.plan.Planned.refit_select`) lists every candidate with its widths, MACs and
held-out accuracy and hinge after the refit, and which one won (and ``refit_aware``: whether the
refit-aware candidate was ``built``, ``off`` for this judgement, or ``unmeasurable`` here); the driver puts it in the
report's ``refit_select`` section.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from oamipc import ir
from oamipc.passmanager import AnalysisManager, CompileContext, PassManager
from oamipc.plan import Plan, Planned
from oamipc.target import Target, granularity
from oamipc.units import UnitGraph

from .costs import count_costs
from .mip.budget import WARM_CRITERIA, unit_magnitude
from .mip.masked import margins
from .plan_greedy import _apply, _GroupChooser, floor_units
from .planner_base import PlannerAnalysis, planner_for
from .prune_units import PruneUnitsPass
from .reconstruct import ReconstructPass
from .refit_orders import allocate, refit_orders

log = logging.getLogger(__name__)

#: Width-split tilts tried on the best existing plan (see the module docstring).
TILTS = (0.0, 0.5)
#: A grown group keeps this many times its fraction of the best plan so far (the others shrink to fit).
GROW = 1.3
#: Folds of the judging pool: each fold is judged by a refit fitted on the other folds.
FOLDS = 3
#: Samples of the train split in the judging pool (all of a smaller split).
POOL_SAMPLES = 3072
#: Fewer pool samples than this: no selection (the accuracies would be noise).
MIN_POOL_SAMPLES = 300
#: MACs of forward passes the whole selection may cost: ``candidates * dense MACs * (layers * fit + judge)``
#: summed over the folds.  2**34: every digits network of the family runs (0.2-1.0e9 per candidate),
#: no Fashion-MNIST one (4-14e9 per candidate: LeNet-5's 12 refits took minutes on a loaded machine).
WORK_MACS = 2**34
#: Fewer candidates than this fit the work: no selection (the solver-free plans and one width split at least).
MIN_CANDIDATES = 6
MAX_CANDIDATES = 12
#: The cheap judgement, where the folds cost too much and the train split is big (module docstring):
#: one seeded split into this many fitting samples and, disjoint from them, this many judged samples,
SPLIT_FIT_SAMPLES = 512
SPLIT_JUDGE_SAMPLES = 2048
#: at most this many MACs of forward passes in all: LeNet-5 6 candidates (1.9e9 each), the Fashion CNNs 8,
#: the Fashion MLPs all 12.  Chosen on the family's tune half (benchmarks/RESULTS.md, "The refit selection's
#: cheap judgement"): 6 candidates gained 0.54 points on average over 12 rows, the worst row -0.14; the
#: seventh (the front-heavy tilt) lost 0.73 on one LeNet-5; LeNet-5 is also the compile that must stay fast.
SPLIT_WORK_MACS = 1.2e10
#: and only when this many candidates fit (the planner's plan, the solver-free plans, one width split).
SPLIT_MIN_CANDIDATES = 6
#: Rounds of one-group growths, by the judgement's mode (more rounds continue from the best growth while it
#: improves and candidates are left: a coordinate search).  One for both: tried with up to 12 rounds under the
#: cheap judgement on the family's tune half (benchmarks/RESULTS.md, "A second round of growths"), the only
#: rows it changed (the Fashion MLPs, the networks the cost rule leaves room) moved by +0.03 and -0.03 points.
GROW_ROUNDS = {"folds": 1, "split": 1}
#: How judged candidates are ranked (:meth:`Judged.key`): ``"correct"`` (most correct judged samples, then the
#: lower mean hinge), ``"loss"`` (the lower mean cross-entropy of the label, then most correct) or ``"hinge"``
#: (the lower mean hinge, then most correct); candidate order breaks the remaining ties.  ``"correct"``: the
#: continuous measures were compared with it on the family's tune half (benchmarks/RESULTS.md, "Ranking the
#: refit selection's candidates by a continuous measure") and did not beat it.
RANK = "correct"
#: Judge the refit-aware candidate (:mod:`.refit_orders`) after the solver-free plans, per judgement mode.
#: The cheap split only: there it gained on both halves of the family; under the folds (the digits
#: networks' 1,258 samples) it was even on the tune half (+0.09 points on average, -0.74 on its worst
#: row), one more contender for held-out noise to pick (benchmarks/RESULTS.md).
REFIT_AWARE = {"folds": False, "split": True}
RANKS = ("correct", "loss", "hinge")
_BATCH = 1024


@dataclass(frozen=True)
class Candidate:
    """One candidate plan: its name, where it came from, and its kept-unit mask."""

    name: str
    origin: str  # "planner" | "solver-free" | "width split"
    kept: np.ndarray = field(compare=False)
    bias_shift: dict[str, list[float]] = field(default_factory=dict, compare=False)
    grow_round: int = 0  # the growth round that made it (0: not a one-group growth)


@dataclass(frozen=True)
class Judged:
    """A candidate after the refit, on the judging samples."""

    candidate: Candidate
    correct: int
    samples: int
    hinge: float
    loss: float = 0.0  # mean cross-entropy of the label (natural log) on the judging samples

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def key(self, rank: str = "correct") -> tuple[float, ...]:
        """Sort key of the ranking ``rank`` (:func:`rank_key`)."""
        return rank_key(self.correct, self.hinge, self.loss, rank)


def rank_key(correct: int, hinge: float, loss: float, rank: str = "correct") -> tuple[float, ...]:
    """Sort key of a judged candidate under the ranking ``rank`` (:data:`RANK`): ``correct`` more correct
    samples first, then the lower mean hinge; ``loss`` the lower mean cross-entropy, then more correct;
    ``hinge`` the lower mean hinge, then more correct."""
    if rank == "loss":
        return (loss, -correct)
    if rank == "hinge":
        return (hinge, -correct)
    return (-correct, hinge)


def best(judged: list[Judged], rank: str | None = None) -> Judged:
    """The winner by the ranking ``rank`` (None: :data:`RANK`), then the earliest candidate."""
    how = RANK if rank is None else rank
    return min(judged, key=lambda j: j.key(how))  # min keeps the first of equals


def judge_split(n: int, seed: int, folds: int = FOLDS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fold, the indices it judges and the indices its refit fits on (the pool's other folds).

    The pool is ``min(n, POOL_SAMPLES)`` samples of a train split of ``n``, in a seeded order; the
    folds are disjoint and cover it, so every pool sample is judged once, by a refit that never saw it."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))[:min(n, POOL_SAMPLES)]
    parts = [order[i::folds] for i in range(folds)]
    return [(parts[i], torch.cat([parts[j] for j in range(folds) if j != i]).sort().values) for i in range(folds)]


def one_split(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cheap judgement's one split of a train split of ``n``: :data:`SPLIT_JUDGE_SAMPLES` judged
    samples and :data:`SPLIT_FIT_SAMPLES` others to fit on, in the seeded order of :func:`judge_split`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))
    judge = order[:SPLIT_JUDGE_SAMPLES].sort().values
    return [(judge, order[SPLIT_JUDGE_SAMPLES:SPLIT_JUDGE_SAMPLES + SPLIT_FIT_SAMPLES].sort().values)]


def choose_mode(n: int, per_folds: float, per_split: float, work_macs: float, split_work_macs: float
                ) -> tuple[str, int]:
    """The cost rule: ``("folds", k)`` when :data:`MIN_CANDIDATES` candidates judged by the folds fit
    ``work_macs``, else ``("split", k)`` when the train split holds the cheap judgement's samples and
    :data:`SPLIT_MIN_CANDIDATES` of its candidates fit ``split_work_macs``, else ``("none", 0)``;
    ``k`` the candidates that fit (at most :data:`MAX_CANDIDATES`).  ``per_*`` is one candidate's work."""
    folds = min(MAX_CANDIDATES, int(work_macs // max(per_folds, 1.0)))
    if folds >= MIN_CANDIDATES:
        return "folds", folds
    split = min(MAX_CANDIDATES, int(split_work_macs // max(per_split, 1.0)))
    if n >= SPLIT_FIT_SAMPLES + SPLIT_JUDGE_SAMPLES and split >= SPLIT_MIN_CANDIDATES:
        return "split", split
    return "none", 0


def candidate_work(macs_per_sample: float, layers: int, fit: int, judge: int) -> float:
    """MACs of forward passes one candidate's refit and judgement cost (the cost rule's estimate)."""
    return float(macs_per_sample) * (max(1, layers) * fit + judge)


def fittable_layers(gm: nn.Module) -> int:
    """The Linear/Conv layers a refit may fit (the reconstruction's own kinds)."""
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in gm.modules())


def group_positions(graph: UnitGraph) -> dict[int, float]:
    """Each prunable group's place in graph order (its first writer), scaled to [-1, 1]."""
    first: dict[int, int] = {}
    group_of = {u: g.id for g in graph.groups if g.prunable for u in g.units}
    for i, layer in enumerate(graph.layers):
        for u in layer.out_units[layer.out_units >= 0].tolist():
            gid = group_of.get(int(u))
            if gid is not None and gid not in first:
                first[gid] = i
    for g in graph.groups:  # a group no layer writes (an input group): after the others, in id order
        if g.prunable and g.id not in first:
            first[g.id] = len(graph.layers) + g.id
    ordered = sorted(first, key=lambda gid: (first[gid], gid))
    if len(ordered) == 1:
        return {ordered[0]: 0.0}
    return {gid: -1.0 + 2.0 * i / (len(ordered) - 1) for i, gid in enumerate(ordered)}


def tilt_weights(graph: UnitGraph, tilt: float) -> dict[int, float]:
    """Per prunable group, ``exp(-tilt * p)`` with ``p`` its place in graph order (:func:`group_positions`)."""
    return {gid: math.exp(-tilt * p) for gid, p in group_positions(graph).items()}


def grow_weights(graph: UnitGraph, kept: np.ndarray, grow: int, factor: float) -> dict[int, float]:
    """Per prunable group, the fraction ``kept`` keeps of it, times ``factor`` for group ``grow``."""
    return {g.id: max(float(kept[g.units].sum()), 1.0) / g.size * (factor if g.id == grow else 1.0)
            for g in graph.groups if g.prunable}


def width_split(graph: UnitGraph, ranking: np.ndarray, target: Target, weights: dict[int, float]) -> np.ndarray | None:
    """The plan keeping about ``s * weights[g]`` of every prunable group ``g``, with the largest ``s``
    within the MAC budget, then single rounding steps given back while they fit (heaviest weight
    first); units by ``ranking`` inside each group.  None when even the narrowest plan is over."""
    assert target.flops_budget is not None
    steps = granularity(target, graph)
    forced = floor_units(graph, ranking)
    choosers = [_GroupChooser(g, ranking, target.min_keep, steps[g.id], forced) for g in graph.groups if g.prunable]
    if not choosers or any(weights.get(ch.group.id, 0.0) <= 0 for ch in choosers):
        return None
    limit = target.flops_budget * graph.macs() * (1 + 1e-9)

    def counts(scale: float) -> dict[int, int]:
        out = {}
        for ch in choosers:
            want = scale * weights[ch.group.id] * ch.group.size
            fits = [a for a in ch.allowed if a <= want + 1e-9]
            out[ch.group.id] = fits[-1] if fits else ch.allowed[0]
        return out

    def mask(n: dict[int, int]) -> np.ndarray:
        kept = graph.all_kept()
        for ch in choosers:
            _apply(kept, ch, n[ch.group.id])
        return kept

    if graph.macs(mask(counts(0.0))) > limit:
        return None
    lo, hi = 0.0, 1.0001 / min(weights[ch.group.id] for ch in choosers)
    for _ in range(60):
        mid = (lo + hi) / 2
        if graph.macs(mask(counts(mid))) <= limit:
            lo = mid
        else:
            hi = mid
    n = counts(lo)
    order = sorted(choosers, key=lambda ch: (-weights[ch.group.id], ch.group.id))
    grew = True
    while grew:
        grew = False
        for ch in order:
            higher = ch.next_higher(n[ch.group.id])
            if higher is None:
                continue
            trial = {**n, ch.group.id: higher}
            if graph.macs(mask(trial)) <= limit:
                n, grew = trial, True
                break
    return mask(n)


def group_widths(graph: UnitGraph, kept: np.ndarray) -> dict[str, int]:
    """Kept units of every prunable group, by group name."""
    return {g.name: int(kept[g.units].sum()) for g in graph.groups if g.prunable}


@dataclass(frozen=True)
class PlanRefitSelectAnalysis(PlannerAnalysis):
    """The inner planner's plan, or a candidate that is more accurate after the refit (module docstring).

    ``inner`` plans; ``refit`` is the reconstruction the compile will run (its options are used
    for the candidates' refits, on the fitting samples).  ``work_macs`` is the cost rule's limit;
    ``grow_rounds`` the rounds of one-group growths (None: :data:`GROW_ROUNDS` of the judgement's mode).
    """

    name: ClassVar[str] = "plan-refit-select"
    inner: PlannerAnalysis | None = None
    refit: ReconstructPass = field(default_factory=ReconstructPass)
    work_macs: float | None = None  # None: WORK_MACS
    split_work_macs: float | None = None  # None: SPLIT_WORK_MACS
    tilts: tuple[float, ...] = TILTS
    grow: float = GROW
    grow_rounds: int | None = None  # None: GROW_ROUNDS of the judgement's mode
    refit_aware: bool | None = None  # the refit-aware candidate; None: REFIT_AWARE of the judgement's mode

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        return self.plan(gm, am)  # the inner planner does its own lossless step

    def plan(self, gm: fx.GraphModule, am: AnalysisManager) -> Planned:
        assert self.inner is not None, "plan-refit-select needs the planner it chooses after"
        planned = am.get(self.inner, gm)
        start = time.perf_counter()  # the selection's own time, after the planner's
        ctx = am.context
        record: dict[str, Any] = {"enabled": True, "ran": False}

        def unchanged(reason: str) -> Planned:
            log.info("refit selection skipped: %s", reason)
            record.update(reason=reason, seconds=time.perf_counter() - start)
            return dataclasses.replace(planned, refit_select=record)

        if ctx.train_x is None or ctx.train_y is None:
            return unchanged("no labelled train split to judge on")
        if len(ctx.train_x) < MIN_POOL_SAMPLES:
            return unchanged(f"the train split has {len(ctx.train_x)} samples, fewer than {MIN_POOL_SAMPLES}")
        n = len(ctx.train_x)
        macs, layers = count_costs(gm).macs, fittable_layers(gm)
        by_mode = {"folds": judge_split(n, ctx.seed), "split": one_split(n, ctx.seed)}
        per_mode = {k: sum(candidate_work(macs, layers, len(f), len(j)) for j, f in v) for k, v in by_mode.items()}
        limit = WORK_MACS if self.work_macs is None else self.work_macs
        split_limit = SPLIT_WORK_MACS if self.split_work_macs is None else self.split_work_macs
        mode, budget = choose_mode(n, per_mode["folds"], per_mode["split"], limit, split_limit)
        folds = by_mode["split" if mode == "split" else "folds"]
        per = per_mode["split" if mode == "split" else "folds"]
        record.update(mode=mode, folds=len(folds), judge_samples=sum(len(j) for j, _ in folds),
                      fit_samples=[len(f) for _, f in folds], work_macs_per_candidate=per,
                      work_macs_limit=split_limit if mode == "split" else limit, max_candidates=budget)
        if mode == "none":
            return unchanged(f"the refit is too expensive to repeat: {MIN_CANDIDATES} candidates would cost "
                             f"{MIN_CANDIDATES * per_mode['folds']:.3g} MACs of forward passes, over {limit:.3g}, "
                             f"and {SPLIT_MIN_CANDIDATES} on one split of {SPLIT_FIT_SAMPLES} + {SPLIT_JUDGE_SAMPLES} "
                             f"samples {SPLIT_MIN_CANDIDATES * per_mode['split']:.3g}, over {split_limit:.3g}"
                             + ("" if n >= SPLIT_FIT_SAMPLES + SPLIT_JUDGE_SAMPLES else
                                f" (or the train split has fewer than {SPLIT_FIT_SAMPLES + SPLIT_JUDGE_SAMPLES} "
                                f"samples)"))
        graph = am.get(self.unit_analysis(), gm)
        judge = _Judge(gm, graph, self, ctx, folds)
        own = Candidate(planned.plan.criterion or "planner", "planner", planned.plan.kept_mask(graph),
                        dict(planned.plan.bias_shift))
        bases = [own, *self._solver_free(gm, am, graph, own)]
        if self.inner.target.kind == "macs":
            on = REFIT_AWARE[mode] if self.refit_aware is None else self.refit_aware
            aware = self._refit_aware(gm, graph, judge) if on else None
            record["refit_aware"] = "built" if aware is not None else "unmeasurable" if on else "off"
            if aware is not None:
                bases.append(aware)
        bases = bases[:budget]
        judged = _dedup_judge(bases, judge)
        if self.inner.target.kind == "macs":
            rounds = self.grow_rounds if self.grow_rounds is not None else GROW_ROUNDS[mode]
            record["grow_rounds"] = rounds
            judged += self._width_splits(gm, graph, judged, judge, budget - len(bases), rounds)
        win = best(judged)
        total = graph.macs()
        record.update(ran=True, rank=RANK, rule=_RULES[RANK],
                      candidates=[{"name": j.candidate.name, "origin": j.candidate.origin,
                                   "round": j.candidate.grow_round, "widths": group_widths(graph, j.candidate.kept),
                                   "macs_kept": graph.macs(j.candidate.kept) / total if total else 1.0,
                                   "accuracy": j.accuracy, "correct": j.correct, "hinge": j.hinge, "loss": j.loss,
                                   "kept": {g.name: [i for i, u in enumerate(g.units) if j.candidate.kept[u]]
                                            for g in graph.groups if g.prunable}} for j in judged],
                      chosen=win.candidate.name, changed=win.candidate is not own,
                      seconds=time.perf_counter() - start)
        log.info("refit selection: %s (held-out accuracy after the refit %.4f; the planner's plan %.4f) of %d "
                 "candidates in %.1f s", win.candidate.name, win.accuracy, judged[0].accuracy, len(judged),
                 record["seconds"])
        if win.candidate is own:
            return dataclasses.replace(planned, refit_select=record)
        record["planner_plan"] = planned.plan.to_dict()
        plan = Plan.from_mask(graph, win.candidate.kept, planned.plan.criterion,
                              {**planned.plan.settings, "refit_select": win.candidate.name}, win.candidate.bias_shift)
        ranking = win.candidate.kept.astype(np.float64) + _normalised(gm, graph)
        return dataclasses.replace(planned, plan=plan, scores=self.group_scores(graph, ranking), refit_select=record)

    def _width_splits(self, gm: fx.GraphModule, graph: UnitGraph, judged: list[Judged], judge: _Judge,
                      room: int, rounds: int = 1) -> list[Judged]:
        """Stage two, the tilts of the best plan so far; stage three, each group grown in turn from
        the best after stage two (earliest groups first), while ``room`` candidates are left; then up
        to ``rounds - 1`` more rounds of growths from the best so far, each only while the previous
        round found a better plan (the group the best grew last, the others first)."""
        target = self.inner.target if self.inner is not None else self.target
        magnitude = _normalised(gm, graph)
        seen = [j.candidate.kept for j in judged]
        out: list[Judged] = []
        lead = best(judged).candidate
        ranking = lead.kept.astype(np.float64) * 2.0 + magnitude
        tilted = []
        for tilt in self.tilts:  # only as many as there is room for (each is a bisection over the budget)
            if len(tilted) >= room:
                break
            kept = width_split(graph, ranking, target, tilt_weights(graph, tilt))
            if kept is not None:
                tilted.append(Candidate(f"{lead.name}, tilt {tilt:+g}", "width split", kept))
        out += _dedup_judge(tilted, judge, seen)
        room -= len(out)
        if room <= 0:
            return out
        seen += [j.candidate.kept for j in out]
        lead = best(judged + out).candidate
        ranking = lead.kept.astype(np.float64) * 2.0 + magnitude
        pos = group_positions(graph)
        more: list[Judged] = []
        grown: dict[int, int] = {}  # id() of a grown candidate -> the group it grew
        order = sorted(pos, key=lambda g: (pos[g], g))
        for round_ in range(1, max(1, rounds) + 1):
            if round_ > 1:  # a later round starts from the best so far, only if the last round improved on it
                top = best(judged + out + more).candidate
                if top is lead:
                    break
                lead = top
                ranking = lead.kept.astype(np.float64) * 2.0 + magnitude
            last = grown.get(id(lead))  # the others first: that direction was just taken
            for gid in [g for g in order if g != last] + ([last] if last is not None else []):
                if room <= 0:
                    break
                kept = width_split(graph, ranking, target, grow_weights(graph, lead.kept, gid, self.grow))
                if kept is None:
                    continue
                name = next(g.name for g in graph.groups if g.id == gid)
                c = Candidate(f"{lead.name}, {name} x{self.grow:g}", "width split", kept, grow_round=round_)
                got = _dedup_judge([c], judge, seen)
                if got:
                    seen.append(c.kept)
                    grown[id(c)] = gid
                    more += got
                    room -= 1
            if room <= 0:
                break
        return out + more

    def _refit_aware(self, gm: fx.GraphModule, graph: UnitGraph, judge: _Judge) -> Candidate | None:
        """The plan the refit-aware ranking and widths give (:mod:`.refit_orders`), from the first
        fitting samples; None where they cannot be measured or the budget cannot be met."""
        target = self.inner.target if self.inner is not None else self.target
        assert target.flops_budget is not None
        fit_x = judge.folds[0][2]
        found = refit_orders(gm, graph, fit_x, ridge=self.refit.ridge, max_rows=self.refit.max_rows,
                             seed=judge.ctx.seed, example_batch=int(judge.ctx.example_inputs[0].shape[0]))
        if found is None:
            return None
        weights = allocate(graph, found, target.flops_budget * graph.macs() * (1 + 1e-9))
        if weights is None:
            return None
        kept = width_split(graph, found.ranking(graph), target, weights)
        return None if kept is None else Candidate("refit-aware", "refit-aware", kept)

    def _solver_free(self, gm: fx.GraphModule, am: AnalysisManager, graph: UnitGraph,
                     own: Candidate) -> list[Candidate]:
        """The greedy plans of the solver-free criteria (the MILP's warm starts; cached analyses)."""
        inner = self.inner
        assert inner is not None
        out = []
        for name in WARM_CRITERIA:
            if name == own.name:
                continue
            planner = planner_for(name, inner.target, inner.leaf_modules, lossless=inner.lossless,
                                  lossless_box=inner.lossless_box, prune_embed=inner.prune_embed)
            plan = am.get(planner, gm).plan
            out.append(Candidate(name, "solver-free", plan.kept_mask(graph), dict(plan.bias_shift)))
        return out


_RULES = {"correct": "most correct judging samples after the refit, then lower mean hinge, then candidate order",
          "loss": "lowest mean cross-entropy on the judging samples after the refit, then most correct, then "
                  "candidate order",
          "hinge": "lowest mean hinge on the judging samples after the refit, then most correct, then candidate order"}


def _normalised(gm: fx.GraphModule, graph: UnitGraph) -> np.ndarray:
    """Each unit's incoming-weight norm over its group's largest, in [0, 1]."""
    mags = unit_magnitude(gm, graph)
    out = np.zeros_like(mags)
    for g in graph.groups:
        top = mags[g.units].max() if g.units else 0.0
        out[g.units] = mags[g.units] / top if top > 0 else 0.0
    return np.clip(out, 0.0, 1.0) * 0.999


def _dedup_judge(cands: list[Candidate], judge: _Judge, seen: list[np.ndarray] | None = None) -> list[Judged]:
    """Judge every candidate whose mask is new (the first of equal masks stands for them)."""
    known = list(seen or [])
    out = []
    for c in cands:
        if any(np.array_equal(c.kept, k) for k in known):
            continue
        known.append(c.kept)
        out.append(judge(c))
    return out


class _Judge:
    """Prunes a candidate and refits it on each fold's fitting samples; measures it on the fold's judging samples."""

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, owner: PlanRefitSelectAnalysis, ctx: CompileContext,
                 folds: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        assert ctx.train_x is not None and ctx.train_y is not None
        self.gm, self.graph, self.owner, self.ctx = gm, graph, owner, ctx
        self.folds = [(ctx.train_x[j].float(), ctx.train_y[j], ctx.train_x[f].float()) for j, f in folds]
        self.targets = [outputs_of(gm, x, y)[0] for x, y, _ in self.folds]

    def network(self, cand: Candidate, fit_x: torch.Tensor) -> fx.GraphModule:
        """The candidate's network after the refit on ``fit_x``."""
        inner = self.owner.inner
        assert inner is not None
        plan = Plan.from_mask(self.graph, cand.kept, cand.name, {}, cand.bias_shift)
        ctx = CompileContext(self.ctx.example_inputs, self.ctx.calib_x, self.ctx.calib_y, seed=self.ctx.seed,
                             train_x=fit_x, original=self.gm)
        steps = [PruneUnitsPass(leaf_modules=inner.leaf_modules, plan=plan, prune_embed=inner.prune_embed),
                 dataclasses.replace(self.owner.refit, samples=0, measure=False)]
        return PassManager(steps, verify=True).run(copy.deepcopy(self.gm), AnalysisManager(ctx))

    def __call__(self, cand: Candidate) -> Judged:
        correct, n, hinge, loss = 0, 0, 0.0, 0.0
        for (x, y, fit_x), target in zip(self.folds, self.targets):
            m, nll = outputs_of(self.network(cand, fit_x), x, y)
            correct += int((m > 0).sum())
            n += len(m)
            hinge += float((target - m).clamp(min=0).sum())
            loss += float(nll.sum())
        return Judged(cand, correct, n, hinge / n if n else 0.0, loss / n if n else 0.0)


def outputs_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label margin ``z_y - max_{c != y} z_c`` and the cross-entropy ``-log softmax(z)_y`` of every
    sample (float64)."""
    got, nll = [], []
    net.eval()
    with torch.no_grad():
        for lo in range(0, len(x), _BATCH):
            z, t = ir.first_output(net(x[lo:lo + _BATCH])).double(), y[lo:lo + _BATCH]
            got.append(margins(z, t))
            nll.append(F.cross_entropy(z, t, reduction="none"))
    if not got:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(got), torch.cat(nll)

"""The MIP planner's ``budget`` formulation: choose the kept units by MILP, layer by layer, then jointly.

Why this shape (``docs``: the method notes, section 6): one joint MILP over every layer's keep
variables does not move within minutes, while a sub-problem over *one* unit group with everything
else fixed is small, and is exact and fast when the logits are affine in its keep variables (the
last hidden layer, or any layer followed only by linear maps).  So:

1. **Warm start.**  Every cheap criterion (L1, L2, and with data activation and Taylor) is turned
   into a plan for the same target by the ordinary selection; the one with the highest held-out
   accuracy (the lowest held-out hinge breaking ties; with ``accept="hinge"`` the lowest hinge) is
   the starting plan.  The MILP can only improve on it, and the planner checks at the end that
   its plan is no worse on the held-out samples than that best solver-free plan.
2. **Sub-problems, last group to first.**  For group ``g``: binary ``m_u`` per free unit of ``g``
   (pinned and split-floor units stay), every other unit fixed to the current plan; the network
   on the MILP samples is encoded by :mod:`.encoder` (ReLU big-M only where a downstream
   pre-activation is unstable under CROWN bounds).  A group with more possible ReLU/max-pool
   binaries than ``exact_binaries`` (counted from the graph before encoding anything) is left to
   step 6: such MILPs do not move in seconds (measured: dual bound stuck, warm start returned).
3. **Loss: margin preservation.**  Each calibration sample ``k`` keeps the logit margin
   ``M_k = z_y - max_{c != y} z_c`` of the original network: ``xi_k >= M_k - (z_y - z_c)`` for all
   ``c != y``, ``xi_k >= 0``; minimise ``mean xi`` minus a tiny reward for kept, group-normalised
   L2 magnitude that breaks ties.  Labels are the data's when there are any, else the original
   predictions (so no labels are needed).
4. **Target.**  ``--flops-budget F``: the exact MACs of the pruned network (every Linear/Conv
   layer, from the unit analysis's cost model) at most ``F`` of the original; with the other
   groups fixed a layer's MACs are affine in ``m``, except a layer reading and writing the same
   group (a residual chain), whose product of widths is linearised with ``p_i = m_i * W``.
   With ``spend_budget`` (the default, ``--no-spend-budget`` turns it off) every MILP must
   also keep at least the MACs of the plan it starts from: it may swap units or add some, never
   only drop them.  Measured why (``benchmarks/mip_bottleneck.py``): without it, the exact
   sub-problem of a ResNet's last stage kept 20 of the warm start's 46 channels because that
   lowered the hinge, and the resulting bottleneck fine-tuned to 77% where the warm start
   reached 98%; with it, the plan is better both before and after fine-tuning.
   ``--prune-ratio R``: the group keeps as many units as the ratio says.  ``--min-keep``, equal
   counts per block (grouped convs) and ``--round-to`` are constraints too.
5. **Warm-started solve** (the starting plan's complete solution, found by solving with ``m``
   fixed), a time limit per sub-problem and in total.  The answer is accepted only if the
   **held-out** samples (the train split less the MILP samples, :mod:`.evidence`) say it is better
   beyond noise, measured by running the pruned network (never on the solver's word); every
   sub-problem's end (optimal / time limit with gap / no incumbent / rejected / unchanged /
   skipped) and the held-out verdict go into the report.  A solution is first checked against the
   target and group rules on the plan itself (:func:`.rows.plan_violations`): one that breaks
   them is ``invalid`` and ignored.  A solver that raises ends the MILP stages (``solver-error``):
   the plan found so far stands, and the report and a warning say why.
6. **Joint stage** (:mod:`.joint`): trust-region MILPs over flip variables of every layer at
   once, on exactly measured single-flip effects, under the exact MAC budget of the whole
   network, so the budget can move between layers (the layer sub-problems keep the warm start's
   split).  Same loss, same held-out acceptance.  Held-out samples and flip effects are evaluated
   by batched masked forward passes (:mod:`.masked`), checked once against the physically
   pruned network; with many free units only those a first-order screen ranks best are
   measured exactly.  Every forward pass of the analysis runs on ``MipOptions.device``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp
import torch
from torch import fx

from oamipc import ir
from oamipc.errors import SolverError, UnsupportedGraphError, UsageError
from oamipc.passmanager import AnalysisManager
from oamipc.solver import complete_solution, solve
from oamipc.surgery import apply_plan, fold_bias_shift
from oamipc.target import Target, granularity
from oamipc.units import UnitGraph, UnitGroup

from .encoder import Encoder, EncodingStats, margin_hinge
from .evidence import HeldOut, holdout_order, holdout_size
from .joint import JointStage
from .masked import CHUNK_ELEMENTS, CPU_BATCH, MaskedNetwork, margins
from .means import bias_shift, reading_means
from .options import DEFAULT_SAMPLES, MipOptions
from .remote import Dispatch, LocalDispatch
from .rows import as_keep, group_rows, mac_expression, plan_violations
from .subproblems import SubProblemsAhead

log = logging.getLogger(__name__)

TIE_REWARD = 1e-3  # total weight of the magnitude tie-breaker per group, in units of the mean hinge
WARM_CRITERIA = ("l2", "l1", "taylor", "activation")


@dataclass
class Calibration:
    """MILP samples and held-out samples, with labels and the original margins' targets."""

    x: torch.Tensor
    y: torch.Tensor
    x_hold: torch.Tensor
    y_hold: torch.Tensor
    margin: torch.Tensor  # original margin of each MILP sample
    margin_hold: torch.Tensor
    holdout_source: str = "calibration"  # train (split less the MILP samples) | calibration | milp-samples

    @classmethod
    def build(cls, gm: fx.GraphModule, am: AnalysisManager, opts: MipOptions, macs_per_sample: float = 0.0
              ) -> Calibration:
        """The first ``samples`` calibration samples for the MILPs; held-out samples from the train split
        less those (``CompileContext.train_x``), else from the other calibration samples, else the
        MILP samples themselves; as many as :func:`.evidence.holdout_size` allows."""
        ctx = am.context
        if ctx.calib_x is None:
            raise UsageError("importance 'mip' needs calibration data: pass --data")
        x = ctx.calib_x.float()
        with torch.no_grad():
            logits = network_logits(gm, x, opts.torch_device())
        labelled = ctx.calib_y is not None
        y = ctx.calib_y if labelled else logits.argmax(1)
        n = min(opts.samples or DEFAULT_SAMPLES, len(x))
        target = margins(logits, y)
        cap = float(torch.quantile(target[:n], opts.margin_cap)) if opts.margin_cap < 1.0 else None
        pool_x, pool_y, source = x[n:], (y[n:] if labelled else None), "calibration"
        order = torch.arange(len(pool_x))
        if ctx.train_x is not None:
            pool_x, pool_y, source = ctx.train_x, ctx.train_y if labelled else None, "train"
            order = holdout_order(pool_x, x[:n], ctx.seed)
        if len(order) == 0:
            pool_x, pool_y, source = x[:n], (y[:n] if labelled else None), "milp-samples"
            order = torch.arange(n)
        chosen = order[:holdout_size(opts.holdout, len(order), macs_per_sample)]
        x_hold = pool_x[chosen].float()
        with torch.no_grad():
            hold_logits = network_logits(gm, x_hold, opts.torch_device())
        y_hold = pool_y[chosen] if pool_y is not None else hold_logits.argmax(1)
        target_hold = margins(hold_logits, y_hold)
        if cap is not None:
            target, target_hold = target.clamp(max=cap), target_hold.clamp(max=cap)
        return cls(x[:n], y[:n], x_hold, y_hold, target[:n], target_hold, source)


def network_logits(gm: torch.nn.Module, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The network's first output on ``x``, float64 on the CPU; run on ``device`` (a copy of the
    network when that is not the CPU), in chunks of at most ``CHUNK_ELEMENTS`` input values so
    that large inputs (224x224 images) do not hold every sample's activations at once, and on the
    CPU of at most ``CPU_BATCH`` samples (cache-sized batches run faster there)."""
    on_cpu = device is None or device.type == "cpu"
    if not on_cpu:
        gm = copy.deepcopy(gm).to(device)
    per = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    if on_cpu:
        per = min(per, CPU_BATCH)
    parts = []
    for lo in range(0, len(x), per):
        parts.append(ir.first_output(gm(x[lo:lo + per].to(device or x.device))).double().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


@dataclass
class SubProblemRecord:
    """What happened to one sub-problem (one row of the report)."""

    group: str
    free_units: int
    kept_before: int
    kept_after: int
    outcome: str  # improved | unchanged | rejected | no-incumbent | invalid | solver-error | skipped
    solve: dict[str, Any] = field(default_factory=dict)
    encoding: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    holdout_before: float = 0.0
    holdout_after: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # the held-out verdict (.evidence.Verdict)
    objective_warm: float | None = None
    time_limited: bool = False  # stopped by the time limit, not a node limit or a proof: may vary between runs
    note: str = ""  # why a solution was invalid, or the solver's error


def group_order(gm: fx.GraphModule, graph: UnitGraph) -> list[UnitGroup]:
    """Prunable groups, last (closest to the output) first."""
    position = {node.target: i for i, node in enumerate(gm.graph.nodes) if node.op == "call_module"}
    groups = [g for g in graph.groups if g.prunable]
    return sorted(groups, key=lambda g: (-max(position.get(p, -1) for p in g.producers), g.id))


_NONLINEAR_OPS = {"relu", "relu_", "max_pool1d", "max_pool2d"}


def _downstream(gm: fx.GraphModule, graph: UnitGraph, group: UnitGroup) -> Iterator[fx.Node]:
    """Every node from the layers reading ``group``'s units to the output, each once."""
    units = set(group.units)
    readers = {layer.node for layer in graph.layers if any(int(u) in units for u in layer.in_units.tolist())}
    seen: set[str] = set()
    stack = [n for n in gm.graph.nodes if n.name in readers]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        yield node
        stack.extend(node.users)


def _per_sample(node: fx.Node) -> int:
    shape = ir.tensor_shape(node)
    return ir.prod(shape[1:]) if shape else 0


def nonlinear_elements_after(gm: fx.GraphModule, graph: UnitGraph, group: UnitGroup) -> int:
    """ReLU/max-pool elements per sample downstream of the layers reading ``group``'s units.

    An upper bound on the binaries per sample of the group's sub-problem (the encoder creates one
    only for elements whose bounds leave the phase open), known before encoding anything.
    """
    total = 0
    for node in _downstream(gm, graph, group):
        mod = ir.get_module(gm, str(node.target)) if node.op == "call_module" else None
        name = ir.op_name(node) if mod is None else ""
        if isinstance(mod, (torch.nn.ReLU, torch.nn.MaxPool1d, torch.nn.MaxPool2d)) or name in _NONLINEAR_OPS:
            total += _per_sample(node)
    return total


def elements_after(gm: fx.GraphModule, graph: UnitGraph, group: UnitGroup) -> int:
    """Tensor elements per sample of every node downstream of the layers reading ``group``'s units.

    Each becomes, in the group's sub-problem, a value whose coefficients cover every variable for
    every element (:class:`.encoder.Sym`); times the samples and the free units this bounds the
    size of the encoder's walk before anything is encoded.
    """
    # the output node is its input's value, counted already
    return sum(_per_sample(node) for node in _downstream(gm, graph, group) if node.op != "output")


# Bytes one nonzero of a hinge row holds while the MILP is built and handed to HiGHS: measured on
# MobileNetV2's 1000-class head (RESULTS, "MobileNetV2's head sub-problem"): about 54 in PuLP's
# rows and 13 in HiGHS's model, before HiGHS's working copies.
ROW_ENTRY_BYTES = 67


def output_elements(gm: fx.GraphModule) -> int:
    """Elements per sample of the network's (first) output: the classes the hinge rows compare."""
    for node in gm.graph.nodes:
        if node.op == "output":
            first = node.args[0]
            while isinstance(first, (tuple, list)):
                first = first[0]
            shape = ir.tensor_shape(first) if isinstance(first, fx.Node) else None
            return ir.prod(shape[1:]) if shape else 0
    return 0


def exact_too_large(solver: BudgetSolver, group: UnitGroup, free: list[int]) -> str | None:
    """Why ``group``'s sub-problem is left to the joint stage before encoding it, or None.

    Three bounds, all read off the graph before anything is encoded: ReLU/max-pool binaries
    (``exact_binaries``), and the bytes of the encoder's symbolic values plus those of the hinge
    rows (``exact_bytes``).  A group read straight by a wide classifier has few binaries and a
    small walk, but every one of its ``samples x (classes - 1)`` hinge rows holds a term per free
    unit: MobileNetV2's 1280-unit head before 1000 classes is 82 million terms, about 10 GiB to
    build and solve, and its LP did not finish within its time limit anyway.
    """
    samples = len(solver.calib.x)
    binaries = samples * nonlinear_elements_after(solver.gm, solver.graph, group)
    if binaries > solver.opts.exact_binaries:
        return f"up to {binaries} ReLU/max-pool binaries (> {solver.opts.exact_binaries}); left to the joint stage"
    walk = 8.0 * samples * len(free) * elements_after(solver.gm, solver.graph, group)
    rows = float(ROW_ENTRY_BYTES) * samples * max(output_elements(solver.gm) - 1, 1) * len(free)
    if walk + rows > solver.opts.exact_bytes:
        return (f"symbolic values and hinge rows of up to {(walk + rows) / 2**30:.1f} GiB "
                f"(> {solver.opts.exact_bytes / 2**30:.1f}); left to the joint stage")
    return None


def unit_magnitude(gm: fx.GraphModule, graph: UnitGraph) -> np.ndarray:
    """L2 norm of each unit's outgoing weights and bias (summed over coupled producers)."""
    out = np.zeros(graph.n_units)
    for unit, members in graph.members.items():
        total = 0.0
        for target, channel in members:
            mod = gm.get_submodule(target)
            w = mod.weight.detach()[channel].double()
            total += float((w**2).sum())
            bias = getattr(mod, "bias", None)
            if bias is not None:
                total += float(bias.detach()[channel].double() ** 2)
        out[unit] = total**0.5
    return out


class BudgetSolver:
    """Runs the layer-decomposed budgeted MILP from a warm-start plan (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, graph: UnitGraph, calib: Calibration, opts: MipOptions, target: Target, *,
                 forced: set[int], progress: Any = None, heldout: HeldOut | None = None,
                 where: Dispatch | None = None) -> None:
        self.gm = gm
        self.graph = graph
        self.calib = calib
        self.opts = opts
        self.target = target.require()
        self.steps = granularity(self.target, graph)
        self.forced = forced
        self.progress = progress
        self.magnitude = unit_magnitude(gm, graph)
        self.pinned = graph.pinned_mask()
        self.total_macs = graph.macs()
        self.records: list[SubProblemRecord] = []
        self.joint_rounds: list[Any] = []
        self.joint_effects: list[dict[str, Any]] = []  # per measured plan: exact effects, screen quality
        device = opts.torch_device()
        self.plain_net = MaskedNetwork(gm, graph, device=device)
        self.means = reading_means(gm, self.plain_net.reading, torch.cat([calib.x, calib.x_hold])) \
            if opts.mean_replacement else {}
        self.net = MaskedNetwork(gm, graph, self.means, device=device) if self.means else self.plain_net
        self.plain_heldout = heldout or HeldOut(gm, graph, calib.x_hold, calib.y_hold, calib.margin_hold,
                                                rule=opts.accept, z=opts.accept_z, loss_z=opts.accept_loss_z,
                                                device=device)
        self.heldout = self.plain_heldout.with_means(self.means) if self.means else self.plain_heldout
        self.bias_shift: dict[str, list[float]] = {}
        self.mean_replacement: dict[str, Any] = {"requested": opts.mean_replacement, "readers": sorted(self.means)}
        self.deadline_reached = False
        self.solver_error: str | None = None  # the first solver failure; the MILP stages stop there
        self.where = where or LocalDispatch(opts.jobs)  # where sub-problems (and the joint stage's tasks) run
        self.ahead = SubProblemsAhead(self)

    def reproducible(self) -> bool:
        """True when no solve and no stage was cut short by a clock: the plan is the same every run."""
        return not (self.deadline_reached or any(r.time_limited for r in self.records)
                    or any(r.time_limited for r in self.joint_rounds))

    def holdout_loss(self, kept: np.ndarray, means: bool = True) -> float:
        """The mean margin hinge on the held-out samples (with the mean replacement when it is on)."""
        return (self.heldout if means else self.plain_heldout).loss(kept)

    def run(self, kept: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        deadline = start + self.opts.total_time_limit
        order = group_order(self.gm, self.graph)
        current = kept.copy()
        pruned = copy.deepcopy(self.gm)
        if self.means:
            fold_bias_shift(pruned, bias_shift(self.gm, self.graph, current, self.means))
        if not current.all():
            apply_plan(pruned, self.graph, current)
        self.net.verify(self.calib.x_hold[:64], current, pruned)  # the masked evaluation is the real network
        best_loss = self.holdout_loss(current)
        steps = (len(order) + int(self.opts.joint)) * self.opts.sweeps
        done = 0
        for _sweep in range(self.opts.sweeps):
            for group in order:
                done += 1
                left = deadline - time.perf_counter()
                free = [u for u in group.units if not self.pinned[u] and u not in self.forced]
                record = SubProblemRecord(group.name, len(free), int(current[group.units].sum()),
                                          int(current[group.units].sum()), "skipped", holdout_before=best_loss)
                self.records.append(record)
                if self.progress:
                    self.progress(f"MILP {group.name}", done - 1, steps)
                if not free or left <= 0.5 or self.solver_error:
                    continue
                too_large = exact_too_large(self, group, free)
                if too_large:
                    record.solve = {"status": too_large}
                    continue
                try:
                    candidate = self.ahead.solve(group, free, current, min(self.opts.time_limit, left), record, order)
                except UnsupportedGraphError as exc:  # an op the exact encoding does not cover
                    record.outcome = "no-encoding"
                    record.note = str(exc).split("; use a solver-free")[0]
                    record.solve = {"status": "no exact encoding; left to the joint stage"}
                    continue
                if candidate is None:
                    continue
                if np.array_equal(candidate, current):
                    record.outcome = "unchanged"
                    continue
                verdict = self.heldout.judge(candidate, current)
                record.holdout_after, record.evidence = verdict.hinge_after, verdict.to_dict()
                if verdict.accepted:
                    record.outcome = "improved"
                    record.kept_after = int(candidate[group.units].sum())
                    current, best_loss = candidate, verdict.hinge_after
                else:
                    record.outcome = "rejected"
            if self.opts.joint and deadline - time.perf_counter() > 0.5 and not self.solver_error:
                done += 1
                if self.progress:
                    self.progress("MILP joint", done - 1, steps)
                current = self.joint(current, deadline)
                best_loss = self.holdout_loss(current)
        if self.progress:
            self.progress("MILP", steps, steps)
        self.deadline_reached = time.perf_counter() > deadline - 0.5
        if self.means:
            with_means, without = self.holdout_loss(current), self.holdout_loss(current, means=False)
            self.mean_replacement.update({"holdout_with": with_means, "holdout_without": without,
                                          "applied": with_means < without})
            if with_means < without:
                self.bias_shift = bias_shift(self.gm, self.graph, current, self.means)
        return current

    def joint(self, current: np.ndarray, deadline: float) -> np.ndarray:
        free = [u for g in self.graph.groups if g.prunable for u in g.units
                if not self.pinned[u] and u not in self.forced]
        if not free:
            return current
        stage = JointStage(self.net, self.graph, self.calib.x, self.calib.y, self.calib.margin, free=free,
                           magnitude=self.magnitude, target=self.target, solver=self.opts.solver,
                           time_limit=self.opts.time_limit, threads=self.opts.threads, tie_reward=TIE_REWARD,
                           gap=self.opts.gap, node_limit=self.opts.joint_nodes, competitors=self.opts.joint_rivals,
                           spend=self.opts.spend_budget and self.target.kind == "macs",
                           exact_macs=self.opts.joint_exact_macs, where=self.where)
        radius = self.opts.joint_radius or max(4, len(free) // 10)
        out = stage.run(current, self.heldout, radius=radius, max_rounds=self.opts.joint_rounds,
                        deadline=deadline, jobs=self.opts.jobs)
        self.joint_rounds.extend(stage.rounds)
        self.joint_effects.extend(stage.measurements)
        failed = next((r.note for r in stage.rounds if r.outcome == "solver-error"), None)
        self.solver_error = self.solver_error or failed
        return out

    def _solver_failed(self, record: SubProblemRecord, group: UnitGroup, exc: SolverError) -> None:
        """Record a solver failure; the plan found so far stands and no further MILP is tried."""
        record.outcome = "solver-error"
        record.note = str(exc)
        record.solve = {**record.solve, "status": "error"}
        self.solver_error = str(exc)
        log.warning("MILP for %s: %s; keeping the plan found so far and skipping the remaining MILPs",
                    group.name, exc)

    # ------------------------------------------------------------------ one sub-problem
    def solve_group(self, group: UnitGroup, free: list[int], current: np.ndarray, time_limit: float,
                    record: SubProblemRecord) -> np.ndarray | None:
        t0 = time.perf_counter()
        prob = pulp.LpProblem(f"group_{group.id}", pulp.LpMinimize)
        m = {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in free}
        enc = Encoder(self.gm, self.graph, self.calib.x, current, m, prob, name=f"g{group.id}",
                      bounds=self.opts.bounds, means=self.means)
        xi = margin_hinge(prob, enc, enc.logits(), self.calib.y, self.calib.margin)  # the logits go before the solves
        self._target(prob, group, free, m, current)
        mags = self.magnitude[free]
        scale = mags.max() if len(mags) and mags.max() > 0 else 1.0
        reward = TIE_REWARD / max(len(free), 1)
        n = len(xi)
        prob += pulp.LpAffineExpression([(v, 1.0 / n) for v in xi]
                                        + [(m[u], -reward * float(self.magnitude[u] / scale)) for u in free])
        record.build_seconds = time.perf_counter() - t0
        record.encoding = _encoding_summary(enc.stats)
        try:
            warm = self._warm_values(prob, enc, current)
        except SolverError as exc:
            self._solver_failed(record, group, exc)
            return None
        if warm is None:
            record.outcome = "no-incumbent"
            record.solve = {"status": "warm start infeasible"}
            log.warning("MILP for %s: the warm start is infeasible in the encoding; group left unchanged", group.name)
            return None
        record.objective_warm = warm[1]
        try:
            result = solve(prob, solver=self.opts.solver, time_limit=time_limit, gap=self.opts.gap,
                           threads=self.opts.threads, warm_start=warm[0], node_limit=self.opts.layer_nodes)
        except SolverError as exc:
            self._solver_failed(record, group, exc)
            return None
        record.solve = result.to_dict()
        record.time_limited = result.stopped_by_time(time_limit)
        if not result.has_solution():
            record.outcome = "no-incumbent"
            return None
        candidate = current.copy()
        for u in free:
            candidate[u] = (m[u].varValue or 0.0) > 0.5
        broken = plan_violations(self.graph, candidate, current, self.target, spend=self.opts.spend_budget)
        if broken:
            record.outcome = "invalid"
            record.note = "; ".join(broken)
            log.warning("MILP for %s returned a plan that breaks its own rows (%s); ignored", group.name, broken[0])
            return None
        return candidate

    def _target(self, prob: pulp.LpProblem, group: UnitGroup, free: list[int], m: dict[int, pulp.LpVariable],
                current: np.ndarray) -> None:
        keep = as_keep(m)
        group_rows(prob, group, keep, current, self.target, round_to=self.steps[group.id], prefix=f"g{group.id}_")
        if self.target.kind == "macs":
            self._macs(prob, group, m, current)

    def _macs(self, prob: pulp.LpProblem, group: UnitGroup, m: dict[int, pulp.LpVariable],
              current: np.ndarray) -> None:
        """Exact MACs of the pruned network <= budget (:func:`.rows.mac_expression`)."""
        assert self.target.flops_budget is not None
        macs = mac_expression(prob, self.graph, as_keep(m), current, prefix=f"g{group.id}_")
        prob += macs <= float(self.target.flops_budget) * self.total_macs
        if self.opts.spend_budget:
            prob += macs >= self.graph.macs(current)

    def _warm_values(self, prob: pulp.LpProblem, enc: Encoder,
                     current: np.ndarray) -> tuple[dict[pulp.LpVariable, float], float] | None:
        """The complete solution of the current plan: every ``m`` fixed to it and every binary of
        the encoding to its phase there (:meth:`Encoder.reference_phases`), so the rest is an LP."""
        return complete_solution(prob, enc.reference_phases(current), solver=self.opts.solver,
                                 time_limit=self.opts.time_limit, threads=self.opts.threads)


def _encoding_summary(stats: EncodingStats) -> dict[str, Any]:
    d = stats.to_dict()
    d["mean_interval_width"] = d.pop("width_per_layer")
    d["mean_interval_width_before_crown"] = d.pop("interval_width_per_layer")
    return d


def plan_budget(gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager, *, warm: np.ndarray, opts: MipOptions,
                calib: Calibration, target: Target, forced: set[int], heldout: HeldOut | None = None,
                where: Dispatch | None = None) -> tuple[np.ndarray, BudgetSolver]:
    """Improve the plan ``warm`` with the budgeted sub-problems; return it and the records."""
    solver = BudgetSolver(gm, graph, calib, opts, target, forced=forced, progress=am.context.tick, heldout=heldout,
                          where=where)
    kept = solver.run(warm)
    return kept, solver

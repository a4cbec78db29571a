"""The sub-problem's build holds less without changing the MILP: the walk drops values it no longer
needs, and the hinge rows are written in one piece.  Both are checked against the build they
replace: the same logits, bit for bit, and the same rows, term order and float values included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pulp
import pytest
import torch

from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip import encoder as encoder_module
from oamipc.passes.mip.budget import ROW_ENTRY_BYTES
from oamipc.passes.mip.encoder import Encoder, Sym, margin_hinge
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace

from .models import ZOO, example_input


def _setup(name: str, n: int, size: int | None = None) -> tuple[Any, Any, torch.Tensor]:
    model = ZOO[name].factory()
    x = example_input(name, batch=n, seed=1)
    if size is not None:
        x = x[..., :size, :size].contiguous()
    gm = trace(model, (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    return gm, graph, x


def _free(graph: Any, which: str) -> dict[int, pulp.LpVariable]:
    pinned = graph.pinned_mask()
    groups = [g for g in graph.groups if g.prunable]
    units = [u for g in (groups[-1:] if which == "last" else groups) for u in g.units if not pinned[u]]
    return {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in units}


def _rows(prob: pulp.LpProblem) -> list[tuple[Any, ...]]:
    """Every row as PuLP holds it: name, terms in order (name, value, type), constant, sense."""
    return [(name, [(v.name, a, type(a)) for v, a in c.items()], c.constant, type(c.constant), c.sense)
            for name, c in prob.constraints.items()]


def _operator_hinge(prob: pulp.LpProblem, enc: Encoder, logits: list[Sym], y: torch.Tensor,
                    target: torch.Tensor) -> None:
    """The hinge rows written with PuLP's operators, as the build did before."""
    for k, s in enumerate(logits):
        yk = int(y[k])
        v = pulp.LpVariable(f"xi{k}", lowBound=0.0)
        zy = enc.expression(s, yk)
        for c in range(s.const.numel()):
            if c != yk:
                prob += v - float(target[k]) + zy - enc.expression(s, c) >= 0


@pytest.mark.parametrize(("name", "size", "which"), [("lenet5", None, "last"), ("resnet", 8, "last"),
                                                     ("mlp", None, "all")])
def test_hinge_rows_are_the_operator_rows(name: str, size: int | None, which: str) -> None:
    gm, graph, x = _setup(name, n=3, size=size)
    with torch.no_grad():
        y = gm(x).argmax(1)
    target = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    built = {}
    for how in ("one piece", "operators"):
        prob = pulp.LpProblem("hinge", pulp.LpMinimize)
        enc = Encoder(gm, graph, x, graph.all_kept(), _free(graph, which), prob)
        logits = enc.logits()
        start = len(prob.constraints)
        if how == "one piece":
            margin_hinge(prob, enc, logits, y, target)
        else:
            _operator_hinge(prob, enc, logits, y, target)
        assert len(prob.constraints) - start == 3 * 9
        built[how] = (_rows(prob), [v.name for v in prob.variables()])
    assert built["one piece"] == built["operators"]
    # Not a vacuous comparison: the rows carry both logits' terms, some on shared variables.
    assert max(len(r[1]) for r in built["operators"][0]) > 2


@pytest.mark.parametrize(("name", "size"), [("resnet", 8), ("lenet5", None)])
def test_walk_that_drops_values_gives_the_same_logits(name: str, size: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gm, graph, x = _setup(name, n=2, size=size)
    live: dict[str, int] = {}
    walks: dict[str, list[Sym]] = {}
    visit = Encoder._visit

    def counting(self: Encoder, node: Any, env: dict[str, Any]) -> Any:
        live[self.prefix] = max(live.get(self.prefix, 0), len(env))
        return visit(self, node, env)

    monkeypatch.setattr(Encoder, "_visit", counting)
    for how in ("dropping", "keeping"):
        if how == "keeping":
            monkeypatch.setattr(encoder_module, "_last_readers", lambda graph: {})
        enc = Encoder(gm, graph, x, graph.all_kept(), _free(graph, "last"), pulp.LpProblem("w", pulp.LpMinimize),
                      name=how)
        walks[how] = enc.logits()
    for a, b in zip(walks["dropping"], walks["keeping"], strict=True):
        assert a.vars == b.vars
        for t, u in ((a.const, b.const), (a.coef, b.coef), (a.lo, b.lo), (a.hi, b.hi)):
            assert torch.equal(t, u)
    nodes = len(gm.graph.nodes)
    assert live["keeping"] >= nodes - 2  # every value to the end: the walk before
    assert live["dropping"] < live["keeping"] / 2
    assert np.isfinite(float(walks["dropping"][0].hi.max()))


def _highs_model(prob: pulp.LpProblem, build: Any) -> dict[str, Any]:
    """The HiGHS model ``build`` makes of ``prob`` (a PuLP ``buildSolverModel``), as arrays."""
    from oamipc.solver.highs import _HighsSolver

    solver = _HighsSolver(msg=False)
    solver.mip = True
    solver.createAndConfigureSolver(prob)
    build(solver, prob)
    lp = prob.solverModel.getLp()
    a = lp.a_matrix_
    return {"cols": (list(lp.col_cost_), list(lp.col_lower_), list(lp.col_upper_), list(lp.integrality_)),
            "rows": (list(lp.row_lower_), list(lp.row_upper_)),
            "matrix": (a.format_, list(a.start_), list(a.index_), list(a.value_))}


@pytest.mark.parametrize("block", [1 << 22, 7])
def test_highs_model_in_blocks_is_pulps(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks of rows give HiGHS PuLP's own model: the same columns, rows and entries (a block
    of 7 entries splits the rows into many calls; zero coefficients are dropped as PuLP does)."""
    from oamipc.solver import highs

    monkeypatch.setattr(highs, "ROW_BLOCK_NONZEROS", block)
    gm, graph, x = _setup("lenet5", n=2)
    with torch.no_grad():
        y = gm(x).argmax(1)
    prob = pulp.LpProblem("model", pulp.LpMinimize)
    enc = Encoder(gm, graph, x, graph.all_kept(), _free(graph, "last"), prob)
    xi = margin_hinge(prob, enc, enc.logits(), y, torch.ones(2, dtype=torch.float64))
    extra = pulp.LpVariable("spare", lowBound=-1, cat=pulp.LpInteger)
    prob += pulp.LpAffineExpression([(xi[0], 0.0), (extra, 2.0)]) <= 3  # a zero coefficient, an integer column
    prob += pulp.lpSum(xi) + extra
    ours = _highs_model(prob, highs._HighsSolver.buildSolverModel)
    theirs = _highs_model(prob, pulp.HiGHS.buildSolverModel)
    assert ours == theirs
    import highspy

    kinds = {int(k.value) for k in theirs["cols"][3]}
    assert len(theirs["matrix"][2]) > 100 and kinds == {int(highspy.HighsVarType.kContinuous.value),
                                                          int(highspy.HighsVarType.kInteger.value)}


def test_subproblem_too_large_for_a_dense_walk_is_left_to_the_joint_stage() -> None:
    """The size gate counts, per sample, the elements downstream of the group's readers: for the
    last hidden layer of an MLP that is the logits alone, so samples x free units x classes x 8."""
    from types import SimpleNamespace

    from oamipc.passes.mip.budget import elements_after, exact_too_large

    gm, graph, x = _setup("mlp", n=4)
    last = [g for g in graph.groups if g.prunable][-1]
    free = [u for u in last.units if not graph.pinned_mask()[u]]
    classes = int(gm(x).shape[1])
    assert elements_after(gm, graph, last) == classes
    size = 8 * 4 * len(free) * classes + ROW_ENTRY_BYTES * 4 * (classes - 1) * len(free)
    solver = SimpleNamespace(gm=gm, graph=graph, calib=SimpleNamespace(x=x),
                             opts=SimpleNamespace(exact_binaries=4000, exact_bytes=float(size)))
    assert exact_too_large(solver, last, free) is None  # at the bound: solved
    solver.opts.exact_bytes = float(size - 1)
    assert "left to the joint stage" in (exact_too_large(solver, last, free) or "")


def test_hinge_rows_of_a_wide_classifier_count_in_the_size_gate() -> None:
    """A group read straight by a 1000-class classifier is in every hinge row: its sub-problem's
    rows alone (samples x 999 x free units terms) can pass the bound with a small walk."""
    from types import SimpleNamespace

    from torch import nn

    from oamipc.passes.mip.budget import elements_after, exact_too_large, output_elements
    from oamipc.tracing import trace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1000)).eval()
    x = torch.randn(16, 8)
    gm = trace(net, (x[:1],))
    am = AnalysisManager(CompileContext((x[:1],), x, net(x).argmax(1), seed=0))
    graph = am.get(UnitGroupAnalysis(), gm)
    (hidden,) = [g for g in graph.groups if g.prunable]
    free = list(hidden.units)
    assert output_elements(gm) == 1000 == elements_after(gm, graph, hidden)
    walk = 8 * 16 * len(free) * 1000
    rows = ROW_ENTRY_BYTES * 16 * 999 * len(free)
    solver = SimpleNamespace(gm=gm, graph=graph, calib=SimpleNamespace(x=x),
                             opts=SimpleNamespace(exact_binaries=4000, exact_bytes=float(walk + rows)))
    assert exact_too_large(solver, hidden, free) is None
    solver.opts.exact_bytes = float(walk + rows // 2)  # the walk alone fits; with the rows it does not
    assert "hinge rows" in (exact_too_large(solver, hidden, free) or "")

"""The whole core path over the model zoo: unit groups -> criterion -> plan -> prune -> ONNX.

Oracles: PyTorch itself (ratio 0 and zero-weight units leave outputs unchanged), the cost model
(the pruned network's real MACs equal the plan's prediction), and onnxruntime (the exported file
computes what the pruned torch module computes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import oamipc
from oamipc.export import export_onnx, verify_onnx
from oamipc.passes import count_costs
from oamipc.units import Layout

from .models import ZOO, build, example_input

CRITERIA = ["l1", "l2", "activation", "taylor", "random"]
# Zero channels stay zero through these models (no sigmoid/normalisation over a removed channel).
ZERO_PROPAGATING = [n for n in ZOO if n not in ("norms", "functional")]


def _data(name: str, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = example_input(name, batch=n, seed=1)
    y = torch.randint(0, ZOO[name].num_classes, (n,), generator=torch.Generator().manual_seed(2))
    return x, y


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_is_identity(name: str) -> None:
    model = build(name)
    x, y = _data(name)
    res = oamipc.compile(model, example_input(name, batch=2), data=(x, y), importance="l1", prune_ratio=0.0,
                         lossless=False)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert res.report["after"]["params"] == res.report["before"]["params"]
    # With the lossless removal (the default with data) only units constant on the data's box go.
    res = oamipc.compile(model, example_input(name, batch=2), data=(x, y), importance="l1", prune_ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert res.report["prune"]["units_removed"] == res.report["lossless"]["units_removed"]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_half_pruned_runs_exports_and_matches(name: str, criterion: str, tmp_path) -> None:
    model = build(name)
    x, y = _data(name)
    res = oamipc.compile(model, example_input(name, batch=2), data=(x, y), importance=criterion, prune_ratio=0.5)
    rep = res.report
    assert rep["after"]["macs"] < rep["before"]["macs"], "nothing was removed"
    assert rep["after"]["params"] < rep["before"]["params"]
    # The cost model's prediction is exactly what the rebuilt network costs.
    assert rep["after"]["macs"] == pytest.approx(rep["prune"]["predicted_macs_after"])
    assert rep["after"]["macs"] == count_costs(res.module).macs
    # Every prunable group lost what the ratio asks (at least one unit when it has two or more).
    for g in rep["prune"]["plan"]["groups"]:
        group = next(s for s in rep["units"]["groups"] if s["name"] == g["name"])
        if group["prunable"] and group["pinned"] == 0 and group["equal_count_blocks"] is None:
            assert len(g["kept"]) == g["size"] - int(0.5 * g["size"])
    path = export_onnx(res.module, res.example_inputs, tmp_path / "m.onnx")
    check = verify_onnx(path, res.module, (x,), rtol=1e-4)
    assert check.passed and check.max_rel_err < 1e-4


def _zero_units(model_gm, graph, units: set[int]) -> None:
    """Zero every weight row and bias that produces or normalises one of ``units``."""
    with torch.no_grad():
        for node in model_gm.graph.nodes:
            lay = graph.layouts.get(node.name)
            if node.op != "call_module" or not isinstance(lay, Layout):
                continue
            mod = model_gm.get_submodule(str(node.target))
            rows = [i for i, u in enumerate(lay.units.tolist()) if u in units]
            if not rows:
                continue
            for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] == len(lay.units):
                    p[rows] = 0.0
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean[rows] = 0.0


@pytest.mark.parametrize("name", ZERO_PROPAGATING)
def test_zero_units_are_removed_without_changing_the_output(name: str) -> None:
    """Oracle: units whose weights and biases are all zero contribute nothing; removing them is exact."""
    from oamipc.passes import UnitGroupAnalysis
    from oamipc.passmanager import AnalysisManager, CompileContext
    from oamipc.tracing import trace

    x = example_input(name, batch=8, seed=3)
    gm = trace(build(name), (x,))
    graph = AnalysisManager(CompileContext((x,))).get(UnitGroupAnalysis(), gm)
    dead: set[int] = set()
    for g in graph.groups:
        free = [u for u in g.units if u not in g.pinned]
        if g.blocks is None and len(free) >= 2:
            dead.update(free[1::2])
    assert dead, f"{name}: no prunable units found"
    _zero_units(gm, graph, dead)
    with torch.no_grad():
        reference = gm(x)
    kept = np.ones(graph.n_units, dtype=bool)
    kept[sorted(dead)] = False
    plan = oamipc.Plan.from_mask(graph, kept, "oracle")
    res = oamipc.compile(gm, (x,), plan=plan)
    assert res.report["prune"]["units_removed"] == len(dead)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), reference, rtol=1e-5, atol=1e-5)

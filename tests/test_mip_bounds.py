"""Bounds of the MILP encoding: CROWN is sound (contains every reachable pre-activation for keep
values in [0, 1], with the solver margin to spare) and tighter than interval arithmetic; sample
bounds fix the ReLU phases."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pulp
import pytest
import torch
from torch import fx

from oamipc.passes import UnitGroupAnalysis
from oamipc.passes.mip.bounds import MARGIN_ABS
from oamipc.passes.mip.budget import group_order
from oamipc.passes.mip.encoder import Encoder
from oamipc.passes.mip.masked import MaskedNetwork, _Masked
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace

from .models import ZOO, example_input


class _Capture(_Masked):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.all_input_nodes and isinstance(self.env.get(n.all_input_nodes[0]), torch.Tensor):
            self.seen[n.name] = self.env[n.all_input_nodes[0]].detach().double()
        return out


def _encode(name: str, bounds: str, size: int | None = None):
    x = example_input(name, batch=3, seed=4)
    if size:
        x = x[..., :size, :size].contiguous()
    gm = trace(ZOO[name].factory(), (x[:1],))
    graph = AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), gm)
    group = group_order(gm, graph)[-1]  # the first layer: the most ReLUs downstream
    free = {u: pulp.LpVariable(f"m{u}", cat=pulp.LpBinary) for u in group.units if u not in group.pinned}
    enc = Encoder(gm, graph, x, graph.all_kept(), free, pulp.LpProblem("b", pulp.LpMinimize), bounds=bounds)
    enc.record_bounds = True
    enc.logits()
    return gm, graph, x, list(free), enc


@pytest.mark.parametrize("name,size", [("mlp", None), ("lenet5", None), ("vgg_bn", None), ("resnet", 8)])
def test_crown_bounds_contain_every_reachable_preactivation_with_the_margin_to_spare(name: str,
                                                                                     size: int | None) -> None:
    """Every reachable pre-activation lies at least MARGIN_ABS inside its bounds, corners of the
    keep box (real plans, where interval bounds are attained exactly) included: a solver that
    accepts violations up to its tolerance never sees a true value within reach of a big-M
    constant.  The network runs in float64, the encoder's own arithmetic."""
    gm, graph, x, free, enc = _encode(name, "crown", size)
    assert enc.relu_bounds
    net = MaskedNetwork(gm, graph)
    gm64 = copy.deepcopy(gm).double()
    rng = np.random.default_rng(0)
    for trial in range(12):
        keep = graph.all_kept().astype(np.float64)
        keep[free] = rng.random(len(free)) if trial % 2 else rng.random(len(free)) < 0.5
        masks = torch.from_numpy(np.repeat(keep[None, :], len(x), axis=0))
        cap = _Capture(gm64, net.reading, masks)
        with torch.no_grad():
            cap.run(x.double())
        for node, per_sample in enc.relu_bounds.items():
            for k, (lo, hi, dep) in enumerate(per_sample):
                v = cap.seen[node][k].reshape(-1).numpy()[dep]
                inside = np.minimum(v - lo.numpy()[dep], hi.numpy()[dep] - v)
                assert np.all(inside >= 0.99 * MARGIN_ABS), (node, float(inside.min()))


@pytest.mark.parametrize("name,size", [("lenet5", None), ("vgg_bn", None), ("resnet", 8)])
def test_crown_is_tighter_than_interval_arithmetic(name: str, size: int | None) -> None:
    *_, crown = _encode(name, "crown", size)
    *_, interval = _encode(name, "interval", size)
    later = [n for n in crown.stats.width_per_layer][1:]  # the first ReLU is exact under both
    assert later
    for node in crown.stats.width_per_layer:
        assert crown.stats.width_per_layer[node] <= interval.stats.width_per_layer[node] + 1e-9
    assert any(crown.stats.width_per_layer[n] < 0.9 * interval.stats.width_per_layer[n] for n in later)
    assert crown.stats.relu_binaries <= interval.stats.relu_binaries
    # Interval arithmetic on top of CROWN-tightened earlier layers is itself tighter than pure IBP.
    for node, width in crown.stats.interval_width_per_layer.items():
        assert crown.stats.width_per_layer[node] <= width + 1e-9
        assert width <= interval.stats.width_per_layer[node] + 1e-9


def test_sample_bounds_fix_every_relu_phase() -> None:
    *_, enc = _encode("mlp", "sample")
    assert enc.stats.relu_binaries == 0 and enc.stats.relu_stable > 0

"""The data criteria run the calibration samples in passes bounded by activation size
(``importance_base.samples_per_pass``); the scores must be those of the unbounded passes.

Oracle: the same criterion with bounds far above the network (one pass per ``BATCH`` group, the
computation before the bound existed) and, for the pass sizes, the activation shapes PyTorch
produces when the network runs.  The network runs in float64 so that the only difference the
passes may make, the order of summation, stays near 1e-15 (in float32 the Taylor scores moved
by up to 1e-5 relative, from the weight gradients' float32 sums).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from oamipc.passes import ActivationImportance, TaylorImportance, UnitGroupAnalysis
from oamipc.passes import importance_base as base
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.fc(h.mean(dim=(2, 3)))


def _scores(criterion: type, n: int = 200) -> tuple[np.ndarray, list[int]]:
    """Scores of ``criterion`` on ``n`` seeded samples, and the batch sizes the first conv saw."""
    model = SmallConv().double().eval()
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1))
    gm = trace(model, (x[:2],))
    seen: list[int] = []
    gm.get_submodule("c1").register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    am = AnalysisManager(CompileContext((x[:2],), x, y, seed=0))
    am.get(UnitGroupAnalysis(), gm)
    return am.get(criterion(), gm), seen


def _per_sample(backward: bool) -> int:
    """Values per sample of the network's activations, from a real forward pass with hooks."""
    model, sizes = SmallConv().eval(), []
    for mod in model.modules():
        if mod is not model:
            mod.register_forward_hook(lambda _m, _a, out: sizes.append(out[0].numel()))
    model(torch.randn(1, 1, 8, 8))
    return sum(sizes) if backward else max(sizes)


@pytest.mark.parametrize("criterion, bound", [(TaylorImportance, "BACKWARD_ELEMENTS"),
                                              (ActivationImportance, "FORWARD_ELEMENTS")])
def test_bounded_passes_give_the_unbounded_scores(monkeypatch: pytest.MonkeyPatch, criterion: type,
                                                  bound: str) -> None:
    whole, seen_whole = _scores(criterion)
    assert max(seen_whole) > 100  # the unbounded run is one pass per group (128 / 256 samples)
    monkeypatch.setattr(base, bound, 7 * _per_sample(criterion is TaylorImportance) + 1)
    parts, seen_parts = _scores(criterion)
    assert max(seen_parts) <= 7 and len(seen_parts) >= 200 // 7
    assert sum(seen_parts) == 200
    torch.testing.assert_close(torch.from_numpy(parts), torch.from_numpy(whole), rtol=1e-12, atol=0.0)
    assert not np.array_equal(seen_parts, seen_whole)


def test_samples_per_pass_reads_the_activation_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 1, 8, 8)
    gm = trace(SmallConv().eval(), (x,))
    largest, total = _per_sample(False), _per_sample(True)
    # the graph also holds the input, relu and mean outputs the module hooks do not see
    assert base.samples_per_pass(gm, 2, 10**6, backward=False) == base.FORWARD_ELEMENTS // largest
    assert base.samples_per_pass(gm, 2, 10**6, backward=True) < base.BACKWARD_ELEMENTS // total
    monkeypatch.setattr(base, "FORWARD_ELEMENTS", 5 * largest)
    assert base.samples_per_pass(gm, 2, 128, backward=False) == 5
    assert base.samples_per_pass(gm, 2, 3, backward=False) == 3
    monkeypatch.setattr(base, "FORWARD_ELEMENTS", 1)
    assert base.samples_per_pass(gm, 2, 128, backward=False) == 1
    assert math.prod(x.shape[1:]) <= largest

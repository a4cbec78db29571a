"""The reconstruct pass's streaming: paused forward passes, bounded batches and row slices.

Oracle: the closed-form ridge solution (numpy) on regression rows stacked from all samples at
once (explicit patches for convs), with each layer's input taken from the refit network and its
target from the dense one.  The streamed pass must reach it whatever its memory bounds are, and
the bound on kept forward passes must change the time only, never a bit of the fit.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import oamipc
from oamipc.passes import ReconstructPass
from oamipc.passes import reconstruct as rec_mod
from oamipc.plan import Plan
from oamipc.tracing import trace
from tests.test_reconstruct import _assert_conv_matches, _conv_oracle, _data, _io, _ridge_numpy


class _Residual(nn.Module):
    """stem -> ReLU (in place) -> [a -> ReLU (in place) -> b] + skip -> depthwise -> pool -> fc.

    The skip keeps two values alive between layers; the in-place ReLUs overwrite layer outputs,
    so a target must be read before the next node runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.relu0 = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(12, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu0(self.stem(x))
        h = h + self.b(self.relu1(self.a(h)))
        return self.fc(self.flatten(self.pool(self.relu2(self.dw(h)))))


def _plan_a(model: nn.Module, x: torch.Tensor) -> Plan:
    """Half of ``a``'s channels removed, every other group whole."""
    res = oamipc.compile(model, x[:1], importance="l1", prune_ratio=0.5, reconstruct=False)
    assert res.plan is not None
    plan = copy.deepcopy(res.plan)
    for g in plan.groups:
        if g.name != "a":
            g.kept = list(range(g.size))
    assert any(g.name == "a" and len(g.kept) < g.size for g in plan.groups)
    return plan


def _compile(monkeypatch: pytest.MonkeyPatch, bounds: dict[str, int], model: nn.Module, x: torch.Tensor,
             y: torch.Tensor, plan: Plan, **options: Any) -> oamipc.CompileResult:
    for name, value in bounds.items():
        monkeypatch.setattr(rec_mod, name, value)
    return oamipc.compile(model, x[:1], data=(x, y), plan=plan, reconstruct=ReconstructPass(**options))


# forward batches of 7 of the 40 samples (a's output, 12x9x9 values per sample, is the largest), rows in
# slices of a few samples
_SMALL = {"FORWARD_ELEMENTS": 12 * 81 * 7, "ROW_ELEMENTS": 2 * 81 * (12 * 9 + 1)}


@pytest.mark.parametrize("cache", [0, 20_000, 1 << 31], ids=["nothing-kept", "some-kept", "all-kept"])
def test_streamed_fit_equals_the_closed_form_on_stacked_rows(monkeypatch: pytest.MonkeyPatch, cache: int) -> None:
    torch.manual_seed(5)
    model = _Residual().eval()
    x, y = _data((2, 9, 9), 40)
    plan = _plan_a(model, x)
    ridge = 0.0  # least squares: every layer whose output changed is refit (ridge can lose to the old fc)
    res = _compile(monkeypatch, _SMALL | {"CACHE_BYTES": cache}, model, x, y, plan, ridge=ridge, samples=0,
                   max_rows=10**7)
    report = res.report["reconstruct"]
    assert report["forward_batch"] == 7
    refit = {layer["name"] for layer in report["layers"] if layer["refit"]}
    assert {"b", "dw", "fc"} <= refit and "a" not in refit  # a: its input and kept outputs are the dense ones
    for name in ("b", "dw"):
        x_in, _ = _io(res.module, name, x)  # the input after every earlier refit, all samples at once
        _, target = _io(model, name, x)
        conv = res.module.get_submodule(name)
        _assert_conv_matches(conv, _conv_oracle(conv, x_in, target, ridge, True), True)
    hidden, _ = _io(res.module, "fc", x)
    want = _ridge_numpy(hidden.double().numpy(), model(x).detach().double().numpy(), ridge)
    fc = res.module.get_submodule("fc")
    np.testing.assert_allclose(fc.weight.detach().double().numpy().T, want[:-1], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fc.bias.detach().double().numpy(), want[-1], rtol=2e-4, atol=2e-5)


def test_kept_passes_change_the_time_never_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights to the bit with no paused pass kept, some, or all; all kept: each network runs
    once per batch; none kept: once per batch and fitted layer."""
    torch.manual_seed(6)
    model = _Residual().eval()
    x, y = _data((2, 9, 9), 40)
    plan = _plan_a(model, x)
    runs = {}
    for cache in (0, 20_000, 1 << 31):
        res = _compile(monkeypatch, _SMALL | {"CACHE_BYTES": cache}, model, x, y, plan, samples=0, max_rows=500)
        runs[cache] = (res.module.state_dict(), res.report["reconstruct"])
    batches, layers = 6, 4  # ceil(40 / 7); a, b, dw, fc (the stem is the dense stem: no samples run for it)
    assert [f["name"] for f in runs[0][1]["layers"] if f["note"] == rec_mod.SAME_NOTE] == ["stem"]
    assert runs[1 << 31][1]["forward_passes"] == 2 * batches
    assert runs[0][1]["forward_passes"] == 2 * batches * layers
    assert 2 * batches < runs[20_000][1]["forward_passes"] < 2 * batches * layers
    for cache in (0, 20_000):
        for name, value in runs[1 << 31][0].items():
            assert torch.equal(runs[cache][0][name], value), (cache, name)


def test_row_slices_and_batches_do_not_change_the_drawn_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With positions drawn (max_rows below all of them), bounded batches and row slices still fit
    the same rows: the draws go in the same order, only the sums are grouped otherwise."""
    torch.manual_seed(7)
    model = _Residual().eval()
    x, y = _data((2, 9, 9), 40)
    plan = _plan_a(model, x)
    whole = _compile(monkeypatch, {}, model, x, y, plan, samples=0, max_rows=40 * 30)
    sliced = _compile(monkeypatch, {"ROW_ELEMENTS": 2 * 30 * (12 * 9 + 1)}, model, x, y, plan, samples=0,
                      max_rows=40 * 30)
    assert whole.report["reconstruct"]["forward_batch"] == sliced.report["reconstruct"]["forward_batch"] == 256
    for name, value in whole.module.state_dict().items():
        torch.testing.assert_close(sliced.module.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    rows = {layer["name"]: layer["rows"] for layer in whole.report["reconstruct"]["layers"]}
    assert rows["b"] == 40 * 30  # 30 of the 81 positions of every sample


def test_forward_batch_follows_the_largest_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Residual().eval()
    gm = trace(copy.deepcopy(model), (torch.zeros(1, 2, 9, 9),))
    largest = 12 * 9 * 9  # a's output, per sample
    monkeypatch.setattr(rec_mod, "FORWARD_ELEMENTS", largest * 5)
    assert rec_mod.forward_batch(gm, 256, 1) == 5
    assert rec_mod.forward_batch(gm, 3, 1) == 3  # never more than the batch size asked for
    gm2 = trace(copy.deepcopy(model), (torch.zeros(2, 2, 9, 9),))
    assert rec_mod.forward_batch(gm2, 256, 2) == 5  # per sample, whatever the example's batch
    monkeypatch.setattr(rec_mod, "FORWARD_ELEMENTS", largest - 1)
    assert rec_mod.forward_batch(gm, 256, 1) == 1  # at least one sample
    monkeypatch.undo()
    lenet = trace(oamipc.load_model("examples/fashion_lenet5.pt").eval(), (torch.zeros(1, 1, 28, 28),))
    assert rec_mod.forward_batch(lenet, 256, 1) == 256  # the shipped networks keep their batches

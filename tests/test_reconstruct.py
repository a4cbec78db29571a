"""The reconstruct pass: refit pruned layers to the dense network's layer outputs.

Oracles: the original network (nothing pruned: nothing changes), numpy's least squares and the
ridge closed form on explicitly built regression rows (a numpy patch extraction for convs, not
torch's unfold), the dense network's per-layer outputs on held-out data, and onnxruntime.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import oamipc
from oamipc.cli import app
from oamipc.errors import DataError, UsageError
from oamipc.export import export_onnx, verify_onnx
from oamipc.passes import ReconstructPass
from oamipc.passes.reconstruct import solve_ridge
from oamipc.pipeline import parse_pipeline
from oamipc.plan import Plan
from tests.models import ZOO, example_input

ROOT = Path(__file__).resolve().parent.parent


def _data(shape: tuple[int, ...], n: int = 256, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), torch.arange(n) % classes


def _only(plan: Plan, group: str) -> Plan:
    """``plan`` with every group but ``group`` kept whole."""
    out = copy.deepcopy(plan)
    for g in out.groups:
        if g.name != group:
            g.kept = list(range(g.size))
    assert any(len(g.kept) < g.size for g in out.groups), "the plan removes nothing from that group"
    return out


def _plan(model: nn.Module, x: torch.Tensor, group: str, ratio: float = 0.5) -> Plan:
    res = oamipc.compile(model, x[:1], importance="l1", prune_ratio=ratio, reconstruct=False)
    assert res.plan is not None
    return _only(res.plan, group)


def _io(net: nn.Module, target: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of submodule ``target`` when ``net`` runs on ``x``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        box["in"], box["out"] = args[0].detach(), out.detach()

    handle = net.get_submodule(target).register_forward_hook(hook)
    with torch.no_grad():
        net(x)
    handle.remove()
    return box["in"], box["out"]


def _ridge_numpy(a: np.ndarray, y: np.ndarray, ridge: float, intercept: bool = True) -> np.ndarray:
    """``argmin |[A 1] W - Y|^2 + lam |W_w|^2``, the closed form (lstsq when ``ridge == 0``)."""
    ones = np.ones((a.shape[0], 1)) if intercept else np.zeros((a.shape[0], 0))
    design = np.hstack([a, ones])
    if ridge == 0:
        return np.linalg.lstsq(design, y, rcond=None)[0]
    gram = design.T @ design
    n_w = a.shape[1]
    lam = ridge * np.mean(np.diag(gram)[:n_w])
    penalty = np.diag([1.0] * n_w + [0.0] * ones.shape[1])
    return np.linalg.solve(gram + lam * penalty, design.T @ y)


def _patches(x: np.ndarray, k: int, stride: int, padding: int | str, dilation: int, mode: str) -> np.ndarray:
    """Rows ``(N * positions, C, k, k)`` of a 2-D convolution's receptive fields, by explicit loops."""
    if padding == "same":
        total = dilation * (k - 1)
        pads = (total // 2, total - total // 2)
    else:
        pads = (int(padding), int(padding))
    np_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    xp = np.pad(x, ((0, 0), (0, 0), pads, pads), mode=np_mode)
    span = dilation * (k - 1) + 1
    h_out = (xp.shape[2] - span) // stride + 1
    w_out = (xp.shape[3] - span) // stride + 1
    rows = np.empty((x.shape[0], h_out, w_out, x.shape[1], k, k))
    for i in range(h_out):
        for j in range(w_out):
            rows[:, i, j] = xp[:, :, i * stride:i * stride + span:dilation, j * stride:j * stride + span:dilation]
    return rows.reshape(-1, x.shape[1], k, k)


# --------------------------------------------------------------------------------------------
# (a) nothing pruned: nothing changes
# --------------------------------------------------------------------------------------------


def test_nothing_pruned_leaves_the_network_unchanged() -> None:
    model = ZOO["lenet5"].factory()
    x, y = _data(ZOO["lenet5"].input_shape[1:], 64)
    res = oamipc.compile(model, x[:1], data=(x, y), pipeline="prune-units{prune-ratio=0.0},reconstruct")
    rec = res.report["reconstruct"]
    assert rec["layers_refit"] == 0
    assert all(layer["note"].startswith("reproduces the dense layer already") for layer in rec["layers"])
    assert rec["output_error_before"] == rec["output_error_after"] < 1e-6
    for name, value in model.state_dict().items():
        assert torch.equal(res.module.state_dict()[name], value), name


def test_exact_targets_are_recovered_by_the_solve() -> None:
    """When Y = X W + b exactly, the unregularised solve returns W and b (and ridge moves them little)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 7, generator=gen, dtype=torch.float64)
    w, b = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    design = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    y = x @ w + b
    exact = solve_ridge((design.T @ design)[None], (design.T @ y)[None], 0.0, True)[0]
    torch.testing.assert_close(exact, torch.cat([w, b[None]]), rtol=1e-9, atol=1e-9)
    near = solve_ridge((design.T @ design)[None], (design.T @ y)[None], 1e-6, True)[0]
    torch.testing.assert_close(near, torch.cat([w, b[None]]), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# (b) a Linear reader against numpy's closed forms
# --------------------------------------------------------------------------------------------


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_linear_reader_equals_the_numpy_closed_form(ridge: float) -> None:
    model = _TwoLayer().eval()
    x, y = _data((6,), 300)
    plan = _plan(model, x, "fc1")
    res = oamipc.compile(model, x[:1], data=(x, y), plan=plan, reconstruct=ReconstructPass(ridge=ridge, samples=0))
    rec = {layer["name"]: layer for layer in res.report["reconstruct"]["layers"]}
    assert not rec["fc1"]["refit"] and rec["fc2"]["refit"]  # fc1's input and kept outputs are the dense ones
    hidden, _ = _io(res.module, "fc2", x)
    target = model(x).detach()
    want = _ridge_numpy(hidden.double().numpy(), target.double().numpy(), ridge)
    fc2 = res.module.get_submodule("fc2")
    np.testing.assert_allclose(fc2.weight.detach().double().numpy().T, want[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fc2.bias.detach().double().numpy(), want[-1], rtol=1e-4, atol=1e-5)
    assert rec["fc2"]["rows"] == 300


# --------------------------------------------------------------------------------------------
# (c) convolutions against an explicit patch extraction
# --------------------------------------------------------------------------------------------


class _ConvChain(nn.Module):
    """conv1 (pruned) -> ReLU -> conv2 (the reader, geometry under test) -> [BN] -> ReLU -> conv3
    (grouped) -> ReLU -> global pool -> fc."""

    def __init__(self, stride: int, padding: int | str, dilation: int, mode: str, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode,
                               bias=not bn)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(self.flatten(self.pool(self.relu3(self.conv3(x)))))


def _conv_oracle(conv: nn.Conv2d, x_in: torch.Tensor, y: torch.Tensor, ridge: float,
                 intercept: bool) -> list[np.ndarray]:
    """Per group: the ridge solution on explicit patches of ``x_in`` for targets ``y``."""
    k, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
    rows = _patches(x_in.double().numpy(), k, stride, padding, dilation, conv.padding_mode)
    targets = y.double().numpy().transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    g = conv.groups
    cg, og = rows.shape[1] // g, targets.shape[1] // g
    return [_ridge_numpy(rows[:, i * cg:(i + 1) * cg].reshape(len(rows), -1), targets[:, i * og:(i + 1) * og],
                         ridge, intercept) for i in range(g)]


def _assert_conv_matches(conv: nn.Conv2d, solutions: list[np.ndarray], intercept: bool,
                         bias: np.ndarray | None = None) -> None:
    og = conv.out_channels // conv.groups
    weight = conv.weight.detach().double().numpy()
    for i, sol in enumerate(solutions):
        got = weight[i * og:(i + 1) * og].reshape(og, -1).T
        np.testing.assert_allclose(got, sol[:-1] if intercept else sol, rtol=2e-4, atol=2e-5)
        if intercept:
            have = (conv.bias.detach().double().numpy() if bias is None else bias)[i * og:(i + 1) * og]
            np.testing.assert_allclose(have, sol[-1], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(("stride", "padding", "dilation", "mode"), [
    (2, 1, 1, "zeros"), (1, 2, 2, "zeros"), (1, "same", 1, "reflect"), (2, 1, 1, "circular"), (1, 0, 1, "replicate"),
], ids=["stride2", "dilation2", "same-reflect", "circular", "valid-replicate"])
def test_conv_reader_equals_explicit_patches_and_solve(stride: int, padding: int | str, dilation: int,
                                                       mode: str) -> None:
    torch.manual_seed(3)
    model = _ConvChain(stride, padding, dilation, mode, bn=False).eval()
    x, y = _data((2, 9, 9), 40)
    plan = _plan(model, x, "conv1")
    ridge = 1e-3
    res = oamipc.compile(model, x[:1], data=(x, y), plan=plan,
                         reconstruct=ReconstructPass(ridge=ridge, samples=0, max_rows=10**7))
    refit = {layer["name"] for layer in res.report["reconstruct"]["layers"] if layer["refit"]}
    assert {"conv2", "conv3", "fc"} <= refit
    for name in ("conv2", "conv3"):  # conv3: a grouped conv downstream, fit per group on the refit conv2's output
        x_in, _ = _io(res.module, name, x)
        _, target = _io(model, name, x)
        conv = res.module.get_submodule(name)
        _assert_conv_matches(conv, _conv_oracle(conv, x_in, target, ridge, True), True)


def test_conv_without_bias_puts_the_intercept_into_its_batchnorm() -> None:
    torch.manual_seed(4)
    model = _ConvChain(1, 1, 1, "zeros", bn=True).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = _data((2, 9, 9), 40)
    plan = _plan(model, x, "conv1")
    res = oamipc.compile(model, x[:1], data=(x, y), plan=plan,
                         reconstruct=ReconstructPass(ridge=1e-3, samples=0, max_rows=10**7))
    conv = res.module.get_submodule("conv2")
    assert conv.bias is None  # no parameter added
    x_in, _ = _io(res.module, "conv2", x)
    _, target = _io(model, "conv2", x)
    shift = (model.bn.running_mean - res.module.get_submodule("bn").running_mean).double().numpy()
    _assert_conv_matches(conv, _conv_oracle(conv, x_in, target, 1e-3, True), True, bias=shift)


class _Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 6, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # depthwise, two outputs per channel
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.relu0(self.conv0(x))))
        return self.fc(self.flatten(self.pool(self.relu2(self.dw(x)))))


def test_depthwise_conv_is_fit_per_channel() -> None:
    """conv0 and conv1 lose channels; the depthwise conv shrinks with conv1 and reads its refit output."""
    torch.manual_seed(5)
    model = _Depthwise().eval()
    x, y = _data((2, 7, 7), 40)
    plan = oamipc.compile(model, x[:1], importance="l1", prune_ratio=0.5, reconstruct=False).plan
    assert plan is not None
    res = oamipc.compile(model, x[:1], data=(x, y), plan=plan,
                         reconstruct=ReconstructPass(ridge=1e-3, samples=0, max_rows=10**7))
    assert {"conv1", "dw", "fc"} <= {layer["name"] for layer in res.report["reconstruct"]["layers"] if layer["refit"]}
    dw = res.module.get_submodule("dw")
    assert dw.groups == dw.in_channels == 3
    # The depthwise outputs of a kept input channel c are 2c and 2c + 1.
    kept_channels = next(g.kept for g in plan.groups if g.name == "conv1")
    kept_out = [2 * c + m for c in sorted(kept_channels) for m in (0, 1)]
    x_in, _ = _io(res.module, "dw", x)
    _, target = _io(model, "dw", x)
    solutions = _conv_oracle(dw, x_in, target[:, kept_out], 1e-3, True)
    assert len(solutions) == 3 and all(s.shape == (10, 2) for s in solutions)  # a 3x3 window + intercept, 2 outputs
    _assert_conv_matches(dw, solutions, True)


# --------------------------------------------------------------------------------------------
# (d) a trained example: lower per-layer error on held-out data, and the ONNX file matches
# --------------------------------------------------------------------------------------------


def _layer_errors(pruned: nn.Module, dense: nn.Module, x: torch.Tensor, kept: dict[str, list[int]]) -> dict[str, float]:
    """Relative error of every Linear/Conv layer's output against the dense layer's kept channels."""
    out = {}
    for name, mod in pruned.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            _, got = _io(pruned, name, x)
            _, want = _io(dense, name, x)
            want = want[:, kept[name]] if name in kept else want
            out[name] = float((got - want).norm() / want.norm())
    return out


def test_trained_example_errors_fall_on_held_out_data_and_onnx_matches(tmp_path: Path) -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_cnn.pt")
    data = oamipc.load_data("digits")
    example = torch.zeros(1, 1, 8, 8)
    plain = oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.3, reconstruct=False)
    rebuilt = oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.3)
    assert rebuilt.report["settings"]["reconstruct"] and rebuilt.plan == plain.plan  # on by default with data
    rec = rebuilt.report["reconstruct"]
    assert rec["samples"] == len(data.train.x) and rec["source"] == "train"
    refit = [layer["name"] for layer in rec["layers"] if layer["refit"]]
    assert refit
    kept = {g.name: g.kept for g in plain.plan.groups}  # each group is one layer's output channels here
    assert set(kept) == {"conv1", "conv2", "fc1", "fc2"}
    test_x = data.test.x
    before = _layer_errors(plain.module, plain.original, test_x, kept)
    after = _layer_errors(rebuilt.module, rebuilt.original, test_x, kept)
    for name in refit:
        assert after[name] < before[name], (name, before[name], after[name])
    assert rebuilt.report["accuracy"]["after"] > plain.report["accuracy"]["after"]
    path = export_onnx(rebuilt.module, (example,), tmp_path / "rebuilt.onnx")
    assert verify_onnx(path, rebuilt.module, test_x[:64]).passed


def test_zoo_models_reconstruct_and_still_export(tmp_path: Path) -> None:
    """Residual adds, concatenation, depthwise/grouped convs, norms, Conv1d: refit, error down, ONNX agrees."""
    for name, entry in ZOO.items():
        x = example_input(name, 64)
        y = torch.arange(64) % entry.num_classes
        res = oamipc.compile(entry.factory(), x[:1], data=(x, y), importance="l1", prune_ratio=0.5,
                             reconstruct=ReconstructPass(samples=0, max_rows=4000))
        rec = res.report["reconstruct"]
        assert rec["layers_refit"] > 0, name
        assert rec["output_error_after"] < rec["output_error_before"], name
        path = export_onnx(res.module, (x[:1],), tmp_path / f"{name}.onnx")
        assert verify_onnx(path, res.module, x[:8]).passed, name


def test_two_prune_passes_compose_the_kept_channels() -> None:
    model = ZOO["vgg_bn"].factory()
    x, y = _data(ZOO["vgg_bn"].input_shape[1:], 64)
    pipeline = "prune-units{importance=l1,prune-ratio=0.3},prune-units{importance=l1,prune-ratio=0.3},reconstruct"
    res = oamipc.compile(model, x[:1], data=(x, y), pipeline=pipeline)
    layers = {layer["name"]: layer for layer in res.report["reconstruct"]["layers"]}
    # The first conv reads the unchanged input: with the right (composed) channel map its kept outputs
    # are exactly the dense ones; a wrong map would show a large error here.
    assert layers["conv1"]["error_before"] < 1e-6 and not layers["conv1"]["refit"]
    assert res.report["reconstruct"]["output_error_after"] < res.report["reconstruct"]["output_error_before"]


# --------------------------------------------------------------------------------------------
# (e) determinism, plan replay
# --------------------------------------------------------------------------------------------


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_deterministic_and_replayed_plans_give_the_same_network(tmp_path: Path) -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_cnn.pt")
    data = oamipc.load_data("digits")
    example = torch.zeros(1, 1, 8, 8)
    options = ReconstructPass(samples=600, max_rows=2000)  # drawn samples and drawn positions
    first = oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.4, reconstruct=options, seed=3)
    second = oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.4, reconstruct=options, seed=3)
    assert first.plan is not None
    first.plan.save(tmp_path / "plan.json")
    replay = oamipc.compile(model, example, data=data, plan=Plan.load(tmp_path / "plan.json"), reconstruct=options,
                            seed=3)
    a, b, c = _weights(first.module), _weights(second.module), _weights(replay.module)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    assert first.report["reconstruct"]["layers"] == second.report["reconstruct"]["layers"]
    other = oamipc.compile(model, example, data=data, importance="l1", flops_budget=0.4, reconstruct=options, seed=4)
    assert any(not torch.equal(a[k], v) for k, v in _weights(other.module).items())  # the seed draws the samples


@pytest.mark.parametrize("name", ["lenet5", "vgg_bn", "resnet", "inception", "conv1d"])
def test_paused_passes_kept_or_rerun_give_the_same_network(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each batch's forward passes are paused at a layer and resumed for the next one while they fit in
    # CACHE_BYTES; rerun from the input (no room) they must give the same values, so the same weights and report.
    from oamipc.passes import reconstruct as rc

    entry = ZOO[name]
    x = example_input(name, 96)
    y = torch.arange(96) % entry.num_classes
    options = ReconstructPass(samples=0, max_rows=3000, batch_size=40)  # three batches, the last short

    def run() -> oamipc.CompileResult:
        return oamipc.compile(entry.factory(), x[:1], data=(x, y), importance="l1", prune_ratio=0.5,
                              reconstruct=options)

    kept = run()
    monkeypatch.setattr(rc, "CACHE_BYTES", 0)
    rerun = run()
    a, b = _weights(kept.module), _weights(rerun.module)
    assert kept.report["reconstruct"]["layers_refit"] > 0
    assert kept.report["reconstruct"]["forward_passes"] == 2 * 3 < rerun.report["reconstruct"]["forward_passes"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert kept.report["reconstruct"]["layers"] == rerun.report["reconstruct"]["layers"]


# --------------------------------------------------------------------------------------------
# (f) bad options and missing data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"ridge": -1.0}, "ridge must be a finite number >= 0"),
    ({"ridge": float("nan")}, "ridge must be a finite number >= 0"),
    ({"samples": -5}, "samples must be an integer >= 0"),
    ({"layers": "some"}, "layers must be one of all, readers"),
    ({"max_rows": 0}, "max-rows must be a positive integer"),
    ({"batch_size": 0}, "batch-size must be a positive integer"),
])
def test_bad_options_are_refused_with_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ReconstructPass(**options)


def test_bad_pipeline_options_name_the_pass() -> None:
    with pytest.raises(UsageError, match="pass 'reconstruct'.*ridge must be"):
        parse_pipeline("prune-units{prune-ratio=0.5},reconstruct{ridge=-1}")
    with pytest.raises(UsageError, match="has no option 'lambda'"):
        parse_pipeline("reconstruct{lambda=1}")
    (step,) = parse_pipeline("reconstruct{ridge=0.01,samples=100,layers=readers}")
    assert step == ReconstructPass(ridge=0.01, samples=100, layers="readers")


def test_reconstruct_needs_data_and_no_pipeline() -> None:
    model = _TwoLayer().eval()
    x, y = _data((6,), 50)
    with pytest.raises(UsageError, match="give --data"):
        oamipc.compile(model, x[:1], prune_ratio=0.5, reconstruct=True)
    with pytest.raises(UsageError, match="name the reconstruct pass in it"):
        oamipc.compile(model, x[:1], data=(x, y), pipeline="prune-units{prune-ratio=0.5}", reconstruct=True)
    with pytest.raises(DataError, match="needs sample inputs"):
        oamipc.compile(model, x[:1], pipeline="prune-units{prune-ratio=0.5},reconstruct")
    without = oamipc.compile(model, x[:1], prune_ratio=0.5)  # auto: off without data
    assert "reconstruct" not in without.report and not without.report["settings"]["reconstruct"]


def test_cli_flag_and_summary_row(tmp_path: Path) -> None:
    model = ROOT / "examples" / "digits_mlp.pt"
    runner = CliRunner()
    bad = runner.invoke(app, ["compile", str(model), "--input-shape", "1,1,8,8", "--prune-ratio", "0.5",
                              "--reconstruct", "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "give --data" in bad.output
    assert not (tmp_path / "x.onnx").exists()
    ok = runner.invoke(app, ["compile", str(model), "--data", "digits", "--importance", "l1", "--flops-budget",
                             "0.3", "--no-bench", "--reconstruct-samples", "500", "-o", str(tmp_path / "y.onnx"),
                             "--report", str(tmp_path / "r.json")], terminal_width=160)
    assert ok.exit_code == 0, ok.output
    assert "output error, reconstructed" in ok.output and "before and after refitting" in ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reconstruct"]["samples"] == 500 and report["reconstruct"]["layers_refit"] > 0
    off = runner.invoke(app, ["compile", str(model), "--data", "digits", "--importance", "l1", "--flops-budget",
                              "0.3", "--no-bench", "--no-reconstruct", "-o", str(tmp_path / "z.onnx"),
                              "--report", str(tmp_path / "s.json")], terminal_width=160)
    assert off.exit_code == 0, off.output
    assert "reconstruct" not in json.loads((tmp_path / "s.json").read_text())


def test_default_samples_follow_the_work_rule() -> None:
    from oamipc.passes.reconstruct import AUTO_WORK_MACS, auto_samples

    assert auto_samples(1_000, 4) == 4096  # small nets: the default
    assert auto_samples(AUTO_WORK_MACS // 600, 1) == 600  # the MACs of forward passes bound the samples
    assert auto_samples(AUTO_WORK_MACS // 1200, 2) == 600
    assert auto_samples(1e12, 3) == 512  # and never fewer than 512
    model = _TwoLayer().eval()
    x, y = _data((6,), 5000)
    res = oamipc.compile(model, x[:1], data=(x, y), importance="l1", prune_ratio=0.5)
    assert res.report["reconstruct"]["samples"] == 4096 and res.report["reconstruct"]["samples_option"] == "auto"


def test_a_layer_plainly_equal_to_the_dense_one_is_left_without_a_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first conv (input through parameter-free nodes, the dense kept rows of weights) is left as it
    is without running samples through it; the network is bit for bit the one the measured check gives."""
    from oamipc.passes import reconstruct

    model = ZOO["lenet5"].factory()
    x, y = _data(ZOO["lenet5"].input_shape[1:], 64)
    pipeline = "prune-units{importance=l1,prune-ratio=0.5},reconstruct{samples=0}"
    quick = oamipc.compile(model, x[:1], data=(x, y), pipeline=pipeline)
    monkeypatch.setattr(reconstruct, "_same_as_dense", lambda *a: False)
    measured = oamipc.compile(model, x[:1], data=(x, y), pipeline=pipeline)
    first = {layer["name"]: layer for layer in quick.report["reconstruct"]["layers"]}
    checked = {layer["name"]: layer for layer in measured.report["reconstruct"]["layers"]}
    same = [name for name, layer in first.items() if layer["note"] == reconstruct.SAME_NOTE]
    assert same and all(first[n]["rows"] == 0 and checked[n]["rows"] > 0 for n in same)
    assert all(not checked[n]["refit"] and checked[n]["error_before"] <= reconstruct.MATCH_TOL for n in same)
    assert quick.report["reconstruct"]["layers_refit"] == measured.report["reconstruct"]["layers_refit"] > 0
    for name, value in measured.module.state_dict().items():
        assert torch.equal(quick.module.state_dict()[name], value), name

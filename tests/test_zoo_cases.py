"""Architectures from outside this project that once failed (issue 14), each compiled, exported and verified.

| case                                              | outcome                                               |
| ------------------------------------------------- | ----------------------------------------------------- |
| ``torch.cat`` of two branches into a residual add | every cat input keeps a unit; compiles at ratio 0.75  |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oamipc
from oamipc.driver import FileJob, ModelSource, compile_file
from oamipc.export import export_onnx, verify_onnx


class CatIntoResidual(nn.Module):
    """Branches of 4 and 2 channels, concatenated and added to a 6-channel skip conv.

    The branch of 2 channels has small weights, so magnitude ranks all of its units last: a plan
    that keeps 2 of the 6 coupled channels by score alone keeps none of that branch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.skip = nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, 10)
        with torch.no_grad():
            self.b.weight.mul_(0.01)
            self.skip.weight[4:].mul_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1) + self.skip(x)
        return self.head(F.relu(y).mean((2, 3)))


def _data(tmp_path: Path, shape: tuple[int, ...], n: int = 64, classes: int = 10) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, x_test=x[: n // 2], y_test=y[: n // 2])
    return str(path)


@pytest.mark.parametrize("target", [{"prune_ratio": 0.75}, {"flops_budget": 0.4}], ids=["ratio", "budget"])
def test_cat_into_residual_keeps_a_unit_of_every_branch(target: dict[str, float], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CatIntoResidual().eval()
    x = torch.randn(8, 3, 8, 8)
    res = oamipc.compile(model, (x[:1],), importance="l1", **target)
    widths = {name: m.out_channels for name, m in res.module.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["a"] >= 1 and widths["b"] >= 1, widths
    assert widths["a"] + widths["b"] == widths["skip"] < 6, widths
    # The oracle: the original with the removed channels of all three convs zeroed.
    ref = CatIntoResidual().eval()
    ref.load_state_dict(model.state_dict())
    group = next(g for g in res.plan.to_dict()["groups"] if g["key"] == "a+b+skip")
    dropped = sorted(set(range(6)) - set(group["kept"]))
    with torch.no_grad():
        for c in dropped:
            conv, ch = (ref.a, c) if c < 4 else (ref.b, c - 4)
            for mod, k in ((conv, ch), (ref.skip, c)):
                mod.weight[k] = 0.0
                mod.bias[k] = 0.0
        torch.testing.assert_close(res.module(x), ref(x), rtol=1e-5, atol=1e-6)
    path = export_onnx(res.module, res.example_inputs, tmp_path / "pruned.onnx")
    assert verify_onnx(path, res.module, (x,)).passed


def test_cat_into_residual_compiles_from_a_file(tmp_path: Path) -> None:
    """The case of the issue end to end: state dict, ``--prune-ratio 0.75``, exported and verified."""
    torch.manual_seed(0)
    torch.save(CatIntoResidual().state_dict(), tmp_path / "model.pt")
    source = ModelSource(str(tmp_path / "model.pt"), model_class="tests.test_zoo_cases:CatIntoResidual",
                         input_shape=(1, 3, 8, 8))
    report = compile_file(FileJob(source, str(tmp_path / "pruned.onnx"), bench=False),
                          importance="l1", prune_ratio=0.75)
    assert report["onnx"]["passed"]
    assert report["after"]["macs"] < report["before"]["macs"]


class NarrowVgg11Bn(nn.Module):
    """VGG-11-BN's layout (8 convs with BatchNorm, 5 max-pools, adaptive average pooling to 7x7,
    two-layer classifier) at an eighth of its widths, for a 96x96 input: the pooling maps 3x3 to
    7x7, which the TorchScript exporter cannot export."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in (8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(64 * 49, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def test_vgg_at_96_falls_back_to_the_dynamo_exporter(tmp_path: Path) -> None:
    """The TorchScript exporter refuses adaptive_avg_pool2d 3x3 -> 7x7; dynamo writes the file, which
    is verified against the pruned module, and the report says which exporter wrote it and why."""
    torch.manual_seed(0)
    torch.save(NarrowVgg11Bn().state_dict(), tmp_path / "model.pt")
    source = ModelSource(str(tmp_path / "model.pt"), model_class="tests.test_zoo_cases:NarrowVgg11Bn",
                         input_shape=(1, 3, 96, 96))
    report = compile_file(FileJob(source, str(tmp_path / "pruned.onnx"), bench=False),
                          importance="l1", prune_ratio=0.5)
    onnx = report["onnx"]
    assert onnx["passed"] and onnx["exporter"] == "dynamo", onnx
    (failed,) = onnx["exporters_failed"]
    assert failed["exporter"] == "torchscript" and "adaptive_avg_pool2d" in failed["error"], failed
    assert (tmp_path / "pruned.onnx").is_file()


class EncoderBehindLinear(nn.Module):
    """torch's own ``nn.TransformerEncoder`` (2 layers, 4 heads, FFN 256) behind a Linear.  The tests
    keep the encoder opaque with ``--leaf-module enc`` (it is traced through otherwise, see
    ``tests/test_attention.py``), so nothing in the network can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 48)
        self.fc2 = nn.Linear(48, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class WithLeafAndLstm(nn.Module):
    """A small MLP block kept opaque by name, and an LSTM (whose ops torch's flop counter does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.mid = nn.Linear(12, 12)
        self.block = Block()
        self.rnn = nn.LSTM(12, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.block(self.mid(torch.relu(self.inp(x)))))
        return self.head(h[:, -1])


def _encoder_macs(seq: int, width: int, ffn: int, layers: int) -> tuple[int, int]:
    """Closed form: the encoder's projections and FFN per sample, and the attention products
    (Q K^T and A V), which torch's flop counter may leave out of a fused attention kernel."""
    linear = seq * width * (3 * width + width + 2 * ffn)
    products = 2 * seq * seq * width
    return layers * linear, layers * products


def test_encoder_behind_linear_says_nothing_was_removed_and_counts_the_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(EncoderBehindLinear().state_dict(), tmp_path / "model.pt")
    source = ModelSource(str(tmp_path / "model.pt"), model_class="tests.test_zoo_cases:EncoderBehindLinear",
                         input_shape=(1, 8, 16), leaf_modules=("enc",))
    report = compile_file(FileJob(source, str(tmp_path / "pruned.onnx"), bench=False),
                          importance="l1", prune_ratio=0.5)
    assert report["onnx"]["passed"]
    before = report["before"]
    (enc,) = before["opaque"]
    assert enc["name"] == "enc" and enc["type"] == "TransformerEncoder"
    assert enc["params"] == sum(p.numel() for p in EncoderBehindLinear().enc.parameters())
    linear, products = _encoder_macs(8, 64, 256, 2)
    assert linear <= enc["macs"] <= linear + products, enc
    assert before["macs"] == 8 * 16 * 64 + 64 * 10  # the two Linear layers the unit analysis sees
    assert before["macs_total"] == before["macs"] + enc["macs"]
    notes = report["notices"]
    assert any("% of the MACs" in n and "enc (TransformerEncoder" in n for n in notes), notes
    assert any(n.startswith("nothing was removed") for n in notes), notes


def test_leaf_module_is_counted_and_uncountable_macs_are_unknown(tmp_path: Path) -> None:
    model = WithLeafAndLstm().eval()
    res = oamipc.compile(model, (torch.randn(1, 5, 6),), importance="l1", prune_ratio=0.5, leaf_modules=("block",))
    opaque = {m["name"]: m for m in res.report["before"]["opaque"]}
    assert opaque["block"]["macs"] == 5 * (12 * 48 + 48 * 12) and "--leaf-module" in opaque["block"]["why"]
    assert opaque["rnn"]["macs"] is None and opaque["rnn"]["macs_note"], opaque["rnn"]
    assert res.report["before"]["opaque_macs_unknown"] == ["rnn"]
    assert any("rnn (LSTM" in n and "unknown" in n for n in res.report["notices"]), res.report["notices"]
    assert not any(n.startswith("nothing was removed") for n in res.report["notices"])  # inp was pruned
    path = export_onnx(res.module, res.example_inputs, tmp_path / "pruned.onnx")
    assert verify_onnx(path, res.module, (torch.randn(4, 5, 6),)).passed


def test_inspect_shows_the_opaque_modules(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oamipc.cli import app

    torch.save(EncoderBehindLinear().state_dict(), tmp_path / "model.pt")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "model.pt"), "--model-class",
                                      "tests.test_zoo_cases:EncoderBehindLinear", "--input-shape", "1,8,16",
                                      "--leaf-module", "enc"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "opaque modules" in result.output and "TransformerEncoder" in result.output
    assert "no unit can be removed" in result.output and "% of the MACs" in result.output


class NormsMlp(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear -> GroupNorm(4) -> ReLU -> Linear: ops the MILP's exact
    encoding does not cover, on units that can be removed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.ln = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 16)
        self.gn = nn.GroupNorm(4, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.ln(self.fc1(x)))
        return self.fc3(torch.relu(self.gn(self.fc2(h))))


def test_mip_runs_the_stages_that_need_no_encoding(tmp_path: Path) -> None:
    """``--importance mip`` on LayerNorm/GroupNorm/GELU: the layer sub-problem the encoding cannot
    build is skipped with the reason, the joint stage (measured flip effects) runs, the report says
    which stages ran, and the plan keeps the budget, exports and verifies."""
    torch.manual_seed(0)
    model = NormsMlp().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(240, 64, generator=gen)
    y = model(x).argmax(1)  # labels the network gets right: margins to keep
    res = oamipc.compile(model, (x[:1],), data=(x, y), importance="mip", flops_budget=0.6, calib_samples=160,
                         reconstruct=False, mip_options={"total_time_limit": 30, "samples": 32})
    stages = res.report["mip"]["stages"]
    assert stages["layer_subproblems_without_encoding"] and "cannot handle" in stages["no_encoding_reason"]
    assert stages["joint_rounds"] >= 1, stages
    assert res.report["after"]["macs"] <= 0.6 * res.report["before"]["macs"]
    assert res.report["mip"]["fallback"] is None
    path = export_onnx(res.module, res.example_inputs, tmp_path / "pruned.onnx")
    assert verify_onnx(path, res.module, (x[:32],)).passed

"""The shipped architectures of :mod:`oamipc.models` used by the examples and benchmarks.

Each prunes end to end under a MAC budget on both input sizes it is meant for (1x28x28 and
3x32x32): the pruned module keeps the output shape, stays within the budget, and its ONNX export
computes what torch computes.  The trained sequence model (``examples/digits_seq.pt``, torch's own
``nn.TransformerEncoder``) loses whole heads and FFN units at half its MACs and still classifies.
The residual net's stream channels couple across blocks, so its groups span several convolutions
(checked through the plan's widths).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import oamipc
from oamipc.data import accuracy, load_data
from oamipc.export import export_onnx, verify_onnx
from oamipc.models import DigitsSeq, LeNet5, PaperMLP, SmallResNet, SmallVGG


def _make(name: str, channels: int, size: int = 28) -> nn.Module:
    torch.manual_seed(0)
    if name == "vgg":
        return SmallVGG(in_channels=channels, image_size=size).eval()
    if name == "resnet":
        return SmallResNet(in_channels=channels).eval()
    if name == "lenet5":
        return LeNet5(in_channels=channels).eval()
    return PaperMLP(hidden=PaperMLP.FC4, in_features=channels * 28 * 28).eval()


CASES = [("vgg", (1, 28, 28)), ("vgg", (3, 32, 32)), ("resnet", (1, 28, 28)), ("resnet", (3, 32, 32)),
         ("lenet5", (1, 28, 28)), ("mlp4", (1, 28, 28))]  # LeNet-5 and the MLP are built for 28x28


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{s[1]}" for n, s in CASES])
def test_prunes_under_a_budget_and_exports(name: str, shape: tuple[int, int, int], tmp_path: Path) -> None:
    model = _make(name, shape[0], shape[1])
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_out = model(x)
    assert dense_out.shape == (4, 10)
    result = oamipc.compile(model, x[:1], importance="l1", flops_budget=0.4)
    rep = result.report
    assert rep["after"]["macs"] <= 0.4 * rep["before"]["macs"]
    assert rep["after"]["params"] < rep["before"]["params"]
    assert any(w["after"] < w["before"] for w in rep["widths"].values())
    with torch.no_grad():
        assert result.module(x).shape == (4, 10)
    path = tmp_path / f"{name}.onnx"
    export_onnx(result.module, x[:1], path)
    check = verify_onnx(path, result.module, x)
    assert check.passed and check.max_abs_err < 1e-4


def test_resnet_couples_the_residual_stream() -> None:
    """The stem and every block's second conv of a stage share one width after pruning."""
    model = _make("resnet", 1)
    x = torch.randn(1, 1, 28, 28)
    result = oamipc.compile(model, x, importance="l1", prune_ratio=0.5)
    convs = {name: m.out_channels for name, m in result.module.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs, "no convolutions"
    assert min(convs.values()) < 64 and max(convs.values()) <= 64


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_digits_seq_loses_heads_and_ffn_units_at_half_the_macs(tmp_path: Path) -> None:
    """The shipped DigitsSeq at a 0.5 MAC budget (l1): its encoder is traced through, whole heads
    (q/k/v rows in multiples of the head size) and FFN units go, and the ONNX file computes what
    the pruned module computes; its test accuracy stays far above chance (94.62% in RESULTS)."""
    model = oamipc.load_model(EXAMPLES / "digits_seq.pt").eval()
    assert isinstance(model, DigitsSeq)
    data = load_data("digits")
    result = oamipc.compile(model, data.test.x[:1], data=data, importance="l1", flops_budget=0.5)
    rep = result.report
    assert rep["after"]["macs"] <= 0.5 * rep["before"]["macs"]
    layers = [f"encoder.layers.{i}" for i in range(len(model.encoder.layers))]
    q_rows = [result.module.get_submodule(f"{p}.self_attn.q_proj").out_features for p in layers]
    ffn = [result.module.get_submodule(f"{p}.linear1").out_features for p in layers]
    assert all(r % 8 == 0 for r in q_rows) and sum(q_rows) < 32 * len(layers), q_rows
    assert sum(ffn) < 64 * len(layers), ffn
    assert accuracy(result.module, data.test) > 0.85
    path = tmp_path / "digits_seq.onnx"
    export_onnx(result.module, data.test.x[:1], path)
    check = verify_onnx(path, result.module, data.test.x[:64])
    assert check.passed and check.max_abs_err < 1e-4

"""ResNet18 and MobileNetV2 of oamipc.models: the standard shapes, seeded, traceable and prunable.

These two networks are what ``benchmarks/latency.py`` measures at 224x224; the tests here run
them at 64x64 (the adaptive pool makes the head independent of the resolution) to stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx, nn

import oamipc
from oamipc import passes
from oamipc.hardware import cpu_channel_block
from oamipc.models import MobileNetV2, ResNet18, ResNet50
from oamipc.tracing import trace

ARCHS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}
SIDE = 64  # input side in the tests; 224 is the networks' design size


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    return {name: cls(num_classes=10).eval() for name, cls in ARCHS.items()}


def _x(batch: int = 2, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("cls", "params", "macs"), [
    # The published sizes of the standard networks (1000 classes, 224x224, MACs of conv and linear layers).
    (ResNet18, 11_689_512, 1_814_073_344),
    (MobileNetV2, 3_504_872, 300_774_272),
    (ResNet50, 25_557_032, 4_089_184_256),
])
def test_standard_size_at_224(cls: type[nn.Module], params: int, macs: int) -> None:
    model = cls()
    assert sum(p.numel() for p in model.parameters()) == params
    costs = passes.count_costs(trace(model.eval(), (torch.zeros(1, 3, 224, 224),)))
    assert int(costs.params) == params
    assert int(costs.macs) == macs


def test_layer_structure() -> None:
    resnet = ResNet18()
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem + 8 blocks x 2 + 3 projections
    assert resnet.stem[0].kernel_size == (7, 7) and resnet.stem[0].stride == (2, 2)
    assert isinstance(resnet.stem[3], nn.MaxPool2d)
    assert [resnet.layer1[0].body[0].out_channels, resnet.layer4[1].body[3].out_channels] == [64, 512]
    mobile = MobileNetV2()
    assert len(mobile.blocks) == sum(n for _, _, n, _ in MobileNetV2.SETTINGS) == 17
    depthwise = [m for m in mobile.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(isinstance(m, nn.ReLU6) for m in mobile.modules()) == 1 + 16 * 2 + 1 + 1
    assert sum(b.residual for b in mobile.blocks) == 10
    assert mobile.head[0].out_channels == 1280 and isinstance(mobile.classifier[0], nn.Dropout)
    assert ResNet18(num_classes=7, in_channels=1).eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 7)
    r50 = ResNet50()
    convs = [m for m in r50.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 * 3 + 4  # stem + 16 bottlenecks x 3 + 4 projections
    assert [r50.layer1[0].body[6].out_channels, r50.layer4[2].body[3].stride] == [256, (1, 1)]
    assert r50.layer2[0].body[3].stride == (2, 2) and r50.fc.in_features == 2048


@pytest.mark.parametrize("cls", list(ARCHS.values()), ids=list(ARCHS))
def test_seeded_without_touching_the_global_rng(cls: type[nn.Module]) -> None:
    state = torch.random.get_rng_state()
    a, b, c = cls(num_classes=10), cls(num_classes=10), cls(num_classes=10, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    floats = [k for k, v in sa.items() if v.is_floating_point()]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in floats)
    # Batch norms are not the identity: scales, shifts and running statistics differ per channel.
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(float(m.running_var.std()) > 0.1 and float(m.running_mean.abs().max()) > 0.1 for m in bns)
    assert all(float(m.weight.detach().std()) > 0.05 for m in bns)


@pytest.mark.parametrize("name", list(ARCHS))
def test_traces_with_fx(nets: dict[str, nn.Module], name: str) -> None:
    model = nets[name]
    gm = fx.symbolic_trace(model)
    x = _x(3)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
    assert expected.shape == (3, 10) and torch.isfinite(expected).all()
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the samples are told apart


@pytest.mark.parametrize("round_to", [1, "auto"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_prunes_exports_and_matches_torch(nets: dict[str, nn.Module], name: str, round_to: int | str,
                                          tmp_path: Path) -> None:
    # Under "auto" a ratio is not rounded (it fixes every count itself): rounding is for budgets.
    how = {"prune_ratio": 0.5} if round_to == 1 else {"flops_budget": 0.5}
    result = oamipc.compile(nets[name], _x(1), importance="l1", round_to=round_to, **how)
    report = result.report
    assert report["after"]["macs"] <= 0.5 * report["before"]["macs"] * (1 + 1e-9)
    widths = report["widths"]
    assert any(w["after"] < w["before"] for w in widths.values())
    assert widths[next(reversed(widths))]["after"] == 10  # the classifier's outputs are never pruned
    if round_to == "auto":  # every group a convolution reads keeps the multiple its kernels need
        from oamipc.passes import UnitGroupAnalysis
        from oamipc.passmanager import AnalysisManager, CompileContext
        from oamipc.target import granularity

        graph = AnalysisManager(CompileContext(result.example_inputs)).get(UnitGroupAnalysis(), result.original)
        steps = granularity(oamipc.Target(flops_budget=0.5), graph)
        kept = result.plan.kept_mask(graph)
        for g in graph.groups:
            count = int(kept[g.units].sum())
            assert count == g.size or count % steps[g.id] == 0, (g.name, count, steps[g.id])
        assert max(steps.values()) == cpu_channel_block()
    path = oamipc.export_onnx(result.module, result.example_inputs, tmp_path / f"{name}.onnx")
    check = oamipc.verify_onnx(path, result.module, result.example_inputs)
    assert check.passed, check
    x = _x(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(result.original(x), nets[name](x), rtol=0.0, atol=0.0)

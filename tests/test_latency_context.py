"""Layers timed in context: the profile's attribution, the variants' design, the curves' fit, plans.

Timings are measured, never compared: the oracles are onnxruntime's own profile (its total
kernel time), closed-form curves, and the plans' widths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

import oamipc
from oamipc.export import export_onnx
from oamipc.latency import LayerSignature, MeasureSetup, context_key
from oamipc.latency_context import REST, kernel_total_ms, match_layers, open_profiled, parse_profile
from oamipc.passes.latency_model import colorings, fit_curve, layer_ops
from oamipc.target import Target

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OAMIPC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class SmallConvNet(nn.Module):
    """Conv + BatchNorm + ReLU (fused by the exporter and by onnxruntime), pooling, a depthwise
    conv, a residual add and a classifier: every kind of node the attribution must place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        y = torch.relu(self.conv2(x))
        y = torch.max_pool2d(y + torch.relu(self.dw(y)), 2)
        return self.fc(y.flatten(1))


def _net() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(SmallConvNet().eval())


def test_the_profile_attributes_all_kernel_time_to_the_layers(tmp_path: Path) -> None:
    gm = _net()
    path = export_onnx(gm, (torch.zeros(1, 1, 28, 28),), tmp_path / "net.onnx")
    profiled = open_profiled(path, layer_ops(gm), 1, tmp_path)
    assert profiled is not None
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    for _ in range(3):
        profiled.session.run(None, {profiled.session.get_inputs()[0].name: x})
    events = json.loads(Path(profiled.session.end_profiling()).read_text())
    runs = parse_profile(events, profiled.owners)
    assert len(runs) == 3
    # Every kernel is placed, on a layer (this net has no node outside a layer's reach).
    assert sum(sum(r.values()) for r in runs) == pytest.approx(kernel_total_ms(events), rel=1e-9)
    assert all(REST not in r for r in runs)
    assert set(runs[0]) == {"conv1", "conv2", "dw", "fc"}
    assert set(profiled.owners.values()) == {"conv1", "conv2", "dw", "fc"}
    # onnxruntime renamed the fused convolutions; each is still placed on its own layer: the
    # classifier's Gemm on fc, and the conv that reads the network's input on conv1.
    ops = {e["name"][: -len("_kernel_time")]: e["args"]["op_name"] for e in events if e.get("cat") == "Node"}
    assert [profiled.owners[n] for n, op in ops.items() if op == "Gemm"] == ["fc"]
    skipped = parse_profile(events, profiled.owners, skip_runs=2)
    assert skipped == runs[2:]


def test_layers_match_the_exported_nodes_only_when_the_weights_agree(tmp_path: Path) -> None:
    import onnx

    gm = _net()
    model = onnx.load(str(export_onnx(gm, (torch.zeros(1, 1, 28, 28),), tmp_path / "net.onnx")))
    ops = layer_ops(gm)
    matched = match_layers(model, ops)
    assert matched is not None and sorted(matched.values()) == ["conv1", "conv2", "dw", "fc"]
    swapped = [ops[1], ops[0], *ops[2:]]
    assert match_layers(model, swapped) is None
    assert match_layers(model, ops[:-1]) is None


def test_the_context_cache_key_changes_with_everything_that_makes_a_profile_valid() -> None:
    args: dict[str, Any] = {"dense": b"net", "layers": ["a", "b"], "widths": [[[1, 2], [2, 3]]],
                            "sample_shape": (1, 8, 8), "setup": MeasureSetup(batch=64)}
    base = context_key(**args)
    assert base == context_key(**args)
    changes = [{"dense": b"other"}, {"layers": ["a", "c"]}, {"widths": [[[1, 2], [2, 2]]]},
               {"sample_shape": (1, 9, 8)}, {"setup": MeasureSetup(batch=8)}, {"setup": MeasureSetup(threads=2)}]
    keys = {context_key(**{**args, **change}) for change in changes}
    assert len(keys | {base}) == len(changes) + 1


def test_the_version_of_onnxruntime_is_in_the_context_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import oamipc.latency as latency

    args: dict[str, Any] = {"dense": b"net", "layers": ["a"], "widths": [], "sample_shape": (1,),
                            "setup": MeasureSetup()}
    base = context_key(**args)

    class Other:
        __version__ = "0.0.1"

    monkeypatch.setattr(latency, "import_onnxruntime", lambda: Other)
    assert context_key(**args) != base
    monkeypatch.setattr(latency, "_device_name", lambda provider: "another CPU")
    assert context_key(**args) != base


def test_colourings_separate_every_layer_of_a_chain_and_of_an_odd_cycle() -> None:
    chain = [(frozenset(), frozenset({0})), (frozenset({0}), frozenset({1})), (frozenset({1}), frozenset({2}))]
    (one,) = colorings(chain)
    assert one[0] != one[1] != one[2]
    triangle = [(frozenset({0}), frozenset({1})), (frozenset({1}), frozenset({2})), (frozenset({2}), frozenset({0}))]
    found = colorings(triangle, limit=3)

    def separated(ins: frozenset[int], outs: frozenset[int]) -> bool:
        return any({c.get(g) for g in ins} | {c.get(g) for g in outs} <= {0, 1} and len({c.get(g) for g in ins}) == 1
                   and len({c.get(g) for g in outs}) == 1 and {c.get(g) for g in ins} != {c.get(g) for g in outs}
                   for c in found)

    assert 2 <= len(found) <= 3 and all(separated(i, o) for i, o in triangle)


def test_curves_fitted_from_in_context_points_reproduce_a_separable_layer() -> None:
    """The oracle: t(i, o) = 0.01 * i * o, a separable cost; its points in the variants give
    curves whose prediction is exact at every measured and every combined width."""
    def t(i: int, o: int) -> float:
        return 0.01 * i * o

    sig = LayerSignature("conv", (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), True)
    points = [(32, o, t(32, o)) for o in (8, 16, 24)] + [(i, 48, t(i, 48)) for i in (8, 16, 24)]
    curve = fit_curve("c", sig, 32, 48, t(32, 48), points, tied=False)
    assert curve.out_widths == [8, 16, 24, 48] and curve.in_widths == [8, 16, 24, 32]
    for i, o in [(32, 48), (8, 48), (32, 16), (16, 24), (8, 8)]:
        assert curve.ms(i, o) == pytest.approx(t(i, o))
    # Never separated (both sides narrowed together): the change is split evenly between the two
    # curves, which then give the measured diagonal back exactly.
    diag = fit_curve("c", sig, 32, 48, t(32, 48), [(16, 24, t(16, 24))], tied=False)
    assert diag.ms(16, 24) == pytest.approx(t(16, 24))
    tied = fit_curve("d", LayerSignature("depthwise", (8, 8)), 32, 32, 1.0, [(16, 16, 0.5), (8, 8, 0.25)], tied=True)
    assert tied.in_widths == [] and tied.ms(16, 16) == pytest.approx(0.5) and tied.ms(24, 24) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def cnn_plan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OAMIPC_CACHE_DIR", str(cache))
        model = oamipc.load_model(ROOT / "examples" / "digits_cnn.pt")
        target = Target(latency_budget=0.7, latency_batch=16)
        first = oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance="l1", target=target)
        again = oamipc.compile(model, torch.zeros(1, 1, 8, 8), importance="l1", target=target)
    return model, first, again


def test_a_conv_net_under_a_latency_budget_is_planned_from_its_profiles(cnn_plan: Any) -> None:
    _, first, again = cnn_plan
    predicted = first.report["latency_prediction"]
    assert predicted["method"] == "context"
    assert predicted["measurements"] > 0 and again.report["latency_prediction"]["measurements"] == 0
    assert predicted["predicted_ms"] <= predicted["budget_ms"] * (1 + 1e-9)
    assert first.report["after"]["macs"] < first.report["before"]["macs"]
    assert again.plan.groups == first.plan.groups  # the cache makes the model, and so the plan, the same


def test_a_plan_made_under_a_latency_budget_replays_from_its_file(cnn_plan: Any, tmp_path: Path) -> None:
    model, first, _ = cnn_plan
    first.plan.save(tmp_path / "plan.json")
    replay = oamipc.compile(model, torch.zeros(1, 1, 8, 8), plan=oamipc.Plan.load(tmp_path / "plan.json"))
    assert replay.plan.groups == first.plan.groups
    assert replay.report["after"]["macs"] == first.report["after"]["macs"]
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(replay.module(x), first.module(x), atol=1e-5)


def test_the_passes_load_without_onnx() -> None:
    """A compile imports the pass library; onnx (0.6 s to import) loads only when a profile or an export reads it."""
    code = "import sys, oamipc.passes, oamipc.driver; sys.exit(1 if 'onnx' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

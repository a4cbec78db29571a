"""The measured latency model and latency budgets (timings are measured, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import oamipc
from oamipc.cli import app
from oamipc.latency import (
    LatencyModel,
    LayerCurve,
    LayerSignature,
    MeasureSetup,
    cache_key,
    candidate_widths,
    layer_onnx,
)
from oamipc.runtime import make_session
from oamipc.target import Target

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "digits_mlp.pt"
CONV = LayerSignature("conv", (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OAMIPC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_key_changes_with_everything_that_makes_a_measurement_valid() -> None:
    base = cache_key(CONV, 8, 16, MeasureSetup(batch=64), "CPUExecutionProvider")
    assert base == cache_key(CONV, 8, 16, MeasureSetup(batch=64), "CPUExecutionProvider")
    others = [cache_key(CONV, 8, 16, MeasureSetup(batch=8), "CPUExecutionProvider"),
              cache_key(CONV, 8, 16, MeasureSetup(batch=64), "CUDAExecutionProvider"),
              cache_key(CONV, 8, 16, MeasureSetup(batch=64, threads=2), "CPUExecutionProvider"),
              cache_key(CONV, 8, 15, MeasureSetup(batch=64), "CPUExecutionProvider"),
              cache_key(LayerSignature("conv", (8, 8), (1, 1), (1, 1), (0, 0), (1, 1), True), 8, 16,
                        MeasureSetup(batch=64), "CPUExecutionProvider")]
    assert len({base, *others}) == 6


@pytest.mark.parametrize("sig", [CONV, LayerSignature("depthwise", (8, 8), (3, 3), (2, 2), (1, 1), (1, 1), False),
                                 LayerSignature("linear", (), bias=True), LayerSignature("linear", (5,), bias=False)])
def test_one_layer_models_run_with_the_widths_asked_for(sig: LayerSignature) -> None:
    c_in, c_out = (6, 6) if sig.kind == "depthwise" else (6, 10)
    session, _ = make_session(layer_onnx(sig, c_in, c_out), device="cpu")
    shape = [3, *sig.spatial, c_in] if sig.kind == "linear" else [3, c_in, *sig.spatial]
    (y,) = session.run(None, {"x": np.zeros(shape, dtype=np.float32)})
    assert y.shape[0] == 3
    assert (y.shape[-1] if sig.kind == "linear" else y.shape[1]) == c_out


def test_candidate_widths_are_multiples_of_the_step_with_the_full_width() -> None:
    assert candidate_widths(64, 16, lowest=16) == [16, 32, 48, 64]
    many = candidate_widths(100, 1)
    assert len(many) <= 8 and many[-1] == 100 and many == sorted(set(many))
    assert candidate_widths(10, 16, lowest=16) == [10]


def test_prediction_is_the_dense_measurement_plus_each_layers_change() -> None:
    curve = LayerCurve("fc", LayerSignature("linear", ()), 10, 20, [10, 20], [1.0, 2.0], [5, 10], [1.0, 2.0])
    model = LatencyModel(MeasureSetup(), "CPUExecutionProvider", 5.0, [curve])
    assert model.predict({}) == 5.0 and model.predict({"fc": (10, 20)}) == 5.0
    assert curve.ms(10, 15) == pytest.approx(1.5)  # linear between measured widths
    assert curve.ms(5, 20) == pytest.approx(1.0)  # input halved: separable factor 1/2
    assert model.predict({"fc": (5, 10)}) == pytest.approx(5.0 + 1.0 * 1.0 / 2.0 - 2.0)


@pytest.fixture(scope="module")
def latency_plan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OAMIPC_CACHE_DIR", str(cache))
        model = oamipc.load_model(MLP)
        data = oamipc.load_data("digits")
        first = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="l1",
                               target=Target(latency_budget=0.7, latency_batch=16))
        again = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="l1",
                               target=Target(latency_budget=0.7, latency_batch=16))
    return first, again


def test_a_latency_plan_keeps_its_predicted_budget_and_reuses_measurements(latency_plan: Any) -> None:
    first, again = latency_plan
    predicted = first.report["latency_prediction"]
    assert predicted["batch"] == 16 and predicted["predicted_ms"] <= predicted["budget_ms"] * (1 + 1e-9)
    assert predicted["budget_ms"] == pytest.approx(0.7 * predicted["dense_ms"])
    assert predicted["measurements"] > 0
    assert again.report["latency_prediction"]["measurements"] == 0  # every layer came from the disk cache
    assert first.report["after"]["macs"] < first.report["before"]["macs"]


def test_a_latency_plan_replays_from_its_file(latency_plan: Any, tmp_path: Path) -> None:
    first, _ = latency_plan
    first.plan.save(tmp_path / "plan.json")
    replay = oamipc.compile(oamipc.load_model(MLP), torch.zeros(1, 1, 8, 8),
                            plan=oamipc.Plan.load(tmp_path / "plan.json"))
    assert replay.plan.groups == first.plan.groups
    assert replay.report["after"]["macs"] == first.report["after"]["macs"]


def test_the_mip_under_a_latency_budget_keeps_the_latency_plans_widths() -> None:
    """The latency knapsack sets the widths; the MILP only chooses which units fill them, so the
    predicted latency of its plan is the warm start's."""
    fast = {"samples": 16, "holdout": 64, "joint_rivals": 1, "joint_nodes": 20, "joint_rounds": 3,
            "exact_binaries": 0}
    model = oamipc.load_model(MLP)
    data = oamipc.load_data("digits")
    target = Target(latency_budget=0.75, latency_batch=16)
    mip = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, importance="mip", target=target,
                         calib_samples=128, mip_options=fast)
    warm = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=data, calib_samples=128, target=target,
                          importance=mip.report["mip"]["warm_start"]["chosen"])
    assert mip.plan.widths() == warm.plan.widths()
    assert mip.report["latency_prediction"]["predicted_ms"] == pytest.approx(
        warm.report["latency_prediction"]["predicted_ms"])


def test_profile_command_prints_and_plots_the_model(tmp_path: Path) -> None:
    out = tmp_path / "curves.svg"
    result = CliRunner().invoke(app, ["profile", str(MLP), "--input-shape", "1,64", "--batch", "8", "--plot",
                                      str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch"] == 8 and data["dense_ms"] > 0
    assert {layer["name"] for layer in data["layers"]} == {"body.0", "body.2", "head"}
    assert out.read_text().lstrip().startswith("<svg")


def test_calibration_replans_until_the_whole_network_meets_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is a stand-in for the whole-network timing in which the network shows only 80% of
    the savings its layers predict: the first plan misses, the calibrated one meets the budget, and
    the report says what each round predicted and measured.  The layers' model is a synthetic one
    (time proportional to in x out, a tenth of the network outside the layers): with the measured
    model, a noisy floor near the budget made the calibrated model call 0.7 unreachable after one
    round now and then, and the test tested the machine's timing instead of the loop."""
    from oamipc.passes import planner_base

    def synthetic(self: Any, gm: Any, am: Any) -> LatencyModel | None:
        if self.target.kind != "latency":
            return None
        curves = []
        for name, mod in gm.named_modules():
            if isinstance(mod, torch.nn.Linear):
                n_in, n_out = mod.in_features, mod.out_features
                ms = n_in * n_out * 1e-4
                curves.append(LayerCurve(name, LayerSignature("linear", ()), n_in, n_out, [1, n_out],
                                         [ms / n_out, ms], [1, n_in], [ms / n_in, ms]))
        return LatencyModel(MeasureSetup(batch=16), "CPUExecutionProvider", 1.1 * sum(c.full_ms for c in curves),
                            curves)

    monkeypatch.setattr(planner_base.PlannerAnalysis, "latency_model", synthetic)
    seen: list[float] = []

    def whole_network(gm: Any, am: Any, graph: Any, kept: np.ndarray, model: LatencyModel) -> float:
        widths = {layer.target: layer.widths(kept) for layer in graph.layers}
        ratio = 1.0 - 0.8 * (1.0 - model.scaled(1.0).predict(widths) / model.dense_ms)
        seen.append(ratio)
        return ratio

    monkeypatch.setattr(planner_base, "_measure_plan", whole_network)
    result = oamipc.compile(oamipc.load_model(MLP), torch.zeros(1, 1, 8, 8), importance="l1",
                            target=Target(latency_budget=0.7, latency_batch=16))
    predicted = result.report["latency_prediction"]
    rounds = predicted["calibration"]
    assert len(rounds) >= 2 and rounds[0]["measured_ratio"] > 0.7 * 1.02
    assert [r["measured_ratio"] for r in rounds] == seen
    assert rounds[-1]["measured_ratio"] <= 0.7 * (1 + planner_base.CALIBRATION_SLACK)
    assert predicted["scale"] == pytest.approx(0.8, rel=0.05)  # it learnt the share the network shows
    assert predicted["predicted_ms"] / predicted["dense_ms"] == pytest.approx(rounds[-1]["measured_ratio"], rel=0.02)


def test_every_compile_reports_a_prediction_beside_its_measurement(tmp_path: Path) -> None:
    """A MAC budget too: the changed layers are timed alone and added to the measured dense latency."""
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["compile", str(MLP), "--input-shape", "1,1,8,8", "--importance", "l1",
                                      "--flops-budget", "0.5", "--batch", "1,16", "-o", str(tmp_path / "m.onnx"),
                                      "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    predicted = json.loads(report_path.read_text())["latency_prediction"]
    assert predicted["batch"] == 16 and predicted["measurements"] > 0
    assert predicted["dense_ms"] == predicted["measured_dense_ms"]
    assert predicted["predicted_ms"] > 0 and predicted["measured_ms"] > 0  # timings: never compared in a test
    assert predicted["error"] == pytest.approx(predicted["predicted_ms"] / predicted["measured_ms"] - 1)
    assert "predicted" in result.output


def test_whole_network_pairs_are_timed_once_then_read_from_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    import oamipc.bench
    from oamipc.latency import cache_session, measure_pair

    model = oamipc.load_model(MLP)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    oamipc.export_onnx(oamipc.compile(model, torch.zeros(1, 1, 8, 8), prune_ratio=0.0).module,
                       (torch.zeros(1, 1, 8, 8),), a)
    oamipc.export_onnx(oamipc.compile(model, torch.zeros(1, 1, 8, 8), prune_ratio=0.5).module,
                       (torch.zeros(1, 1, 8, 8),), b)
    calls = []
    real = oamipc.bench.benchmark
    monkeypatch.setattr(oamipc.bench, "benchmark", lambda *args, **kw: calls.append(kw) or real(*args, **kw))
    setup = MeasureSetup(batch=4)
    with cache_session() as cache:
        first = measure_pair(a, b, (1, 8, 8), setup, cache, rounds=5)
    with cache_session() as cache:
        again = measure_pair(a, b, (1, 8, 8), setup, cache, rounds=5)
        other = measure_pair(a, b, (1, 8, 8), MeasureSetup(batch=8), cache, rounds=5)
    assert first == again and len(calls) == 2 and calls[1]["batch_sizes"] == (8,)
    assert 0 < first and 0 < other

"""The onnxruntime benchmark: structure, ordering of statistics, shapes, providers.

Timings themselves are never asserted (they belong to benchmarks/, not tests); only what must
hold on any machine: positive numbers, p99 >= p90 >= median, interleaved run counts, and the
provider that really ran the models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from oamipc.bench import BenchResult, benchmark, cpu_model
from oamipc.errors import ExportError, LoadError, UsageError
from oamipc.export import export_onnx
from oamipc.runtime import CPU, CUDA, make_session


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A (wider) and B (narrower): the same interface, as before and after pruning."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    example = (torch.randn(1, 1, 8, 8),)
    return (export_onnx(wide, example, root / "a.onnx"), export_onnx(narrow, example, root / "b.onnx"))


def _identity_model(path: Path, shape: list[int | str]) -> Path:
    """A one-node ONNX file whose input has the given (possibly symbolic) shape."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _assert_stats_sane(stats: dict) -> None:
    assert stats["runs"] >= 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["mean_ms"] > 0 and stats["std_ms"] >= 0 and stats["throughput"] > 0


def test_interleaved_ab_structure(models: tuple[Path, Path]) -> None:
    calls: list[tuple[int, int]] = []
    result = benchmark(models, batch_sizes=(1, 4), warmup=2, runs=7, progress=lambda d, t: calls.append((d, t)))

    assert isinstance(result, BenchResult)
    data = json.loads(json.dumps(result.to_dict()))  # JSON-serialisable, and round-trips
    assert data["provider"] == CPU and data["gpu"] is False
    assert data["onnxruntime"] == onnxruntime.__version__
    assert data["intra_op_threads"] == 1 and data["inter_op_threads"] == 1
    assert data["cpu"] == cpu_model() and data["cpu"]
    assert [m["path"] for m in data["models"]] == [str(p) for p in models]
    assert [m["provider"] for m in data["models"]] == [CPU, CPU]
    assert [b["batch"] for b in data["batches"]] == [1, 4]
    for entry in data["batches"]:
        assert [shapes["input"] for shapes in entry["input_shapes"]] == [[entry["batch"], 1, 8, 8]] * 2
        assert len(entry["models"]) == 2
        for stats in entry["models"]:
            assert stats["runs"] == 7  # one run of each model per round
            _assert_stats_sane(stats)
            assert math.isclose(stats["throughput"], entry["batch"] / (stats["median_ms"] / 1e3))
        a, b = (s["median_ms"] for s in entry["models"])
        assert math.isclose(entry["speedup"], a / b) and math.isclose(entry["latency_ratio"], b / a)
        assert entry["speedup_pairwise"] > 0 and entry["pairwise_ratio"] > 0
    assert "times_ns" not in data["batches"][0]
    assert calls and calls[-1][0] == calls[-1][1] == 14  # 2 batch sizes x 7 rounds
    assert all(d <= t for d, t in calls)


def test_rows_flatten_a_and_b(models: tuple[Path, Path]) -> None:
    result = benchmark(models, batch_sizes=(2,), warmup=0, runs=3)
    (row,) = result.rows()
    assert row["batch"] == 2
    for key in ("a", "b"):
        assert row[f"{key}_p99_ms"] >= row[f"{key}_p90_ms"] >= row[f"{key}_median_ms"] > 0
        assert row[f"{key}_throughput"] > 0
    assert row == result.to_dict()["rows"][0]


def test_single_model_has_no_ratios(models: tuple[Path, Path]) -> None:
    result = benchmark(models[:1], batch_sizes=(3,), warmup=1, runs=5)
    (row,) = result.rows()
    assert row["a_median_ms"] > 0
    assert row["b_median_ms"] is None and row["speedup"] is None and row["pairwise_ratio"] is None
    assert len(result.batches[0].times_ns) == 1 and len(result.batches[0].times_ns[0]) == 5
    data = result.to_dict(include_times=True)
    assert len(data["batches"][0]["times_ns"][0]) == 5
    json.dumps(data)


def test_min_time_extends_the_runs(models: tuple[Path, Path]) -> None:
    result = benchmark(models[:1], batch_sizes=(1,), warmup=0, runs=2, min_time_s=0.05)
    assert result.batches[0].stats[0].runs > 2  # 2 rounds of a tiny model take far less than 50 ms
    assert result.to_dict()["min_time_s"] == 0.05


def test_inputs_are_seeded(tmp_path: Path) -> None:
    from oamipc.bench import _feed  # the data generator: same seed, same data

    session, _ = make_session(_identity_model(tmp_path / "r.onnx", ["batch", 3]), device="cpu")
    first = _feed(session, Path("r.onnx"), 4, None, seed=1)["input"]
    again = _feed(session, Path("r.onnx"), 4, None, seed=1)["input"]
    other = _feed(session, Path("r.onnx"), 4, None, seed=2)["input"]
    assert first.dtype.name == "float32" and first.shape == (4, 3)
    assert (first == again).all() and not (first == other).all()


def test_symbolic_non_batch_dim_needs_a_shape(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "dyn.onnx", ["batch", 3, "height"])
    with pytest.raises(UsageError, match="height.*sample_shapes"):
        benchmark([path], batch_sizes=(1,), warmup=0, runs=1)
    result = benchmark([path], batch_sizes=(2,), warmup=0, runs=2, sample_shapes={"input": (3, 5)})
    assert result.batches[0].input_shapes[0]["input"] == [2, 3, 5]
    result = benchmark([path], batch_sizes=(2,), warmup=0, runs=2, sample_shapes=(3, 6))
    assert result.batches[0].input_shapes[0]["input"] == [2, 3, 6]


def test_fixed_batch_model_asks_for_its_batch(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "fixed.onnx", [2, 3])
    with pytest.raises(UsageError, match="fixed batch size of 2"):
        benchmark([path], batch_sizes=(1,), warmup=0, runs=1)
    assert benchmark([path], batch_sizes=(2,), warmup=0, runs=1).batches[0].stats[0].runs == 1


def test_multiple_inputs(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    z = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Add", ["input", "input_1"], ["output"])], "g", [x, z], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "add.onnx"))
    result = benchmark([tmp_path / "add.onnx"], batch_sizes=(5,), warmup=0, runs=2)
    assert result.batches[0].input_shapes[0] == {"input": [5, 4], "input_1": [5, 4]}


def test_bad_options_and_paths(models: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="one or two"):
        benchmark([models[0]] * 3)
    with pytest.raises(UsageError, match="batch sizes"):
        benchmark(models, batch_sizes=(0,))
    with pytest.raises(UsageError, match="runs >= 1"):
        benchmark(models, runs=0)
    with pytest.raises(LoadError, match="missing.onnx"):
        benchmark([tmp_path / "missing.onnx"])


# --------------------------------------------------------------------------------------------
# Provider selection (this machine has no CUDA)
# --------------------------------------------------------------------------------------------


def test_auto_uses_the_cpu_here(models: tuple[Path, Path]) -> None:
    session, provider = make_session(models[0], device="auto")
    assert provider == CPU == session.get_providers()[0]


def test_cuda_requested_without_cuda_build(models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(ExportError, match=r"no CUDAExecutionProvider.*oamipc\[gpu\]"):
        make_session(models[0], device="cuda")


def test_listed_but_unusable_cuda_is_detected(models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime lists CUDA but cannot load it: the session silently runs on the CPU.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    _, provider = make_session(models[0], device="auto")
    assert provider == CPU
    with pytest.raises(ExportError, match="not active"):
        make_session(models[0], device="cuda")
    result = benchmark(models[:1], batch_sizes=(1,), warmup=0, runs=1, device="auto")
    assert result.provider == CPU and result.gpu is False


def test_unknown_device_is_a_usage_error(models: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="auto, cpu or cuda"):
        make_session(models[0], device="tpu")  # type: ignore[arg-type]

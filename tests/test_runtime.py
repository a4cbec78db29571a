"""Unit tests for oamipc/runtime.py: the onnxruntime import point and provider choice.

The machine that runs the test suite has no GPU, so the real onnxruntime is used for the CPU
paths, and a fake ``onnxruntime`` module (put in ``sys.modules``) plays a GPU build whose CUDA
provider is listed but fails or silently falls back, or works.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from oamipc import runtime
from oamipc.errors import ExportError, LoadError, UsageError, first_line
from oamipc.runtime import CPU, CUDA, available_providers, import_onnxruntime, make_session


def _relu_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --------------------------------------------------------------------------------------------
# onnxruntime missing
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail


def _assert_install_hint(message: str) -> None:
    assert "onnxruntime is not installed" in message
    assert "oamipc[cpu]" in message and "oamipc[gpu]" in message


def test_missing_onnxruntime_names_both_extras(no_onnxruntime: None) -> None:
    with pytest.raises(ExportError) as info:
        import_onnxruntime()
    _assert_install_hint(str(info.value))
    assert isinstance(info.value.__cause__, ImportError)
    assert "\n" not in str(info.value)


def test_missing_onnxruntime_through_every_entry_point(no_onnxruntime: None) -> None:
    with pytest.raises(ExportError) as info:
        available_providers()
    _assert_install_hint(str(info.value))
    with pytest.raises(ExportError) as info:
        make_session(_relu_model(), device="auto")
    _assert_install_hint(str(info.value))


def test_missing_onnxruntime_via_a_failing_import(monkeypatch: pytest.MonkeyPatch) -> None:
    real = runtime.importlib.import_module

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(runtime.importlib, "import_module", fake_import)
    with pytest.raises(ExportError) as info:
        import_onnxruntime()
    _assert_install_hint(str(info.value))


# --------------------------------------------------------------------------------------------
# The real (CPU) onnxruntime
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_only() -> None:
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; the CPU-fallback tests assume it has not")


def test_auto_falls_back_to_cpu_without_cuda(cpu_only: None) -> None:
    import numpy as np

    session, provider = make_session(_relu_model(), device="auto")
    assert provider == CPU
    assert session.get_providers()[0] == CPU
    out = session.run(None, {"x": np.array([[-1.0, 0.0, 2.0]], dtype=np.float32)})[0]
    assert out.tolist() == [[0.0, 0.0, 2.0]]


def test_cpu_device_gives_cpu(cpu_only: None, tmp_path) -> None:
    path = tmp_path / "relu.onnx"
    path.write_bytes(_relu_model())
    _, provider = make_session(path, device="cpu")
    assert provider == CPU


def test_cuda_requested_on_a_cpu_build_says_how_to_get_it(cpu_only: None) -> None:
    with pytest.raises(ExportError, match=r"no CUDAExecutionProvider.*oamipc\[gpu\].*use device cpu"):
        make_session(_relu_model(), device="cuda")


def test_argument_errors() -> None:
    with pytest.raises(UsageError, match="unknown device 'gpu': use auto, cpu or cuda"):
        make_session(_relu_model(), device="gpu")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="intra_op_threads must be >= 1"):
        make_session(_relu_model(), intra_op_threads=0)


def test_missing_file_is_a_load_error(tmp_path) -> None:
    with pytest.raises(LoadError, match=r"ONNX file .*nope\.onnx not found"):
        make_session(tmp_path / "nope.onnx")


def test_unloadable_model_is_an_export_error() -> None:
    with pytest.raises(ExportError, match="onnxruntime cannot load <bytes>: .*re-export the model"):
        make_session(b"not an onnx model", device="cpu")


# --------------------------------------------------------------------------------------------
# A fake GPU build of onnxruntime
# --------------------------------------------------------------------------------------------


class _FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return list(self._providers)


def _fake_ort(cuda: str) -> types.ModuleType:
    """A GPU build whose CUDA provider ``cuda``: "works", "falls-back" (silently) or "fails"."""
    ort = types.ModuleType("onnxruntime")
    ort.calls = []  # type: ignore[attr-defined]
    ort.get_available_providers = lambda: [CUDA, CPU]  # type: ignore[attr-defined]
    ort.SessionOptions = types.SimpleNamespace  # type: ignore[attr-defined]
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)  # type: ignore[attr-defined]

    def session(model: Any, sess_options: Any = None, providers: list[str] | None = None) -> _FakeSession:
        ort.calls.append((list(providers or []), sess_options))  # type: ignore[attr-defined]
        if providers and providers[0] == CUDA:
            if cuda == "fails":
                raise RuntimeError("libcudnn.so.9: cannot open shared object file\nmore details")
            if cuda == "falls-back":
                return _FakeSession([CPU])
            return _FakeSession([CUDA, CPU])
        return _FakeSession([CPU])

    ort.InferenceSession = session  # type: ignore[attr-defined]
    return ort


def _install(monkeypatch: pytest.MonkeyPatch, cuda: str) -> types.ModuleType:
    ort = _fake_ort(cuda)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    return ort


def test_working_cuda_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = _install(monkeypatch, "works")
    for device in ("auto", "cuda"):
        _, provider = make_session(b"model", device=device)
        assert provider == CUDA
    assert [c[0] for c in ort.calls] == [[CUDA, CPU], [CUDA, CPU]]


def test_cpu_device_never_tries_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = _install(monkeypatch, "works")
    _, provider = make_session(b"model", device="cpu")
    assert provider == CPU
    assert [c[0] for c in ort.calls] == [[CPU]]


def test_silent_fallback_is_reported_as_cpu(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    _install(monkeypatch, "falls-back")
    with caplog.at_level(logging.WARNING, logger="oamipc.runtime"):
        _, provider = make_session(b"model", device="auto")
    assert provider == CPU
    assert "fell back" in caplog.text
    with pytest.raises(ExportError, match="CUDAExecutionProvider is listed but not active for <bytes>.*device cpu"):
        make_session(b"model", device="cuda")


def test_failing_cuda_session_falls_back_to_a_cpu_session(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    ort = _install(monkeypatch, "fails")
    with caplog.at_level(logging.WARNING, logger="oamipc.runtime"):
        _, provider = make_session(b"model", device="auto")
    assert provider == CPU
    assert [c[0] for c in ort.calls] == [[CUDA, CPU], [CPU]]
    assert "using the CPU" in caplog.text and "libcudnn" in caplog.text
    with pytest.raises(ExportError, match=r"cannot open <bytes> with CUDA: libcudnn\.so\.9: cannot open shared "
                                          r"object file; check the CUDA") as info:
        make_session(b"model", device="cuda")
    assert "more details" not in str(info.value)


def test_session_options(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = _install(monkeypatch, "works")
    make_session(b"model", device="cpu")
    make_session(b"model", device="cpu", intra_op_threads=None)
    (_, one), (_, every) = ort.calls
    assert (one.intra_op_num_threads, one.inter_op_num_threads) == (1, 1)
    assert every.intra_op_num_threads == 0  # onnxruntime's default: all cores
    assert one.graph_optimization_level == 99


def test_first_line() -> None:
    assert first_line(RuntimeError("\n  boom  \nsecond")) == "boom"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line("plain") == "plain"

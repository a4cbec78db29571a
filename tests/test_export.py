"""ONNX export and verification: files are single, self-contained, batch-dynamic and correct.

The oracle is onnxruntime against the torch module on the same inputs.  Two small models go
through the slow dynamo exporter (about 4 s each: one asked for, one that the default exporter
falls back to); everything else uses the torchscript exporter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from oamipc.errors import ExportError, OutputError, UsageError
from oamipc.export import eval_mode, export, export_onnx, onnx_size_bytes, verify_onnx
from oamipc.runtime import import_onnxruntime, make_session

# --------------------------------------------------------------------------------------------
# Tiny models: one per pattern the exporter must keep dynamic in the batch
# --------------------------------------------------------------------------------------------


def _conv_bn() -> nn.Module:
    """Conv-BN-ReLU-maxpool-flatten-Linear, with non-trivial BatchNorm statistics."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return net


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


class ResidualCat(nn.Module):
    """Residual add, channel concatenation and a batch-size-aware view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y = y + F.relu(self.body(y))
        y = torch.cat([y, self.side(y)], dim=1)
        y = F.max_pool2d(y, 2)
        return self.head(y.view(y.size(0), -1))


class TwoHeads(nn.Module):
    """Two inputs, two outputs: names input/input_1 and output/output_1, all batch-dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.a(x) + self.b(z))
        return h, h.sum(dim=1, keepdim=True)


CASES = [
    ("conv_bn", _conv_bn, (1, 1, 8, 8)),
    ("mlp", _mlp, (1, 1, 4, 4)),
    ("residual_cat", ResidualCat, (1, 2, 4, 4)),
]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _assert_single_dynamic_file(path: Path) -> onnx.ModelProto:
    """The directory holds just this file; every input and output has the symbolic batch dim."""
    assert sorted(os.listdir(path.parent)) == [path.name]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        assert _dims(value)[0] == "batch", (value.name, _dims(value))
    return model


def _run_ort(path: Path, *inputs: torch.Tensor) -> list[np.ndarray]:
    session, _ = make_session(path, device="cpu")
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True], ids=["module", "graphmodule"])
@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_export_is_single_dynamic_file_matching_torch(tmp_path: Path, name: str, factory, shape, traced: bool) -> None:
    module = factory().eval()
    if traced:
        module = fx.symbolic_trace(module)
    path = export_onnx(module, (torch.randn(*shape),), tmp_path / f"{name}.onnx")

    model = _assert_single_dynamic_file(path)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert onnx_size_bytes(path) == path.stat().st_size > 0
    with torch.no_grad():
        for batch in (1, 7):
            x = torch.randn(batch, *shape[1:])
            (got,) = _run_ort(path, x)
            torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-4, atol=1e-5)

    calib = [torch.randn(4, *shape[1:]), torch.randn(2, *shape[1:])]
    result = verify_onnx(path, module, calib)
    assert result.passed
    assert result.n_checked == 4
    assert result.batch_sizes == (4, 2, 3, 1)  # the random batches use sizes the calibration did not
    assert result.max_abs_err <= 1e-5
    assert set(result.to_dict()) >= {"max_abs_err", "max_rel_err", "n_checked", "batch_sizes", "passed"}


def test_dynamo_exporter_small_graphmodule(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(_conv_bn().eval())
    path = export_onnx(gm, (torch.randn(1, 1, 8, 8),), tmp_path / "dyn.onnx", exporter="dynamo")

    _assert_single_dynamic_file(path)
    with torch.no_grad():
        x = torch.randn(7, 1, 8, 8)
        (got,) = _run_ort(path, x)
        torch.testing.assert_close(torch.from_numpy(got), gm(x), rtol=1e-4, atol=1e-5)
    assert verify_onnx(path, gm, torch.randn(5, 1, 8, 8)).passed


def test_dynamo_exporter_without_onnxscript_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    gm = fx.symbolic_trace(_conv_bn().eval())
    with pytest.raises(ExportError, match=r"pip install onnxscript"):
        export_onnx(gm, (torch.randn(1, 1, 8, 8),), tmp_path / "dyn.onnx", exporter="dynamo")
    assert not (tmp_path / "dyn.onnx").exists()


def test_multiple_inputs_and_outputs(tmp_path: Path) -> None:
    module = TwoHeads()
    example = (torch.randn(2, 4), torch.randn(2, 5))
    path = export_onnx(module, example, tmp_path / "two.onnx")

    model = _assert_single_dynamic_file(path)
    assert [i.name for i in model.graph.input] == ["input", "input_1"]
    assert [o.name for o in model.graph.output] == ["output", "output_1"]
    result = verify_onnx(path, module, example)  # one call's arguments, not two batches
    assert result.batch_sizes == (2, 3, 1)
    result = verify_onnx(path, module, [example, (torch.randn(6, 4), torch.randn(6, 5))], extra_random=0)
    assert result.batch_sizes == (2, 6)


def test_eval_mode_used_and_training_mode_restored(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 2))
    module.train()
    module[2].eval()  # a deliberately mixed state must survive too
    x = torch.randn(8, 6)
    path = export_onnx(module, (x,), tmp_path / "m.onnx")

    assert module.training and module[1].training and not module[2].training
    assert verify_onnx(path, module, x).passed  # eval semantics: no dropout, running statistics
    assert module.training and not module[2].training


def test_static_batch_when_asked(tmp_path: Path) -> None:
    module = _mlp()
    path = export_onnx(module, (torch.randn(3, 1, 4, 4),), tmp_path / "static.onnx", dynamic_batch=False)
    model = onnx.load(str(path))
    assert _dims(model.graph.input[0]) == [3, 1, 4, 4]
    result = verify_onnx(path, module, torch.randn(3, 1, 4, 4))
    assert result.batch_sizes == (3, 3, 3)  # the random batches keep the fixed size


def test_opset_is_honoured(tmp_path: Path) -> None:
    path = export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "o17.onnx", opset=17)
    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets[""] == 17


def test_hard_coded_batch_is_caught_by_verify(tmp_path: Path) -> None:
    class FixedView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.view(2, -1))

    gm = fx.symbolic_trace(FixedView())
    x = torch.randn(2, 1, 4, 4)
    path = export_onnx(gm, (x,), tmp_path / "fixed.onnx")
    with pytest.raises(ExportError, match="batch size 3.*dynamic_batch=False"):
        verify_onnx(path, gm, x)


def test_unknown_exporter_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="torchscript, dynamo"):
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "x.onnx", exporter="jit")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Verification failures
# --------------------------------------------------------------------------------------------


def test_verify_against_a_different_module_reports_the_numbers(tmp_path: Path) -> None:
    path = export_onnx(_conv_bn().eval(), (torch.randn(1, 1, 8, 8),), tmp_path / "a.onnx")
    other = _conv_bn().eval()  # same architecture, other weights
    with pytest.raises(ExportError) as info:
        verify_onnx(path, other, torch.randn(4, 1, 8, 8))
    message = str(info.value)
    assert "\n" not in message
    assert "a.onnx" in message and "max abs err" in message and "max rel err" in message
    assert "atol 1e-05" in message and "rtol 0.0001" in message


def test_verify_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="bad.onnx"):
        verify_onnx(bad, _mlp(), torch.randn(1, 1, 4, 4))


# --------------------------------------------------------------------------------------------
# Paths and failures: nothing is ever left behind
# --------------------------------------------------------------------------------------------


def test_missing_directory_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "nowhere" / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_directory_as_path_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a directory"):
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory_is_an_output_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), locked / "m.onnx")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_failure_mid_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[Path] = []

    def broken_export(module, args, f, **kwargs):
        Path(f).write_bytes(b"half a model")
        written.append(Path(f))
        raise RuntimeError("exporter exploded\nsecond line of a long dump")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ExportError) as info:
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")
    message = str(info.value)
    assert "m.onnx" in message and "exporter exploded" in message and "second line" not in message
    assert not list(tmp_path.iterdir())
    assert written and not written[0].parent.exists()  # the scratch directory is gone too


def test_side_data_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = torch.onnx.export

    def export_with_data(module, args, f, **kwargs):
        real_export(module, args, f, **kwargs)
        Path(f).with_suffix(".onnx.data").write_bytes(b"\0" * 16)

    monkeypatch.setattr(torch.onnx, "export", export_with_data)
    with pytest.raises(ExportError, match="external data"):
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_existing_file_survives_a_failed_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"previous model")

    def failing(*args, **kwargs):
        raise ValueError("nope")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ExportError, match="nope"):
        export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), dest)
    assert dest.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_module_failing_on_example_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="fails while exporting"):
        export_onnx(_mlp(), (torch.randn(1, 3, 5, 5),), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# onnxruntime missing
# --------------------------------------------------------------------------------------------


def test_missing_onnxruntime_names_both_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export_onnx(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ExportError) as info:
        import_onnxruntime()
    message = str(info.value)
    assert "onnxruntime is not installed" in message
    assert "oamipc[cpu]" in message and "oamipc[gpu]" in message and "never both" in message
    with pytest.raises(ExportError, match=r"oamipc\[cpu\]"):
        verify_onnx(path, _mlp(), torch.randn(1, 1, 4, 4))


def test_eval_mode_restores_on_error() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    module.train()
    with pytest.raises(RuntimeError), eval_mode(module):
        assert not module.training
        raise RuntimeError("boom")
    assert module.training and module[1].training


class _AdaptiveTo7(nn.Module):
    """adaptive_avg_pool2d 3x3 -> 7x7: the TorchScript exporter refuses it, dynamo exports it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 7), 1)


def test_auto_exporter_falls_back_to_dynamo(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = _AdaptiveTo7().eval()
    with pytest.raises(ExportError, match="adaptive_avg_pool2d.*exporter='dynamo'"):
        export(model, (torch.randn(1, 1, 3, 3),), tmp_path / "ts.onnx", exporter="torchscript")
    exported = export(model, (torch.randn(1, 1, 3, 3),), tmp_path / "auto.onnx")
    assert exported.exporter == "dynamo"
    assert [e for e, _ in exported.failed] == ["torchscript"] and "adaptive_avg_pool2d" in exported.failed[0][1]
    _assert_single_dynamic_file(exported.path)
    assert verify_onnx(exported.path, model, torch.randn(4, 1, 3, 3)).passed
    # The torchscript exporter's IR dump (printed from C++ on an op it refuses) stays off stdout.
    assert "Torch IR graph" not in capfd.readouterr().out


def test_auto_exporter_keeps_torchscript_when_it_works(tmp_path: Path) -> None:
    exported = export(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")
    assert exported.exporter == "torchscript" and exported.failed == ()


def test_every_exporter_failing_names_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(module, args, f, **kwargs):
        raise RuntimeError(f"no luck with dynamo={kwargs.get('dynamo')}")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ExportError) as info:
        export(_mlp(), (torch.randn(1, 1, 4, 4),), tmp_path / "m.onnx")
    message = str(info.value)
    assert "every exporter" in message and "torchscript: no luck with dynamo=False" in message
    assert "dynamo: no luck with dynamo=True" in message and not list(tmp_path.iterdir())

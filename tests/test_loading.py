"""Tests for loading a model (oamipc.loading and the safe_load, checkpoint and lifting modules it
dispatches to): every supported format, every refusal, and the .pt2 lifting."""

from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from oamipc.checkpoint import import_object
from oamipc.errors import DataError, LoadError, OamipcError, UsageError
from oamipc.lifting import exported_to_graph_module
from oamipc.loading import load_model

SPEC = f"{__name__}:SmallCNN"


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a residual add, max pool, cat, flatten and a linear head: (N, 3, 8, 8)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = F.relu(y + self.bn2(self.conv2(y)))
        y = F.max_pool2d(y, 2)
        y = torch.cat([y, y * 0.5], dim=1)
        return self.fc(torch.flatten(y, 1))


class NormZoo(nn.Module):
    """Conv1d, BatchNorm1d, LayerNorm, GroupNorm and a bias-free linear; returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding="same")
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 6, 3, stride=2)
        self.bn1d = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.gn(self.conv(x))
        z = self.ln(self.bn1d(self.conv1d(y.mean(3))))
        return {"logits": self.head(z), "features": y}


class NotAModel:
    """A plain class: pickling it needs a global that weights-only loading refuses."""

    def __init__(self) -> None:
        self.value = 3


class Malicious:
    """Unpickling this creates the file at ``marker``: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def make_tiny() -> nn.Module:
    """A factory (not a class) for --model-class."""
    return SmallCNN(width=4)


def make_nothing() -> int:
    return 42


def broken_constructor() -> nn.Module:
    raise ValueError("width must be even")


NOT_CALLABLE = 7


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so a lost BN shows up in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    return model.eval()


def _save_pt2(model: nn.Module, x: torch.Tensor, path: Path, *, decompose: bool = False) -> Path:
    program = torch.export.export(model, (x,))
    if decompose:
        program = program.run_decompositions()
    torch.export.save(program, path)
    return path


def _aten_names(gm: fx.GraphModule) -> set[str]:
    return {
        n.target.overloadpacket.__name__  # type: ignore[union-attr]
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }


def _module_types(gm: fx.GraphModule) -> dict[str, type[nn.Module]]:
    return {str(n.target): type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"}


def _one_line(exc: pytest.ExceptionInfo[OamipcError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---- torch.export programs --------------------------------------------------------------------


def test_pt2_round_trip_lifts_parametric_ops(tmp_path: Path) -> None:
    model = _randomise_bn(SmallCNN())
    x = torch.randn(2, 3, 8, 8)
    loaded = load_model(_save_pt2(model, x, tmp_path / "cnn.pt2"))

    assert isinstance(loaded, fx.GraphModule)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert _module_types(loaded) == {
        "features.0": nn.Conv2d, "features.1": nn.BatchNorm2d, "conv2": nn.Conv2d,
        "bn2": nn.BatchNorm2d, "fc": nn.Linear,
    }
    conv2 = loaded.get_submodule("conv2")
    assert (conv2.groups, conv2.padding, conv2.bias) == (2, (1, 1), None)
    torch.testing.assert_close(loaded.get_submodule("bn2").running_var, model.bn2.running_var)
    assert not [n for n in loaded.graph.nodes if n.op == "get_attr"]
    assert _aten_names(loaded) == {"relu", "add", "max_pool2d", "mul", "cat", "flatten"}


def test_pt2_from_decomposed_program_lifts_too(tmp_path: Path) -> None:
    model = _randomise_bn(SmallCNN())
    x = torch.randn(2, 3, 8, 8)
    loaded = load_model(_save_pt2(model, x, tmp_path / "cnn.pt2", decompose=True))

    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert set(_module_types(loaded).values()) == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}
    assert not _aten_names(loaded) & {"convolution", "_native_batch_norm_legit_no_training", "addmm", "permute"}


def test_exported_norms_conv1d_and_dict_output() -> None:
    model = _randomise_bn(NormZoo())
    x = torch.randn(2, 3, 8, 8)
    for program in (torch.export.export(model, (x,)), torch.export.export(model, (x,)).run_decompositions()):
        gm = exported_to_graph_module(program)
        out = gm(x)
        assert set(out) == {"logits", "features"}
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert _module_types(gm) == {
            "conv": nn.Conv2d, "gn": nn.GroupNorm, "conv1d": nn.Conv1d, "bn1d": nn.BatchNorm1d,
            "ln": nn.LayerNorm, "head": nn.Linear,
        }
    assert gm.get_submodule("conv1d").stride == (2,)
    assert gm.get_submodule("head").bias is None


def test_weight_shared_between_two_calls_becomes_one_module() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    model = Tied().eval()
    x = torch.randn(3, 4)
    gm = exported_to_graph_module(torch.export.export(model, (x,)))
    torch.testing.assert_close(gm(x), model(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "fc"]


@pytest.mark.parametrize("where", ["sample inputs", "pickled weight disguised as json"])
def test_pt2_with_pickled_payload_is_refused_and_not_run(tmp_path: Path, where: str) -> None:
    """torch.export.load unpickles parts of a .pt2 (falling back to weights_only=False)."""
    good = _save_pt2(SmallCNN().eval(), torch.randn(1, 3, 8, 8), tmp_path / "good.pt2")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    payload = pickle.dumps(Malicious(marker))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if where == "sample inputs" and info.filename.endswith("sample_inputs/model.pt"):
                data = payload
            if where != "sample inputs" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["fc.bias"].update(path_name="evil_config.json", use_pickle=True)
                data = json.dumps(config).encode()
                root = info.filename.split("/", 1)[0]
                dst.writestr(f"{root}/data/weights/evil_config.json", payload)
            dst.writestr(info.filename, data)

    with pytest.raises(LoadError) as err:
        load_model(evil)
    assert "--trust-pickle" in _one_line(err)
    assert not marker.exists()


# ---- state dicts --------------------------------------------------------------------------------


def test_state_dict_with_model_class(tmp_path: Path) -> None:
    model = _randomise_bn(SmallCNN(width=4))
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, model_class=SPEC, model_args={"width": 4})
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(loaded, SmallCNN) and not loaded.training
    torch.testing.assert_close(loaded(x), model(x))


def test_state_dict_with_factory_and_positional_args(tmp_path: Path) -> None:
    model = SmallCNN(width=4, num_classes=3).eval()
    path = tmp_path / "sd.pth"
    torch.save(model.state_dict(), path)
    assert isinstance(load_model(path, model_class=SPEC, model_args=[4, 3]), SmallCNN)
    torch.save(SmallCNN(width=4).state_dict(), path)
    assert isinstance(load_model(path, model_class=f"{__name__}:make_tiny"), SmallCNN)


def test_state_dict_without_model_class_asks_for_one(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(SmallCNN().state_dict(), path)
    with pytest.raises(LoadError) as err:
        load_model(path)
    assert "--model-class" in _one_line(err)


def test_checkpoint_naming_oamipc_model_class_is_used(tmp_path: Path) -> None:
    from oamipc.models import DigitsMLP

    model = DigitsMLP(hidden=(16,)).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "model_class": "oamipc.models:DigitsMLP",
                "model_args": {"hidden": [16]}}, path)
    loaded = load_model(path)
    x = torch.randn(2, 1, 8, 8)
    assert isinstance(loaded, DigitsMLP)
    torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_naming_foreign_class_is_refused_unless_passed(tmp_path: Path) -> None:
    model = SmallCNN(width=4).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "model_class": SPEC, "model_args": {"width": 4}}, path)
    with pytest.raises(LoadError) as err:
        load_model(path)
    text = _one_line(err)
    assert "--model-class" in text and SPEC in text
    # An explicit class wins; the checkpoint's own arguments are still used.
    assert isinstance(load_model(path, model_class=SPEC), SmallCNN)


def test_checkpoint_cannot_smuggle_a_callable_through_oamipc_models(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(Malicious(marker), evil)  # what torch.load(evil, weights_only=False) would run
    path = tmp_path / "ckpt.pt"
    for spec in ["oamipc.models:torch.load", "oamipc.models:nn.Module", "oamipc.models:_relu_mlp"]:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "model_class": spec,
                    "model_args": {"f": str(evil), "weights_only": False}}, path)
        with pytest.raises(LoadError) as err:
            load_model(path)
        assert "--model-class" in _one_line(err)
    assert not marker.exists()


def test_state_dict_mismatch_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    state = SmallCNN(width=4).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=SPEC, model_args={"width": 4})
    text = _one_line(err)
    assert "fc.bias" in text and "extra.weight" in text

    torch.save(SmallCNN(width=4).state_dict(), path)
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=SPEC, model_args={"width": 8})
    assert "shape mismatch" in _one_line(err)


def test_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    model = SmallCNN(width=4).eval()
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, model_class=SPEC, model_args={"width": 4})
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


def test_nan_weight_is_named(tmp_path: Path) -> None:
    state = SmallCNN(width=4).state_dict()
    state["conv2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=SPEC, model_args={"width": 4})
    assert "conv2.weight" in _one_line(err)


# ---- pickles ------------------------------------------------------------------------------------


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    model = _randomise_bn(SmallCNN())
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(LoadError) as err:
        load_model(path)
    text = _one_line(err)
    assert "--trust-pickle" in text and "arbitrary code" in text

    loaded = load_model(path, trust_pickle=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_trusted_pickle_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save(NotAModel(), path)
    with pytest.raises(LoadError) as err:
        load_model(path, trust_pickle=True)
    assert "is a NotAModel, not a model" in _one_line(err)


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(Malicious(marker), path)
    else:
        path.write_bytes(pickle.dumps(Malicious(marker)))
    assert not marker.exists()
    with pytest.raises(LoadError) as err:
        load_model(path)
    assert "--trust-pickle" in _one_line(err)
    assert not marker.exists()


# ---- other files --------------------------------------------------------------------------------


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(SmallCNN().eval()), path)
    with pytest.raises(LoadError) as err:
        load_model(path)
    text = _one_line(err)
    assert "TorchScript" in text and "torch.export" in text


def test_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(SmallCNN().state_dict(), good)
    data = good.read_bytes()
    cases = {
        "missing.pt": None,
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "random.pt": random.Random(0).randbytes(4096),
        "text.pt": b"hello, not a model\n" * 10,
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(LoadError) as err:
            load_model(path, model_class=SPEC)
        assert name in _one_line(err)
    with pytest.raises(LoadError, match="directory"):
        load_model(tmp_path)


def test_bad_model_class_specs(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(SmallCNN().state_dict(), path)
    for spec, expected in [
        ("no_colon_here", "package.module:Name"),
        ("surely_not_a_module_xyz:Net", "surely_not_a_module_xyz"),
        (f"{__name__}:DoesNotExist", "DoesNotExist"),
        (f"{__name__}:NOT_CALLABLE", "not a class or function"),
        (f"{__name__}:broken_constructor", "width must be even"),
        (f"{__name__}:make_nothing", "not a torch.nn.Module"),
    ]:
        with pytest.raises(LoadError) as err:
            load_model(path, model_class=spec)
        text = _one_line(err)
        assert spec in text or spec.partition(":")[0] in text
        assert expected in text


def test_model_args_must_be_dict_or_list(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(SmallCNN().state_dict(), path)
    with pytest.raises(UsageError):
        load_model(path, model_class=SPEC, model_args="width=4")  # type: ignore[arg-type]


def test_import_object_from_module_and_file(tmp_path: Path) -> None:
    assert import_object("torch.nn:Conv2d") is nn.Conv2d
    assert import_object("torch:nn.Linear") is nn.Linear
    source = tmp_path / "my_loader.py"
    source.write_text("def load():\n    return 'data'\n")
    assert import_object(f"{source}:load")() == "data"  # type: ignore[operator]
    with pytest.raises(DataError, match="nothing_here"):
        import_object("torch.nn:nothing_here", error=DataError)


def test_loading_still_exports_what_moved_out_of_it() -> None:
    # Callers import these from oamipc.loading; they now live beside what they belong to.
    from oamipc import loading

    assert loading.import_object is import_object
    assert loading.exported_to_graph_module is exported_to_graph_module


def test_legacy_torch_save_format_state_dict(tmp_path: Path) -> None:
    model = SmallCNN(width=4).eval()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load_model(path, model_class=SPEC, model_args={"width": 4})
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


def test_plain_pickle_of_a_model_needs_trust(tmp_path: Path) -> None:
    model = SmallCNN(width=4).eval()
    path = tmp_path / "model.pkl"
    with open(path, "wb") as handle:
        pickle.dump(model, handle)
    with pytest.raises(LoadError) as err:
        load_model(path)
    assert "--trust-pickle" in _one_line(err)
    loaded = load_model(path, trust_pickle=True)
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


# ---- hostile and degenerate checkpoints -------------------------------------------------------


class Recorder(nn.Module):
    """Records the device of every build: the meta dry run must come first, and suffice to refuse."""

    builds: ClassVar[list[str]] = []

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(8, hidden)
        Recorder.builds.append(self.fc.weight.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class NeedsRealTensors(nn.Module):
    """A constructor that reads a tensor's value: it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, int(torch.ones(()).add(1).item()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_weight_is_named(tmp_path: Path, value: float) -> None:
    state = SmallCNN(width=4).state_dict()
    state["fc.weight"][3, 1] = value
    path = tmp_path / "inf.pt"
    torch.save(state, path)
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=SPEC, model_args={"width": 4})
    text = _one_line(err)
    assert "fc.weight" in text and "1 NaN/Inf" in text and "inf.pt" in text


def test_inf_weight_in_exported_program_is_refused(tmp_path: Path) -> None:
    model = SmallCNN(width=4).eval()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("inf")
    path = _save_pt2(model, torch.randn(1, 3, 8, 8), tmp_path / "inf.pt2")
    with pytest.raises(LoadError) as err:
        load_model(path)
    assert "conv2.weight" in _one_line(err) and "NaN/Inf" in _one_line(err)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("layers", [(4, 0, 3), (4, 8, 0)], ids=["hidden layer", "output layer"])
def test_zero_size_layer_is_refused(tmp_path: Path, layers: tuple[int, int, int]) -> None:
    a, b, c = layers
    model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    path = tmp_path / "zero.pt"
    torch.save(model, path)
    with pytest.raises(LoadError) as err:
        load_model(path, trust_pickle=True)
    text = _one_line(err)
    bad = "0.weight" if b == 0 else "2.weight"
    assert f"'{bad}'" in text and "no elements" in text and "zero.pt" in text


def test_huge_model_args_fail_fast_without_allocating(tmp_path: Path) -> None:
    """A checkpoint (or --model-args) declaring a 10^12-unit layer: refused from the meta build alone."""
    from oamipc.models import DigitsMLP

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": DigitsMLP(hidden=(16,)).state_dict(), "model_class": "oamipc.models:DigitsMLP",
                "model_args": {"hidden": [10**12]}}, path)
    with pytest.raises(LoadError) as err:
        load_model(path)
    text = _one_line(err)
    assert "TB" in text and "(1000000000000, 64)" in text and "--model-args" in text

    Recorder.builds.clear()
    with pytest.raises(LoadError, match="half of this machine's"):
        load_model(path, model_class=f"{__name__}:Recorder", model_args={"hidden": 10**12})
    assert Recorder.builds == ["meta"]  # the real constructor never ran


def test_model_size_limit_is_half_the_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oamipc import checkpoint

    path = tmp_path / "sd.pt"
    torch.save(Recorder(hidden=64).state_dict(), path)
    # 64 * 8 + 64 floats = 2304 bytes
    monkeypatch.setattr(checkpoint, "_memory_limit", lambda: 2304)
    assert isinstance(load_model(path, model_class=f"{__name__}:Recorder", model_args=[64]), Recorder)
    monkeypatch.setattr(checkpoint, "_memory_limit", lambda: 2303)
    with pytest.raises(LoadError, match=r"2\.3 KB .* 4\.6 KB of memory"):
        load_model(path, model_class=f"{__name__}:Recorder", model_args=[64])


def test_wrong_shapes_are_checked_before_the_real_build(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(Recorder(hidden=4).state_dict(), path)
    Recorder.builds.clear()
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=f"{__name__}:Recorder", model_args={"hidden": 6})
    assert _one_line(err) == (
        f"the state dict in {path} does not fit '{__name__}:Recorder': shape mismatch (file vs model) "
        f"fc.weight (4, 8) vs (6, 8), fc.bias (4,) vs (6,); check that --model-class and --model-args "
        f"describe the model that was saved")
    assert Recorder.builds == ["meta"]


def test_only_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = SmallCNN(width=4).state_dict()
    state["head.weight"] = torch.zeros(2, 2)
    state["head.bias"] = torch.zeros(2)
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=SPEC, model_args={"width": 4})
    text = _one_line(err)
    assert "unexpected keys head.weight, head.bias;" in text and "missing" not in text


def test_factory_that_cannot_run_on_meta_still_loads(tmp_path: Path) -> None:
    model = NeedsRealTensors().eval()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, model_class=f"{__name__}:NeedsRealTensors")
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)


def test_declared_huge_storage_in_a_legacy_checkpoint_fails_fast(tmp_path: Path) -> None:
    """A torch.save (legacy format) file whose header claims a 4 TB storage: refused, not allocated."""
    import collections
    import io
    import struct

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    numel = 10**12

    class Storage:
        pass

    class Rebuild:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (torch._utils._rebuild_tensor_v2,
                    (Storage, 0, (10**6, 10**6), (10**6, 1), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is Storage else None

    buf = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                                                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump({"fc.weight": Rebuild()})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", numel) + bytes(16))
    path = tmp_path / "huge.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(LoadError) as err:
        load_model(path, model_class=f"{__name__}:Recorder")
    assert "huge.pt" in _one_line(err)


def test_pt2_with_top_level_legacy_entries_is_refused_and_not_run(tmp_path: Path) -> None:
    """torch.export.load falls back to top-level ``serialized_*.pt`` entries and unpickles them fully."""
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    program = torch.export.export(SmallCNN().eval(), (torch.randn(1, 3, 8, 8),))
    good = tmp_path / "good.pt2"
    torch.export.save(program, good)
    legacy = serialize(program)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Malicious(marker))
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        # Any top-level entry makes the current layout fail, so torch tries the old one.
        dst.writestr("version", f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}")
        dst.writestr("serialized_exported_program.json", legacy.exported_program)
        dst.writestr("serialized_state_dict.pt", payload)
        dst.writestr("serialized_constants.pt", legacy.constants)
        dst.writestr("serialized_example_inputs.pt", legacy.example_inputs)
    with pytest.raises(LoadError) as err:
        load_model(evil)
    text = _one_line(err)
    assert "serialized_state_dict.pt" in text and "--trust-pickle" in text
    assert not marker.exists()


def test_damaged_pt2_gives_the_real_cause_and_no_log_noise(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    good = _save_pt2(SmallCNN().eval(), torch.randn(1, 3, 8, 8), tmp_path / "good.pt2")
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["fc.weight"]["tensor_meta"]["sizes"][0]["as_int"] = 10**6
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    capfd.readouterr()
    with pytest.raises(LoadError) as err:
        load_model(bad)
    text = _one_line(err)
    assert "bad.pt2" in text and "out of bounds" in text and "warnings above" not in text
    assert capfd.readouterr().err == ""  # torch's traceback-in-a-warning stays off the terminal

"""The example models: architectures trace with torch.fx, and the shipped files are really trained.

The files in ``examples/`` are loaded the way a user without oamipc.loading would: weights-only,
then the class named in the file is imported and built with the stored arguments.  Their test
accuracies must match what examples/README.md documents (measured by examples/train_examples.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from oamipc import models
from oamipc.data import accuracy, fashion_mnist_available, load_data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_BYTES = 1_000_000

# name -> (data spec, class, test accuracy in % as documented in examples/README.md)
DOCUMENTED = {
    "digits_mlp": ("digits", "DigitsMLP", 98.70),
    "digits_cnn": ("digits", "DigitsCNN", 99.07),
    "digits_seq": ("digits", "DigitsSeq", 97.77),
    "fashion_mlp": ("fashion-mnist", "PaperMLP", 88.96),
    "fashion_lenet5": ("fashion-mnist", "LeNet5", 89.24),
    "fashion_vit": ("fashion-mnist", "ViT", 81.40),
}
TOLERANCE_POINTS = 0.5

no_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)",
)


def _params(name: str) -> list[object]:
    return [pytest.param(name, marks=no_fashion)] if DOCUMENTED[name][0] == "fashion-mnist" else [name]


ALL = [p for name in DOCUMENTED for p in _params(name)]


def _load(path: Path) -> tuple[dict[str, object], nn.Module]:
    """Weights-only load, then build ``module:Class(**model_args)`` and load the state dict strictly."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    module_name, class_name = payload["model_class"].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls(**payload["model_args"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return payload, model.eval()


# ----------------------------------------------------------------------------- architectures

ARCHITECTURES = {
    "DigitsMLP": (lambda: models.DigitsMLP(), (1, 8, 8)),
    "DigitsMLP-3": (lambda: models.DigitsMLP(hidden=(32, 16, 8)), (1, 8, 8)),
    "DigitsCNN": (lambda: models.DigitsCNN(), (1, 8, 8)),
    "PaperMLP-FC3": (lambda: models.PaperMLP(), (1, 28, 28)),
    "PaperMLP-FC4": (lambda: models.PaperMLP(hidden=models.PaperMLP.FC4), (1, 28, 28)),
    "PaperMLP-flat": (lambda: models.PaperMLP(hidden=(50,), in_features=64), (64,)),
    "LeNet5": (lambda: models.LeNet5(), (1, 28, 28)),
    "LeNet5-rgb": (lambda: models.LeNet5(in_channels=3, num_classes=4), (3, 28, 28)),
    "LeNet5-avg": (lambda: models.LeNet5(pool="avg"), (1, 28, 28)),
    "SmallCNN": (lambda: models.SmallCNN(), (1, 8, 8)),
    "SmallCNN-noBN": (lambda: models.SmallCNN(batch_norm=False), (1, 8, 8)),
    "SmallCNN-28": (lambda: models.SmallCNN(widths=(8, 16, 4), image_size=28, hidden=20), (1, 28, 28)),
    "ViT": (lambda: models.ViT(dim=32, depth=2, heads=4, mlp=64), (1, 28, 28)),
    "ViT-digits": (lambda: models.ViT(image_size=8, patch=2, dim=16, depth=1, heads=2, mlp=32), (1, 8, 8)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_trace_with_fx(arch: str) -> None:
    make, sample_shape = ARCHITECTURES[arch]
    model = make().eval()
    x = torch.rand(3, *sample_shape)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert expected.shape[0] == 3
    # every layer is its own call_module node (no shared modules, no functional ReLU)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(called) == len(set(called)) == sum(1 for m in model.modules() if not list(m.children()))


def test_paper_mlp_widths() -> None:
    fc3 = [m.out_features for m in models.PaperMLP().modules() if isinstance(m, nn.Linear)]
    fc4 = [m.out_features for m in models.PaperMLP(hidden=models.PaperMLP.FC4).modules() if isinstance(m, nn.Linear)]
    assert fc3 == [300, 100, 10] and fc4 == [200, 100, 100, 10]
    assert models.PaperMLP().body[0].in_features == 784


def test_digits_cnn_and_lenet_shapes() -> None:
    cnn_bytes = sum(t.numel() * t.element_size() for t in models.DigitsCNN().state_dict().values())
    assert cnn_bytes < MAX_BYTES
    convs = [(m.in_channels, m.out_channels) for m in models.LeNet5().modules() if isinstance(m, nn.Conv2d)]
    fcs = [(m.in_features, m.out_features) for m in models.LeNet5().modules() if isinstance(m, nn.Linear)]
    assert convs == [(1, 6), (6, 16)] and fcs == [(400, 120), (120, 84), (84, 10)]


def test_lenet5_average_pooling_is_the_functional_average() -> None:
    """pool="avg" is LeNet-5 with F.avg_pool2d where the max pools were (the oracle: torch's functional ops)."""
    model = models.LeNet5(pool="avg").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        h = F.avg_pool2d(F.relu(model.conv1(x)), 2)
        h = F.avg_pool2d(F.relu(model.conv2(h)), 2)
        h = F.relu(model.fc2(F.relu(model.fc1(h.flatten(1)))))
        torch.testing.assert_close(model(x), model.fc3(h), rtol=0, atol=0)
    assert isinstance(models.LeNet5().pool1, nn.MaxPool2d)
    with pytest.raises(ValueError, match="pool must be one of max, avg"):
        models.LeNet5(pool="min")


@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_cnn_layers(batch_norm: bool) -> None:
    model = models.SmallCNN(widths=(8, 16), image_size=28, hidden=32, batch_norm=batch_norm).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16)]
    assert bns == ([8, 16] if batch_norm else [])
    assert all((c.bias is None) == batch_norm for c in convs)  # the batch norm's shift replaces the bias
    assert model.head[1].in_features == 16 * 7 * 7  # two 2x2 pools: 28 -> 14 -> 7
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        h = x
        for i, conv in enumerate(convs):
            h = conv(h)
            if batch_norm:
                bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][i]
                h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
            h = F.max_pool2d(F.relu(h), 2)
        torch.testing.assert_close(model(x), model.head[3](F.relu(model.head[1](h.flatten(1)))))
    with pytest.raises(ValueError, match="too small"):
        models.SmallCNN(widths=(4, 4, 4, 4), image_size=8)


def test_constructors_follow_the_callers_seed() -> None:
    torch.manual_seed(7)
    a = models.DigitsCNN().state_dict()
    torch.manual_seed(7)
    b = models.DigitsCNN().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("name", ALL)
def test_shipped_files_are_weights_only_small_and_well_formed(name: str) -> None:
    for suffix in ("", "_init"):
        path = EXAMPLES / f"{name}{suffix}.pt"
        assert path.is_file(), f"{path} missing: run python examples/train_examples.py --fashion"
        assert path.stat().st_size < MAX_BYTES
        payload, model = _load(path)
        assert set(payload) == {"model_class", "model_args", "state_dict"}
        assert payload["model_class"] == f"oamipc.models:{DOCUMENTED[name][1]}"
        fx.symbolic_trace(model)


@pytest.mark.parametrize("name", ALL)
def test_shipped_models_reach_documented_accuracy(name: str) -> None:
    spec, _, documented = DOCUMENTED[name]
    test = load_data(spec).test
    _, trained = _load(EXAMPLES / f"{name}.pt")
    _, initial = _load(EXAMPLES / f"{name}_init.pt")
    measured = 100 * accuracy(trained, test)
    assert abs(measured - documented) <= TOLERANCE_POINTS, f"{name}: {measured:.2f}% vs documented {documented}%"
    # the _init file holds the untrained starting point of the same network
    assert 100 * accuracy(initial, test) < 30.0
    init_sd, trained_sd = initial.state_dict(), trained.state_dict()
    assert init_sd.keys() == trained_sd.keys()
    assert all(init_sd[k].shape == trained_sd[k].shape for k in init_sd)
    assert not torch.equal(init_sd[next(iter(init_sd))], trained_sd[next(iter(init_sd))])


# ---------------------------------------------------------------------------- training script


def _train_script() -> ModuleType:
    name = "_oamipc_examples_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "train_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_training_script_recipes_match_shipped_files() -> None:
    script = _train_script()
    assert {r.name for r in script.RECIPES} == set(DOCUMENTED)
    for recipe in script.RECIPES:
        payload = torch.load(EXAMPLES / f"{recipe.name}.pt", map_location="cpu", weights_only=True)
        assert (payload["model_class"], payload["model_args"]) == (recipe.model_class, recipe.model_args)


def test_training_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _train_script()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert script.main(["--out", str(tmp_path), "--only", "digits_mlp"]) == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)  # main() switches it on for the process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_mlp.pt", "digits_mlp_init.pt"]
    _, model = _load(tmp_path / "digits_mlp.pt")
    assert accuracy(model, load_data("digits").test) > 0.95
    assert "digits_mlp" in capsys.readouterr().out

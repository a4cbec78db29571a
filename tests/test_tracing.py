"""Tests for oamipc.tracing: tracing, leaf modules, shape propagation and their error messages."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oamipc.errors import OamipcError, TraceError, UsageError
from oamipc.lifting import exported_to_graph_module
from oamipc.tracing import example_inputs_for, parse_input_shape, propagate_shapes, trace

THIS_FILE = Path(__file__).name


class MnistNet(nn.Module):
    """(N, 1, 28, 28) -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(x, 1))


class Gate(nn.Module):
    """Data-dependent control flow: untraceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # LINE-GATE
            return self.conv(x)
        return x


class Rows(nn.Module):
    """Iterates over a tensor: untraceable by torch.fx."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row * 2 for row in x])  # LINE-ROWS


class Checked(nn.Module):
    """``torch._assert`` on a data-dependent condition: traced as a call, checked when run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.abs().sum() >= 0, "input must be finite")
        return x * 2


class PlainAssert(nn.Module):
    """A Python ``assert`` on tensor values needs a bool: untraceable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.sum() > -1e9  # LINE-ASSERT
        return x


class ClampFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class UsesFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ClampFn.apply(x) + 1


class Net(nn.Module):
    """A stem, a block that cannot be traced, and a head; returns a tuple."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(block)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.layer1(F.relu(self.stem(x)))
        return self.head(y.mean((2, 3))), y


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.fc(x)
        return {"logits": y, "probs": y.softmax(-1)}


def _line_of(marker: str) -> int:
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()  # type: ignore[arg-type]
    return next(i for i, text in enumerate(lines, 1) if marker in text and "_line_of" not in text)


def _one_line(exc: pytest.ExceptionInfo[OamipcError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_trace_gives_eval_graph_with_shapes() -> None:
    model = MnistNet().train()
    (x,) = example_inputs_for((2, 1, 28, 28))
    gm = trace(model, (x,))
    assert not gm.training and not gm.bn1.training
    for node in gm.graph.nodes:
        if node.op not in ("output",):
            assert "tensor_meta" in node.meta, node.name
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"}
    assert shapes["conv1"] == (2, 4, 28, 28)
    assert shapes["flatten"] == (2, 4 * 14 * 14)
    assert shapes["fc"] == (2, 10)
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_tuple_and_dict_outputs_trace() -> None:
    model = Net(nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model, (x,))
    out = gm(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out, model(x))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert [tuple(m.shape) for m in output.meta["tensor_meta"]] == [(1, 2), (1, 4, 8, 8)]

    gm = trace(DictOut().eval(), (torch.randn(2, 5),))
    assert set(gm(torch.randn(2, 5))) == {"logits", "probs"}


def test_data_dependent_control_flow_names_module_and_line() -> None:
    with pytest.raises(TraceError) as err:
        trace(Net(Gate()), (torch.randn(1, 3, 8, 8),))
    text = _one_line(err)
    assert "'layer1.0' (Gate)" in text
    assert f"{THIS_FILE}:{_line_of('LINE-GATE')}" in text
    assert "--leaf-module layer1.0" in text
    assert "control flow" in text


def test_iterating_a_tensor_names_module_and_line() -> None:
    with pytest.raises(TraceError) as err:
        trace(Net(Rows()), (torch.randn(1, 3, 8, 8),))
    text = _one_line(err)
    assert "'layer1.0' (Rows)" in text and f"{THIS_FILE}:{_line_of('LINE-ROWS')}" in text
    assert "cannot be iterated" in text


def test_python_assert_in_root_forward() -> None:
    with pytest.raises(TraceError) as err:
        trace(PlainAssert(), (torch.randn(3),))
    text = _one_line(err)
    assert "forward of PlainAssert" in text and f"{THIS_FILE}:{_line_of('LINE-ASSERT')}" in text
    assert "--leaf-module" in text


def test_torch_assert_is_traced_and_checked_when_run() -> None:
    gm = trace(Checked(), (torch.randn(3),))
    assert any(n.target is torch._assert for n in gm.graph.nodes)
    with pytest.raises(TraceError, match="input must be finite"):
        propagate_shapes(gm, (torch.tensor([float("nan")]),))


def test_custom_autograd_function_is_traced_through() -> None:
    """fx inlines ``Function.apply``'s forward (the custom backward is not in the graph)."""
    gm = trace(UsesFunction(), (torch.randn(4),))
    x = torch.randn(4)
    torch.testing.assert_close(gm(x), x.clamp(min=0) + 1)


def test_leaf_module_stays_opaque() -> None:
    model = Net(Gate()).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model, (x,), leaf_modules=["layer1.0"])
    leaves = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert leaves["layer1.0"] is Gate
    assert "layer1.0.conv" not in leaves
    torch.testing.assert_close(gm(x), model(x))


def test_unknown_leaf_module_lists_valid_names() -> None:
    with pytest.raises(TraceError) as err:
        trace(Net(Gate()), (torch.randn(1, 3, 8, 8),), leaf_modules=["layer1.00"])
    text = _one_line(err)
    assert "'layer1.00'" in text and "layer1.0" in text


def test_wrong_input_shape_names_node_and_fix() -> None:
    with pytest.raises(TraceError) as err:
        trace(MnistNet(), example_inputs_for((1, 3, 32, 32)))
    text = _one_line(err)
    assert "node 'conv1' (call_module conv1: Conv2d)" in text
    assert "1,3,32,32" in text
    assert "--input-shape" in text and "1,1,32,32" in text

    # Right channels, wrong size: the failure is deeper, at the linear head.
    with pytest.raises(TraceError) as err:
        trace(MnistNet(), example_inputs_for((1, 1, 32, 32)))
    assert "node 'fc' (call_module fc: Linear)" in _one_line(err)


def test_wrong_input_count() -> None:
    gm = trace(MnistNet(), example_inputs_for((1, 1, 28, 28)))
    with pytest.raises(TraceError, match="takes 1 input"):
        propagate_shapes(gm, (torch.randn(1, 1, 28, 28), torch.randn(1)))


def test_graph_module_from_export_is_not_retraced() -> None:
    model = MnistNet().eval()
    x = torch.randn(2, 1, 28, 28)
    lifted = exported_to_graph_module(torch.export.export(model, (x,)))
    gm = trace(lifted, (x,))
    assert gm is lifted
    assert tuple(next(n for n in gm.graph.nodes if n.target == "fc").meta["tensor_meta"].shape) == (2, 10)
    with pytest.raises(TraceError, match="node 'conv1'"):
        propagate_shapes(gm, (torch.randn(2, 3, 28, 28),))


def test_propagate_shapes_reruns_after_a_change() -> None:
    gm = trace(MnistNet(), example_inputs_for((1, 1, 28, 28)))
    gm.conv1 = nn.Conv2d(1, 4, 3, padding=0)
    gm.fc = nn.Linear(4 * 13 * 13, 10)
    propagate_shapes(gm, example_inputs_for((1, 1, 28, 28)))
    assert tuple(next(n for n in gm.graph.nodes if n.name == "conv1").meta["tensor_meta"].shape) == (1, 4, 26, 26)


def test_parse_input_shape() -> None:
    assert parse_input_shape("1,1,28,28") == (1, 1, 28, 28)
    assert parse_input_shape(" (1, 3, 32, 32) ") == (1, 3, 32, 32)
    assert parse_input_shape("1x64") == (1, 64)
    for bad in ["", "1,,2", "a,b", "1,-3", "0,1"]:
        with pytest.raises(UsageError) as err:
            parse_input_shape(bad)
        assert "1,1,28,28" in _one_line(err)


def test_example_inputs_are_seeded() -> None:
    (a,) = example_inputs_for((2, 3), seed=1)
    (b,) = example_inputs_for([2, 3], seed=1)
    (c,) = example_inputs_for((2, 3), seed=2)
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


class WritesInput(nn.Module):
    """An in-place activation on (a view of) the input, then a Linear: it overwrites the caller's tensor."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.act = act
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.flat(x)))


class MethodWritesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.view(x.size(0), -1)
        y.relu_()
        return x * 2  # reads the input after the in-place op: the model relies on the aliasing


@pytest.mark.parametrize("act", [nn.ELU(inplace=True), nn.ReLU(inplace=True)], ids=["elu", "relu"])
def test_input_written_in_place_is_copied_first(act: nn.Module) -> None:
    """Regression (found by tests/test_fuzz.py): tracing used to let the graph overwrite its input.

    The example input, and later every calibration, test and ONNX-verification batch, were changed
    by each run, so that accuracies and the ONNX check compared different data.  The traced graph
    now starts with a clone of such an input; its outputs are the eager model's.
    """
    model = WritesInput(act).eval()
    x = torch.randn(3, 2, 3)
    before = x.clone()
    gm = trace(model, (x,))
    assert torch.equal(x, before), "tracing wrote into the example input"
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    assert (first.op, first.target) == ("call_method", "clone")
    with torch.no_grad():
        out = gm(x)
    assert torch.equal(x, before), "the traced module wrote into its input"
    torch.testing.assert_close(out, model(x.clone()))
    # Found statically as well: on data that the activation leaves unchanged, e.g. ReLU of x >= 0.
    positive = x.abs()
    gm = trace(model, (positive,))
    assert next(n for n in gm.graph.nodes if n.op != "placeholder").target == "clone"


def test_in_place_method_on_a_view_of_the_input_keeps_the_model_semantics() -> None:
    model = MethodWritesInput()
    x = torch.randn(2, 3, 2)
    before = x.clone()
    gm = trace(model, (x,))
    out = gm(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, before.clamp(min=0) * 2)  # the model's own aliasing still holds


def test_model_that_does_not_write_its_input_gets_no_copy() -> None:
    gm = trace(MnistNet(), example_inputs_for((2, 1, 28, 28)))
    assert not any(n.target == "clone" for n in gm.graph.nodes)


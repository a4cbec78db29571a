"""Graph edge cases through the public API (issue 5, item 2): each is handled or refused by name.

Handled means checked numerically: the pruned module equals the original with the removed units'
producers zeroed (exact here: every model uses ReLU-like activations, so a zeroed unit contributes
nothing downstream), and the exported ONNX file computes what the pruned module computes.
Refused means a one-line ``OamipcError`` that names the node or group and the way out.

| case                               | outcome                                                          |
| ---------------------------------- | ---------------------------------------------------------------- |
| tuple / dict outputs               | handled; every output's units are kept                           |
| several inputs                     | handled; branches from both inputs couple through the add        |
| module called twice                | handled; its units are kept ("called 2 times (shared weights)")  |
| layers sharing a parameter         | handled; kept, so the tie survives ("tied weights")              |
| in-place ops, also on the input    | handled; the graph copies an input it writes, caller data intact |
| item assignment (``h[:, 0] = 0``)  | refused (TraceError: line, --leaf-module or a tensor op)         |
| torch._assert                      | handled; a checked channel width is kept, the asserts still run  |
| data-dependent control flow        | refused (TraceError: module, line, --leaf-module); as a leaf: ok |
| custom autograd Function           | handled; fx inlines its forward                                  |
| buffers                            | handled; a per-channel buffer keeps its units, a scalar does not |
| layers of width 1                  | handled; never emptied                                           |
| every unit would be pruned         | keeps --min-keep; an unreachable budget or empty plan: PlanError |
| a width used as a number (h / C)   | handled; those units are kept ("used as a number")               |
| cat of a tuple the graph computes  | handled; the indexed channels are kept                           |
| a pass that breaks the graph       | TraceError naming the node and a --leaf-module, not the shape    |
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import oamipc
from oamipc.driver import CompileResult, FileJob, ModelSource, compile_file
from oamipc.errors import OamipcError, PlanError, TraceError
from oamipc.export import export_onnx, verify_onnx
from oamipc.passes import UnitGroupAnalysis
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.units import Layout

from .models import Asserts

# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


def _flat(out: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple/list/dict output, depth first (ONNX output order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    return [t for v in out for t in _flat(v)]


def _zeroed_reference(res: CompileResult) -> fx.GraphModule:
    """The unpruned graph with every removed unit's producer rows (and BatchNorm entries) zeroed."""
    example = res.example_inputs
    ref = copy.deepcopy(res.original)
    leaves = tuple(res.report["settings"]["leaf_modules"])
    graph = AnalysisManager(CompileContext(example)).get(UnitGroupAnalysis(leaves), ref)
    assert res.plan is not None
    removed = set(np.flatnonzero(~res.plan.kept_mask(graph)).tolist())
    with torch.no_grad():
        for u in removed:
            for target, channel in graph.members[u]:
                mod = ref.get_submodule(target)
                mod.weight[channel] = 0.0
                if mod.bias is not None:
                    mod.bias[channel] = 0.0
        for node in ref.graph.nodes:
            lay = graph.layouts.get(node.name)
            if node.op == "call_module" and isinstance(ref.get_submodule(node.target), nn.BatchNorm2d) \
                    and isinstance(lay, Layout):
                rows = [i for i, u in enumerate(lay.units.tolist()) if u in removed]
                bn = ref.get_submodule(node.target)
                for t in (bn.weight, bn.bias, bn.running_mean):
                    t[rows] = 0.0
    return ref


def _check(res: CompileResult, inputs: tuple[torch.Tensor, ...], tmp_path: Path, *, removed: bool = True) -> None:
    """Pruned == zeroed reference on ``inputs``, and the ONNX file == the pruned module."""
    if removed:
        assert res.report["prune"]["units_removed"] > 0, "the case should still allow some pruning"
        assert res.report["after"]["macs"] < res.report["before"]["macs"]
    with torch.no_grad():
        got = _flat(res.module(*(t.clone() for t in inputs)))
        want = _flat(_zeroed_reference(res)(*(t.clone() for t in inputs)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    path = export_onnx(res.module, res.example_inputs, tmp_path / "pruned.onnx")
    check = verify_onnx(path, res.module, inputs)
    assert check.passed, check


def _compile(model: nn.Module, example: tuple[torch.Tensor, ...], **options: Any) -> CompileResult:
    options.setdefault("importance", "l1")
    if "plan" not in options and "flops_budget" not in options:
        options.setdefault("prune_ratio", 0.5)
    return oamipc.compile(model.eval(), example, **options)


def _pinned_reasons(res: CompileResult, group: str) -> list[str]:
    return next(g for g in res.report["units"]["groups"] if g["name"].split(" ")[0] == group)["pinned_reasons"]


# --------------------------------------------------------------------------------------------
# Outputs and inputs
# --------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A shared trunk and two heads; returns a tuple, or a dict with ``as_dict``."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.trunk = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.hidden(torch.relu(self.trunk(x))))
        a, b = self.head_a(h), self.head_b(h)
        return {"a": a, "b": b} if self.as_dict else (a, b)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_tuple_and_dict_outputs(as_dict: bool, tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(TwoHeads(as_dict), (x[:2],))
    out = res.module(x)
    assert isinstance(out, dict if as_dict else tuple)
    assert [t.shape for t in _flat(out)] == [(5, 3), (5, 2)]  # both outputs keep their width
    assert _pinned_reasons(res, "head_a") == ["reaches a network output"]
    _check(res, (x,), tmp_path)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.a(x) + self.b(y)))


def test_multiple_inputs(tmp_path: Path) -> None:
    x, y = torch.randn(5, 6), torch.randn(5, 4)
    res = _compile(TwoInputs(), (x[:2], y[:2]))
    group = next(g for g in res.report["units"]["groups"] if "a" in g["producers"])
    assert sorted(group["producers"]) == ["a", "b"]  # the add couples the two inputs' branches
    assert res.module.get_submodule("b").out_features == 4
    _check(res, (x, y), tmp_path)


# --------------------------------------------------------------------------------------------
# Shared modules and tied parameters
# --------------------------------------------------------------------------------------------


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(torch.relu(self.shared(h))))
        return self.fc(torch.relu(self.mid(h)))


class TiedWeights(CalledTwice):
    def __init__(self) -> None:
        super().__init__()
        self.other = nn.Linear(8, 8)
        self.other.weight = self.shared.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.other(torch.relu(self.shared(h))))
        return self.fc(torch.relu(self.mid(h)))


@pytest.mark.parametrize(("cls", "reason"), [(CalledTwice, "module is called 2 times (shared weights)"),
                                             (TiedWeights, "shares a parameter with other (tied weights)")])
def test_shared_module_and_tied_weights_are_kept(cls: type[nn.Module], reason: str, tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(cls(), (x[:2],))
    assert _pinned_reasons(res, "inp") == [f"feeds shared: {reason}"]
    assert res.module.get_submodule("shared").weight.shape == (8, 8)
    assert res.module.get_submodule("mid").out_features == 4  # after the shared part: prunable
    if cls is TiedWeights:
        assert res.module.get_submodule("other").weight is res.module.get_submodule("shared").weight
    _check(res, (x,), tmp_path)


# --------------------------------------------------------------------------------------------
# In-place ops
# --------------------------------------------------------------------------------------------


class InPlaceNet(nn.Module):
    """In-place ops everywhere, the first on the network input itself (ELU, not idempotent)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(x, inplace=True)
        h = self.act(self.fc1(x))
        h += self.fc2(h)
        h.mul_(0.5)
        return self.fc(h)


def test_in_place_ops(tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    example = x[:2].clone()
    res = _compile(InPlaceNet(), (example,))
    assert torch.equal(example, x[:2]), "compile wrote into the example input"
    before = x.clone()
    assert res.module(x).shape == (5, 3)
    assert torch.equal(x, before), "the pruned module wrote into its input"
    _check(res, (x,), tmp_path)


def test_in_place_input_model_through_compile_file(tmp_path: Path) -> None:
    """End to end: before the graph copied its input, the ONNX check saw batches the torch run had changed."""
    torch.manual_seed(0)
    model = InPlaceNet()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 3, 40), x_test=x[:20], y_test=rng.integers(0, 3, 20))
    source = ModelSource(str(tmp_path / "model.pt"), model_class="tests.test_edge_cases:InPlaceNet",
                         data=str(tmp_path / "data.npz"))
    job = FileJob(source, str(tmp_path / "pruned.onnx"), bench=False)
    report = compile_file(job, importance="l1", prune_ratio=0.5)
    assert report["onnx"]["passed"] and report["prune"]["units_removed"] == 4
    assert np.array_equal(np.load(tmp_path / "data.npz")["x"], x)


class SetsItem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h[:, 0] = 0.0  # LINE-SETITEM
        return h


def test_item_assignment_is_refused_with_the_line() -> None:
    """torch.fx cannot record ``h[:, 0] = 0``: a TraceError names the line and the ways out."""
    with pytest.raises(TraceError) as err:
        _compile(SetsItem(), (torch.randn(2, 6),))
    text = str(err.value)
    line = next(i for i, t in enumerate(Path(__file__).read_text().splitlines(), 1) if "# LINE-SETITEM" in t)
    assert f"test_edge_cases.py:{line}" in text and "item assignment" in text and "--leaf-module" in text


# --------------------------------------------------------------------------------------------
# torch._assert and control flow
# --------------------------------------------------------------------------------------------


def test_torch_assert(tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(Asserts(), (x[:2],))
    assert _pinned_reasons(res, "fc1") == ["its width is checked by torch._assert at _assert_1 (_assert)"]
    assert res.module.get_submodule("fc2").out_features == 4
    assert sum(n.target is torch._assert for n in res.module.graph.nodes) == 3  # still checked
    with pytest.raises(Exception, match="expects"):
        res.module(torch.randn(5, 6, 1))
    _check(res, (x,), tmp_path)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.mean() > 0:  # data-dependent: torch.fx cannot follow it
            return torch.relu(self.fc(h))
        return h


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.gate = Gate()
        self.mid = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.mid(self.gate(torch.relu(self.inp(x))))))


def test_data_dependent_control_flow_is_refused_then_kept_as_leaf(tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    with pytest.raises(TraceError) as err:
        _compile(Branchy(), (x[:2],))
    text = str(err.value)
    assert "'gate' (Gate)" in text and "test_edge_cases.py:" in text and "--leaf-module gate" in text
    assert "\n" not in text
    res = _compile(Branchy(), (x[:2],), leaf_modules=["gate"])
    assert _pinned_reasons(res, "inp") == ["feeds gate: kept opaque (leaf module)"]
    assert isinstance(res.module.get_submodule("gate"), Gate)
    assert res.module.get_submodule("mid").out_features == 4
    with torch.no_grad():
        got, want = res.module(x), _zeroed_reference(res)(x)
    torch.testing.assert_close(got, want)  # ONNX would bake in the branch taken: not exported here


# --------------------------------------------------------------------------------------------
# Custom autograd functions and buffers
# --------------------------------------------------------------------------------------------


class ClampMin(torch.autograd.Function):
    """relu with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class CustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(ClampMin.apply(self.fc1(x)))


def test_custom_autograd_function(tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(CustomFunction(), (x[:2],))
    assert res.module.get_submodule("fc1").out_features == 4
    _check(res, (x,), tmp_path)


class Buffers(nn.Module):
    """An input-normalisation buffer, a per-channel buffer scale and a scalar buffer temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)
        self.register_buffer("mean", torch.linspace(-1, 1, 6))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x - self.mean)) * self.scale
        g = torch.relu(self.fc2(h)) / self.temperature
        return self.fc(g)


def test_buffers(tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(Buffers(), (x[:2],))
    assert _pinned_reasons(res, "fc1") == ["combined with a tensor of fixed channels at mul (mul)"]
    assert res.module.get_submodule("fc2").out_features == 4  # the scalar buffer pins nothing
    assert set(dict(res.module.named_buffers())) == {"mean", "scale", "temperature"}
    _check(res, (x,), tmp_path)


# --------------------------------------------------------------------------------------------
# Widths at the edge
# --------------------------------------------------------------------------------------------


class WidthOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(1)
        self.c2 = nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.bn1(self.c1(x))))).mean((2, 3))
        return self.fc(torch.relu(self.fc1(h)))


def test_layers_of_width_one(tmp_path: Path) -> None:
    x = torch.randn(5, 3, 6, 6)
    res = _compile(WidthOne(), (x[:2],), prune_ratio=0.9)
    m = res.module
    assert (m.c1.out_channels, m.bn1.num_features, m.c2.in_channels, m.fc1.out_features) == (1, 1, 1, 1)
    assert m.c2.out_channels == 1 and m.fc1.in_features == 1  # 6 -> 1: at least one unit stays
    _check(res, (x,), tmp_path)


@pytest.mark.parametrize("min_keep", [1, 3])
def test_every_unit_would_be_pruned_keeps_min_keep(min_keep: int, tmp_path: Path) -> None:
    x = torch.randn(5, 6)
    res = _compile(TwoHeads(), (x[:2],), prune_ratio=0.99, min_keep=min_keep)
    assert {gp.name: len(gp.kept) for gp in res.plan.groups} == {"trunk": min_keep, "hidden": min_keep,
                                                                  "head_a": 3, "head_b": 2}
    _check(res, (x,), tmp_path)


def test_unreachable_budget_and_empty_plan_are_plan_errors() -> None:
    x = torch.randn(2, 6)
    with pytest.raises(PlanError, match=r"unreachable.*every group is at its minimum width.*min_keep"):
        _compile(TwoHeads(), (x,), flops_budget=0.01, min_keep=2)
    plan = _compile(TwoHeads(), (x,), prune_ratio=0.0).plan
    assert plan is not None
    plan.groups[0].kept = []
    with pytest.raises(PlanError, match=r"plan keeps no unit of group 'trunk'.*--min-keep") as err:
        _compile(TwoHeads(), (x,), plan=plan)
    assert isinstance(err.value, OamipcError) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Widths read at run time, tuples the graph computes, a transform that breaks the graph
# --------------------------------------------------------------------------------------------


class WidthUse(nn.Module):
    """``fc1``'s output goes through ``mix`` (a function of the tensor) before ``fc2``; ``out`` is free."""

    def __init__(self, mix: Any) -> None:
        super().__init__()
        self.mix = mix
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(self.mix(h))))


def _divide_by_width(h: torch.Tensor) -> torch.Tensor:
    return h / h.size(1)


def _swap_halves(h: torch.Tensor) -> torch.Tensor:
    return torch.cat(h.chunk(2, dim=1)[::-1], dim=1)


@pytest.mark.parametrize(("mix", "reason"), [
    (_divide_by_width, "its width is used as a number at truediv (truediv)"),
    (_swap_halves, "feeds getitem (getitem): indexes into a tensor with channels"),
], ids=["width-as-number", "cat-of-computed-tuple"])
def test_width_dependent_code_keeps_its_units(mix: Any, reason: str, tmp_path: Path) -> None:
    """``h / h.size(1)`` would change every value once ``h`` lost a unit, and ``cat`` of a tuple the
    graph computes cannot be followed: both keep ``fc1``'s units, the rest is still pruned."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    res = _compile(WidthUse(mix), (x[:2],))
    assert _pinned_reasons(res, "fc1") == [reason]
    assert res.module.get_submodule("fc1").out_features == 8
    assert res.module.get_submodule("fc2").out_features < 8
    _check(res, (x,), tmp_path)


def test_a_graph_broken_by_a_transform_is_not_blamed_on_the_input_shape() -> None:
    """Shapes that ran before a pass changed the graph: the error names the node and the module to
    keep whole, and does not suggest another --input-shape."""
    from oamipc.tracing import propagate_shapes

    gm = fx.symbolic_trace(WidthUse(_divide_by_width))
    x = torch.randn(2, 6)
    propagate_shapes(gm, (x,))
    gm.fc2 = nn.Linear(5, 8)  # as if a unit analysis had missed that fc2 reads fc1's 8 channels
    with pytest.raises(TraceError) as err:
        propagate_shapes(gm, (x,), transformed=True)
    text = str(err.value)
    assert "no longer runs at node 'fc2'" in text and "--leaf-module fc2" in text
    assert "--input-shape" not in text and "\n" not in text
    with pytest.raises(TraceError, match="pass --input-shape matching the model"):
        propagate_shapes(gm, (x,))

"""The model zoo itself: every entry traces, is seeded, has the documented shape and layers.

The docstring of every zoo architecture carries ``Input``, ``Modules`` and ``Ops`` lines (see
``tests/models.py``); they are checked here against the traced graph, so a zoo model cannot
claim to test a pattern that it does not contain.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter

import pytest
import torch
from torch import fx, nn

from tests.models import ZOO, build, example_input

NAMES = sorted(ZOO)
EXPECTED = {
    "mlp", "lenet5", "vgg_bn", "resnet", "inception", "mobilenet", "se", "flatten_view",
    "functional", "chunk", "norms", "conv1d", "residual_chain",
}
# Layers allowed fewer than 4 output units: (model, qualified module name).
NARROW_ON_PURPOSE = {("mobilenet", "attn")}
_FIELDS = ("Input", "Modules", "Ops", "Pruning")
_FUNCTION_PREFIXES = {
    "_operator": "operator",
    "operator": "operator",
    "torch.nn.functional": "F",
    "torch._C._nn": "F",
}


def _op_name(node: fx.Node) -> str:
    """``torch.cat``, ``F.relu``, ``operator.add`` for functions; ``.view`` for methods."""
    if node.op == "call_method":
        return f".{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    return f"{_FUNCTION_PREFIXES.get(module, module)}.{target.__name__}"


def _doc_fields(doc: str) -> dict[str, str]:
    """The ``Field: text`` entries of a docstring; an entry runs on to the next field or blank line."""
    fields: dict[str, str] = {}
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)[0].split(" ", 1)[0]
        if head in _FIELDS:
            current = head
            fields[current] = stripped[len(head):].lstrip(":").strip()
        elif current is not None and stripped:
            fields[current] += " " + stripped
        else:
            current = None
    return {k: v.removesuffix(".").strip() for k, v in fields.items()}


def _traced(name: str) -> tuple[nn.Module, fx.GraphModule]:
    model = build(name)
    return model, fx.symbolic_trace(model)


def test_zoo_has_every_model() -> None:
    assert set(ZOO) == EXPECTED
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.input_shape[0] == 1, "input shapes are given with batch 1"
        assert entry.num_classes >= 2


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="resnet"):
        build("resnet9000")
    with pytest.raises(KeyError, match="unknown zoo model"):
        example_input("nope")


@pytest.mark.parametrize("name", NAMES)
def test_traces_and_matches_the_module(name: str) -> None:
    model, gm = _traced(name)
    x = example_input(name, batch=3, seed=1)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
    assert expected.shape == (3, ZOO[name].num_classes)
    assert torch.isfinite(expected).all()
    # The samples are told apart: no layer collapses the batch to a constant.
    assert (expected[0] - expected[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_build_is_seeded(name: str) -> None:
    rng_before = torch.random.get_rng_state()
    a, b, c = build(name), build(name), build(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "build touched the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{name}: {key} differs between two seed-0 builds"
    floats = [k for k, v in sa.items() if v.is_floating_point()]
    assert floats
    for key in floats:
        assert not torch.equal(sa[key], sc[key]), f"{name}: {key} is the same for seeds 0 and 1"
    factory_state = ZOO[name].factory().state_dict()
    assert all(torch.equal(factory_state[k], sa[k]) for k in sa), "factory() is not build(name)"


@pytest.mark.parametrize("name", NAMES)
def test_example_input(name: str) -> None:
    shape = ZOO[name].input_shape
    x = example_input(name, batch=5)
    assert x.shape == (5, *shape[1:])
    assert torch.equal(x, example_input(name, batch=5))
    assert not torch.equal(x, example_input(name, batch=5, seed=1))
    assert example_input(name).shape[0] == 4


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_and_non_trivial_norms(name: str) -> None:
    model = build(name)
    assert not any(m.training for m in model.modules())
    for qual, mod in model.named_modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert not torch.allclose(mod.weight, torch.ones_like(mod.weight)), qual
            assert not torch.allclose(mod.bias, torch.zeros_like(mod.bias)), qual
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert mod.running_mean.abs().min() > 0, qual
            assert (mod.running_var > 0).all(), qual
            assert not torch.allclose(mod.running_var, torch.ones_like(mod.running_var)), qual


@pytest.mark.parametrize("name", NAMES)
def test_layers_are_wide_enough_and_end_in_a_linear_classifier(name: str) -> None:
    model, gm = _traced(name)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    head = out_node.args[0]
    assert isinstance(head, fx.Node) and head.op == "call_module"
    classifier = gm.get_submodule(str(head.target))
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == ZOO[name].num_classes
    for qual, mod in model.named_modules():
        if qual == head.target or (name, qual) in NARROW_ON_PURPOSE:
            continue
        if isinstance(mod, nn.Linear):
            assert mod.out_features >= 4, f"{name}: {qual} has {mod.out_features} units"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            assert mod.out_channels >= 4, f"{name}: {qual} has {mod.out_channels} channels"
        assert sum(p.numel() for p in mod.parameters(recurse=False)) < 20_000, f"{name}: {qual}"


@pytest.mark.parametrize("name", NAMES)
def test_docstring_describes_the_model(name: str) -> None:
    model, gm = _traced(name)
    entry = ZOO[name]
    doc = inspect.getdoc(type(model))
    assert doc, f"{name}: no docstring"
    fields = _doc_fields(doc)
    assert set(fields) == set(_FIELDS), f"{name}: docstring fields {sorted(fields)}"

    # Input (N, C, H, W) -> K logits
    match = re.fullmatch(r"\(N((?:, \d+)+)\) -> (\d+) logits", fields["Input"])
    assert match, f"{name}: bad Input line {fields['Input']!r}"
    shape = tuple(int(d) for d in match[1].split(",")[1:])
    assert shape == entry.input_shape[1:], f"{name}: documented input {shape}"
    assert int(match[2]) == entry.num_classes, f"{name}: documented {match[2]} classes"

    # Modules: every call_module node by type; every module is used, and used once.
    documented: Counter[str] = Counter()
    for item in fields["Modules"].split(","):
        kind, count = item.strip().rsplit(" x", 1)
        documented[kind] += int(count)
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert len(called) == len(set(called)), f"{name}: a module is called twice"
    in_graph = Counter(type(gm.get_submodule(t)).__name__ for t in called)
    leaves = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    assert in_graph == documented, f"{name}: graph has {dict(in_graph)}"
    assert leaves == documented, f"{name}: module tree has {dict(leaves)}"

    # Ops: exactly the functions and methods of the graph.
    ops = {_op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    doc_ops = set() if fields["Ops"] == "none" else {o.strip() for o in fields["Ops"].split(",")}
    assert ops == doc_ops, f"{name}: graph ops {sorted(ops)}"
    assert fields["Pruning"], f"{name}: no Pruning notes"

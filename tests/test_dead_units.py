"""The lossless removal: dead units found, removed for free, outputs unchanged on the data's box.

Oracles are PyTorch itself: the original network run on points of the box (uniform samples,
corners, the data) must give what the pruned one gives, and a unit that any of those points
activates must never be called dead.  The hand-built nets have units dead by construction
(non-positive weights and a negative bias on non-negative inputs), so the analysis must find them.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

import oamipc
from oamipc.cli import app
from oamipc.data import fashion_mnist_available
from oamipc.errors import UsageError
from oamipc.passes import DeadUnitAnalysis, UnitGroupAnalysis
from oamipc.passes.input_bounds import Val, propagate
from oamipc.passmanager import AnalysisManager, CompileContext, InputRange
from oamipc.plan import Plan
from oamipc.summary import costs_table
from oamipc.tracing import trace

from .models import ZOO, build, example_input

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------------------------
# networks with dead units by construction


class DeadMLP(nn.Module):
    """6 inputs in [0, 1] -> 8 -> 8 -> 3.  ``fc1`` units 1 and 4 have non-positive weights and a
    negative bias (dead); unit 6 is nearly dead but active near the corner ``x[2] = 1``.  A
    BatchNorm after the first ReLU turns the dead units' 0 into other constants, which ``fc2``
    must absorb in its bias.  ``fc2`` unit 3 has a bias of -50 against weights of about 0.01."""

    DEAD_FC1 = (1, 4)
    NEARLY_DEAD_FC1 = 6

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():
            for m in (self.fc1, self.fc2, self.fc3):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            for u, b in zip(self.DEAD_FC1, (-0.5, -0.1)):
                self.fc1.weight[u] = -self.fc1.weight[u].abs()
                self.fc1.bias[u] = b
            u = self.NEARLY_DEAD_FC1
            self.fc1.weight[u] = -self.fc1.weight[u].abs()
            self.fc1.weight[u, 2] = 1.2
            self.fc1.bias[u] = -1.0
            self.bn.running_mean.copy_(torch.rand(8, generator=gen))
            self.bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
            self.bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
            self.bn.bias.copy_(torch.randn(8, generator=gen))
            self.fc2.weight[3] *= 0.01
            self.fc2.bias[3] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(h)))


class DeadCNN(nn.Module):
    """1x8x8 inputs in [0, 1].  ``conv1`` channels 2 and 5 are dead; with ``bn`` their constant is
    not 0, so a zero-padded ``conv2`` (``pad=1``) cannot absorb it and they must stay; an unpadded
    one folds it into its bias.  ``conv2`` channel 1 has a bias of -100."""

    DEAD_CONV1 = (2, 5)

    def __init__(self, pad: int = 0, bn: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.bn1 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=pad)
        self.fc = nn.Linear(5 * (4 + 2 * pad) ** 2, 3)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            for c, b in zip(self.DEAD_CONV1, (-0.3, -0.2)):
                self.conv1.weight[c] = -self.conv1.weight[c].abs()
                self.conv1.bias[c] = b
            if isinstance(self.bn1, nn.BatchNorm2d):
                self.bn1.running_mean.uniform_(-0.5, 0.5, generator=gen)
                self.bn1.running_var.uniform_(0.5, 2.0, generator=gen)
                self.bn1.weight.uniform_(0.5, 1.5, generator=gen)
                self.bn1.bias.uniform_(-0.5, 0.5, generator=gen)
            self.conv2.bias[1] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


def _data(shape: tuple[int, ...], n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen)


def _box_points(lo: torch.Tensor, hi: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """Uniform points of the box and random corners (each feature at its minimum or maximum)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *lo.shape[1:])
    uniform = torch.minimum(lo + (hi - lo) * torch.rand(shape, generator=gen), hi)
    corners = torch.where(torch.rand(shape, generator=gen) > 0.5, hi, lo)
    if lo[0].numel() <= 8:  # every corner of a small box
        bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=lo[0].numel()))).reshape(-1, *lo.shape[1:])
        corners = torch.cat([corners, lo + (hi - lo) * bits])
    return torch.cat([uniform, corners])


class _Readers(fx.Interpreter):
    """Runs a graph and keeps the input of every node (what each Linear/Conv layer reads)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.inputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
            self.inputs[n.name] = self.env[n.args[0]]
        return super().run_node(n)


class _Every(fx.Interpreter):
    """Runs a graph and keeps the output of every node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.outputs: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.outputs[n.name] = out = super().run_node(n)
        return out


def _varying_units(gm: fx.GraphModule, points: torch.Tensor) -> np.ndarray:
    """Units whose positions at some reading layer do not hold one value on all ``points``."""
    graph = AnalysisManager(CompileContext((points[:1],))).get(UnitGroupAnalysis(), gm)
    readers = _Readers(gm)
    with torch.no_grad():
        readers.run(points)
    varies = np.zeros(graph.n_units, dtype=bool)
    for layer in graph.layers:
        if layer.kind not in ("linear", "conv"):
            continue
        value = readers.inputs[layer.node].movedim(1 if layer.kind == "conv" else -1, 0)
        for p, u in enumerate(layer.in_units.tolist()):
            if u >= 0 and bool((value[p] != value[p].reshape(-1)[0]).any()):
                varies[u] = True
    return varies


def _dead(model: nn.Module, x: torch.Tensor, **options: Any) -> tuple[np.ndarray, Any, fx.GraphModule]:
    gm = trace(model, (x[:1],))
    am = AnalysisManager(CompileContext((x[:1],), x, input_range=InputRange.of(x, "test data")))
    result = am.get(DeadUnitAnalysis(**options), gm)
    return result.dead, am.get(UnitGroupAnalysis(), gm), gm


def _unit(graph: Any, producer: str, channel: int) -> int:
    return next(u for u, members in graph.members.items() if (producer, channel) in members)


def _compile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: Any) -> oamipc.CompileResult:
    options.setdefault("importance", "l1")
    options.setdefault("reconstruct", False)  # a refit changes outputs on purpose; these tests compare them exactly
    return oamipc.compile(model, x[:1], data=(x, y), **options)


def _same_outputs(a: nn.Module, b: nn.Module, points: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(points), b(points), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the analysis


@pytest.mark.parametrize("bounds", ["linear", "interval"])
def test_units_dead_by_construction_are_found(bounds: str) -> None:
    x, _ = _data((6,))
    dead, graph, _ = _dead(DeadMLP().eval(), x, bounds=bounds)
    assert all(dead[_unit(graph, "fc1", c)] for c in DeadMLP.DEAD_FC1)
    assert dead[_unit(graph, "fc2", 3)]
    x, _ = _data((1, 8, 8))
    dead, graph, _ = _dead(DeadCNN().eval(), x, bounds=bounds)
    assert all(dead[_unit(graph, "conv1", c)] for c in DeadCNN.DEAD_CONV1)
    assert dead[_unit(graph, "conv2", 1)]


@pytest.mark.parametrize("name", ["dead_mlp", "dead_cnn", "dead_cnn_padded", *ZOO])
def test_a_unit_that_any_point_of_the_box_moves_is_never_dead(name: str) -> None:
    if name.startswith("dead"):
        model = DeadMLP() if name == "dead_mlp" else DeadCNN(pad=1 if name.endswith("padded") else 0)
        x, _ = _data((6,) if name == "dead_mlp" else (1, 8, 8))
    else:
        model, x = build(name), example_input(name, 256)
    model.eval()
    dead, graph, gm = _dead(model, x)
    points = torch.cat([x, _box_points(x.amin(0, keepdim=True), x.amax(0, keepdim=True), 300)])
    varies = _varying_units(gm, points)
    assert not (dead & varies).any(), f"units {np.nonzero(dead & varies)[0].tolist()} move but were called dead"
    assert not (dead & graph.pinned_mask()).any()


def test_the_nearly_dead_unit_is_active_at_a_corner_and_kept() -> None:
    x, y = _data((6,))
    model = DeadMLP().eval()
    dead, graph, gm = _dead(model, x)
    u = _unit(graph, "fc1", DeadMLP.NEARLY_DEAD_FC1)
    corner = x.amin(0, keepdim=True).clone()
    corner[0, 2] = x[:, 2].max()
    with torch.no_grad():
        assert model.fc1(corner)[0, DeadMLP.NEARLY_DEAD_FC1] > 0  # active in the box, though rarely
    assert not dead[u]
    result = _compile(model, x, y, prune_ratio=0.0)
    assert DeadMLP.NEARLY_DEAD_FC1 in result.plan.groups[0].kept


def test_interval_bounds_prove_no_more_than_linear_ones_and_the_channel_box_stays_sound() -> None:
    for model, x in ((DeadMLP(), _data((6,))[0]), (DeadCNN(), _data((1, 8, 8))[0]),
                     (build("mobilenet"), example_input("mobilenet", 256))):
        model.eval()
        linear, _, gm = _dead(model, x)
        # The linear mode intersects the same interval bounds, which only get tighter at each ReLU.
        assert not (_dead(model, x, bounds="interval")[0] & ~linear).any()
        channel = _dead(model, x, box="channel")[0]
        lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
        if lo.dim() > 2:  # the channel box: every position of a channel spans the channel's range
            lo = lo.amin(dim=tuple(range(2, lo.dim())), keepdim=True).expand_as(hi)
            hi = hi.amax(dim=tuple(range(2, hi.dim())), keepdim=True).expand_as(lo)
        assert not (channel & _varying_units(gm, _box_points(lo, hi, 300))).any()


def test_bounds_contain_every_value_the_network_computes_on_the_box() -> None:
    cases = ((DeadCNN(pad=1), _data((1, 8, 8))[0]), (build("residual_chain"), example_input("residual_chain", 64)),
             (build("functional"), example_input("functional", 64)))
    for model, x in cases:
        gm = trace(model.eval(), (x[:1],))
        lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
        bounds = propagate(gm, lo, hi)
        every = _Every(gm)
        with torch.no_grad():
            every.run(_box_points(lo, hi, 200))
        outputs = every.outputs
        for name, v in bounds.values.items():
            if isinstance(v, Val):
                out = outputs[name].to(torch.float64)
                assert bool(((out >= v.lo) & (out <= v.hi)).all()), name
                const = v.const.expand_as(out[:1])[0]
                assert bool((out[:, const] == out[:1, const]).all()), name


def test_the_analysis_needs_data_and_one_input() -> None:
    x, _ = _data((6,))
    gm = trace(DeadMLP().eval(), (x[:1],))
    with pytest.raises(UsageError, match="needs data"):
        AnalysisManager(CompileContext((x[:1],))).get(DeadUnitAnalysis(), gm)
    with pytest.raises(UsageError, match="box must be one of"):
        DeadUnitAnalysis(box="pixel")


# ----------------------------------------------------------------------------------------------
# removal through the planners


@pytest.mark.parametrize(("model", "shape"),
                         [(DeadMLP(), (6,)), (DeadCNN(), (1, 8, 8)), (DeadCNN(bn=False, pad=1), (1, 8, 8)),
                          (DeadCNN(pad=1), (1, 8, 8))],
                         ids=["mlp-batchnorm", "cnn-unpadded", "cnn-padded-zero-constant", "cnn-padded-batchnorm"])
def test_removing_the_dead_units_leaves_every_output_of_the_box_unchanged(model: nn.Module,
                                                                         shape: tuple[int, ...]) -> None:
    x, y = _data(shape)
    model.eval()
    result = _compile(model, x, y, prune_ratio=0.0)  # the planner removes nothing: only dead units go
    section = result.report["lossless"]
    dead, graph, _ = _dead(model, x)
    assert section["units_dead"] == int(dead.sum()) == section["units_removed"] > 0
    assert result.report["prune"]["units_removed"] == section["units_removed"]
    assert result.report["after"]["macs"] == section["macs_after"] < section["macs_before"]
    points = torch.cat([x, _box_points(x.amin(0, keepdim=True), x.amax(0, keepdim=True), 500)])
    _same_outputs(result.module, model, points)


def test_a_zero_padded_reader_keeps_units_with_a_nonzero_constant() -> None:
    x, _ = _data((1, 8, 8))
    dead, graph, _ = _dead(DeadCNN(pad=1).eval(), x)
    assert not any(dead[_unit(graph, "conv1", c)] for c in DeadCNN.DEAD_CONV1)  # BatchNorm(0) != 0, padded
    dead, graph, _ = _dead(DeadCNN(pad=1, bn=False).eval(), x)
    assert all(dead[_unit(graph, "conv1", c)] for c in DeadCNN.DEAD_CONV1)  # 0 pads like the border


@pytest.mark.parametrize("importance", ["l1", "taylor", "activation", "random", "mip"])
def test_every_criterion_plans_over_the_live_units_and_the_plan_replays(importance: str) -> None:
    x, _ = _data((6,))
    model = DeadMLP().eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    mip = {"time_limit": 5.0, "total_time_limit": 10.0, "samples": 32}
    options = {"mip_options": mip} if importance == "mip" else {}
    result = _compile(model, x, y, importance=importance, flops_budget=0.45, **options)
    section = result.report["lossless"]
    before = result.report["before"]["macs"]
    # The budget is a fraction of the original MACs; the planner got the rest, lifted to the smaller copy.
    assert result.report["after"]["macs"] <= 0.45 * before + 1e-6
    assert section["planned_target"]["flops_budget"] == pytest.approx(0.45 * before / section["macs_after"])
    kept = result.plan.kept_mask(AnalysisManager(CompileContext((x[:1],))).get(UnitGroupAnalysis(), result.original))
    dead, _, _ = _dead(model, x)
    assert not (kept & dead).any()
    replayed = oamipc.compile(model, x[:1], plan=Plan.from_dict(result.plan.to_dict()))  # no data needed
    _same_outputs(replayed.module, result.module, _box_points(x.amin(0, keepdim=True), x.amax(0, keepdim=True), 200))
    assert replayed.report["lossless"]["enabled"] is False


def test_dead_units_that_meet_the_budget_alone_leave_the_rest_untouched() -> None:
    x, y = _data((1, 8, 8))
    model = DeadCNN().eval()
    result = _compile(model, x, y, flops_budget=0.9)
    section = result.report["lossless"]
    assert section["macs_after"] <= 0.9 * section["macs_before"]
    assert section["planned_target"] is None and result.report["after"]["macs"] == section["macs_after"]
    _same_outputs(result.module, model, _box_points(x.amin(0, keepdim=True), x.amax(0, keepdim=True), 200))


def test_min_keep_and_rounding_limit_what_goes() -> None:
    x, y = _data((6,))
    model = DeadMLP().eval()
    plain = _compile(model, x, y, prune_ratio=0.0)
    fc1_dead = next(g for g in plain.report["lossless"]["groups"] if g["name"] == "fc1")["dead"]
    assert fc1_dead == 2
    kept_some = _compile(model, x, y, prune_ratio=0.0, min_keep=7).report["lossless"]
    assert next(g for g in kept_some["groups"] if g["name"] == "fc1")["removed"] == 1
    rounded = _compile(model, x, y, prune_ratio=0.0, round_to=4)  # 8 - 2 = 6 is not a multiple of 4
    section = rounded.report["lossless"]
    assert next(g for g in section["groups"] if g["name"] == "fc1")["removed"] == 0
    assert section["units_kept_by_rules"] >= 2
    assert all(len(g.kept) % 4 == 0 or len(g.kept) == g.size for g in rounded.plan.groups)
    table = costs_table(rounded.report)
    row = next(r for r in table.rows if r[0].startswith("lossless"))
    assert row[0].startswith(f"lossless: {section['units_removed']} dead units removed") and row[0].endswith("[1]")
    assert table.notes[0].startswith(f"{section['units_dead']} units were proved dead")


def test_the_plan_and_the_analysis_are_deterministic() -> None:
    x, y = _data((1, 8, 8))
    first, second = (_compile(DeadCNN().eval(), x, y, flops_budget=0.5) for _ in range(2))
    assert first.plan == second.plan
    a, b = _dead(DeadCNN().eval(), x)[0], _dead(DeadCNN().eval(), x)[0]
    assert (a == b).all()


def test_a_pipeline_planner_takes_lossless() -> None:
    x, y = _data((6,))
    model = DeadMLP().eval()
    piped = oamipc.compile(model, x[:1], data=(x, y), pipeline="plan-greedy{importance=l1,prune-ratio=0,lossless=true},"
                                                             "prune-units")
    direct = _compile(model, x, y, prune_ratio=0.0)
    assert piped.plan.groups == direct.plan.groups and piped.plan.bias_shift == direct.plan.bias_shift
    assert piped.report["lossless"]["units_removed"] == direct.report["lossless"]["units_removed"] > 0


def test_without_data_it_is_off_and_says_why() -> None:
    x, _ = _data((6,))
    model = DeadMLP().eval()
    result = oamipc.compile(model, x[:1], prune_ratio=0.25)
    assert result.report["lossless"]["enabled"] is False and "no data" in result.report["lossless"]["note"]
    row = next(r for r in costs_table(result.report).rows if r[0].startswith("lossless"))
    assert row[1:] == ("-", "-", "-")
    with pytest.raises(UsageError, match="needs data"):
        oamipc.compile(model, x[:1], prune_ratio=0.25, lossless=True)
    off = oamipc.compile(model, x[:1], data=(x, torch.zeros(len(x), dtype=torch.long)), prune_ratio=0.25,
                         importance="l1", lossless=False)
    assert off.report["lossless"] == {"enabled": False, "note": "turned off (--no-lossless)"}


def test_cli_switch_and_table_row(tmp_path: Path) -> None:
    x, y = _data((6,))
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    model = DeadMLP().eval()
    torch.save(model, tmp_path / "m.pt")
    runner = CliRunner()
    common = ["compile", str(tmp_path / "m.pt"), "--trust-pickle", "--data", str(tmp_path / "data.pt"),
              "--importance", "l1", "--prune-ratio", "0", "--no-bench", "-o", str(tmp_path / "o.onnx")]
    on = runner.invoke(app, [*common, "--report", str(tmp_path / "r.json")])
    assert on.exit_code == 0, on.output
    assert "dead units removed" in on.output
    off = runner.invoke(app, [*common, "--no-lossless"])
    assert off.exit_code == 0, off.output
    assert "lossless removal: off" in off.output and "turned off (--no-lossless)" in off.output


# ----------------------------------------------------------------------------------------------
# the shipped trained examples


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn",
                                  pytest.param("fashion_lenet5", marks=pytest.mark.skipif(
                                      not fashion_mnist_available(), reason="Fashion-MNIST not installed"))])
def test_shipped_examples_keep_their_outputs_on_the_data_and_the_box(name: str) -> None:
    data = oamipc.load_data("digits" if name.startswith("digits") else "fashion-mnist")
    model = oamipc.load_model(EXAMPLES / f"{name}.pt")
    train = data.train.stratified_sample(2000, seed=0) if len(data.train.x) > 2000 else data.train
    result = oamipc.compile(model, train.x[:1], data=oamipc.DataSplits(train, data.test), importance="l1",
                            prune_ratio=0.0)
    section = result.report["lossless"]
    assert section["enabled"] and section["units_removed"] == section["units_dead"]
    lo, hi = train.x.amin(0, keepdim=True), train.x.amax(0, keepdim=True)
    _same_outputs(result.module, model.eval(), torch.cat([train.x[:512], _box_points(lo, hi, 256)]))
    dead, _, gm = _dead(model, train.x)
    varies = _varying_units(gm, torch.cat([train.x[:512], _box_points(lo, hi, 256)]))
    assert not (dead & varies).any()


def test_a_latency_budget_is_a_fraction_of_the_original_measured_latency(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("OAMIPC_CACHE_DIR", str(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    with torch.no_grad():  # a quarter of the first layer dead on non-negative inputs
        model[0].weight[:128] = -model[0].weight[:128].abs()
        model[0].bias[:128] = -0.1
    x = torch.rand(256, 64, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    result = _compile(model, x, y, target=oamipc.Target(latency_budget=0.7))
    predicted, section = result.report["latency_prediction"], result.report["lossless"]
    assert section["units_removed"] == 128
    assert predicted["predicted_ms"] <= predicted["budget_ms"] == pytest.approx(0.7 * predicted["dense_ms"])
    replayed = oamipc.compile(model, x[:1], plan=result.plan)
    _same_outputs(replayed.module, result.module, x)

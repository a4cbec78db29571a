"""The lottery-ticket transfer experiment (``oamipc transfer``).

Oracles: the ticket arm before training is exactly the initial network's kept slices (checked
weight by weight against the initial state dict); the random arm has the ticket's widths but other
units; everything is reproducible from the seed; the command writes its JSON atomically and bad
input gives one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.data import Dataset, DataSplits, load_data
from oamipc.driver import compile as compile_model
from oamipc.errors import DataError
from oamipc.finetune import FinetuneConfig
from oamipc.loading import load_model
from oamipc.passes import UnitGroupAnalysis
from oamipc.passmanager import AnalysisManager, CompileContext
from oamipc.tracing import trace
from oamipc.transfer import fit_to_shape, random_plan_like, run_transfer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INIT = EXAMPLES / "digits_mlp_init.pt"
TRAINED = EXAMPLES / "digits_mlp.pt"
runner = CliRunner()


def _small(seed: int = 0) -> dict:
    return run_transfer(load_model(INIT), source=load_data("digits"), target=load_data("digits"),
                        trained=load_model(TRAINED), importance="l1", prune_ratio=0.75,
                        train=FinetuneConfig(epochs=2, batch_size=64), train_samples=400, seed=seed)


def test_arms_have_the_plans_widths_and_the_run_is_reproducible() -> None:
    a, b = _small(), _small()
    arms = {r["name"]: r for r in a["arms"]}
    assert set(arms) == {"dense", "ticket", "random"}
    assert arms["ticket"]["params"] == arms["random"]["params"] < arms["dense"]["params"]
    assert arms["ticket"]["macs"] == arms["random"]["macs"] < arms["dense"]["macs"]
    assert a["train_samples"] == {"source": 400, "target": 400}
    for arm in a["arms"]:
        assert 0.0 <= arm["accuracy"] <= 1.0 and len(arm["history"]) == 2
        assert arm["accuracy"] > arm["accuracy_init"]  # it did train
    assert [r["accuracy"] for r in a["arms"]] == [r["accuracy"] for r in b["arms"]]
    losses = [[(h["loss"], h["eval_accuracy"]) for h in r["history"]] for r in a["arms"]]
    assert losses == [[(h["loss"], h["eval_accuracy"]) for h in r["history"]] for r in b["arms"]]


def test_ticket_is_the_initial_network_restricted_to_the_kept_units() -> None:
    init = load_model(INIT)
    plan = compile_model(load_model(TRAINED), torch.zeros(1, 1, 8, 8), importance="l1", prune_ratio=0.5).plan
    assert plan is not None
    ticket = compile_model(init, torch.zeros(1, 1, 8, 8), plan=plan).module
    first = plan.groups[0]
    w0 = init.state_dict()
    name = next(k for k in w0 if k.endswith("weight"))
    kept = torch.tensor(first.kept)
    got = dict(ticket.named_parameters())[name.replace("/", ".")]
    torch.testing.assert_close(got, w0[name][kept], rtol=0, atol=0)


def test_random_plan_keeps_counts_and_pinned_units_but_not_the_same_units() -> None:
    model = load_model(TRAINED)
    example = torch.zeros(1, 1, 8, 8)
    plan = compile_model(model, example, importance="l1", prune_ratio=0.5).plan
    assert plan is not None
    gm = trace(model, (example,))
    graph = AnalysisManager(CompileContext((example,))).get(UnitGroupAnalysis(()), gm)
    rnd = random_plan_like(plan, graph, seed=3)
    assert [len(g.kept) for g in rnd.groups] == [len(g.kept) for g in plan.groups]
    assert any(a.kept != b.kept for a, b in zip(rnd.groups, plan.groups))
    mask = rnd.kept_mask(graph)
    assert all(mask[u] for g in graph.groups for u in g.pinned)  # e.g. the logits stay
    assert random_plan_like(plan, graph, seed=3).to_dict() == rnd.to_dict()


def test_fit_to_shape_resizes_images_reshapes_vectors_and_refuses_the_rest() -> None:
    ds = Dataset("d", torch.rand(4, 1, 8, 8), torch.arange(4))
    assert tuple(fit_to_shape(ds, (1, 28, 28)).x.shape) == (4, 1, 28, 28)
    assert tuple(fit_to_shape(ds, (64,)).x.shape) == (4, 64)
    with pytest.raises(DataError, match="cannot be brought"):
        fit_to_shape(ds, (3, 28, 28))


def test_more_labels_than_outputs_is_refused() -> None:
    x = torch.rand(40, 1, 8, 8)
    wide = Dataset("wide", x, torch.arange(40) % 12)
    with pytest.raises(DataError, match="12 classes but the network outputs 10"):
        run_transfer(load_model(INIT), source=load_data("digits"), target=DataSplits(wide, wide),
                     trained=load_model(TRAINED), importance="l1", prune_ratio=0.5, train=FinetuneConfig())


def test_cli_trains_the_source_network_when_none_is_given_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    res = runner.invoke(app, ["transfer", str(INIT), "--source", "digits", "--target", "digits",
                              "--source-epochs", "1", "--epochs", "1", "--importance", "l1", "--prune-ratio", "0.5",
                              "--train-samples", "300", "--report", str(out)])
    assert res.exit_code == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["source_training"]["history"] and data["plan"]["criterion"] == "l1"
    assert "ticket" in res.stdout and "random" in res.stdout


def test_cli_without_a_trained_network_or_source_epochs_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    res = runner.invoke(app, ["transfer", str(INIT), "--source", "digits", "--target", "digits",
                              "--prune-ratio", "0.5", "--report", str(out)])
    assert res.exit_code == 2
    assert res.stderr.count("error:") == 1 and "--source-epochs" in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    np.testing.assert_equal(res.stdout, "")

"""Choosing the network that fine-tunes best (oamipc.finetune_select and compile's use of it).

Oracles: fine-tuning itself (a network with dead weights cannot learn, a healthy one does), and
compile with the chosen criterion directly (the selected network is exactly that compile's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from oamipc import (
    compile,  # noqa: A004 - the product's verb
    finetune_select,
)
from oamipc.data import Dataset, DataSplits, load_data
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.finetune_select import HELDOUT_MAX, Probe, Selection, select, split_train
from oamipc.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _blobs(n: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 8])
    return Dataset(f"blobs{seed}", centres[y] + torch.randn(n, 8, generator=gen), y)


def _net(seed: int, dead: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    if dead:  # every hidden ReLU is off for every input: no gradient reaches the first layer
        with torch.no_grad():
            net[0].weight.zero_()
            net[0].bias.fill_(-1.0)
    return net


def test_held_out_part_is_disjoint_seeded_and_capped() -> None:
    train = _blobs(600, 0)
    held, rest = split_train(train, seed=3)
    assert len(held) == 120 and len(rest) == 480
    rows = {tuple(r.tolist()) for r in held.x} & {tuple(r.tolist()) for r in rest.x}
    assert not rows
    again, _ = split_train(train, seed=3)
    assert torch.equal(again.x, held.x)
    assert not torch.equal(split_train(train, seed=4)[0].x, held.x)
    big = Dataset("big", torch.zeros(20000, 2), torch.zeros(20000, dtype=torch.long))
    assert len(split_train(big, seed=0)[0]) == HELDOUT_MAX


def test_a_network_that_trains_replaces_one_that_cannot() -> None:
    train = _blobs(900, 1)
    config = FinetuneConfig(epochs=3, lr=0.02, batch_size=32, seed=0)
    dead, live = _net(0, dead=True), _net(1)
    before = copy.deepcopy(dead.state_dict())
    choice = select([("mip", dead), ("l1", live)], train, config)
    assert choice.chosen == 1 and "l1 fine-tuned best" in choice.reason
    assert choice.probes[1].accuracy_after > choice.probes[1].accuracy_before + 0.3
    assert all(torch.equal(a, b) for a, b in zip(before.values(), dead.state_dict().values()))  # not trained here
    # the other way round the asked network stays; two equal networks are a tie, kept too
    assert select([("mip", live), ("l1", dead)], train, config).chosen == 0
    assert select([("mip", live), ("l1", copy.deepcopy(live))], train, config).chosen == 0


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


def test_compile_fine_tunes_the_selected_criterions_network(digits: DataSplits,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The plumbing: whichever candidate the probes choose is the network fine-tuned and reported.

    The probes' choice is forced to ``taylor`` (their own behaviour is tested above), so the
    oracle is a compile with ``taylor`` directly.
    """
    model = load_model(str(EXAMPLES / "digits_mlp.pt"))
    x = digits.train.x[:1]
    config = FinetuneConfig(epochs=1, seed=0)
    seen: list[list[str]] = []

    def choose_taylor(candidates: list[tuple[str, nn.Module]], train: Dataset, cfg: FinetuneConfig) -> Selection:
        seen.append([name for name, _ in candidates])
        assert cfg == config and len(train) == len(digits.train)
        probes = tuple(Probe(name, 0.5, 0.5, 0.0) for name, _ in candidates)
        return Selection([n for n, _ in candidates].index("taylor"), probes, 10, 10, 1, "forced")

    monkeypatch.setattr(finetune_select, "select", choose_taylor)
    picked = compile(model, x, data=digits, importance="mip", flops_budget=0.2, finetune=config)
    assert seen == [["mip", "l1", "taylor", "activation"]]
    sel = picked.report["finetune_select"]
    assert sel["asked"] == "mip" and sel["chosen"] == "taylor"
    assert picked.report["settings"]["importance"] == "mip" and "mip" in picked.report  # the MILP's record stays
    direct = compile(model, x, data=digits, importance="taylor", flops_budget=0.2, refit_select=False)
    assert picked.plan is not None and direct.plan is not None
    assert picked.plan.to_dict()["groups"] == direct.plan.to_dict()["groups"]
    assert picked.report["accuracy"]["after_prune"] == direct.report["accuracy"]["after"]
    tuned = copy.deepcopy(direct.module)
    finetune(tuned, digits.train, config)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), picked.module.state_dict().values()))
    # select off, or another criterion asked: no probes
    seen.clear()
    compile(model, x, data=digits, importance="l1", flops_budget=0.2, finetune=config)
    assert not seen

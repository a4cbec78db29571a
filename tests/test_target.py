"""The target is one value, validated once where it enters, spelled for each front end."""

from __future__ import annotations

import pytest
import torch

import oamipc
from oamipc.errors import UsageError
from oamipc.target import Target, TargetError

from .models import ZOO, example_input


def test_kind_and_validation() -> None:
    assert Target(prune_ratio=0.5).kind == "ratio" and Target(flops_budget=0.5).kind == "macs"
    assert not Target().is_set
    with pytest.raises(TargetError, match="say how much to remove"):
        Target().require()
    with pytest.raises(TargetError) as info:
        Target(flops_budget=2.0)
    assert info.value.field == "flops_budget"
    assert str(info.value) == "flops_budget must be in (0, 1], got 2"
    assert str(info.value.spelled("cli")) == "--flops-budget must be in (0, 1], got 2"
    assert str(info.value.spelled("pipeline")) == "flops-budget must be in (0, 1], got 2"


def test_compile_takes_the_target_as_one_value_or_as_keywords_but_not_both() -> None:
    model = ZOO["mlp"].factory()
    x = example_input("mlp", batch=1)
    a = oamipc.compile(model, x, importance="l2", target=Target(prune_ratio=0.5, round_to=2))
    b = oamipc.compile(model, x, importance="l2", prune_ratio=0.5, round_to=2)
    assert a.plan is not None and a.plan.groups == b.plan.groups  # type: ignore[union-attr]
    assert a.report["settings"]["round_to"] == 2
    with pytest.raises(UsageError, match="not both"):
        oamipc.compile(model, x, target=Target(prune_ratio=0.5), flops_budget=0.5)
    with pytest.raises(TargetError, match=r"^prune_ratio must be in \[0, 1\), got 1.5$"):  # the API's spelling
        oamipc.compile(model, torch.zeros_like(x), prune_ratio=1.5)

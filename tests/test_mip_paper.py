"""The thesis's formulation: per-class problems, scores in [0, 1], --relax, --jobs equivalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import oamipc
from oamipc.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def _compile(**opts):
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    return oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=oamipc.load_data("digits"), importance="mip",
                          flops_budget=0.3, calib_samples=128, mip_options={"formulation": "paper", **opts},
                          refit_select=False)  # the formulation's own plan and scores


@pytest.fixture(scope="module")
def relaxed():
    # jobs=1 first: HiGHS has run in this process before the workers fork (they must not hang).
    return _compile(relax=True, jobs=1), _compile(relax=True, jobs=2)


def test_paper_relaxation_scores_every_unit_per_class_and_meets_the_budget(relaxed) -> None:
    one, _ = relaxed
    rep = one.report
    assert rep["after"]["macs"] <= 0.3 * rep["before"]["macs"] + 1e-9
    mip = rep["mip"]
    assert mip["formulation"] == "paper" and mip["relaxed"]
    assert sorted(c["label"] for c in mip["classes"]) == list(range(10))  # one problem per class
    assert all(c["samples"] == 1 and c["status"] == "optimal" for c in mip["classes"])
    assert all(c["solve"]["n_binaries"] == 0 for c in mip["classes"])  # the LP relaxation
    scores = np.concatenate([np.asarray(v) for v in rep["scores"].values()])
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert 0 < mip["threshold_rule"]["units_kept"] <= mip["threshold_rule"]["units_free"]


def test_worker_processes_give_the_same_scores(relaxed) -> None:
    one, two = relaxed
    assert one.report["scores"] == two.report["scores"]
    assert one.plan == two.plan


def test_paper_binary_problem_keeps_relu_binaries() -> None:
    rep = _compile(time_limit=2.0, total_time_limit=4.0, samples=10).report["mip"]
    assert any(c["encoding"]["relu_binaries"] > 0 for c in rep["classes"])
    assert {c["outcome"] for c in rep["classes"]} <= {"solved", "no-incumbent"}


def test_relax_needs_the_paper_formulation() -> None:
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")
    with pytest.raises(UsageError, match="relax"):
        oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=oamipc.load_data("digits"), importance="mip",
                       flops_budget=0.5, mip_options={"relax": True})


def test_sample_bounds_give_the_paper_problem_no_relu_binaries_and_bad_bounds_are_refused() -> None:
    rep = _compile(relax=False, bounds="sample", time_limit=2.0, total_time_limit=4.0).report["mip"]
    assert rep["bounds"] == "sample"
    # Only the score gates relu(x - (1 - s) U+) keep binaries; downstream phases are fixed.
    assert all(c["encoding"]["relu_binaries"] <= c["encoding"]["keep_variables"] for c in rep["classes"])
    with pytest.raises(UsageError, match="bounds"):
        _compile(bounds="loose")

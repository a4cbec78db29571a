"""The MIP's tasks on Ray (``--executor ray``): the plan of the local executor, for any worker count.

The oracle is the same compile with ``--executor local`` (the default, which runs the MIP in
this process): the plan JSON written by ``--save-plan`` must be equal, byte for byte, with 2
Ray workers and with 1.  The digits CNN's compile goes through every kind of remote task of the
budget formulation: a layer sub-problem (its last group has an exact encoding), flip-effect
batches and the joint stage's trust radii.  The paper formulation's class problems are checked
on its LP relaxation (its MILPs end at time limits that depend on ``jobs`` by design).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import oamipc
from oamipc.cli import app
from oamipc.errors import UsageError
from oamipc.passes.mip.remote import dumps
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parents[1]
CNN = str(ROOT / "examples" / "digits_cnn.pt")


def _plan(tmp: Path, name: str, *extra: str) -> tuple[str, dict]:
    plan, report = tmp / f"{name}.plan.json", tmp / f"{name}.report.json"
    result = CliRunner().invoke(app, ["compile", CNN, "--data", "digits", "--importance", "mip", "--flops-budget",
                                      "0.5", "--no-bench", "--no-reconstruct", "--calib-samples", "256", "-o",
                                      str(tmp / f"{name}.onnx"), "--save-plan", str(plan), "--report", str(report),
                                      *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return plan.read_text(), json.loads(report.read_text())["mip"]


def test_ray_executor_gives_the_local_plan_for_one_and_two_workers(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'oamipc[ray]')")
    local, mip = _plan(tmp_path, "local")
    assert mip["reproducible"], "the oracle itself must not depend on a clock"
    assert any(s["outcome"] in ("improved", "unchanged", "rejected") for s in mip["subproblems"])
    assert mip["joint_rounds"] and mip["joint_effects"]
    two, mip2 = _plan(tmp_path, "ray2", "--executor", "ray", "--jobs", "2")
    assert not ray.is_initialized()  # the embedded Ray was shut down
    assert mip2["executor"] == {"kind": "ray", "workers": 2, "ray_address": None}
    one, _ = _plan(tmp_path, "ray1", "--executor", "ray", "--jobs", "1")
    assert two == local and one == local
    assert [s["outcome"] for s in mip2["subproblems"]] == [s["outcome"] for s in mip["subproblems"]]
    assert [e["exact"] for e in mip2["joint_effects"]] == [e["exact"] for e in mip["joint_effects"]]


def test_paper_class_problems_on_ray_give_the_local_scores() -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'oamipc[ray]')")
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp.pt")

    def scores(**opts: object) -> list[list[float]]:
        res = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=oamipc.load_data("digits"), importance="mip",
                             flops_budget=0.3, calib_samples=128, reconstruct=False,
                             mip_options={"formulation": "paper", "relax": True, **opts})
        return [c["scores"] for c in res.report["mip"]["classes"]]

    local = scores()
    assert len(local) == 10 and scores(executor="ray", jobs=2) == local


def test_a_graph_module_travels_with_its_nodes_and_weights() -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'oamipc[ray]')")
    model = oamipc.load_model(ROOT / "examples" / "digits_cnn.pt")
    x = torch.randn(4, 1, 8, 8)
    gm = trace(model, (x[:1],))
    with pytest.raises(Exception):  # noqa: B017 - what torch.fx does today, the reason for the portable form
        pickle.dumps(gm)
    back, again = pickle.loads(dumps((gm, gm)))  # noqa: S301 - bytes made just above
    assert back is again  # one network, however often the value refers to it
    assert [(n.name, n.op, n.target) for n in back.graph.nodes] == [(n.name, n.op, n.target) for n in gm.graph.nodes]
    assert all(n.meta.get("tensor_meta") == m.meta.get("tensor_meta") for n, m in zip(back.graph.nodes, gm.graph.nodes))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_executor_ray_without_ray_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = CliRunner().invoke(app, ["compile", CNN, "--data", "digits", "--importance", "mip", "--flops-budget",
                                      "0.5", "-o", str(tmp_path / "x.onnx"), "--executor", "ray"])
    assert result.exit_code == UsageError.exit_code
    assert "pip install 'oamipc[ray]'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    bad = CliRunner().invoke(app, ["compile", CNN, "--data", "digits", "-o", str(tmp_path / "x.onnx"),
                                   "--ray-address", "auto"])
    assert bad.exit_code == UsageError.exit_code and "--ray-address needs --executor ray" in bad.output

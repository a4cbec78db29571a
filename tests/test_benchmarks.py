"""Smoke test of the benchmark scripts: they run end to end on tiny settings and write sane JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):  # noqa: ANN202 - a script module
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_vs_flops_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    _load("latency_vs_flops").main(["--runs", "5", "--ratios", "0,0.5", "--batch", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["prune_ratio"] for r in rows] == [0.0, 0.5]
    assert rows[0]["flops_ratio"] == pytest.approx(1.0)
    assert 0.2 < rows[1]["flops_ratio"] < 0.5
    assert "| prune ratio |" in capsys.readouterr().out


def test_mip_quality_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.json"
    _load("mip_quality").main(["--models", "digits_mlp", "--budgets", "0.3", "--criteria", "l2,mip,mip_paper_lp",
                               "--time-limit", "2", "--total-time-limit", "4", "--mip-samples", "16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["criterion"] for r in rows] == ["l2", "mip", "mip_paper_lp"]
    assert all(r["macs_kept"] <= 0.3 + 1e-9 for r in rows)
    assert rows[1]["mip"]["holdout_loss"]["final"] <= rows[1]["mip"]["holdout_loss"]["warm_start"] + 1e-12
    assert rows[2]["mip"]["classes"] and all(c["status"] == "optimal" for c in rows[2]["mip"]["classes"])
    assert "| digits_mlp" in capsys.readouterr().out

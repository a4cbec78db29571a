"""Executors: the same results, in the items' order, however the tasks ran.

The Ray test starts an embedded local Ray with 2 CPUs and compiles a shipped example's front
with ``--executor ray``; the oracle is the same front made with the local executor (the ONNX
files' bytes and the plans must be equal).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.errors import UsageError
from oamipc.executor import executor

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples" / "digits_mlp.pt")


def _square_plus(shared: int, item: int) -> int:
    return item * item + shared


def test_local_executor_keeps_the_items_order() -> None:
    for workers in (1, 2):
        seen: list[int] = []
        with executor("local", workers) as ex:
            assert ex.map(_square_plus, 10, [3, 1, 2], done=seen.append) == [19, 11, 14]
        assert seen[-1] == 3


def test_bad_executor_options_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="--executor 'dask'"), executor("dask"):
        pass
    with pytest.raises(UsageError, match="--workers"), executor("local", 0):
        pass
    with pytest.raises(UsageError, match="--ray-address needs --executor ray"), executor("local", 1, "auto"):
        pass
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UsageError, match=r"pip install 'oamipc\[ray\]'"), executor("ray", 2):
        pass


def _front(out: Path, *extra: str) -> dict[str, str]:
    result = CliRunner().invoke(app, ["pareto", MLP, "--data", "digits", "--budgets", "0.3,0.6", "--importance", "l1",
                                      "--out-dir", str(out), "--runs", "2", "--batch", "8", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    points = json.loads((out / "pareto.json").read_text())["points"]
    assert not any(p["reused"] for p in points)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("budget-*.onnx")}
    plans = {p.name: json.loads(p.read_text())["report"]["prune"]["plan"] for p in out.glob("budget-*.json")}
    return files | {name: json.dumps(plan, sort_keys=True) for name, plan in plans.items()}


def test_ray_executor_gives_the_local_front(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'oamipc[ray]')")
    local = _front(tmp_path / "local")
    remote = _front(tmp_path / "ray", "--executor", "ray", "--workers", "2")
    assert remote == local and len(local) == 4
    assert not ray.is_initialized()  # the embedded Ray was shut down

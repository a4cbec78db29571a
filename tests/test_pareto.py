"""``oamipc pareto``: every budget compiled, measured and charted; the front by its definition.

Oracles: onnxruntime (each point's recorded accuracy is the accuracy its ONNX file really has on
the test split), the definition of domination checked point by point, byte equality of files
(a picked file is the budget's file; worker processes and a reused run give the same bytes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.data import load_data
from oamipc.errors import UsageError
from oamipc.pareto import budget_name, front, parse_budgets
from oamipc.report_html import PARETO_COLOUR

from .test_report_html import _chromium, _pixels_of, _screenshot

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples" / "digits_mlp.pt")
BUDGETS = "0.6,0.2,0.4"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def front_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pareto") / "front"
    code, text = run("pareto", MLP, "--data", "digits", "--budgets", BUDGETS, "--importance", "l1",
                     "--out-dir", str(out), "--runs", "5", "--batch", "16")
    assert code == 0, text
    return out


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "pareto.json").read_text())


def onnx_accuracy(path: Path) -> float:
    import onnxruntime as ort

    test = load_data("digits").test
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: test.x.numpy().astype(np.float32)})[0]
    return float((logits.argmax(axis=1) == test.y.numpy()).mean())


def test_front_is_the_set_of_undominated_points() -> None:
    pts = [(1.0, 0.98), (0.5, 0.97), (0.6, 0.96), (0.4, 0.97), (0.4, 0.90), (0.3, 0.80), (0.3, 0.80)]
    # (0.5, .97) loses to (0.4, .97); (0.6, .96) to both; (0.4, .90) to (0.4, .97); ties both stay
    assert front(pts) == [True, False, False, True, False, True, True]


def test_budgets_are_parsed_and_checked() -> None:
    assert parse_budgets("0.5, 0.2,0.9") == (0.2, 0.5, 0.9)
    for bad in ("", "0.5,x", "0,0.5", "1.5", "0.5,0.5"):
        with pytest.raises(UsageError, match="--budgets"):
            parse_budgets(bad)
    assert budget_name(0.5) == "budget-0.50" and budget_name(0.125) == "budget-0.125"


def test_every_budget_is_compiled_measured_and_verified(front_dir: Path) -> None:
    result = load(front_dir)
    assert [p["budget"] for p in result["points"]] == [0.2, 0.4, 0.6]
    dense = result["dense"]
    assert dense["accuracy"] == pytest.approx(onnx_accuracy(front_dir / "original.onnx"), abs=1e-3)
    test_n = len(load_data("digits").test.x)
    for p in result["points"]:
        onnx = front_dir / p["onnx"]
        assert onnx.name == f"{budget_name(p['budget'])}.onnx" and sha(onnx) == p["onnx_sha256"]
        assert p["macs"] <= p["budget"] * dense["macs"]
        assert abs(p["accuracy"] - onnx_accuracy(onnx)) <= 1 / test_n  # the file has the recorded accuracy
        assert p["latency_ms"] > 0 and p["latency_ratio"] > 0
        report = json.loads((front_dir / f"{budget_name(p['budget'])}.json").read_text())["report"]
        assert report["settings"]["flops_budget"] == p["budget"]
    # the front by its definition, the original included
    everyone = [dense, *result["points"]]
    for p in everyone:
        beaten = any(q is not p and q["latency_ratio"] <= p["latency_ratio"] and q["accuracy"] >= p["accuracy"]
                     and (q["latency_ratio"] < p["latency_ratio"] or q["accuracy"] > p["accuracy"]) for q in everyone)
        assert p["front"] is (not beaten)
    assert sum(p["front"] for p in everyone) >= 1
    page = (front_dir / "pareto.html").read_text()
    assert 'id="fig-pareto"' in page and "<svg" in page and "http" not in page.split("<svg")[0]


def test_pick_reuses_points_and_copies_the_file(front_dir: Path, tmp_path: Path) -> None:
    before = {p.name: sha(p) for p in front_dir.glob("budget-*.onnx")}
    out = tmp_path / "small.onnx"
    code, text = run("pareto", MLP, "--data", "digits", "--budgets", BUDGETS, "--importance", "l1",
                     "--out-dir", str(front_dir), "--runs", "3", "--batch", "16", "--pick", "0.4", "-o", str(out))
    assert code == 0, text
    assert all(p["reused"] for p in load(front_dir)["points"])
    assert {p.name: sha(p) for p in front_dir.glob("budget-*.onnx")} == before
    assert sha(out) == before["budget-0.40.onnx"]


def test_workers_and_changed_options(front_dir: Path, tmp_path: Path) -> None:
    """Two worker processes give the same files; another seed is not taken from the old run."""
    out = tmp_path / "workers"
    code, text = run("pareto", MLP, "--data", "digits", "--budgets", BUDGETS, "--importance", "l1",
                     "--out-dir", str(out), "--runs", "3", "--batch", "16", "--workers", "2")
    assert code == 0, text
    made = {p.name: sha(p) for p in out.glob("budget-*.onnx")}
    assert made == {p.name: sha(p) for p in front_dir.glob("budget-*.onnx")}
    code, text = run("pareto", MLP, "--data", "digits", "--budgets", "0.4", "--importance", "l1", "--seed", "3",
                     "--out-dir", str(out), "--runs", "3", "--batch", "16")
    assert code == 0, text
    assert not load(out)["points"][0]["reused"]


@pytest.mark.parametrize(("args", "message"), [
    (("--budgets", "0.5,2"), "--budgets must lie in (0, 1]"),
    (("--budgets", "0.5", "--pick", "0.3", "-o", "{out}"), "--pick 0.3 is not one of --budgets"),
    (("--budgets", "0.5", "--pick", "0.5"), "--pick and -o go together"),
])
def test_bad_input_is_one_line_and_writes_nothing(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    out = tmp_path / "picked.onnx"
    argv = [a.replace("{out}", str(out)) for a in args]
    code, text = run("pareto", MLP, "--data", "digits", "--importance", "l1", "--out-dir", str(tmp_path / "d"),
                     "--runs", "2", "--batch", "4", *argv)
    assert code in (1, 2) and message in " ".join(text.split()), text
    assert not out.exists()


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium) for the headless render")
def test_headless_chromium_paints_the_front(front_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    shot = _screenshot(browser, front_dir / "pareto.html", tmp_path / "front.png", tmp_path / "profile")
    assert _pixels_of(shot, PARETO_COLOUR) >= 40, "the front's markers and line are not visible"

"""The HTML report: one self-contained page with a figure per claim, readable back, seen by a browser.

Oracles: the page is built from a real ``compile`` report (digits MLP, l1, half the units) with a
synthetic sweep and fine-tuning record added; its embedded JSON must equal the report; the CLI
must re-render a page from JSON and from a page (the same bytes both times); bad input gives
exactly one ``error:`` line, exit 1 and no output; and headless Chromium must paint every
figure's signature colour, which a page with the figures stripped out does not.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.driver import FileJob, ModelSource, compile_file
from oamipc.report_html import FIGURE_COLOURS, Page, build_page, load_report, write_html

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP = str(EXAMPLES / "digits_mlp.pt")
ALL_FIGURES = ["widths", "scores", "sweep", "latency", "finetune"]

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real compile report with a (short) latency measurement, as it would be saved to JSON."""
    out = tmp_path_factory.mktemp("compile") / "small.onnx"
    job = FileJob(ModelSource(MLP, data="digits"), str(out), bench=True, bench_batches=(1, 8), bench_runs=5)
    rep = compile_file(job, importance="l1", prune_ratio=0.5)
    return json.loads(json.dumps(rep, default=str))


def with_extras(report: dict[str, Any]) -> dict[str, Any]:
    """The report plus a sweep (three criteria, one fine-tuned) and a fine-tuning record."""
    rep = copy.deepcopy(report)
    rep["sweep"] = [
        {"criterion": crit, "flops_kept": kept, "accuracy": 0.98 - slope * (1 - kept),
         **({"accuracy_finetuned": 0.985 - slope / 3 * (1 - kept)} if crit == "l1" else {})}
        for crit, slope in (("l1", 0.3), ("mip", 0.1), ("random", 0.8)) for kept in (0.25, 0.5, 0.75)]
    rep["finetune"] = {"epochs": 3, "accuracy_before": 0.95, "accuracy_after": 0.97,
                       "history": [{"epoch": e, "loss": 1 / e, "train_accuracy": 0.9 + 0.02 * e,
                                    "eval_accuracy": 0.93 + 0.01 * e} for e in (1, 2, 3)]}
    return rep


@pytest.fixture(scope="module")
def full_page(report: dict[str, Any]) -> Page:
    """The page of the report with every optional part (rendered once for the module)."""
    return build_page(with_extras(report))


def figure_block(page: str, key: str) -> str:
    match = re.search(rf'<figure class="plot" id="fig-{key}">(.*?)</figure>', page, re.DOTALL)
    assert match, f"no {key} figure in the page"
    return match.group(1)


def test_page_has_one_figure_per_claim_and_nothing_external(report: dict[str, Any], full_page: Page) -> None:
    page = full_page
    assert page.figures == ALL_FIGURES and page.notes == []
    assert page.html.count('<figure class="plot"') == len(ALL_FIGURES)
    assert page.html.count("<svg") == len(ALL_FIGURES)
    for key in ALL_FIGURES:
        block = figure_block(page.html, key)
        assert block.count("<svg") == 1 and "<figcaption>" in block
    widths = figure_block(page.html, "widths")
    for layer in report["widths"]:
        assert f">{layer}</text>" in widths, f"layer {layer} not labelled in the widths figure"
    # Self-contained: no resource is fetched from anywhere (namespace URIs are not fetched).
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page.html, re.IGNORECASE)
    assert not re.search(r"<link\b|<img\b|@import|url\(\s*['\"]?(?:https?:)?//|<script\s[^>]*src=", page.html)
    # The only script is the embedded report, and it is data.
    assert re.findall(r"<script[^>]*>", page.html) == ['<script type="application/json" id="oamipc-report">']
    # The latency figure names the provider that ran the models.
    assert report["latency"]["provider"] in figure_block(page.html, "latency")


def test_threshold_drawn_only_when_kept_and_removed_separate(report: dict[str, Any]) -> None:
    page = build_page(report).html
    caption = re.search(r"<figcaption>(.*?)</figcaption>", figure_block(page, "scores"), re.DOTALL)
    assert caption and "dashed line" in caption.group(1) and "overlap" not in caption.group(1)
    assert figure_block(page, "scores").count("stroke-dasharray") >= 2  # one threshold per group

    # Keep the lowest-scored unit of body.0 instead of the highest: no threshold separates them now.
    rep = copy.deepcopy(report)
    group = next(g for g in rep["prune"]["plan"]["groups"] if g["name"] == "body.0")
    scores = np.asarray(rep["scores"]["body.0"])
    best = max(group["kept"], key=lambda i: scores[i])
    worst = int(np.argmin(scores))
    assert worst not in group["kept"]
    group["kept"] = sorted({*group["kept"], worst} - {best})
    page = build_page(rep).html
    assert "1 group(s) (body.0)" in figure_block(page, "scores") and "overlap" in page


def test_partial_and_malformed_reports_render_with_notes(report: dict[str, Any]) -> None:
    minimal = build_page({"before": {"params": 10, "macs": 20}, "after": {"params": 5, "macs": 8}})
    assert minimal.figures == []
    assert [n.split(":")[0] for n in minimal.notes] == ALL_FIGURES
    assert "<svg" not in minimal.html and "Not shown" in minimal.html and "0.400x" in minimal.html

    rep = copy.deepcopy(report)
    del rep["latency"]
    rep["scores"]["body.0"] = ["x"] * len(rep["scores"]["body.0"])  # unusable group: skipped, body.2 drawn
    rep["sweep"] = [{"criterion": "l1", "flops_kept": None}, "junk"]
    rep["finetune"] = {"epochs": 2, "history": [{"epoch": 1, "loss": 0.5}, {"loss": 0.4}, 7]}
    rep["widths"]["broken"] = "nope"
    rep["mip"] = {"formulation": "budget", "subproblems": [{"group": "body.0"}, None]}
    page = build_page(rep)
    assert page.figures == ["widths", "scores", "finetune"]
    assert [n.split(":")[0] for n in page.notes] == ["sweep", "latency"]
    assert "--no-bench" in page.notes[1] and "MIP analysis" in page.html
    assert ">body.2</text>" in figure_block(page.html, "scores")
    assert ">body.0</text>" not in figure_block(page.html, "scores")


def test_embedded_json_round_trips(report: dict[str, Any], tmp_path: Path) -> None:
    rep = with_extras(report)
    rep["model"] = "odd</script><!--<script>&name.pt"  # must not end or confuse the JSON block
    out = tmp_path / "page.html"
    page = write_html(rep, out)
    text = out.read_text(encoding="utf-8")
    assert text == page.html
    assert text.count("</script>") == 1
    assert load_report(out) == rep
    assert "odd&lt;/script&gt;" in text  # the title is escaped HTML


def test_report_command_renders_json_and_rerenders_a_page(report: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps(with_extras(report), indent=1))
    first, second = tmp_path / "first.html", tmp_path / "second.html"
    code, stdout, stderr = run("report", str(src), "-o", str(first))
    assert code == 0, stderr
    assert "5 figures" in stdout
    assert load_report(first) == json.loads(src.read_text())
    code, _, stderr = run("report", str(first), "-o", str(second))
    assert code == 0, stderr
    assert second.read_text() == first.read_text()  # deterministic, and nothing lost in the embedded JSON


@pytest.mark.parametrize("case", ["missing", "directory", "not-json", "no-costs", "list", "page-without-report"])
def test_report_command_rejects_bad_input(case: str, tmp_path: Path) -> None:
    bad = tmp_path / {"not-json": "run.json", "no-costs": "run.json", "list": "run.json",
                      "page-without-report": "page.html", "directory": "d", "missing": "nope.json"}[case]
    if case == "not-json":
        bad.write_text("{not json")
    elif case == "no-costs":
        bad.write_text(json.dumps({"settings": {}, "widths": {}}))
    elif case == "list":
        bad.write_text("[1, 2]")
    elif case == "page-without-report":
        bad.write_text("<!DOCTYPE html><html><body><p>hello</p></body></html>")
    elif case == "directory":
        bad.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stdout, stderr = run("report", str(bad), "-o", str(out_dir / "page.html"))
    assert code == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert str(bad.name) in lines[0] and "--report run.json" in lines[0]
    assert list(out_dir.iterdir()) == []


def test_compile_report_html_writes_the_page(tmp_path: Path) -> None:
    out, page = tmp_path / "small.onnx", tmp_path / "run.html"
    code, _, stderr = run("compile", MLP, "--data", "digits", "--importance", "l1", "--prune-ratio", "0.5",
                          "--no-bench", "-o", str(out), "--report", str(page))
    assert code == 0, stderr
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 2  # widths and scores
    rep = load_report(page)
    assert rep["widths"]["body.0"] == {"before": 128, "after": 64} and "latency" not in rep
    assert "no latency measurement" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html", "small.onnx"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _screenshot(browser: str, page: Path, png: Path, profile: Path) -> np.ndarray:
    from matplotlib.image import imread

    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,5000", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-500:]}"
    img = imread(str(png))
    return np.round(img[..., :3] * 255).astype(np.int16)


def _pixels_of(img: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(img - rgb).max(axis=-1) <= 2).sum())


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium) for the headless render")
def test_headless_chromium_paints_every_figure(full_page: Page, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    html = full_page.html
    full, bare = tmp_path / "full.html", tmp_path / "bare.html"
    full.write_text(html, encoding="utf-8")
    bare.write_text(re.sub(r"<svg.*?</svg>", "", html, flags=re.DOTALL), encoding="utf-8")
    shot = _screenshot(browser, full, tmp_path / "full.png", tmp_path / "profile")
    control = _screenshot(browser, bare, tmp_path / "bare.png", tmp_path / "profile")

    assert shot.shape[1] == 1200
    ink = (shot.min(axis=-1) < 200).mean()
    assert ink > 0.02, f"the screenshot is nearly blank ({100 * ink:.2f}% ink)"
    for key, colour in FIGURE_COLOURS.items():
        seen = _pixels_of(shot, colour)
        assert seen >= 40, f"figure {key} ({colour}) is not visible in the screenshot ({seen} pixels)"
        assert _pixels_of(control, colour) == 0, f"colour {colour} of figure {key} appears without the figures"

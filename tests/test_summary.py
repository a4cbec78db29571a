"""The summary tables (oamipc.summary): the rows both the command line and the HTML page show.

Oracles: the rows of a real compile report (digits MLP, l1, with and without fine-tuning) must
carry the report's own numbers in the documented formats; hand-made MIP sections with every kind
of long status must give short words with numbered notes; rendered by the CLI at 80 columns
every row of the MIP table must be exactly one line whose cells are the rows' cells (nothing
wrapped), and at narrower widths every word of every cell must still appear whole; the HTML page
must show the same cells.  One real ``oamipc compile`` with the MILP runs at ``COLUMNS=80``.
"""

from __future__ import annotations

import copy
import html
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import oamipc
from oamipc.cli import _finetune_table, _mip_table, _summary_table, app
from oamipc.finetune import FinetuneConfig
from oamipc.report_html import build_page
from oamipc.summary import (
    SummaryTable,
    costs_table,
    finetune_history_table,
    finetune_table,
    fmt_gap,
    mip_status,
    mip_table,
    widths_table,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP = EXAMPLES / "digits_mlp.pt"
CNN = EXAMPLES / "digits_cnn.pt"

TOO_BIG = "up to 8192 ReLU/max-pool binaries (> 4000); left to the joint stage"
TOO_BIG_2 = "up to 167936 ReLU/max-pool binaries (> 4000); left to the joint stage"


def _as_json(report: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(report, default=str))


@pytest.fixture(scope="module")
def digits() -> oamipc.DataSplits:
    return oamipc.load_data("digits")


@pytest.fixture(scope="module")
def plain(digits: oamipc.DataSplits) -> dict[str, Any]:
    """A real report: digits MLP, half the units by L1, accuracy on the test split."""
    model = oamipc.load_model(MLP)
    result = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=digits, importance="l1", prune_ratio=0.5)
    return _as_json(result.report)


@pytest.fixture(scope="module")
def tuned(digits: oamipc.DataSplits) -> dict[str, Any]:
    """The same compile, fine-tuned for one epoch afterwards."""
    model = oamipc.load_model(MLP)
    result = oamipc.compile(model, torch.zeros(1, 1, 8, 8), data=digits, importance="l1", prune_ratio=0.7,
                            finetune=FinetuneConfig(epochs=1))
    return _as_json(result.report)


def budget_report() -> dict[str, Any]:
    """A budget MIP section with every kind of status a sub-problem or joint round can end with."""
    def solve(status: str, **extra: Any) -> dict[str, Any]:
        return {"solver": "highs", "status": status, "n_binaries": 64, "n_constraints": 579, "seconds": 3.21, **extra}

    return {"mip": {
        "formulation": "budget", "solver": "highs", "bounds": "crown", "seconds": 23.7,
        "warm_start": {"chosen": "activation"}, "holdout_loss": {"warm_start": 3.78041, "final": 2.99221},
        "subproblems": [
            {"group": "fc1", "outcome": "improved", "solve": solve("optimal", gap=1.6e-8)},
            {"group": "conv2", "outcome": "skipped", "solve": {"status": TOO_BIG}},
            {"group": "conv1", "outcome": "skipped", "solve": {"status": TOO_BIG_2}},
            {"group": "fc2", "outcome": "unchanged", "solve": solve("feasible", gap=0.0151)},
            {"group": "fc3", "outcome": "rejected", "time_limited": True, "solve": solve("feasible", gap=0.25)},
            {"group": "fc4", "outcome": "no-incumbent", "solve": {"status": "warm start infeasible"}},
            {"group": "fc5", "outcome": "solver-error", "note": "HiGHS crashed", "solve": {"status": "error"}},
            {"group": "fc6", "outcome": "invalid", "note": "keeps 3 units, min_keep is 4", "solve": solve("optimal")},
            {"group": "fc7", "outcome": "skipped", "solve": {}},
        ],
        "joint_rounds": [
            {"outcome": "improved", "solve": solve("optimal", n_binaries=44, n_constraints=188, seconds=1.0)},
            {"outcome": "improved", "time_limited": True, "solve": solve("feasible", seconds=2.0)},
            {"outcome": "rejected", "solve": solve("feasible", seconds=0.5)},
        ],
    }}


def paper_report() -> dict[str, Any]:
    solve = {"status": "feasible", "n_binaries": 4694, "n_constraints": 12587, "gap": 0.99447, "seconds": 12.61}
    return {"mip": {
        "formulation": "paper", "solver": "highs", "bounds": "crown", "seconds": 157.8,
        "classes": [{"label": 0, "status": "feasible", "outcome": "solved", "solve": solve},
                    {"label": 1, "status": "optimal", "outcome": "solved",
                     "solve": {**solve, "status": "optimal", "gap": 0.0}},
                    {"label": 2, "status": "error", "outcome": "solver-error",
                     "solve": {"status": "error", "error": "HiGHS returned no solution at all"}}],
        "threshold_rule": {"tau": 0.1, "units_kept": 112, "units_free": 112, "macs_kept": 1.0},
    }}


def render(renderable: Any, width: int = 80) -> str:
    """What the CLI prints for ``renderable`` on a terminal ``width`` columns wide (no colour)."""
    out = io.StringIO()
    Console(file=out, width=width, soft_wrap=True, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def body(text: str) -> list[list[str]]:
    """The body lines of the first box table in ``text``, split into their stripped cells."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


# ----------------------------------------------------------------------------------------------
# rows from a real compile


def test_costs_and_widths_rows_carry_the_reports_numbers(plain: dict[str, Any]) -> None:
    table = costs_table(plain)
    b, a, acc, lossless, rec = (plain["before"], plain["after"], plain["accuracy"], plain["lossless"],
                                plain["reconstruct"])
    assert [c.header for c in table.columns] == ["", "before", "after", "after/before"]
    assert table.rows == [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / b['params']:.3f}x"),
        ("FLOPs (MACs)", f"{b['macs']:,}", f"{a['macs']:,}", f"{a['macs'] / b['macs']:.3f}x"),
        # The trained MLP has no unit that is constant on the digits' range (RESULTS, lossless removal).
        (f"lossless: 0 dead units removed, {lossless['seconds']:.2f} s", f"{b['macs']:,}", f"{b['macs']:,}", "1.000x"),
        (f"accuracy (digits/test, n={acc['samples']})", f"{100 * acc['before']:.2f}%", f"{100 * acc['after']:.2f}%",
         f"{100 * (acc['after'] - acc['before']):+.2f} pt"),
        ("output error, reconstructed [1]", f"{rec['output_error_before']:.3g}", f"{rec['output_error_after']:.3g}",
         f"{rec['output_error_after'] / rec['output_error_before']:.3f}x"),
    ]
    assert table.caption == ""
    assert table.notes == [f"reconstruct: relative error of the network's output against the original's on "
                           f"{rec['samples']:,} train samples, before and after refitting {rec['layers_refit']} layers "
                           f"({rec['seconds']:.2f} s)"]
    widths = widths_table(plain)
    assert widths.rows == [(name, str(w["before"]), str(w["after"])) for name, w in plain["widths"].items()]
    assert ("body.0", "128", "64") in widths.rows
    assert mip_table(plain) is None  # l1: no MILP ran


def test_onnx_and_latency_rows_when_measured(plain: dict[str, Any]) -> None:
    rep = copy.deepcopy(plain)
    rep["onnx"] = {"bytes": 53177}
    assert costs_table(rep).rows[3] == ("ONNX bytes", "-", "53,177", "-")  # the original's size needs the bench
    rep["onnx"]["bytes_before"] = 105379
    rep["latency"] = {"rows": [{"batch": 1, "a_median_ms": 0.025, "b_median_ms": 0.02354}]}
    rows = costs_table(rep).rows
    assert rows[3] == ("ONNX bytes", "105,379", "53,177", "0.505x")
    assert rows[-1] == ("latency batch 1 (median ms)", "0.0250", "0.0235", "0.942x")


def test_finetuned_report_splits_accuracy_and_has_a_history(tuned: dict[str, Any]) -> None:
    acc, ft = tuned["accuracy"], tuned["finetune"]
    labels = [row[0] for row in costs_table(tuned).rows]
    assert labels[3:6] == [f"accuracy after pruning (digits/test, n={acc['samples']})",
                          f"accuracy, fine-tuning (1 epochs, {ft['seconds']:.2f} s)", "accuracy, pruned + fine-tuned"]
    rows = costs_table(tuned).rows
    assert rows[4][1:] == (f"{100 * acc['after_prune']:.2f}%", f"{100 * acc['after']:.2f}%",
                           f"{100 * (acc['after'] - acc['after_prune']):+.2f} pt")
    history = finetune_history_table(ft)
    assert [c.header for c in history.columns] == ["epoch", "loss", "train accuracy", "held-out accuracy"]
    (epoch,) = ft["history"]
    assert history.rows == [("1", f"{epoch['loss']:.4f}", f"{100 * epoch['train_accuracy']:.2f}%",
                             f"{100 * epoch['eval_accuracy']:.2f}%")]
    summary = finetune_table(tuned)
    assert summary.title == "oamipc finetune" and len(summary.rows) == 3
    assert summary.caption == f"1 epochs on {ft['train_samples']} samples, {ft['seconds']:.2f} s"


def test_partial_reports_give_dashes_not_errors() -> None:
    table = costs_table({"before": {"params": 10}, "after": {"params": "x"}, "latency": {"rows": [None]}})
    assert table.rows == [("parameters", "10", "-", "-"), ("FLOPs (MACs)", "-", "-", "-"),
                          ("latency batch ? (median ms)", "-", "-", "-")]
    assert widths_table({"widths": {"a": "nope"}}).rows == [("a", "-", "-")]
    assert finetune_history_table(None).rows == []
    assert mip_table({"mip": {"formulation": "budget", "subproblems": [None, {"group": "g"}]}}) is not None


# ----------------------------------------------------------------------------------------------
# the MIP rows


@pytest.mark.parametrize(("status", "time_limited", "node_limit", "word", "noted"), [
    ("optimal", False, True, "optimal", False),
    ("feasible", False, True, "node limit", False),
    ("feasible", True, True, "time limit", False),
    ("feasible", False, False, "time limit", False),  # paper: no node limit, so the clock stopped it
    ("no_solution", False, True, "node limit", False),
    ("infeasible", False, True, "infeasible", False),
    ("error", False, True, "error", False),
    (None, False, True, "-", False),
    (TOO_BIG, False, True, "too big", True),
    ("warm start infeasible", False, True, "bad start", True),
    ("some status the planner may add one day", False, True, "other", True),
])
def test_mip_status_words(status: Any, time_limited: bool, node_limit: bool, word: str, noted: bool) -> None:
    got, note = mip_status(status, time_limited=time_limited, node_limit=node_limit)
    assert got == word and (note is not None) == noted
    assert len(got) <= 12
    if status == TOO_BIG:
        assert note == TOO_BIG  # the full text is kept for the note


def test_budget_rows_use_short_words_and_numbered_notes() -> None:
    table = mip_table(budget_report())
    assert table is not None
    assert table.title == "MIP analysis (budget, highs, crown bounds)"
    assert [c.header for c in table.columns] == ["step", "binaries", "rows", "status", "gap", "solve s", "outcome"]
    assert table.rows == [
        ("fc1", "64", "579", "optimal", "0.0%", "3.2", "improved"),
        ("conv2", "-", "-", "too big [1]", "-", "-", "skipped"),
        ("conv1", "-", "-", "too big [2]", "-", "-", "skipped"),
        ("fc2", "64", "579", "node limit", "1.5%", "3.2", "unchanged"),
        ("fc3", "64", "579", "time limit", "25.0%", "3.2", "rejected"),
        ("fc4", "-", "-", "bad start [3]", "-", "-", "no-incumbent"),
        ("fc5", "-", "-", "error [4]", "-", "-", "solver-error"),
        ("fc6", "64", "579", "optimal", "-", "3.2", "invalid [5]"),
        ("fc7", "-", "-", "-", "-", "-", "skipped"),
        ("joint", "44", "188", "time limit [6]", "-", "3.5", "2/3 improved"),
    ]
    assert table.notes == [
        TOO_BIG, TOO_BIG_2,
        "the warm start is infeasible in the MILP's encoding; the group was left unchanged",
        "HiGHS crashed", "keeps 3 units, min_keep is 4",
        "1 of 3 joint rounds stopped at the time limit (--time-limit): the plan may differ between runs",
    ]
    assert table.caption == "warm start activation; held-out margin loss 3.7804 -> 2.9922; 23.7 s"


def test_a_repeated_note_keeps_its_number() -> None:
    rep = budget_report()
    rep["mip"]["subproblems"][2]["solve"]["status"] = TOO_BIG
    table = mip_table(rep)
    assert table is not None
    assert [row[3] for row in table.rows[1:3]] == ["too big [1]", "too big [1]"] and table.notes.count(TOO_BIG) == 1


def test_paper_rows() -> None:
    table = mip_table(paper_report())
    assert table is not None
    assert table.title == "MIP analysis (paper, highs, crown bounds)"
    assert table.rows == [
        ("class 0", "4,694", "12,587", "time limit", "99.4%", "12.6", "solved"),
        ("class 1", "4,694", "12,587", "optimal", "0.0%", "12.6", "solved"),
        ("class 2", "-", "-", "error [1]", "-", "-", "solver-error"),
    ]
    assert table.notes == ["HiGHS returned no solution at all"]
    assert table.caption == ("scores ranked to the target; the thesis's rule s >= 0.1 would keep 112/112 units, "
                             "100.0% of the MACs; 157.8 s")


def test_gap_format() -> None:
    assert [fmt_gap(g) for g in (0.0, 1.6e-8, 0.0151, 0.99447, 1.0, None)] == ["0.0%", "0.0%", "1.5%", "99.4%",
                                                                             "100.0%", "-"]


# ----------------------------------------------------------------------------------------------
# the command line's rendering


def assert_shown_unwrapped(text: str, table: SummaryTable) -> None:
    """Every row of ``table`` is one line of ``text`` with exactly its cells, every line fits 80."""
    assert body(text) == [list(row) for row in table.rows]
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("make", [budget_report, paper_report])
def test_mip_table_fits_80_columns_without_wrapping(make: Any) -> None:
    report = make()
    table = mip_table(report)
    assert table is not None
    text = render(_mip_table(report))
    assert_shown_unwrapped(text, table)
    lines = text.splitlines()
    assert lines[0] == table.title
    # The caption, then one numbered note per marker, wrapped between words with a hanging indent.
    after = "\n".join(lines[lines.index(next(line for line in lines if line.startswith("└"))) + 1:])
    assert " ".join(after.split()).startswith(table.caption)
    for number, note in enumerate(table.notes, 1):
        assert f"[{number}] {note}" in " ".join(after.split())


def test_narrow_terminals_wrap_cells_between_words_only() -> None:
    """Long unit-group names (a VGG's) do not fit 80 columns: cells wrap, but no word is cut."""
    rep = budget_report()
    for sp, name in zip(rep["mip"]["subproblems"], ["features.17", "features.14", "stem.0 (+1 coupled)"]):
        sp["group"] = name
    rep["mip"]["joint_rounds"][0]["solve"].update(n_binaries=123456, n_constraints=1234567)
    table = mip_table(rep)
    assert table is not None
    words = {word for row in table.rows for cell in row for word in cell.split()}
    for width in (80, 79):  # 79: the longest word of every column and the table's rules, exactly
        text = render(_mip_table(rep), width)
        assert max(len(line) for line in text.splitlines()) <= width
        shown = set(text.replace("│", " ").replace("┃", " ").split())
        assert words <= shown, sorted(words - shown)  # a word cut in two would be missing
    # Narrower than the longest words: they are folded, never cut short.
    text = render(_mip_table(rep), 60)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 60


def test_summary_and_finetune_tables_fit_80_columns(plain: dict[str, Any], tuned: dict[str, Any]) -> None:
    assert_shown_unwrapped(render(_summary_table(plain)), costs_table(plain))
    text = render(_finetune_table(tuned))
    assert " ".join(text.split()).endswith(finetune_table(tuned).caption)


def test_compile_prints_the_mip_table_unwrapped_at_80_columns(tmp_path: Path) -> None:
    """A real MILP run: conv1 is left to the joint stage, and its status is a word plus note 1."""
    report = tmp_path / "run.json"
    res = CliRunner().invoke(app, ["compile", str(CNN), "--data", "digits", "--flops-budget", "0.3", "--no-bench",
                                   "--mip-samples", "16", "--time-limit", "1", "--total-time-limit", "30",
                                   "-o", str(tmp_path / "x.onnx"), "--report", str(report)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.stderr
    rep = json.loads(report.read_text())
    table = mip_table(rep)
    assert table is not None and ("conv1", "-", "-", "too big [1]", "-", "-", "skipped") in table.rows
    mip_block = res.stdout[res.stdout.index(table.title):res.stdout.index("kept units per layer")]
    assert_shown_unwrapped(mip_block, table)
    assert "[1] up to 41984 ReLU/max-pool binaries (> 4000); left to the joint stage" in mip_block
    for other in (widths_table(rep), costs_table(rep)):
        assert other.title in res.stdout
    assert max(len(line) for line in res.stdout.splitlines() if not line.startswith("wrote ")) <= 80


# ----------------------------------------------------------------------------------------------
# the page shows the same rows


def test_page_shows_the_same_rows_and_notes(tuned: dict[str, Any]) -> None:
    rep = {**tuned, **budget_report()}
    page = build_page(rep).html
    for table in (costs_table(rep), mip_table(rep), widths_table(rep), finetune_history_table(rep["finetune"])):
        assert table is not None
        attrs = [' class="l"' if c.align == "left" else "" for c in table.columns]
        for row in table.rows:
            cells = "".join(f"<td{attr}>{html.escape(v)}</td>" for attr, v in zip(attrs, row))
            assert f"<tr>{cells}</tr>" in page, row
        for number, note in enumerate(table.notes, 1):
            assert f"[{number}] {html.escape(note)}" in page
    assert "<h2>Kept units per layer</h2>" in page and "<h2>Fine-tuning per epoch</h2>" in page
    assert f"<h2>{html.escape(mip_table(rep).title)}</h2>" in page  # type: ignore[union-attr]

"""The summary tables of a compile report, as plain rows of strings: one source for every view.

The command line (:mod:`oamipc.cli`, with rich) and the HTML page (:mod:`oamipc.report_html`)
show the same tables: costs, accuracy and latency before and after, the kept units per layer,
how the MILP analysis went, and fine-tuning.  Both used to build their rows themselves, and the
two copies drifted apart (different rules for when a row appears, different number formats).
Here each table is built once, as a :class:`SummaryTable` of strings; the views only lay it out.
Nothing here prints.

Every function takes the report as a dict (as :func:`oamipc.compile` returns it, or as read back
from JSON) and never raises on a missing or malformed field: the page must render a partial
report, so a value that is not there shows as ``-``.

Cells stay short so a table fits a terminal 80 columns wide.  A cell whose full text is long (a
MILP status such as "up to 8192 ReLU/max-pool binaries (> 4000); left to the joint stage") shows
a short word and a marker, ``too big [1]``, and the full text becomes note 1 of the table's
:attr:`~SummaryTable.notes`, which the views print below the table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Column", "SummaryTable", "costs_table", "finetune_history_table", "finetune_table", "fmt_gap", "fmt_int",
    "fmt_num", "mip_status", "mip_table", "pareto_table", "ratio", "widths_table",
]

Align = Literal["left", "right"]

#: The text of an empty or unknown cell.
MISSING = "-"


@dataclass(frozen=True)
class Column:
    """One column of a table: its header and how its cells are aligned (numbers to the right)."""

    header: str
    align: Align = "right"


@dataclass
class SummaryTable:
    """One table of a report: everything a view needs to show it, already formatted.

    ``rows`` hold one string per column.  ``caption`` is one sentence under the table (may be
    empty).  ``notes`` explain cells that carry a marker ``[n]``: note ``n`` is ``notes[n - 1]``.
    """

    title: str
    columns: tuple[Column, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    caption: str = ""
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> str:
        """Add ``text`` as a note (once: the same text gets the same number); return its marker."""
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def add_row(self, *cells: str) -> None:
        """Append a row; it must have one cell per column (a mismatch is a bug here, not bad data)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(tuple(cells))


# ----------------------------------------------------------------------------------------------
# reading a report that may be partial


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, non-numeric, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return MISSING if value is None else str(value)


# ----------------------------------------------------------------------------------------------
# number formats (the same in every view)


def fmt_int(value: Any) -> str:
    """A count with thousands separators (``38,378``), or ``-``."""
    v = _num(value)
    return f"{int(v):,}" if v is not None else MISSING


def fmt_num(value: Any, spec: str = ".3g") -> str:
    """A number in format ``spec``; ``-`` when missing, and any other value as its text."""
    v = _num(value)
    return format(v, spec) if v is not None else _text(value)


def ratio(before: Any, after: Any) -> str:
    """``after / before`` as ``0.396x``, or ``-`` when either is missing or ``before`` is 0."""
    a, b = _num(before), _num(after)
    return f"{b / a:.3f}x" if a and b is not None else MISSING


def fmt_gap(value: Any) -> str:
    """A MILP's relative gap as a percentage with one decimal (``99.4%``; below 0.05%: ``0.0%``), or ``-``.

    A percentage, as solvers print it, stays at most six characters wide where ``.3g`` of a
    tiny gap would take eight (``1.61e-08``), which matters in an 80-column table.
    """
    v = _num(value)
    return f"{100 * v:.1f}%" if v is not None else _text(value)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _points(before: float, after: float) -> str:
    return f"{100 * (after - before):+.2f} pt"


# ----------------------------------------------------------------------------------------------
# costs, accuracy and latency


def _accuracy_rows(table: SummaryTable, report: dict[str, Any]) -> None:
    """Accuracy before/after; after fine-tuning also after pruning and the fine-tuning step itself.

    The split needs ``accuracy.after_prune``, which a compile with fine-tuning records; a report
    without it (no fine-tuning, or ``oamipc finetune`` of an already pruned model) gets one row.
    """
    acc = _dict(report.get("accuracy"))
    before, after = _num(acc.get("before")), _num(acc.get("after"))
    if before is None or after is None:
        return
    where = f"{acc.get('dataset', '?')}, n={acc.get('samples', '?')}"
    finetune = report.get("finetune")
    after_prune = _num(acc.get("after_prune"))
    if not isinstance(finetune, dict) or after_prune is None:
        table.add_row(f"accuracy ({where})", _pct(before), _pct(after), _points(before, after))
        return
    how = f"{finetune.get('epochs', '?')} epochs"
    seconds = _num(finetune.get("seconds"))
    if seconds is not None:
        how += f", {seconds:.2f} s"
    table.add_row(f"accuracy after pruning ({where})", _pct(before), _pct(after_prune), _points(before, after_prune))
    table.add_row(f"accuracy, fine-tuning ({how})", _pct(after_prune), _pct(after), _points(after_prune, after))
    table.add_row("accuracy, pruned + fine-tuned", _pct(before), _pct(after), _points(before, after))


def _lossless_row(table: SummaryTable, report: dict[str, Any]) -> None:
    """The lossless removal: MACs before and after removing only the provably dead units.

    The label says how many units went and how long the proof took; a removal that did not run
    says why in a note (no data, turned off), and a report without the section gets no row.
    """
    section = _dict(report.get("lossless"))
    if not section:
        return
    if not section.get("enabled"):
        table.add_row(f"lossless removal: off {table.note(_text(section.get('note')))}", MISSING, MISSING, MISSING)
        return
    seconds = _num(section.get("seconds"))
    took = f", {seconds:.2f} s" if seconds is not None else ""
    removed, dead = fmt_int(section.get("units_removed")), fmt_int(section.get("units_dead"))
    label = f"lossless: {removed} dead units removed{took}"
    if removed != dead:
        label += " " + table.note(f"{dead} units were proved dead; the rest are kept by --min-keep, --round-to or "
                                  "equal-count blocks")
    table.add_row(label, fmt_int(section.get("macs_before")), fmt_int(section.get("macs_after")),
                  ratio(section.get("macs_before"), section.get("macs_after")))


def _reconstruct_row(table: SummaryTable, report: dict[str, Any]) -> None:
    """The network output's relative error against the original, before and after reconstruction.

    Before and after are those of the reconstruct step (as the fine-tuning row's are of fine-tuning):
    the pruned network as the surgery left it, and with its layers refit.  A note says so, with the
    samples and seconds (the label must stay short enough for an 80-column table).
    """
    rec = _dict(report.get("reconstruct"))
    before, after = _num(rec.get("output_error_before")), _num(rec.get("output_error_after"))
    if before is None or after is None:
        return
    seconds = _num(rec.get("seconds"))
    note = (f"reconstruct: relative error of the network's output against the original's on "
            f"{fmt_int(rec.get('samples'))} {rec.get('source', 'train')} samples, before and after refitting "
            f"{fmt_int(rec.get('layers_refit'))} layers" + (f" ({seconds:.2f} s)" if seconds is not None else ""))
    table.add_row(f"output error, reconstructed {table.note(note)}", fmt_num(before), fmt_num(after),
                  ratio(before, after))


def _opaque_rows(table: SummaryTable, b: dict[str, Any], a: dict[str, Any]) -> None:
    """MACs with the opaque modules counted in, and the opaque modules' own share (never pruned)."""
    names = ", ".join(f"{m.get('name')} ({m.get('type')})" for m in (_dict(m) for m in _list(b.get("opaque"))))
    unknown = _list(b.get("opaque_macs_unknown"))
    text = (f"opaque modules: {names}; the tracer keeps them whole, so nothing inside them is pruned; their "
            "MACs are counted by torch.utils.flop_counter on one call with the recorded input shapes")
    if unknown:
        text += f"; unknown for {', '.join(map(str, unknown))}, so the totals are lower bounds"
    marker = table.note(text)
    bound = ">= " if unknown else ""

    def cell(section: dict[str, Any], key: str) -> str:
        value = fmt_int(section.get(key))
        return bound + value if value != MISSING else value

    table.add_row(f"FLOPs (MACs) {marker}", cell(b, "macs_total"), cell(a, "macs_total"),
                  ratio(b.get("macs_total"), a.get("macs_total")))
    table.add_row("  in opaque modules", cell(b, "opaque_macs"), cell(a, "opaque_macs"),
                  ratio(b.get("opaque_macs"), a.get("opaque_macs")))


def costs_table(report: dict[str, Any], *, title: str = "oamipc compile") -> SummaryTable:
    """Parameters, MACs, ONNX size, accuracy and latency of the model before and after pruning.

    The lossless row gives the MACs after removing the provably dead units alone.  With
    reconstruction, a row gives the network output's relative error against the original before
    and after the refit.  The ONNX row appears whenever the pruned file's size is known (the
    original's size, ``-`` when not measured, comes with the latency measurement); accuracy rows
    need labelled data, latency rows a benchmark.
    """
    table = SummaryTable(title, (Column("", "left"), Column("before"), Column("after"), Column("after/before")))
    b, a = _dict(report.get("before")), _dict(report.get("after"))
    table.add_row("parameters", fmt_int(b.get("params")), fmt_int(a.get("params")),
                  ratio(b.get("params"), a.get("params")))
    if _list(b.get("opaque")):
        _opaque_rows(table, b, a)
    else:
        table.add_row("FLOPs (MACs)", fmt_int(b.get("macs")), fmt_int(a.get("macs")),
                      ratio(b.get("macs"), a.get("macs")))
    _lossless_row(table, report)
    onnx = _dict(report.get("onnx"))
    if "bytes" in onnx:
        table.add_row("ONNX bytes", fmt_int(onnx.get("bytes_before")), fmt_int(onnx.get("bytes")),
                      ratio(onnx.get("bytes_before"), onnx.get("bytes")))
    _accuracy_rows(table, report)
    _reconstruct_row(table, report)
    for row in _list(_dict(report.get("latency")).get("rows")):
        row = _dict(row)
        a_ms, b_ms = _num(row.get("a_median_ms")), _num(row.get("b_median_ms"))
        change = ratio(a_ms, b_ms)
        if a_ms is not None and b_ms is not None and b_ms > a_ms:
            change += " SLOWER"  # never slower without saying so
        table.add_row(f"latency batch {row.get('batch', '?')} (median ms)", fmt_num(a_ms, ".4f"),
                      fmt_num(b_ms, ".4f"), change)
    predicted = _dict(report.get("latency_prediction"))
    if predicted:
        table.add_row(f"latency batch {predicted.get('batch', '?')} (predicted ms)",
                      fmt_num(predicted.get("dense_ms"), ".4f"), fmt_num(predicted.get("predicted_ms"), ".4f"),
                      ratio(predicted.get("dense_ms"), predicted.get("predicted_ms")))
    why = _dict(_dict(report.get("latency")).get("verdict")).get("why")
    if why:
        table.caption = f"slower than the original at some batch: {why}"
    return table


def widths_table(report: dict[str, Any], *, title: str = "kept units per layer") -> SummaryTable:
    """Output units of every layer before and after pruning (all layers, in graph order)."""
    table = SummaryTable(title, (Column("layer", "left"), Column("before"), Column("after")))
    for name, w in _dict(report.get("widths")).items():
        w = _dict(w)
        before, after = _num(w.get("before")), _num(w.get("after"))
        table.add_row(str(name), MISSING if before is None else str(int(before)),
                      MISSING if after is None else str(int(after)))
    return table


# ----------------------------------------------------------------------------------------------
# the MILP analysis

#: Solver statuses (``oamipc.solver.STATUSES``) as they read in a table; ``feasible`` and
#: ``no_solution`` mean a limit stopped the solve and become the limit's name instead.
_STATUS_WORDS = {"optimal": "optimal", "infeasible": "infeasible", "unbounded": "unbounded", "error": "error"}
_LIMITED = ("feasible", "no_solution")
#: The budget formulation's note for a layer it left to the joint stage (passes/mip/budget.py).
_TOO_BIG = re.compile(r"^up to \d+ .*binaries")
#: A status longer than this shows as a word and a note.
_SHORT = 12


def mip_status(status: Any, *, time_limited: bool = False, node_limit: bool = True) -> tuple[str, str | None]:
    """A MILP status as a short word for a table cell, and the full text for a note when it is long.

    ``status`` is what a solve record holds: a solver status (``optimal``, ``feasible``, ...) or
    the planner's own sentence for a solve it did not run.  A ``feasible`` or ``no_solution``
    result was stopped by a limit: ``time limit`` when ``time_limited`` says the clock ran out
    (or when the solve had no node limit, as in the ``paper`` formulation), else ``node limit``.
    Returns ``(word, note)`` with ``note`` None when the word says it all.
    """
    text = _text(status)
    if text in _LIMITED:
        return ("time limit" if time_limited or not node_limit else "node limit"), None
    if text in _STATUS_WORDS:
        return _STATUS_WORDS[text], None
    if _TOO_BIG.match(text):
        return "too big", text
    if text == "warm start infeasible":
        return "bad start", "the warm start is infeasible in the MILP's encoding; the group was left unchanged"
    if len(text) <= _SHORT:
        return text, None
    return "other", text


def _status_cell(table: SummaryTable, word: str, *notes: str | None) -> str:
    """``word`` followed by the markers of its notes (empty notes are left out)."""
    markers = [table.note(n) for n in notes if n]
    return " ".join([word, *markers])


#: The joint row shows the first of these words that any round ended with.
_SEVERITY = ("error", "time limit", "node limit", "infeasible", "unbounded", "optimal")


def _joint_row(table: SummaryTable, rounds: list[dict[str, Any]]) -> None:
    """One row for all joint rounds: the size of the first, the most limiting status, total seconds.

    Rounds that ran into the time limit get a note, since they make the plan depend on machine
    load; a node limit is a fixed amount of work and needs none.
    """
    words = []
    notes: list[str] = []
    for r in rounds:
        word, note = mip_status(_dict(r.get("solve")).get("status"), time_limited=bool(r.get("time_limited")))
        words.append(word)
        if note:
            notes.append(note)
        if r.get("outcome") in ("solver-error", "invalid") and r.get("note"):
            notes.append(str(r["note"]))
    word = min(words, key=lambda w: _SEVERITY.index(w) if w in _SEVERITY else len(_SEVERITY))
    limited = sum(bool(r.get("time_limited")) for r in rounds)
    if limited:
        notes.insert(0, f"{limited} of {len(rounds)} joint rounds stopped at the time limit (--time-limit): "
                        "the plan may differ between runs")
    improved = sum(r.get("outcome") == "improved" for r in rounds)
    seconds = sum(_num(_dict(r.get("solve")).get("seconds")) or 0.0 for r in rounds)
    first = _dict(rounds[0].get("solve"))
    table.add_row("joint", fmt_int(first.get("n_binaries")), fmt_int(first.get("n_constraints")),
                  _status_cell(table, word, *notes), MISSING, f"{seconds:.1f}", f"{improved}/{len(rounds)} improved")


def mip_table(report: dict[str, Any]) -> SummaryTable | None:
    """How the MILP analysis went: one row per sub-problem (or class problem), then the totals.

    ``budget``: a row per layer sub-problem (named by its unit group) and one for all joint rounds
    (``4/12 improved``: rounds that lowered the held-out loss); the caption gives the warm start,
    the held-out loss before and after, and the seconds.  ``paper``: a row per class problem; the
    caption says what the thesis's threshold rule would have kept.  None without a MILP analysis.
    """
    mip = _dict(report.get("mip"))
    if not mip:
        return None
    formulation = mip.get("formulation", "?")
    columns = (Column("step", "left"), Column("binaries"), Column("rows"), Column("status", "left"), Column("gap"),
               Column("solve s"), Column("outcome", "left"))
    table = SummaryTable(f"MIP analysis ({formulation}, {mip.get('solver', '?')}, {mip.get('bounds', 'crown')} bounds)",
                         columns)
    seconds = _num(mip.get("seconds"))
    if formulation == "paper":
        for c in _list(mip.get("classes")):
            c = _dict(c)
            sv = _dict(c.get("solve"))
            word, note = mip_status(c.get("status", sv.get("status")), node_limit=False)
            table.add_row(f"class {c.get('label', '?')}", fmt_int(sv.get("n_binaries")),
                          fmt_int(sv.get("n_constraints")), _status_cell(table, word, note, sv.get("error")),
                          fmt_gap(sv.get("gap")), fmt_num(sv.get("seconds"), ".1f"), _text(c.get("outcome")))
        rule = _dict(mip.get("threshold_rule"))
        parts = ["scores ranked to the target"]
        if rule:
            mk = _num(rule.get("macs_kept"))
            share = f", {100 * mk:.1f}% of the MACs" if mk is not None else ""
            parts.append(f"the thesis's rule s >= {rule.get('tau', '?')} would keep {rule.get('units_kept', '?')}/"
                         f"{rule.get('units_free', '?')} units{share}")
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        table.caption = "; ".join(parts)
        return table
    for sp in _list(mip.get("subproblems")):
        sp = _dict(sp)
        sv = _dict(sp.get("solve"))
        word, note = mip_status(sv.get("status"), time_limited=bool(sp.get("time_limited")))
        outcome = _text(sp.get("outcome"))
        why = str(sp.get("note") or "")  # why a solution was invalid (explains the outcome), or the solver's error
        status = _status_cell(table, word, note, "" if outcome == "invalid" else why)
        if outcome == "invalid" and why:
            outcome = f"{outcome} {table.note(why)}"
        table.add_row(_text(sp.get("group")), fmt_int(sv.get("n_binaries")), fmt_int(sv.get("n_constraints")), status,
                      fmt_gap(sv.get("gap")), fmt_num(sv.get("seconds"), ".1f"), outcome)
    rounds = [_dict(r) for r in _list(mip.get("joint_rounds"))]
    if rounds:
        _joint_row(table, rounds)
    parts = []
    warm = _dict(mip.get("warm_start")).get("chosen")
    if warm:
        parts.append(f"warm start {warm}")
    hold = _dict(mip.get("holdout_loss"))
    hw, hf = _num(hold.get("warm_start")), _num(hold.get("final"))
    if hw is not None and hf is not None:
        parts.append(f"held-out margin loss {hw:.4f} -> {hf:.4f}")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    table.caption = "; ".join(parts)
    return table


# ----------------------------------------------------------------------------------------------
# fine-tuning


def finetune_history_table(finetune: Any, *, title: str = "fine-tuning") -> SummaryTable:
    """One row per fine-tuning epoch: mean training loss, training and held-out accuracy.

    ``finetune`` is a report's ``finetune`` section; without a per-epoch history the table has no rows.
    """
    history = [_dict(h) for h in _list(_dict(finetune).get("history"))]
    table = SummaryTable(title, tuple(Column(h) for h in ("epoch", "loss", "train accuracy", "held-out accuracy")))
    for h in history:
        train, held_out = _num(h.get("train_accuracy")), _num(h.get("eval_accuracy"))
        table.add_row(_text(h.get("epoch")), fmt_num(h.get("loss"), ".4f"), MISSING if train is None else _pct(train),
                      MISSING if held_out is None else _pct(held_out))
    return table


def finetune_table(report: dict[str, Any], *, title: str = "oamipc finetune") -> SummaryTable:
    """``oamipc finetune``'s summary: accuracy before/after fine-tuning, with epochs, samples and seconds."""
    table = SummaryTable(title, (Column("", "left"), Column("before"), Column("after"), Column("change")))
    _accuracy_rows(table, report)
    ft = _dict(report.get("finetune"))
    seconds = _num(ft.get("seconds"))
    table.caption = (f"{ft.get('epochs', '?')} epochs on {ft.get('train_samples', '?')} samples"
                     + (f", {seconds:.2f} s" if seconds is not None else ""))
    return table



# ----------------------------------------------------------------------------------------------
# the accuracy-latency front (oamipc pareto)


def pareto_table(result: dict[str, Any]) -> SummaryTable:
    """One row per budget of an ``oamipc pareto`` result (the dense network first): MACs and
    parameters kept, test accuracy, latency and its ratio to the dense network's, and whether the
    point is on the accuracy-latency front."""
    lat = _dict(result.get("latency"))
    table = SummaryTable(
        f"accuracy-latency front of {result.get('model', '?')}",
        (Column("budget"), Column("MACs kept"), Column("params kept"), Column("accuracy"),
         Column(f"latency ms (batch {lat.get('batch', '?')})"), Column("latency ratio"), Column("front", "left")))
    dense = _dict(result.get("dense"))
    rows = [dense, *(_dict(p) for p in _list(result.get("points")))]
    for i, p in enumerate(rows):
        budget = "original" if i == 0 else fmt_num(p.get("budget"), "g")
        if "error" in p:
            table.add_row(budget, *(MISSING,) * 5, f"not compiled {table.note(str(p['error']))}")
            continue
        acc = _num(p.get("accuracy"))
        table.add_row(budget, ratio(dense.get("macs"), p.get("macs")), ratio(dense.get("params"), p.get("params")),
                      f"{100 * acc:.2f}%" if acc is not None else MISSING, fmt_num(p.get("latency_ms"), ".4f"),
                      fmt_num(p.get("latency_ratio"), ".3f"), "yes" if p.get("front") else "")
    table.caption = (f"Latency: onnxruntime ({lat.get('provider', '?')}), median of {lat.get('runs', '?')} runs, "
                     "each compiled network timed interleaved with the original; ratio below 1 is faster. "
                     "On the front: no other point is as accurate and as fast.")
    return table

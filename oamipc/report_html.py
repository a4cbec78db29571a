"""The compile report as one self-contained HTML page: tables plus one figure per claim.

Why a page: the JSON report holds every number, but "did pruning keep the right units, and
what did it buy?" is answered faster by pictures.  Each figure makes one claim and says which
in its caption: per-layer widths before/after, the score distribution of every prunable group
split into kept and removed units (with the threshold when one separates them), accuracy
against FLOPs kept per criterion when the report holds a sweep, latency before/after per batch
size, and the fine-tuning curves when the model was fine-tuned.

The tables (costs and accuracy, the MIP analysis, kept units per layer, fine-tuning per epoch)
are the rows of :mod:`oamipc.summary`, the same the command line prints, laid out as HTML.

The page opens offline: figures are drawn with matplotlib (through :class:`~matplotlib.figure.Figure`,
never pyplot's global state) and inlined as SVG, the CSS is inline, and there are no scripts
or fonts to fetch.  The full report is embedded as JSON in
``<script type="application/json" id="oamipc-report">``, so :func:`load_report` can read a page
back and re-render it.  A partial report (``--no-bench``, a replayed plan, no labels) never
fails: a figure whose data is missing or malformed is replaced by a one-line note.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oamipc import summary
from oamipc.atomic import atomic_output
from oamipc.errors import DataError
from oamipc.summary import (  # the summary rows' tolerant readers of report fields
    Column,
    SummaryTable,
    _dict,
    _list,
    _num,
)

__all__ = ["FIGURE_COLOURS", "PARETO_COLOUR", "Page", "build_page", "load_report", "render_html", "render_pareto_html",
           "sweep_svg", "write_html"]

log = logging.getLogger(__name__)

#: The id of the ``<script>`` block that carries the full JSON report.
REPORT_SCRIPT_ID = "oamipc-report"

# Each figure draws its main marks in colours no other part of the page uses, so a screenshot
# can tell which figures really rendered (see FIGURE_COLOURS).
_WIDTH_BEFORE = "#c7c7c7"
_WIDTH_AFTER = "#1f5fb4"
_KEPT = "#2ca02c"
_REMOVED = "#d62728"
_LAT_A = "#9467bd"
_LAT_B = "#17becf"
_SWEEP = ("#ff7f0e", "#8c564b", "#e377c2", "#1f77b4", "#bcbd22", "#7f7f7f", "#393b79", "#637939")
_FT_LOSS = "#a05a2c"
_FT_EVAL = "#e7298a"
_FT_TRAIN = "#66a61e"
#: The marks of the accuracy-latency front on the ``oamipc pareto`` page.
PARETO_COLOUR = "#d95f02"
_PARETO_OFF = "#a6a6a6"

#: The one colour that identifies each figure's data marks (bars, histogram bins, markers).
FIGURE_COLOURS: dict[str, str] = {
    "widths": _WIDTH_AFTER, "scores": _KEPT, "sweep": _SWEEP[0], "latency": _LAT_B, "finetune": _FT_EVAL,
}

#: Small multiples of the score figure: at most this many groups are drawn.
MAX_SCORE_PANELS = 12
#: The widths figure draws at most this many layers (one bar pair each).
MAX_WIDTH_LAYERS = 80

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; font-size: 0.92em; }
th:first-child, td:first-child, th.l, td.l { text-align: left; }
figure { margin: 1em 0 2em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.92em; color: #444; max-width: 900px; }
p.note { color: #555; font-style: italic; }
p.meta { color: #555; }
p.caption, p.tnote { font-size: 0.92em; color: #444; margin: 0.2em 0; max-width: 900px; }
"""


class _Skip(Exception):  # noqa: N818 - control flow inside the page builder, never raised to users
    """A figure cannot be drawn from this report; the message is the page's one-line note."""


@dataclass
class Page:
    """The rendered page and what went into it: figures drawn (keys) and notes for those skipped."""

    html: str
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Drawn:
    key: str
    title: str
    svg: str
    caption: str


# ----------------------------------------------------------------------------------------------
# helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _svg(fig: Figure, key: str) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, DOCTYPE or metadata)."""
    buf = io.StringIO()
    # Deterministic ids per figure (svg.hashsalt) and text kept as <text> (svg.fonttype none):
    # the page is stable across runs and its labels are searchable.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"oamipc-{key}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL).strip()


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    fig.patch.set_facecolor("white")
    return fig


# ----------------------------------------------------------------------------------------------
# figures: each returns a drawn figure or raises _Skip with the reason


def _fig_widths(report: dict[str, Any]) -> _Drawn:
    widths = _dict(report.get("widths"))
    rows = [(str(name), _num(_dict(w).get("before")), _num(_dict(w).get("after"))) for name, w in widths.items()]
    rows = [(n, b, a) for n, b, a in rows if b is not None and a is not None]
    if not rows:
        raise _Skip("no per-layer widths in this report (field \"widths\")")
    shown = rows[:MAX_WIDTH_LAYERS]
    names = [n for n, _, _ in shown]
    y = np.arange(len(shown))
    fig = _new_figure(8.0, max(2.2, 0.32 * len(shown) + 1.0))
    ax = fig.subplots()
    h = 0.4
    ax.barh(y - h / 2, [b for _, b, _ in shown], height=h, color=_WIDTH_BEFORE, label="before")
    ax.barh(y + h / 2, [a for _, _, a in shown], height=h, color=_WIDTH_AFTER, label="after")
    for yi, (_, b, a) in zip(y, shown):
        ax.text(max(a, b), yi + h / 2, f" {int(a)}/{int(b)}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("output units (neurons / channels)")
    ax.set_xlim(0, max(1.0, *(max(b, a) for _, b, a in shown)) * 1.15)
    ax.legend(loc="lower right", frameon=False)
    changed = sum(a != b for _, b, a in rows)
    caption = (f"Output width of each layer before (grey) and after (blue) pruning; {changed} of {len(rows)} "
               "layers lost units. Labels give kept/original units.")
    if len(rows) > len(shown):
        caption += f" Only the first {len(shown)} layers are drawn; the JSON report has all {len(rows)}."
    return _Drawn("widths", "Per-layer widths", _svg(fig, "widths"), caption)


def _plan_groups(report: dict[str, Any]) -> dict[str, tuple[int, set[int]]]:
    """Group name -> (size, kept local indices) from the applied plan."""
    plan = _dict(_dict(report.get("prune")).get("plan"))
    out: dict[str, tuple[int, set[int]]] = {}
    for g in _list(plan.get("groups")):
        g = _dict(g)
        size = _num(g.get("size"))
        if "name" in g and size is not None:
            out[str(g["name"])] = (int(size), {int(i) for i in _list(g.get("kept"))})
    return out


def _fig_scores(report: dict[str, Any]) -> _Drawn:
    scores = _dict(report.get("scores"))
    if not scores:
        raise _Skip("no per-unit scores in this report (a replayed --plan or a custom pipeline does not score units)")
    plan = _plan_groups(report)
    if not plan:
        raise _Skip("no applied plan in this report (field prune.plan), so kept and removed units are unknown")
    panels = []
    for name, values in scores.items():
        vals = [_num(v) for v in _list(values)]
        if name not in plan or not vals or any(v is None for v in vals) or plan[name][0] != len(vals):
            continue
        kept_idx = plan[name][1]
        arr = np.asarray(vals, dtype=np.float64)
        mask = np.array([i in kept_idx for i in range(len(arr))])
        panels.append((name, arr, mask))
    if not panels:
        raise _Skip("the scores do not match the plan's groups (names or sizes differ)")
    shown = panels[:MAX_SCORE_PANELS]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _new_figure(3.4 * cols, 2.3 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    overlapping = []
    for ax, (name, arr, mask) in zip(axes, shown):
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            hi = lo + 1.0
        kept, removed = arr[mask], arr[~mask]
        separable = bool(len(kept) and len(removed) and removed.max() <= kept.min())
        width = (hi - lo) / min(30, max(5, len(arr) // 4))
        # With a threshold, put a bin edge on it so no bin mixes kept and removed units.
        tau = float(removed.max() + kept.min()) / 2 if separable else lo
        bins = tau + width * np.arange(math.floor((lo - tau) / width), math.ceil((hi - tau) / width) + 1)
        ax.hist([removed, kept], bins=bins, stacked=True, histtype="stepfilled", color=[_REMOVED, _KEPT],
                label=[f"removed ({len(removed)})", f"kept ({len(kept)})"])
        if separable:
            ax.axvline(tau, color="black", linestyle="--", linewidth=1)
            ax.text(tau, ax.get_ylim()[1] * 0.97, f"{tau:.3g}", fontsize=7, va="top", ha="center",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        elif len(kept) and len(removed):
            overlapping.append(name)
        ax.set_title(name, fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.supxlabel("importance score", fontsize=9)
    fig.supylabel("units", fontsize=9)
    criterion = _dict(_dict(report.get("prune")).get("plan")).get("criterion") or _dict(
        report.get("settings")).get("importance", "?")
    caption = (f"Distribution of the {criterion} importance scores of each prunable group, split into "
               "kept (green) and removed (red) units; the dashed line is a threshold that separates them.")
    if overlapping:
        caption += (f" In {len(overlapping)} group(s) ({', '.join(overlapping[:4])}"
                    f"{', ...' if len(overlapping) > 4 else ''}) kept and removed scores overlap, so no threshold "
                    "is drawn: the units were not chosen by score alone (")
        caption += ("the MILP picks units itself" if criterion == "mip" else
                    "units pinned by the graph, or equal counts kept per block of a grouped conv or GroupNorm")
        caption += ")."
    if criterion == "mip" and not overlapping:
        caption += " With --importance mip the MILP chooses the units and these scores follow its choice"
        budget = _dict(report.get("mip")).get("formulation") == "budget"
        caption += " (normalised magnitude, plus 1 when kept)." if budget else "."
    if len(panels) > len(shown):
        caption += f" The first {len(shown)} of {len(panels)} groups are drawn."
    return _Drawn("scores", "Score distribution per group", _svg(fig, "scores"), caption)


def _fig_sweep(report: dict[str, Any]) -> _Drawn:
    rows = [_dict(r) for r in _list(report.get("sweep"))]
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    for r in rows:
        x, y = _num(r.get("flops_kept")), _num(r.get("accuracy"))
        if x is None or y is None:
            continue
        series.setdefault(str(r.get("criterion", "?")), []).append((x, y, _num(r.get("accuracy_finetuned"))))
    if not series:
        raise _Skip("no accuracy-vs-FLOPs sweep in this report (field \"sweep\": rows of criterion, flops_kept, "
                    "accuracy from a sweep over criteria and budgets)")
    fig = _new_figure(7.5, 4.5)
    ax = fig.subplots()
    finetuned = False
    for i, (crit, pts) in enumerate(series.items()):
        pts.sort()
        colour = _SWEEP[i % len(_SWEEP)]
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", markersize=7, linewidth=1.8,
                color=colour, label=crit)
        ft = [p for p in pts if p[2] is not None]
        if ft:
            finetuned = True
            ax.plot([100 * p[0] for p in ft], [100 * p[2] for p in ft], marker="o", markersize=6,
                    markerfacecolor="white", linestyle="--", linewidth=1.2, color=colour, label=f"{crit}, fine-tuned")
    before, after = _dict(report.get("before")), _dict(report.get("after"))
    acc = _dict(report.get("accuracy"))
    mb, ma, aa = _num(before.get("macs")), _num(after.get("macs")), _num(acc.get("after"))
    if mb and ma is not None and aa is not None:
        ax.plot([100 * ma / mb], [100 * aa], marker="*", markersize=14, color="black", linestyle="none",
                label="this run")
    ab = _num(acc.get("before"))
    if ab is not None:
        ax.axhline(100 * ab, color="black", linewidth=0.8, linestyle=":", label="original model")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, 100 * ab - 1), max(high, 100 * ab + 1))
    ax.set_xlabel("FLOPs (MACs) kept, %")
    ax.set_ylabel("test accuracy, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    caption = ("Test accuracy against the fraction of FLOPs (MACs) kept, one line per importance criterion "
               "(higher and further left is better)")
    caption += "; dashed lines with open markers are after fine-tuning." if finetuned else "."
    return _Drawn("sweep", "Accuracy against FLOPs kept", _svg(fig, "sweep"), caption)


def _fig_latency(report: dict[str, Any]) -> _Drawn:
    lat = _dict(report.get("latency"))
    rows = []
    for r in _list(lat.get("rows")):
        r = _dict(r)
        batch, a, b = _num(r.get("batch")), _num(r.get("a_median_ms")), _num(r.get("b_median_ms"))
        if batch is not None and a is not None and b is not None and a > 0 and b > 0:
            rows.append((int(batch), a, b, _num(r.get("a_p90_ms")), _num(r.get("b_p90_ms"))))
    if not rows:
        raise _Skip("no latency measurement in this report (compiled with --no-bench)")
    fig = _new_figure(max(4.5, 1.6 * len(rows) + 2.0), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    w = 0.38
    ax.bar(x - w / 2, [r[1] for r in rows], width=w, color=_LAT_A, label="original (A)")
    ax.bar(x + w / 2, [r[2] for r in rows], width=w, color=_LAT_B, label="pruned (B)")
    for xi, (_, a, b, pa, pb) in zip(x, rows):
        for dx, med, p90 in ((-w / 2, a, pa), (w / 2, b, pb)):
            if p90 is not None and p90 >= med:
                ax.plot([xi + dx, xi + dx], [med, p90], color="black", linewidth=1)
                ax.plot([xi + dx - w / 6, xi + dx + w / 6], [p90, p90], color="black", linewidth=1)
        ax.text(xi, max(a, b, pa or 0, pb or 0) * 1.08, f"B/A {b / a:.2f}x", ha="center", fontsize=8)
    spread = max(max(r[1], r[2]) for r in rows) / min(min(r[1], r[2]) for r in rows)
    if spread > 20:
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 2)
    else:
        ax.set_ylim(0, max(max(r[1], r[2], r[3] or 0, r[4] or 0) for r in rows) * 1.25)
    ax.set_xticks(x, [f"batch {r[0]}" for r in rows])
    ax.set_ylabel("median latency, ms" + (" (log)" if spread > 20 else ""))
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    provider = lat.get("provider") or "?"
    threads = lat.get("intra_op_threads")
    runs = lat.get("runs")
    where = str(provider) + (f", {threads} intra-op thread(s)" if threads is not None else "")
    if lat.get("cpu") and "CPU" in str(provider):
        where += f", {lat['cpu']}"
    caption = (f"Median onnxruntime latency of the original (A, purple) and pruned (B, cyan) ONNX model per batch "
               f"size, timed interleaved on {where}" + (f", {runs} runs each" if runs is not None else "")
               + "; whiskers reach the 90th percentile, labels give B/A (below 1: the pruned model is faster).")
    return _Drawn("latency", "Latency before/after", _svg(fig, "latency"), caption)


def _fig_finetune(report: dict[str, Any]) -> _Drawn:
    ft = report.get("finetune")
    if not isinstance(ft, dict):
        raise _Skip("no fine-tuning in this report")
    hist = [_dict(h) for h in _list(ft.get("history"))]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(_num(h.get("epoch")), _num(h.get(key))) for h in hist]
        if any(e is None for e, _ in pts):  # no usable epoch numbers: count them
            pts = [(float(i + 1), v) for i, (_, v) in enumerate(pts)]
        good = [(e, v) for e, v in pts if e is not None and v is not None]
        return [e for e, _ in good], [v for _, v in good]

    loss = series("loss")
    accs = [(label, colour, series(key)) for key, label, colour in
            (("eval_accuracy", "eval", _FT_EVAL), ("train_accuracy", "train", _FT_TRAIN))]
    accs = [a for a in accs if a[2][0]]
    if not loss[0] and not accs:
        raise _Skip("the fine-tuning record has no per-epoch history to draw")
    fig = _new_figure(9.0, 3.4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    if loss[0]:
        ax_loss.plot(*loss, marker="o", markersize=6, color=_FT_LOSS)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    for label, colour, (e, v) in accs:
        ax_acc.plot(e, [100 * x for x in v], marker="o", markersize=6, color=colour, label=label)
    for key, label, style in (("accuracy_before", "pruned, before fine-tuning", "--"),
                              ("accuracy_after", "after fine-tuning", "-.")):
        v = _num(ft.get(key))
        if v is not None:
            ax_acc.axhline(100 * v, color="black", linewidth=0.8, linestyle=style, label=label)
    orig = _num(_dict(report.get("accuracy")).get("before"))
    if orig is not None:
        ax_acc.axhline(100 * orig, color="grey", linewidth=0.8, linestyle=":", label="original model")
    ax_acc.set_xlabel("epoch")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylabel("accuracy, %")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=7, frameon=False)
    caption = ("Fine-tuning of the pruned model: training loss (left) and accuracy (right) per epoch, with the "
               "accuracy before and after fine-tuning and the original model's for reference.")
    return _Drawn("finetune", "Fine-tuning", _svg(fig, "finetune"), caption)


def sweep_svg(rows: Iterable[dict[str, Any]], *, accuracy_before: float | None = None) -> str:
    """The accuracy-against-FLOPs-kept figure of the page, alone, as an SVG document.

    ``rows`` are sweep rows as in a report's ``"sweep"`` field (``criterion``, ``flops_kept``,
    ``accuracy`` and optionally ``accuracy_finetuned``, fractions); ``accuracy_before`` draws the
    original model's accuracy as a reference line.  For benchmark scripts that sweep many
    settings and want the same figure as a file rather than a page.  Raises
    :class:`~oamipc.errors.DataError` when no row has both a FLOPs fraction and an accuracy.
    """
    report: dict[str, Any] = {"sweep": list(rows)}
    if accuracy_before is not None:
        report["accuracy"] = {"before": accuracy_before}
    try:
        drawn = _fig_sweep(report)
    except _Skip as skip:
        raise DataError(str(skip)) from None
    return '<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + drawn.svg + "\n"


_FIGURES: tuple[tuple[str, Callable[[dict[str, Any]], _Drawn]], ...] = (
    ("widths", _fig_widths), ("scores", _fig_scores), ("sweep", _fig_sweep), ("latency", _fig_latency),
    ("finetune", _fig_finetune),
)


# ----------------------------------------------------------------------------------------------
# tables


def _table_html(table: SummaryTable, *, section: str | None = None) -> str:
    """A summary table (:mod:`oamipc.summary`) as HTML: its heading, the table, caption and notes.

    ``section`` replaces the table's title as the heading (the command line's titles name the
    command, the page's headings name the section).  Columns the command line aligns left get
    ``class="l"``; the notes keep their ``[n]`` markers, which the cells refer to.
    """
    attrs = [' class="l"' if column.align == "left" else "" for column in table.columns]

    def cells(tag: str, values: Iterable[str]) -> str:
        return "".join(f"<{tag}{attr}>{_esc(v)}</{tag}>" for attr, v in zip(attrs, values))

    header = cells("th", (c.header for c in table.columns))
    out = [f"<h2>{_esc(section or table.title)}</h2>", "<table>", f"<tr>{header}</tr>"]
    out += [f"<tr>{cells('td', row)}</tr>" for row in table.rows]
    out.append("</table>")
    if table.caption:
        out.append(f"<p class=\"caption\">{_esc(table.caption)}</p>")
    out += [f"<p class=\"tnote\">[{n}] {_esc(note)}</p>" for n, note in enumerate(table.notes, 1)]
    return "\n".join(out)


def _settings_table(report: dict[str, Any]) -> SummaryTable:
    """The settings the report was made with, one ``key`` (or ``key.sub``) per row."""
    settings = _dict(report.get("settings"))
    table = SummaryTable("Settings", (Column("setting", "left"), Column("value", "left")))
    for key, value in settings.items():
        if isinstance(value, dict):
            if key == "mip" and settings.get("importance") != "mip":
                continue  # the MILP options only matter when the MILP ran
            for k, v in value.items():
                shown = "-" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                table.add_row(f"{key}.{k}", shown)
        else:
            shown = "-" if value is None else ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            table.add_row(key, shown)
    for key in ("model", "input_shape"):
        if key in report:
            table.add_row(key, str(report[key]))
    return table


# ----------------------------------------------------------------------------------------------
# the page


def _embedded_json(report: dict[str, Any]) -> str:
    """The report as JSON that is safe inside a ``<script>`` element.

    ``<``, ``>`` and ``&`` can only occur inside JSON strings, where ``\\u003c`` etc. decode to the
    same characters; escaping them means no ``</script>`` or ``<!--`` can end or confuse the block.
    """
    text = json.dumps(report, indent=1, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(report: dict[str, Any], *, title: str | None = None) -> Page:
    """Render ``report`` (a compile report dict) into a :class:`Page`; never raises on missing fields."""
    title = title or f"oamipc report: {report.get('model', 'compiled model')}"
    page = Page(html="")
    blocks: list[str] = []
    for key, draw in _FIGURES:
        try:
            drawn = draw(report)
        except _Skip as skip:
            page.notes.append(f"{key}: {skip}")
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
            # A malformed field must not cost the reader the rest of the page.
            log.warning("report figure %s skipped: %s: %s", key, type(exc).__name__, exc)
            page.notes.append(f"{key}: skipped, the report's data for it is malformed ({type(exc).__name__}: {exc})")
            continue
        page.figures.append(key)
        blocks.append(f"<figure class=\"plot\" id=\"fig-{drawn.key}\">\n<h2>{_esc(drawn.title)}</h2>\n{drawn.svg}\n"
                      f"<figcaption>{_esc(drawn.caption)}</figcaption>\n</figure>")

    importance = _dict(report.get("settings")).get("importance")
    meta = ", ".join(_esc(s) for s in (
        f"model {report['model']}" if "model" in report else "",
        f"importance {importance}" if importance else "",
        f"input {report['input_shape']}" if "input_shape" in report else "") if s)
    parts = [
        "<!DOCTYPE html>",
        "<html lang=\"en\">",
        "<head>",
        "<meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class=\"meta\">{meta}</p>" if meta else "",
        _table_html(summary.costs_table(report), section="Summary"),
        # What the table alone would not say (oamipc.notices): nothing removed, opaque modules.
        *(f"<p class=\"note\"><b>note:</b> {_esc(n)}</p>" for n in report.get("notices") or [] if isinstance(n, str)),
        *blocks,
    ]
    if page.notes:
        parts.append("<h2>Not shown</h2>")
        parts += [f"<p class=\"note\">{_esc(n)}</p>" for n in page.notes]
    # The same tables as the command line prints (oamipc.summary), after the figures.
    mip = summary.mip_table(report)
    if mip is not None:
        parts.append(_table_html(mip))
    widths = summary.widths_table(report)
    if widths.rows:
        parts.append(_table_html(widths, section="Kept units per layer"))
    history = summary.finetune_history_table(report.get("finetune"))
    if history.rows:
        parts.append(_table_html(history, section="Fine-tuning per epoch"))
    settings = _settings_table(report)
    if settings.rows:
        parts.append(_table_html(settings))
    parts += [
        ("<p class=\"meta\">The full report is embedded in this page as JSON "
         f"(<code>script#{REPORT_SCRIPT_ID}</code>); <code>oamipc report page.html -o new.html</code> "
         "re-renders it.</p>"),
        f"<script type=\"application/json\" id=\"{REPORT_SCRIPT_ID}\">\n{_embedded_json(report)}\n</script>",
        "</body>",
        "</html>",
    ]
    page.html = "\n".join(p for p in parts if p) + "\n"
    return page


def render_html(report: dict[str, Any], *, title: str | None = None) -> str:
    """The self-contained HTML page for ``report`` (pure: no files read or written)."""
    return build_page(report, title=title).html


def write_html(report: dict[str, Any], path: str | Path, *, title: str | None = None) -> Page:
    """Write the page for ``report`` to ``path`` atomically; return what it contains."""
    page = build_page(report, title=title)
    with atomic_output(path) as tmp:
        tmp.write_text(page.html, encoding="utf-8")
    return page


_SCRIPT_RE = re.compile(
    r"<script[^>]*\bid=\"" + re.escape(REPORT_SCRIPT_ID) + r"\"[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)

_HOW = ("give a JSON report written by `oamipc compile ... --report run.json` "
        "or a page written by `oamipc report` / `--report run.html`")


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a compile report from JSON or from a page made by :func:`write_html`; DataError if neither."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"report {p} does not exist; {_HOW}")
    if p.is_dir():
        raise DataError(f"report {p} is a directory; {_HOW}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read report {p}: {exc}; {_HOW}") from exc
    where = str(p)
    if text.lstrip()[:1] == "<":
        match = _SCRIPT_RE.search(text)
        if match is None:
            raise DataError(f"{p} is an HTML page without an embedded oamipc report "
                            f"(no <script id=\"{REPORT_SCRIPT_ID}\">); {_HOW}")
        text = match.group(1)
        where = f"the report embedded in {p}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"{_HOW}") from exc
    if not (isinstance(data, dict) and isinstance(data.get("before"), dict) and isinstance(data.get("after"), dict)):
        raise DataError(f"{where} is not an oamipc compile report (it has no \"before\"/\"after\" cost fields); {_HOW}")
    return data


def latency_curves_svg(profile: dict[str, Any]) -> str:
    """``oamipc profile --plot``: one panel per layer, measured milliseconds against width (a staircase
    where the kernels work on channel blocks), output width and input width as two lines."""
    layers = _list(profile.get("layers"))
    cols = 3
    rows = max(1, (len(layers) + cols - 1) // cols)
    fig = _new_figure(4.0 * cols, 2.6 * rows)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(layer["out_widths"], layer["out_ms"], marker="o", label="output width")
        if layer.get("in_widths"):
            ax.plot(layer["in_widths"], layer["in_ms"], marker="s", label="input width")
        ax.set_title(f"{layer['name']} ({layer['kind']})", fontsize=9)
        ax.set_xlabel("width (channels or features)", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{profile.get('model', '')}: latency per layer at batch {profile.get('batch')} "
                 f"({profile.get('provider')}, {profile.get('threads')} thread(s))", fontsize=10)
    return _svg(fig, "latency-profile")


# ----------------------------------------------------------------------------------------------
# the accuracy-latency front (oamipc pareto)


def _fig_pareto(result: dict[str, Any]) -> _Drawn:
    """Accuracy against latency ratio, one marker per budget; the front joined by a line."""
    dense = _dict(result.get("dense"))
    pts = []
    for p in [dense, *(_dict(q) for q in _list(result.get("points")))]:
        x, y = _num(p.get("latency_ratio")), _num(p.get("accuracy"))
        if x is not None and y is not None:
            pts.append((x, 100 * y, bool(p.get("front")), p is dense, _num(p.get("budget"))))
    if len(pts) < 2:
        raise _Skip("fewer than two measured points (compiled budgets with accuracy and latency)")
    fig = _new_figure(7.5, 4.5)
    ax = fig.subplots()
    on = sorted((x, y) for x, y, f, _, _ in pts if f)
    if len(on) > 1:
        ax.plot([x for x, _ in on], [y for _, y in on], color=PARETO_COLOUR, linewidth=1.8, zorder=1,
                label="front")
    for x, y, f, is_dense, budget in pts:
        colour = "black" if is_dense else PARETO_COLOUR if f else _PARETO_OFF
        ax.plot([x], [y], marker="*" if is_dense else "o", markersize=13 if is_dense else 8, color=colour,
                linestyle="none", zorder=2)
        ax.annotate("original" if is_dense else f"{budget:g}", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel("latency, fraction of the original's")
    ax.set_ylabel("test accuracy, %")
    ax.grid(alpha=0.3)
    lat = _dict(result.get("latency"))
    caption = (f"Test accuracy against onnxruntime latency at batch {lat.get('batch', '?')} "
               f"({lat.get('provider', '?')}), one point per MAC budget (labelled with it), the original as a star. "
               "Orange points are on the front (no other point is as accurate and as fast), grey ones are "
               "dominated; up and to the left is better.")
    return _Drawn("pareto", "Accuracy against latency", _svg(fig, "pareto"), caption)


def render_pareto_html(result: dict[str, Any]) -> str:
    """The self-contained page of an ``oamipc pareto`` result: the front, its table, the JSON."""
    title = f"oamipc pareto: {result.get('model', 'model')}"
    try:
        drawn = _fig_pareto(result)
        figure = (f"<figure class=\"plot\" id=\"fig-{drawn.key}\">\n<h2>{_esc(drawn.title)}</h2>\n{drawn.svg}\n"
                  f"<figcaption>{_esc(drawn.caption)}</figcaption>\n</figure>")
    except _Skip as skip:
        figure = f"<p class=\"note\">{_esc(skip)}</p>"
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
        f"<title>{_esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class=\"meta\">data {_esc(result.get('data', '-'))}; each budget's ONNX file and compile report are in "
        "the same directory (budget-*.onnx, budget-*.json); <code>oamipc pareto ... --pick B -o file.onnx</code> "
        "copies one out.</p>",
        figure,
        _table_html(summary.pareto_table(result), section="Points"),
        f"<script type=\"application/json\" id=\"{REPORT_SCRIPT_ID}\">\n{_embedded_json(result)}\n</script>",
        "</body>", "</html>",
    ]
    return "\n".join(parts) + "\n"

"""The ``oamipc`` command line: the only module that prints.

Commands parse options, call the driver, and render what it returns.  An :class:`OamipcError`
becomes one red line and its exit code (1; 2 for usage errors); Ctrl-C exits 130.  Set
``OAMIPC_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from oamipc import summary
from oamipc.cli_options import (
    DataDir,
    InputShape,
    ModelArgs,
    ModelClass,
    PruneEmbed,
    TrustPickle,
    ints,
    json_arg,
    mip_group,
    source_group,
    target_group,
    with_groups,
)
from oamipc.errors import OamipcError, UsageError
from oamipc.launch import EXIT_INTERRUPTED
from oamipc.summary import SummaryTable
from oamipc.summary import fmt_int as _fmt_int

if TYPE_CHECKING:
    from oamipc.driver import ModelSource
    from oamipc.passes import MipOptions
    from oamipc.target import Target

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained PyTorch networks smaller and faster by removing neurons and channels.")
# soft_wrap: never break a line of ours at the terminal width (a path in it must stay copyable);
# tables and progress bars still fit the width.
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True)



def _fail(exc: OamipcError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn known failures into one line and an exit code."""
    try:
        yield
    except OamipcError as exc:
        if os.environ.get("OAMIPC_DEBUG"):
            raise
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (no output was written)")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@contextmanager
def _progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress display fed by the library's ``progress(what, done, total)`` callbacks.

    One bar per task: ``what`` names it, or ``"key|text"`` names it ``key`` and shows
    ``key text`` as a description that may change from call to call (e.g. a running loss).
    """
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(what: str, done: int, total: int) -> None:
            key, _, text = what.partition("|")
            description = f"{key} {text}" if text else key
            if key not in tasks:
                tasks[key] = bar.add_task(description, total=total)
            bar.update(tasks[key], completed=done, total=total, description=description)

        yield update


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


class _Notes:
    """The caption and numbered notes under a summary table, wrapped at word boundaries.

    The console soft-wraps (it never breaks our lines, so a path stays copyable), which would
    leave a long note for the terminal to cut mid-word; this wraps it to the width itself, each
    note indented under its marker.  A single word longer than the width (a path) is not split.
    """

    def __init__(self, caption: str, notes: list[str]) -> None:
        self.caption = caption
        self.notes = notes

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(20, options.max_width)

        def wrap(text: str, first: str = "", rest: str = "") -> list[str]:
            return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                                 break_long_words=False, break_on_hyphens=False)

        for line in wrap(self.caption) if self.caption else []:
            yield Text(line, style="table.caption")
        pad = len(f"[{len(self.notes)}] ")
        for number, note in enumerate(self.notes, 1):
            for line in wrap(note, f"[{number}] ".rjust(pad), " " * pad):
                yield Text(line)


class _Fitted:
    """A summary table laid out at render time, when the width is known, so no cell breaks inside a word.

    rich shrinks the widest columns first when a table is too wide, even below their longest word,
    which it then cuts ("ReLU/max-" ... "400").  Here each column keeps at least its longest word:
    when the natural widths do not fit, the widest columns that still have room above that floor
    give up one character at a time, and their cells wrap between words.  Only a width too small
    for the longest words themselves is left to rich, folding those words rather than cutting
    them short with an ellipsis.
    """

    def __init__(self, rows: SummaryTable) -> None:
        self.rows = rows

    def widths(self, max_width: int) -> list[int] | None:
        """Fixed column widths (without padding) that fit ``max_width``; None: rich's own layout."""
        columns = list(zip(*[[c.header for c in self.rows.columns], *self.rows.rows]))
        natural = [max(cell_len(cell) for cell in column) for column in columns]
        floor = [max((cell_len(word) for cell in column for word in cell.split()), default=0) for column in columns]
        # A padding space on each side of every cell, and a rule between cells and at both edges.
        room = max_width - (3 * len(columns) + 1)
        if sum(natural) <= room or sum(floor) > room:
            return None
        widths = list(natural)
        while sum(widths) > room:
            widest = max((i for i in range(len(widths)) if widths[i] > floor[i]), key=lambda i: widths[i])
            widths[widest] -= 1
        return widths

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.rows
        fitted = self.widths(options.max_width)
        widths: list[int | None] = list(fitted) if fitted else [None] * len(rows.columns)
        table = Table(title=escape(rows.title), title_justify="left")
        for column, width in zip(rows.columns, widths):
            # fold: on a terminal too narrow for the longest words, split them rather than drop the rest
            table.add_column(escape(column.header), justify=column.align, width=width, overflow="fold")
        for row in rows.rows:  # escaped: a [...] in a layer name or a status is text, not rich markup
            table.add_row(*(escape(cell) for cell in row))
        yield table
        yield _Notes(rows.caption, rows.notes)


def _summary_table(report: dict[str, Any]) -> _Fitted:
    """Costs, accuracy and latency before/after (:func:`oamipc.summary.costs_table`)."""
    return _Fitted(summary.costs_table(report, title="oamipc compile"))


def _widths_table(report: dict[str, Any]) -> _Fitted:
    """Kept units per layer (:func:`oamipc.summary.widths_table`)."""
    return _Fitted(summary.widths_table(report))


def _mip_table(report: dict[str, Any]) -> _Fitted | None:
    """How the MILP analysis went (:func:`oamipc.summary.mip_table`); None without one."""
    rows = summary.mip_table(report)
    return _Fitted(rows) if rows is not None else None


Lr = Annotated[float, typer.Option("--lr", help="Fine-tuning learning rate.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Fine-tuning batch size.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="Fine-tuning optimizer: adam | adamw | sgd (momentum 0.9).")]


@app.command("compile")
@with_groups(lambda: _errors(), source_group(), target_group(), mip_group())
def compile_cmd(
    source: ModelSource,
    target: Target,
    mip: MipOptions,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pruned ONNX model.")],
    importance: Annotated[str, typer.Option("--importance", help="auto (mip with --data, else l1) | mip | l1 | l2 | activation | taylor | random")] = "auto",
    pipeline: Annotated[str | None, typer.Option("-p", "--pipeline", help="Pass pipeline, e.g. 'prune-units{importance=l2,prune-ratio=0.5}'.")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Replay a plan saved with --save-plan.")] = None,
    save_plan: Annotated[Path | None, typer.Option("--save-plan", help="Write the plan (kept units) as JSON.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the full report: an HTML page with plots for a .html/.htm path, JSON otherwise.")] = None,
    save_pt: Annotated[Path | None, typer.Option("--save-pt", help="Also write the pruned model as a torch.export program.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples for data-driven criteria.")] = 512,
    lossless: Annotated[bool | None, typer.Option("--lossless/--no-lossless", help="Remove the units that are provably constant on the data's range first, for free (default: on with --data).")] = None,
    lossless_box: Annotated[str, typer.Option("--lossless-box", help="The box of --lossless: feature (each input feature its own range) | channel (one range per input channel; wider).")] = "feature",
    prune_embed: PruneEmbed = False,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Measure latency before/after.")] = True,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes for the latency measurement.")] = "1,64",
    require_speedup: Annotated[float | None, typer.Option("--require-speedup", help="Fail (exit 1, nothing written) when the measured speed-up over the original, at any --batch, is below this (e.g. 1.0: never slower).")] = None,
    exporter: Annotated[str, typer.Option("--exporter", help="auto (torchscript, then dynamo if torchscript fails) | torchscript (fast) | dynamo")] = "auto",
    reconstruct: Annotated[bool | None, typer.Option("--reconstruct/--no-reconstruct", help="After pruning, refit every pruned Linear/Conv layer to the original network's layer outputs on samples of --data (closed-form ridge regression). Default: on when --data is given.")] = None,
    reconstruct_samples: Annotated[int | None, typer.Option("--reconstruct-samples", help="Samples of --data's train split the reconstruction fits on (0: all; default 4096, fewer for networks with expensive forward passes).")] = None,
    refit_select: Annotated[bool | None, typer.Option("--refit-select/--no-refit-select", help="With reconstruction: compare the planner's plan, the solver-free plans and width splits of them by held-out train accuracy after a refit, and prune the best. Default: on when reconstruction runs and the refit is cheap enough to repeat.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tune the pruned net for this many epochs on --data's train split (0: off).")] = 0,
    finetune_select: Annotated[bool, typer.Option("--finetune-select/--no-finetune-select", help="With --finetune-epochs and --importance mip: also make the l1, taylor and activation plans, fine-tune each briefly, and fine-tune the one that does best on held-out train samples.")] = True,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 128,
    optimizer: Optimizer = "adam",
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Prune MODEL and write a smaller, verified ONNX file."""
    from oamipc.driver import FileJob, compile_file, reconstruct_option
    from oamipc.finetune import FinetuneConfig

    _setup_logging(verbose)
    with _errors():
        rebuild = reconstruct_option(reconstruct, reconstruct_samples)
        if finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be 0 (off) or more, got {finetune_epochs}")
        finetune = (FinetuneConfig(epochs=finetune_epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                                   seed=seed, select=finetune_select) if finetune_epochs else None)
        if require_speedup is not None and (not bench or require_speedup <= 0):
            raise UsageError("--require-speedup needs the latency measurement (drop --no-bench) and a positive "
                             f"speed-up, got {require_speedup:g}" + (" with --no-bench" if not bench else ""))
        job = FileJob(source, str(output), str(plan) if plan else None, str(save_plan) if save_plan else None,
                      str(report) if report else None, str(save_pt) if save_pt else None, bench,
                      ints(batch, "--batch") or (1,), exporter=exporter, require_speedup=require_speedup)
        with _progress() as progress:
            result = compile_file(job, progress, importance=importance, target=target, pipeline=pipeline, seed=seed,
                                  calib_samples=calib_samples, mip_options=mip, finetune=finetune, lossless=lossless,
                                  lossless_box=lossless_box, reconstruct=rebuild, refit_select=refit_select,
                                  prune_embed=prune_embed)
    mip_table = _mip_table(result)
    if mip_table is not None:
        console.print(mip_table)
    if "finetune_select" in result:
        console.print(f"fine-tune selection: {escape(result['finetune_select']['reason'])}", highlight=False)
    chosen = result.get("refit_select") or {}
    if chosen.get("ran"):
        first = chosen["candidates"][0]
        won = next(c for c in chosen["candidates"] if c["name"] == chosen["chosen"])
        console.print(f"refit selection: {escape(won['name'])} of {len(chosen['candidates'])} candidates, held-out "
                      f"accuracy after the refit {won['accuracy']:.2%} (the planner's plan: {first['accuracy']:.2%})",
                      highlight=False)
    console.print(_widths_table(result))
    console.print(_summary_table(result))
    _print_notices(result.get("notices", []))
    _print_wrote(output, result["onnx"])


def _print_notices(notices: list[str]) -> None:
    """What the tables alone would not say: nothing removed, most MACs in opaque modules (oamipc.notices)."""
    for text in notices:
        console.print(f"[bold yellow]note:[/] {escape(text)}", highlight=False)


def _print_wrote(output: Path, onnx: dict[str, Any]) -> None:
    """The last line: where the file went, which exporter wrote it (and why not the first), the check."""
    failed = onnx.get("exporters_failed") or []
    for f in failed:
        console.print(f"[yellow]the {f['exporter']} exporter failed:[/] {escape(f['error'])}", highlight=False)
    by = f"{onnx['exporter']} exporter" + (f" after {', '.join(f['exporter'] for f in failed)} failed" if failed else "")
    console.print(f"wrote [bold]{escape(str(output))}[/] ({by}; onnxruntime vs torch: max abs err "
                  f"{onnx['max_abs_err']:.2e}, max rel err {onnx['max_rel_err']:.2e})")


@app.command("finetune")
@with_groups(lambda: _errors(), source_group(
    model_help="A pruned program from compile --save-pt (.pt2), or the original model with --plan.",
    data_help="Labelled data: digits | fashion-mnist | file.pt | file.npz | pkg.module:function"))
def finetune_cmd(
    source: ModelSource,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fine-tuned ONNX model.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs over the train split.")] = 2,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 128,
    optimizer: Optimizer = "adam",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay (decoupled for adamw).")] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="Learning rate: cosine (decays to 0) | constant.")] = "cosine",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.")] = 0.0,
    plan: Annotated[Path | None, typer.Option("--plan", help="Replay this plan (from compile --save-plan) on MODEL first.")] = None,
    reconstruct: Annotated[bool | None, typer.Option("--reconstruct/--no-reconstruct", help="With --plan: refit the pruned layers to the original's layer outputs before training, as compile does (default: on).")] = None,
    save_pt: Annotated[Path | None, typer.Option("--save-pt", help="Also write the fine-tuned model as a torch.export program.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the report as JSON (.html: a page with plots).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch order (same seed: same weights).")] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Fine-tune a pruned MODEL on labelled data and write it as a verified ONNX file."""
    from oamipc.driver import FileJob, finetune_file, reconstruct_option
    from oamipc.finetune import FinetuneConfig

    _setup_logging(verbose)
    with _errors():
        config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                                weight_decay=weight_decay, schedule=schedule, label_smoothing=label_smoothing, seed=seed)
        job = FileJob(source, str(output), str(plan) if plan else None, report_path=str(report) if report else None,
                      save_pt=str(save_pt) if save_pt else None, bench=False)
        with _progress() as progress:
            result = finetune_file(job, config, progress, reconstruct=reconstruct_option(reconstruct, None))
    console.print(_history_table(result["finetune"]))
    console.print(_finetune_table(result))
    _print_wrote(output, result["onnx"])


def _history_table(finetune: dict[str, Any]) -> _Fitted:
    """One row per fine-tuning epoch (:func:`oamipc.summary.finetune_history_table`)."""
    return _Fitted(summary.finetune_history_table(finetune))


def _finetune_table(report: dict[str, Any]) -> _Fitted:
    """``oamipc finetune``'s summary (:func:`oamipc.summary.finetune_table`)."""
    return _Fitted(summary.finetune_table(report, title="oamipc finetune"))


@app.command("profile")
@with_groups(lambda: _errors(), source_group(), target_group())
def profile_cmd(
    source: ModelSource,
    target: Target,
    batch: Annotated[int, typer.Option("--batch", help="Batch size to measure at.")] = 64,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write an SVG of latency against width per layer.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the latency model as JSON.")] = False,
) -> None:
    """Measure MODEL's latency model: each prunable layer's onnxruntime latency at candidate widths, timed
    inside the whole network (profiles of a few narrowed variants)."""
    from oamipc.driver import profile_file

    with _errors(), _progress() as progress:
        data = profile_file(source, target, batch=batch, threads=threads, plot=str(plot) if plot else None,
                            progress=progress)
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table(title=f"latency model of {escape(source.model)} at batch {data['batch']} ({data['provider']}, "
                        f"{data['threads']} thread(s), layers timed {'in context' if data.get('method') == 'context' else 'alone'}); "
                        f"dense network {data['dense_ms']:.4f} ms", title_justify="left")
    for col in ("layer", "kind", "width", "ms at widths (output; input)"):
        table.add_column(col, justify="left")
    for layer in data["layers"]:
        outs = ", ".join(f"{w}:{t:.4f}" for w, t in zip(layer["out_widths"], layer["out_ms"]))
        ins = ", ".join(f"{w}:{t:.4f}" for w, t in zip(layer["in_widths"], layer["in_ms"]))
        table.add_row(layer["name"], layer["kind"], f"{layer['full'][0]}->{layer['full'][1]}",
                      outs + (f"; {ins}" if ins else ""))
    console.print(table)
    console.print(f"{data['measured']} measurements, {data['cached']} from the cache"
                  + (f"; wrote {escape(str(plot))}" if plot else ""))


@app.command("inspect")
@with_groups(lambda: _errors(), source_group())
def inspect_cmd(
    source: ModelSource,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    prune_embed: PruneEmbed = False,
) -> None:
    """Show the graph, unit groups, widths, parameters, FLOPs and barriers of MODEL."""
    from oamipc.driver import inspect_file

    with _errors():
        summary = inspect_file(source, prune_embed=prune_embed)
    if as_json:
        console.print_json(json.dumps(summary, default=str))
        return
    macs = f"{_fmt_int(summary['macs'])} MACs" + (
        f" in Linear/Conv layers ({_fmt_int(summary['macs_total'])} with the opaque modules)" if summary["opaque"] else "")
    console.print(f"[bold]{escape(source.model)}[/]: {summary['nodes']} graph nodes, input {summary['input_shape']}, "
                  f"{_fmt_int(summary['params'])} parameters, {macs}")
    layers = Table(title="layers", title_justify="left")
    for col in ("layer", "type", "in", "out", "MACs"):
        layers.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for name, layer in summary["layers"].items():
        layers.add_row(name, layer["type"], str(layer["in"]), str(layer["out"]), _fmt_int(layer["macs"]))
    console.print(layers)
    groups = Table(title="unit groups", title_justify="left")
    for col in ("group", "producers", "units", "pinned", "prunable", "why pinned"):
        groups.add_column(col)
    for g in summary["units"]["groups"]:
        groups.add_row(g["name"], ", ".join(g["producers"]), str(g["units"]), str(g["pinned"]),
                       "yes" if g["prunable"] else "no", "; ".join(g["pinned_reasons"]))
    console.print(groups)
    if summary["units"]["barriers"]:
        barriers = Table(title="barriers (units feeding them are kept)", title_justify="left")
        for col in ("node", "op", "reason", "units kept"):
            barriers.add_column(col)
        for b in summary["units"]["barriers"]:
            barriers.add_row(b["node"], b["op"], b["reason"], str(b["units_pinned"]))
        console.print(barriers)
    if summary["opaque"]:
        opaque = Table(title="opaque modules (kept whole by the tracer; never pruned)", title_justify="left")
        for col in ("module", "type", "params", "MACs", "why opaque"):
            opaque.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for m in summary["opaque"]:
            macs_cell = _fmt_int(m["macs"]) if m["macs"] is not None else f"unknown: {m['macs_note']}"
            opaque.add_row(m["name"], m["type"], _fmt_int(m["params"]), macs_cell, m["why"])
        console.print(opaque)
    _print_notices(summary["notices"])


@app.command("bench")
def bench_cmd(
    model_a: Annotated[Path, typer.Argument(help="ONNX model (the baseline, A).")],
    model_b: Annotated[Path | None, typer.Argument(help="Second ONNX model (B), measured interleaved with A.")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,64",
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model and batch size.")] = 200,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.")] = 20,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when really usable) | cpu | cuda")] = "auto",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")] = None,
) -> None:
    """Measure onnxruntime latency of one model, or of A vs B interleaved."""
    from oamipc.atomic import atomic_output, check_writable
    from oamipc.bench import benchmark

    with _errors():
        if json_out:
            check_writable(json_out)
        paths = [model_a] + ([model_b] if model_b else [])
        with _progress() as progress:
            result = benchmark(paths, batch_sizes=ints(batch, "--batch") or (1,), runs=runs, warmup=warmup,
                               device=device, intra_op_threads=threads,
                               progress=(lambda d, t: progress("bench", d, t)) if progress else None)
        data = result.to_dict()
        if json_out:
            with atomic_output(json_out) as tmp:
                tmp.write_text(json.dumps(data, indent=1))
    table = Table(title=f"onnxruntime latency ({data['provider']}, {threads} thread(s))", title_justify="left")
    for col in ("model", "batch", "median ms", "p90 ms", "p99 ms", "samples/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in data["rows"]:
        for key, path in (("a", model_a), ("b", model_b)):
            if f"{key}_median_ms" in row and row[f"{key}_median_ms"] is not None:
                table.add_row(str(path), str(row["batch"]), f"{row[f'{key}_median_ms']:.4f}", f"{row[f'{key}_p90_ms']:.4f}",
                              f"{row[f'{key}_p99_ms']:.4f}", f"{row[f'{key}_throughput']:.1f}")
    console.print(table)
    if model_b:
        for row in data["rows"]:
            console.print(f"batch {row['batch']}: B/A latency {row['b_median_ms'] / row['a_median_ms']:.3f}x "
                          f"(median of pairwise ratios {row['pairwise_ratio']:.3f}x)")


@app.command("pareto")
@with_groups(lambda: _errors(), source_group(), mip_group(executor=False))
def pareto_cmd(
    source: ModelSource,
    mip: MipOptions,
    budgets: Annotated[str, typer.Option("--budgets", help="Fractions of the MACs to keep, one compile each.")] = "0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Where every point's ONNX file and report, pareto.json and pareto.html go (default: MODEL's name + .pareto, here). Points made with the same model, data and options are reused.")] = None,
    pick: Annotated[float | None, typer.Option("--pick", help="Copy this budget's ONNX file to -o.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where --pick writes the chosen ONNX file.")] = None,
    importance: Annotated[str, typer.Option("--importance", help="auto (mip with --data) | mip | l1 | l2 | activation | taylor | random")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples for data-driven criteria.")] = 512,
    reconstruct: Annotated[bool | None, typer.Option("--reconstruct/--no-reconstruct", help="Refit the pruned layers (default: on, as in compile).")] = None,
    lossless: Annotated[bool | None, typer.Option("--lossless/--no-lossless", help="Remove provably constant units first (default: on, as in compile).")] = None,
    prune_embed: PruneEmbed = False,
    batch: Annotated[int, typer.Option("--batch", help="Batch size the latency is measured at.")] = 64,
    runs: Annotated[int, typer.Option("--runs", help="Timed rounds per point (each against the original).")] = 30,
    workers: Annotated[int, typer.Option("--workers", help="Budgets compiled at once: local worker processes, or the CPUs of an embedded Ray (timing is never parallel).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (worker processes) | ray (Ray tasks; needs pip install 'oamipc[ray]').")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --executor ray: join this running cluster (e.g. auto, or host:6379) instead of starting an embedded Ray.")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Compile MODEL at several MAC budgets and chart test accuracy against onnxruntime latency."""
    from oamipc.atomic import check_writable
    from oamipc.driver import reconstruct_option
    from oamipc.pareto import ParetoJob, parse_budgets, run_pareto
    from oamipc.pareto import pick as pick_point

    _setup_logging(verbose)
    with _errors():
        if (pick is None) != (output is None):
            raise UsageError("--pick and -o go together: --pick 0.5 -o small.onnx writes that budget's ONNX file")
        if output is not None:
            check_writable(output)
        directory = out_dir or Path(f"{Path(source.model).stem}.pareto")
        options = {"importance": importance, "seed": seed, "calib_samples": calib_samples, "mip_options": mip,
                   "lossless": lossless, "reconstruct": reconstruct_option(reconstruct, None)}
        if prune_embed:  # only when asked: the points made without it keep their keys
            options["prune_embed"] = True
        job = ParetoJob(source, parse_budgets(budgets), directory, options, batch=batch, runs=runs, workers=workers,
                        executor=executor, ray_address=ray_address)
        with _progress() as progress:
            result = run_pareto(job, progress)
        chosen = pick_point(result, pick, output) if pick is not None and output is not None else None
    console.print(_Fitted(summary.pareto_table(result)))
    console.print(f"wrote [bold]{escape(str(directory / 'pareto.html'))}[/] and pareto.json")
    if chosen is not None:
        console.print(f"wrote [bold]{escape(str(output))}[/] (budget {chosen['budget']:g}, accuracy "
                      f"{100 * chosen['accuracy']:.2f}%, latency ratio {chosen['latency_ratio']:.3f})")


@app.command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="A compile report: JSON from --report run.json, or a page made by oamipc.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the HTML page.")],
    title: Annotated[str | None, typer.Option("--title", help="Page title (default: from the model path).")] = None,
) -> None:
    """Render a compile report as one self-contained HTML page with plots."""
    from oamipc.atomic import check_writable
    from oamipc.report_html import load_report, write_html

    with _errors():
        check_writable(output)
        page = write_html(load_report(run), output, title=title)
    console.print(f"wrote [bold]{escape(str(output))}[/] ({len(page.figures)} figures: {', '.join(page.figures) or 'none'})")
    for note in page.notes:
        console.print(f"  not shown: {escape(note)}", highlight=False)


@app.command("passes")
def passes_cmd() -> None:
    """List the passes and analyses a pipeline (-p) can name, with their options."""
    import oamipc.passes  # noqa: F401 - registers the pass library
    from oamipc.pipeline import describe_registry

    table = Table(title="passes", title_justify="left")
    for col in ("name", "kind", "options (defaults)"):
        table.add_column(col)
    for row in describe_registry():
        table.add_row(*row)
    console.print(table)


@app.command("transfer")
def transfer_cmd(
    init: Annotated[Path, typer.Argument(help="The network at its initial weights (e.g. examples/fashion_lenet5_init.pt).")],
    source: Annotated[str, typer.Option("--source", help="Dataset A: the plan is computed on it (digits | fashion-mnist | file | pkg.module:fn).")],
    target: Annotated[str, typer.Option("--target", help="Dataset B: every arm is trained and tested on it.")],
    trained: Annotated[Path | None, typer.Option("--trained", help="The network trained on A (same architecture); without it, --source-epochs trains one.")] = None,
    source_epochs: Annotated[int, typer.Option("--source-epochs", help="Epochs to train INIT on A when --trained is not given.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs of every arm on B.")] = 5,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 128,
    optimizer: Optimizer = "adam",
    importance: Annotated[str, typer.Option("--importance", help="Criterion of the plan on A: auto (mip) | mip | l1 | l2 | activation | taylor | random.")] = "auto",
    flops_budget: Annotated[float | None, typer.Option("--flops-budget", help="Keep at most this fraction of the MACs.")] = None,
    prune_ratio: Annotated[float | None, typer.Option("--prune-ratio", help="Fraction of units removed per group.")] = None,
    train_samples: Annotated[int | None, typer.Option("--train-samples", help="Use a stratified subset of this many training samples of A and B (quick runs).")] = None,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds per MILP solve (a safety net).")] = 20.0,
    total_time_limit: Annotated[float, typer.Option("--total-time-limit", help="Seconds for all MILP sub-problems.")] = 120.0,
    report: Annotated[Path | None, typer.Option("--report", help="Write the full result as JSON.")] = None,
    model_class: ModelClass = None,
    model_args: ModelArgs = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training runs, the calibration samples and the random plan.")] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Lottery-ticket transfer: plan on A, rewind to INIT, train on B; compare with dense and random."""
    from oamipc.atomic import atomic_output, check_writable
    from oamipc.data import load_data
    from oamipc.finetune import FinetuneConfig
    from oamipc.loading import load_model
    from oamipc.transfer import run_transfer

    _setup_logging(verbose)
    with _errors():
        if report:
            check_writable(report)
        if trained is None and source_epochs < 1:
            raise UsageError("give --trained (the network trained on the source data) or --source-epochs N to train one")
        args = json_arg(model_args, "--model-args")
        load = {"model_class": model_class, "model_args": args, "trust_pickle": trust_pickle}
        init_model = load_model(init, **load)
        trained_model = load_model(trained, **load) if trained else None
        config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, seed=seed)
        source_config = FinetuneConfig(epochs=source_epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                                       seed=seed) if trained is None else None
        shape = ints(input_shape, "--input-shape")
        with _progress() as progress:
            result = run_transfer(init_model, source=load_data(source, data_dir=data_dir),
                                  target=load_data(target, data_dir=data_dir), trained=trained_model,
                                  input_shape=shape[1:] if shape else None, importance=importance,
                                  flops_budget=flops_budget, prune_ratio=prune_ratio,
                                  mip_options={"time_limit": time_limit, "total_time_limit": total_time_limit},
                                  train=config, source_train=source_config, train_samples=train_samples, seed=seed,
                                  progress=progress)
        if report:
            with atomic_output(report) as tmp:
                tmp.write_text(json.dumps(result, indent=1, default=str))
    table = Table(title=f"transfer: plan on {result['source']} ({result['plan']['criterion']}, "
                        f"{100 * result['plan']['macs_kept']:.1f}% MACs), trained on {result['target']}",
                  title_justify="left")
    for col in ("arm", "params", "MACs", "test acc. at init", f"test acc. after {epochs} epochs", "train s"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm in result["arms"]:
        table.add_row(arm["name"], _fmt_int(arm["params"]), _fmt_int(arm["macs"]), f"{100 * arm['accuracy_init']:.2f}%",
                      f"{100 * arm['accuracy']:.2f}%", f"{arm['seconds']:.1f}")
    table.caption = (f"source network: {100 * result['source_accuracy']:.2f}% on {result['source']}'s test split; "
                     f"inputs: {result['transform']['target']} (target), {result['transform']['source']} (source)")
    console.print(table)
    if report:
        console.print(f"wrote [bold]{escape(str(report))}[/]")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)

"""Option groups of the command line: sets of flags that build one value each.

Several commands take the same flags (where the model and data come from) and ``compile`` takes
three families of them (the model source, the target, the MIP planner's options).  Typer makes
one function parameter per flag, which gave ``compile`` forty-one parameters and repeated the
loading flags in four commands.  Here each family is declared once, as an :class:`OptionGroup`
(its flags and the function that turns their values into a :class:`~oamipc.driver.ModelSource`,
a :class:`~oamipc.target.Target` or a :class:`~oamipc.passes.MipOptions`), and
:func:`with_groups` adds a group's flags to a command's signature and hands the command the
built value instead.  Values are validated where they are built, with flag spellings in the
messages.  Nothing here prints: a failed build raises the usual :class:`OamipcError`, which the
command's error handler renders.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from oamipc.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

# Flags shared by several commands (also used directly as parameter annotations).
ModelClass = Annotated[str | None, typer.Option("--model-class", help="pkg.module:ClassOrFactory for a state dict.")]
ModelArgs = Annotated[str | None, typer.Option("--model-args", help="JSON kwargs (object) or args (list) for the class.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a full pickled model (runs code in the file!).")]
InputShape = Annotated[str | None, typer.Option("--input-shape", help="Example input shape, e.g. 1,1,28,28 (default: from --data).")]
DataDir = Annotated[str | None, typer.Option("--data-dir", help="Directory of the Fashion-MNIST IDX files.")]
PruneEmbed = Annotated[bool, typer.Option("--prune-embed", help="Also prune a transformer's residual stream: embeddings, class token, positional embedding, every LayerNorm over it and every block's output rows and input columns, as one group (off: kept). A LayerNorm over fewer channels is not an exact removal.")]
LeafModules = Annotated[list[str] | None, typer.Option("--leaf-module", help="Keep this module opaque and unpruned (repeatable).")]
DATA_HELP = "digits | fashion-mnist | file.pt | file.npz | pkg.module:function"
MODEL_HELP = "Model file: torch.export program (.pt2), state dict (.pt) or pickle."


def ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """``"1,1,28,28"`` (or ``1x1x28x28``) as positive integers; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers like 1,1,28,28, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive integers like 1,1,28,28, got {text!r}")
    return values


def json_arg(text: str | None, what: str) -> Any:
    """A JSON option value (None stays None); a usage error with an example when it does not parse."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc.msg}): {text!r}; e.g. '{{\"hidden\": [64, 64]}}'") from None


@dataclass(frozen=True)
class OptionGroup:
    """Flags (as keyword-only parameters) and the function that builds one value from them."""

    name: str  # the keyword the command receives the built value as
    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _panel(annotation: Any, panel: str) -> Any:
    """A shared flag's annotation shown under the help panel ``panel``."""
    base, info = annotation.__origin__, copy.copy(annotation.__metadata__[0])
    info.rich_help_panel = panel
    return Annotated[base, info]


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _resolved(param: inspect.Parameter, func: Callable[..., Any]) -> inspect.Parameter:
    """``param`` keyword-only, its annotation evaluated where the command was written (postponed
    annotations are strings; the grouped parameters' own types may exist only for type checkers)."""
    annotation = param.annotation
    if isinstance(annotation, str):
        annotation = eval(annotation, func.__globals__)  # noqa: S307 - our own source's annotation text
    return param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation)


def with_groups(errors: Callable[[], AbstractContextManager[None]], *groups: OptionGroup) -> Callable[[F], F]:
    """Add each group's flags to the decorated command and pass it the built values instead.

    ``errors`` is the command line's error handler (a context manager): a value that cannot be
    built becomes one error line and an exit code, as any other failure of the command.
    """
    def wrap(func: F) -> F:
        own = inspect.signature(func)
        names = {g.name for g in groups}
        params = [_resolved(p, func) for p in own.parameters.values() if p.name not in names]
        arguments = [p for g in groups for p in g.params if p.default is inspect.Parameter.empty]
        options = [p for g in groups for p in g.params if p.default is not inspect.Parameter.empty]
        ordered = arguments + params + options  # positional arguments first, as the command line reads them

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            with errors():
                for g in groups:
                    kwargs[g.name] = g.build(**{p.name: kwargs.pop(p.name) for p in g.params})
            return func(**kwargs)

        command.__signature__ = own.replace(parameters=ordered)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in ordered}
        return command  # type: ignore[return-value]
    return wrap


def source_group(*, model_help: str = MODEL_HELP, data_help: str = DATA_HELP, model_flag: str = "model") -> OptionGroup:
    """Where the model and data come from: MODEL, --model-class/--model-args/--trust-pickle,
    --input-shape, --data/--data-dir, --leaf-module; builds a :class:`~oamipc.driver.ModelSource`."""
    panel = "Model and data"
    params = (
        _param(model_flag, Annotated[Path, typer.Argument(help=model_help, metavar=model_flag.upper())]),
        _param("model_class", _panel(ModelClass, panel), None),
        _param("model_args", _panel(ModelArgs, panel), None),
        _param("trust_pickle", _panel(TrustPickle, panel), False),
        _param("input_shape", _panel(InputShape, panel), None),
        _param("data", Annotated[str | None, typer.Option("--data", help=data_help, rich_help_panel=panel)], None),
        _param("data_dir", _panel(DataDir, panel), None),
        _param("leaf_module", _panel(LeafModules, panel), None),
    )

    def build(**v: Any) -> Any:
        from oamipc.driver import ModelSource

        return ModelSource(str(v[model_flag]), v["model_class"], json_arg(v["model_args"], "--model-args"),
                           v["trust_pickle"], ints(v["input_shape"], "--input-shape"), v["data"], v["data_dir"],
                           tuple(v["leaf_module"] or ()))
    return OptionGroup("source", params, build)


_TARGET = "Target"


def target_group() -> OptionGroup:
    """How much to remove: --prune-ratio or --flops-budget, --min-keep, --round-to; builds a Target."""
    params = (
        _param("prune_ratio", Annotated[float | None, typer.Option("--prune-ratio", help="Fraction of units removed per group.", rich_help_panel=_TARGET)], None),
        _param("flops_budget", Annotated[float | None, typer.Option("--flops-budget", help="Keep at most this fraction of the MACs.", rich_help_panel=_TARGET)], None),
        _param("latency_budget", Annotated[float | None, typer.Option("--latency-budget", help="Keep at most this fraction of the dense network's latency at --latency-batch, predicted by a latency model measured with onnxruntime on this machine (cached on disk).", rich_help_panel=_TARGET)], None),
        _param("latency_batch", Annotated[int, typer.Option("--latency-batch", help="Batch size of --latency-budget.", rich_help_panel=_TARGET)], 64),
        _param("min_keep", Annotated[int, typer.Option("--min-keep", help="Units every group keeps at least.", rich_help_panel=_TARGET)], 1),
        _param("round_to", Annotated[str, typer.Option("--round-to", help="Kept widths are multiples of this where the layer allows. auto (the default): what onnxruntime's fast convolution kernels on this machine need, probed: multiples of the channel block (16 with AVX-512) for conv widths that are multiples of it, of the input alignment (4) for other aligned conv widths; a MAC budget lets block-rounded widths go below the block only where it would otherwise cut some group below half its width; Linear layers are not rounded. 1: no rounding.", rich_help_panel=_TARGET)], "auto"),
    )

    def build(**v: Any) -> Any:
        from oamipc.target import Target, TargetError

        raw = str(v["round_to"]).strip().lower()
        try:
            v["round_to"] = raw if raw == "auto" else int(raw)
        except ValueError:
            raise UsageError(f"--round-to must be a positive integer or auto, got {v['round_to']!r}") from None
        try:
            return Target(**v)
        except TargetError as exc:
            raise exc.spelled("cli") from None
    return OptionGroup("target", params, build)


_MIP = "MIP planner (--importance mip)"


def mip_group(executor: bool = True) -> OptionGroup:
    """The MIP planner's options (--formulation, --solver, --time-limit, ...); builds MipOptions.

    ``executor``: with --executor/--ray-address (where the MIP's tasks run); a command whose own
    --executor means something else (pareto: where whole compiles run) leaves them out."""
    def opt(flag: str, annotation: Any, help_text: str) -> Any:
        return Annotated[annotation, typer.Option(flag, help=help_text, rich_help_panel=_MIP)]

    params = (
        _param("formulation", opt("--formulation", str, "MIP formulation: budget | paper."), "budget"),
        _param("relax", opt("--relax", bool, "--formulation paper: solve the LP relaxation."), False),
        _param("mean_replacement", opt("--mean-replacement", bool, "budget: removed units read as their calibration "
               "mean at Linear readers (modelled in the MILP; kept only if held-out data agrees)."), False),
        _param("spend_budget", opt("--spend-budget/--no-spend-budget", bool, "budget: no MILP may lower the MACs of "
               "the plan it starts from (swap or add units, never only drop them), so the pruned net keeps the "
               "capacity fine-tuning needs."), True),
        _param("bounds", opt("--bounds", str, "MILP bounds: crown (sound, default) | interval | sample (the "
               "thesis's per-sample phases)."), "crown"),
        _param("jobs", opt("--jobs", int, "Workers for the MIP's independent tasks (class problems, layer "
               "sub-problems, joint radii; with --executor ray also flip effects): forked processes, or Ray CPUs."), 1),
        _param("device", opt("--device", str, "Where the MIP analysis's forward passes run: auto (CUDA when torch "
               "can use it) | cpu | cuda[:N]."), "auto"),
        _param("solver", opt("--solver", str, "MILP solver: highs | cbc | scip."), "highs"),
        _param("time_limit", opt("--time-limit", float, "Seconds per MILP solve: a safety net; solves end at node "
               "limits, reproducibly."), 20.0),
        _param("total_time_limit", opt("--total-time-limit", float, "Seconds for all MILP sub-problems."), 120.0),
        _param("gap", opt("--gap", float | None, "Relative MIP gap at which every MILP solve stops."), None),
        _param("threads", opt("--threads", int | None, "Solver threads."), None),
        _param("samples", opt("--mip-samples", int | None, "Calibration samples inside the MILP (budget: 64, "
               "the rest held out; paper: one per class)."), None),
    )

    if executor:
        params += (
            _param("executor", opt("--executor", str, "Where the MIP's tasks run: local (forked worker processes) | "
                   "ray (Ray tasks on an embedded local Ray with --jobs CPUs; needs pip install 'oamipc[ray]'). "
                   "The plan is the same."), "local"),
            _param("ray_address", opt("--ray-address", str | None, "With --executor ray: join this running cluster "
                   "(e.g. auto, or host:6379) instead of starting an embedded Ray."), None),
        )

    def build(**v: Any) -> Any:
        from oamipc.passes import MipOptions

        return MipOptions(**v)
    return OptionGroup("mip", params, build)

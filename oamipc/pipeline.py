"""Pipeline strings: ``"prune-units{importance=taylor,prune-ratio=0.5},costs"``.

Grammar (MLIR-like): a comma-separated list of registered names, each optionally followed by
``{key=value,...}``.  Keys are the pass's dataclass fields in kebab-case; values are converted to
the field's type (int, float, bool, str, tuple of str separated by ``;``).  A field whose type is
itself a frozen dataclass (a planner's :class:`~oamipc.target.Target`, the MIP planner's
options) is flattened: its own fields are options of the pass
(``plan-mip{flops-budget=0.5,time-limit=20}``), and it is built, and so validated, while the
string is parsed.  Unknown names and options are rejected with the list of what is known.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

from oamipc.errors import UsageError
from oamipc.passmanager import Analysis, Pass, options_of, registry
from oamipc.target import TargetError

_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _convert(raw: str, annotation: Any, where: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null", "") and len(args) < len(typing.get_args(hint)):
            return None
        for member in args[:-1]:  # e.g. ``int | str`` (round-to=8 or round-to=auto): the first that fits
            try:
                return _convert(raw, member, where)
            except UsageError:
                continue
        hint = args[-1]
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin is tuple:
            return tuple(p for p in raw.split(";") if p)
        if hint is str:
            return raw
    except ValueError:
        raise UsageError(f"pipeline option {where}={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    raise UsageError(f"pipeline option {where} cannot be set from a pipeline string")


@dataclasses.dataclass(frozen=True)
class _Option:
    """One settable option of a pass: its field, type, and the nested field it belongs to (or None)."""

    field: dataclasses.Field[Any]
    hint: Any
    parent: str | None = None


def pipeline_options(cls: type[Any]) -> dict[str, _Option]:
    """The options a pipeline string may set on ``cls``, by field name (nested dataclasses flattened)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, _Option] = {}
    for name, f in options_of(cls).items():
        if not f.init:
            continue
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub_hints = typing.get_type_hints(hint)
            for sub in dataclasses.fields(hint):
                if sub.init:
                    out[sub.name] = _Option(sub, sub_hints[sub.name], name)
        else:
            out[name] = _Option(f, hint)
    return out


def _build(cls: type[Any], name: str, kwargs: dict[str, Any], nested: dict[str, dict[str, Any]]) -> Any:
    """Construct the pass, its nested option values first; option errors name the pipeline's spelling."""
    hints = typing.get_type_hints(cls)
    try:
        for parent, values in nested.items():
            kwargs[parent] = hints[parent](**values)
        return cls(**kwargs)
    except TargetError as exc:
        raise UsageError(f"pass {name!r}: {exc.spelled('pipeline')}") from exc
    except UsageError as exc:
        raise UsageError(f"pass {name!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name!r}: {exc}") from exc


def parse_pipeline(text: str) -> list[Pass | Analysis[Any]]:
    """Parse a pipeline string into pass/analysis instances (see the module docstring)."""
    known = registry()
    steps: list[Pass | Analysis[Any]] = []
    pos = 0
    text = text.strip()
    if not text:
        raise UsageError(f"empty pipeline; known passes: {', '.join(known)}")
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None or m.end() == pos:
            raise UsageError(f"cannot parse pipeline at {text[pos:]!r}; expected name or name{{key=value,...}}")
        name, opts = m.group(1), m.group(2)
        pos = m.end()
        if name not in known:
            raise UsageError(f"unknown pass {name!r} in pipeline; known passes: {', '.join(known)}")
        cls = known[name]
        options = pipeline_options(cls)
        kwargs: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for item in filter(None, (o.strip() for o in (opts or "").split(","))):
            key, sep, value = item.partition("=")
            attr = key.strip().replace("-", "_")
            if not sep or attr not in options:
                known_options = ", ".join(f.replace("_", "-") for f in options) or "none"
                raise UsageError(f"pass {name!r} has no option {key.strip()!r}; its options: {known_options}")
            option = options[attr]
            converted = _convert(value.strip(), option.hint, f"{name}.{key.strip()}")
            if option.parent is None:
                kwargs[attr] = converted
            else:
                nested.setdefault(option.parent, {})[attr] = converted
        steps.append(_build(cls, name, kwargs, nested))
    return steps


def describe_registry() -> list[tuple[str, str, str]]:
    """(name, kind, options) of every registered pass and analysis, for help texts."""
    rows = []
    for name, cls in registry().items():
        kind = "transform" if issubclass(cls, Pass) else "analysis"
        opts = ", ".join(f"{key.replace('_', '-')}={o.field.default!r}" for key, o in pipeline_options(cls).items()
                         if o.field.default is not dataclasses.MISSING)
        rows.append((name, kind, opts))
    return rows

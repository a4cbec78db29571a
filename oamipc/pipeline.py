"""Pipeline strings: ``"prune-units{importance=taylor,prune-ratio=0.5},costs"``.

Grammar (MLIR-like): a comma-separated list of registered names, each optionally followed by
``{key=value,...}``.  Keys are the pass's dataclass fields in kebab-case; values are converted to
the field's type (int, float, bool, str, tuple of str separated by ``;``).  Unknown names and
options are rejected with the list of what is known.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

from oamipc.errors import UsageError
from oamipc.passmanager import Analysis, Pass, options_of, registry

_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _convert(raw: str, annotation: Any, where: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        hint = args[0]
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
        fields = options_of(cls)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in (opts or "").split(","))):
            key, sep, value = item.partition("=")
            attr = key.strip().replace("-", "_")
            if not sep or attr not in fields or not fields[attr].init:
                options = ", ".join(f.replace("_", "-") for f, fl in fields.items() if fl.init) or "none"
                raise UsageError(f"pass {name!r} has no option {key.strip()!r}; its options: {options}")
            kwargs[attr] = _convert(value.strip(), hints[attr], f"{name}.{key.strip()}")
        try:
            steps.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"pass {name!r}: {exc}") from exc
    return steps


def describe_registry() -> list[tuple[str, str, str]]:
    """(name, kind, options) of every registered pass and analysis, for help texts."""
    rows = []
    for name, cls in registry().items():
        kind = "transform" if issubclass(cls, Pass) else "analysis"
        opts = ", ".join(f"{f.name.replace('_', '-')}={f.default!r}" for f in options_of(cls).values()
                         if f.init and f.default is not dataclasses.MISSING)
        rows.append((name, kind, opts))
    return rows

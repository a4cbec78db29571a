"""Plain-language notices about a compile or inspect report: what a table alone would not say.

Two situations that used to pass with one INFO log line: a compile that removes nothing (the
"compiled" file is the original network), and a network whose MACs sit mostly inside opaque
modules (``call_module`` nodes the tracer kept whole, see :mod:`oamipc.passes.costs`), where
pruning the rest barely changes anything.  :func:`notices` reads the report (plain data, as
:func:`oamipc.compile` returns it or as read back from JSON) and returns one sentence per
situation, naming what was opaque and why; the driver stores them under ``report["notices"]``,
the command line prints them, and ``oamipc inspect`` shows them too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["MOSTLY_OPAQUE", "notices", "opaque_notices", "unprunable_notice"]

#: Above this share of the network's MACs inside opaque modules, a notice says so.
MOSTLY_OPAQUE = 0.5


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _describe(modules: list[dict[str, Any]], limit: int = 3) -> str:
    parts = [f"{m.get('name')} ({m.get('type')}: {m.get('why')})" for m in modules[:limit]]
    if len(modules) > limit:
        parts.append(f"and {len(modules) - limit} more")
    return "; ".join(parts)


def opaque_notices(costs: dict[str, Any]) -> list[str]:
    """Notices about the opaque modules of one cost section (``report["before"]``): most MACs
    inside them, or MACs that could not be counted."""
    out: list[str] = []
    opaque = [_dict(m) for m in _list(costs.get("opaque"))]
    total = costs.get("macs_total", costs.get("macs")) or 0
    inside = costs.get("opaque_macs") or 0
    if opaque and total and inside / total > MOSTLY_OPAQUE:
        out.append(f"{100 * inside / total:.0f}% of the MACs ({inside:,} of {total:,} per sample) are inside "
                   f"opaque modules, which are never pruned: {_describe(opaque)}")
    unknown = [m for m in opaque if m.get("macs") is None]
    if unknown:
        out.append("the MACs inside " + "; ".join(f"{m.get('name')} ({m.get('type')}: {m.get('macs_note')})"
                                                   for m in unknown)
                   + " are unknown, so the MAC totals are lower bounds")
    return out


def unprunable_notice(units: dict[str, Any], costs: dict[str, Any], *, name_opaque: bool = True) -> str | None:
    """Why no unit can be removed, when none can: the commonest reasons units are kept, and the opaque modules."""
    groups = [_dict(g) for g in _list(units.get("groups"))]
    if any(g.get("prunable") for g in groups):
        return None
    reasons = Counter(r for g in groups for r in _list(g.get("pinned_reasons")))
    said = "; ".join(f"{r} ({n} group{'s' if n > 1 else ''})" for r, n in reasons.most_common(3))
    opaque = [_dict(m) for m in _list(costs.get("opaque"))] if name_opaque else []
    text = f"no unit can be removed: every one of the {units.get('units', 0)} units is kept"
    text += f" ({said})" if said else ""
    return text + (f"; opaque: {_describe(opaque)}" if opaque else "")


def notices(report: dict[str, Any]) -> list[str]:
    """The notices of a compile report (see the module docstring)."""
    before, after = _dict(report.get("before")), _dict(report.get("after"))
    out = opaque_notices(before)
    if before.get("params") == after.get("params") and before.get("macs") == after.get("macs"):
        named = not out  # an opaque notice above already names the modules
        why = unprunable_notice(_dict(report.get("units")), before, name_opaque=named)
        if why is None:
            opaque = [_dict(m) for m in _list(before.get("opaque"))] if named else []
            why = ("the plan kept every unit (the target asks for no reduction, or nothing scored low enough)"
                   + (f"; opaque: {_describe(opaque)}" if opaque else ""))
        out.append("nothing was removed, so the output is the original network: " + why)
    return out

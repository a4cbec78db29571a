"""The CBC backend: the CBC binary bundled with PuLP (or one on PATH), run as a subprocess.

CBC reports its verdict in the first line of its solution file and its bound only in its log,
so :class:`_CbcSolver` keeps that line and the log is read back after the run.  Seeds are pinned
(and parallel search made repeatable) so that a solve without a time limit is reproducible.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping

import pulp
from pulp import constants as lpc

from oamipc.solver.backend import Outcome, parse_float

__all__ = ["available", "run"]

log = logging.getLogger("oamipc.solver")  # the package's one logger: the name users see and filter on


def _cbc_class() -> type | None:
    """The PuLP class that runs CBC here: PuLP's bundled binary first, a CBC on PATH second."""
    for name in ("PULP_CBC_CMD", "COIN_CMD"):
        base = getattr(pulp, name, None)
        if base is None:
            continue
        try:
            with warnings.catch_warnings():
                # PULP_CBC_CMD is deprecated for PuLP 4.0; it is still the CBC that PuLP ships.
                warnings.simplefilter("ignore", DeprecationWarning)
                ok = bool(base(msg=False).available())
        except Exception:  # noqa: BLE001 - a broken install simply is not available
            ok = False
        if ok:
            return base
    return None


def available() -> bool:
    """Whether a CBC binary can run here."""
    return _cbc_class() is not None


_CBC_BOUND_RE = re.compile(r"^\s*(?:Lower|Upper) bound:\s*(\S+)", re.MULTILINE)
_CBC_OBJ_RE = re.compile(r"^\s*Objective value:\s*(\S+)", re.MULTILINE)


def _cbc_solver_class(base: type) -> type:
    """``base`` (a PuLP CBC class) that also keeps the first line of CBC's solution file."""

    class _CbcSolver(base):  # type: ignore[misc, valid-type]
        status_line = ""

        def get_status(self, filename: str) -> tuple[int, int]:
            try:
                with open(filename) as f:
                    self.status_line = f.readline().strip()
            except OSError:
                self.status_line = ""
            return super().get_status(filename)  # type: ignore[no-any-return]

    return _CbcSolver


def run(
    prob: pulp.LpProblem,
    *,
    time_limit: float | None,
    gap: float | None,
    threads: int | None,
    node_limit: int | None,
    start: Mapping[str, float] | None,
    msg: bool,
) -> Outcome:
    base = _cbc_class()
    assert base is not None  # checked by solve()
    if start is not None:
        for var in prob.variables():
            var.setInitialValue(start[var.name])
    # randomCbcSeed 0 would mean "time of day": pin both seeds.  threads 100+n makes CBC's
    # parallel search repeatable.
    options = ["randomCbcSeed 1", "randomSeed 1234567"]
    cbc_threads = None if threads is None or threads <= 1 else 100 + int(threads)
    with tempfile.TemporaryDirectory(prefix="oamipc-cbc-") as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = _cbc_solver_class(base)(
                msg=False,  # CBC's log always goes to log_path; msg forwards it to the logger
                timeLimit=time_limit,
                gapRel=gap,
                threads=cbc_threads,
                maxNodes=node_limit,
                warmStart=start is not None,
                logPath=log_path,
                options=options,
            )
        # PuLP writes the model and solution files to the system temp directory by default: put
        # them in ours, which is removed even when the solve is interrupted (Ctrl-C).
        solver.tmpDir = tmp
        try:
            prob.solve(solver)
        finally:
            try:
                with open(log_path) as f:
                    cbc_log = f.read()
            except OSError:
                cbc_log = ""
            if msg:
                for line in cbc_log.splitlines():
                    log.info("cbc: %s", line)
    line = solver.status_line
    log.debug("CBC: %r, PuLP status %s / sol_status %s", line, prob.status, prob.sol_status)

    result_at = cbc_log.rfind("Result -")
    tail = cbc_log[result_at:] if result_at >= 0 else ""
    bound_m = _CBC_BOUND_RE.search(tail)
    obj_m = _CBC_OBJ_RE.search(tail)
    raw_bound = parse_float(bound_m.group(1)) if bound_m else None
    raw_obj = parse_float(obj_m.group(1)) if obj_m else None

    has_point = prob.sol_status in (lpc.LpSolutionOptimal, lpc.LpSolutionIntegerFeasible)
    if line.startswith("Optimal"):
        status = "optimal" if has_point else "error"
    elif line.startswith(("Infeasible", "Integer infeasible")):
        status = "infeasible"
    elif line.startswith("Unbounded"):
        status = "unbounded"
    elif line.startswith("Stopped"):
        if has_point:
            status = "feasible"
        elif "difficulties" in line:
            status = "error"
        else:
            status = "no_solution"
    else:
        log.warning("CBC returned %r on problem %r", line, prob.name)
        status = "error"
    if not has_point:
        raw_obj = None
    return Outcome(status, raw_bound=raw_bound, raw_objective=raw_obj)

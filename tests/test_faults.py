"""Injected faults: the solver missing, crashing, silent or wrong; Ctrl-C; a full disk.

Each test runs ``oamipc compile`` in-process with one fault injected (monkeypatch) and checks
what the user gets: a finished compile whose plan is valid and within the target, with the report
saying what happened -- or exactly one ``error:`` line and the documented exit code (1; 130 for
Ctrl-C), no traceback, nothing in the output directory (not even a partial or temporary file) and
nothing left in the temporary directory.  The temporary directory is a private one per test
(``tempfile.tempdir``), so other processes cannot disturb the "nothing left" check.

Solver faults are injected below :func:`oamipc.solver.solve`, in the HiGHS backend, so that
``solve``'s own status handling runs as it would on a real fault.  The completion solves that turn
a plan into a MIP start (no warm start of their own) are left alone; the fault hits the solves
that choose units.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulp
import pytest
import torch
from typer.testing import CliRunner

import oamipc.solver.cbc as cbc_backend
import oamipc.solver.core as solver_core
from oamipc.cli import EXIT_INTERRUPTED, app
from oamipc.errors import OamipcError, UsageError
from oamipc.models import DigitsMLP
from oamipc.solver.backend import Outcome

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 0.5
MIP = ["--data", "digits", "--importance", "mip", "--mip-samples", "8", "--calib-samples", "64",
       "--time-limit", "10", "--total-time-limit", "60", "--no-bench"]

runner = CliRunner()


class Run:
    """One CLI invocation: exit code, output, and the report when one was written."""

    def __init__(self, args: list[str], out_dir: Path) -> None:
        res = runner.invoke(app, args)
        # An exception that escaped the CLI (a traceback for the user) is a failure of its own.
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        self.code = res.exit_code
        self.stdout = res.stdout
        self.stderr = res.stderr
        report = out_dir / "r.json"
        self.report: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}

    def one_error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stdout + self.stderr
        return lines[0]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own: whatever is left in it, oamipc (or a solver) left.

    Python's ``tempfile`` and programs that read ``TMPDIR`` (PuLP's CBC interface) both use it.
    onnxruntime is imported first: at import it writes its telemetry session file ``.ses`` to
    ``TMPDIR`` (and reuses it on every later run), which is not oamipc's to clean up.
    """
    import onnxruntime  # noqa: F401

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("TMP", raising=False)
    return tmp


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small self-describing checkpoint (two hidden layers of 16): quick MILPs."""
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.save({"state_dict": DigitsMLP(hidden=(16, 16)).state_dict(), "model_class": "oamipc.models:DigitsMLP",
                "model_args": {"hidden": [16, 16]}}, path)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def compile_args(model: Path, out: Path, *extra: str, target: tuple[str, str] = ("--flops-budget", str(BUDGET))
                 ) -> list[str]:
    return ["compile", str(model), *MIP, *target, "-o", str(out / "m.onnx"), "--report", str(out / "r.json"),
            *extra]


def nothing_left(out: Path, tmp: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == []
    assert sorted(p.name for p in tmp.iterdir()) == []


Fault = Callable[[Callable[..., Any], pulp.LpProblem, dict[str, Any]], Any]


def inject(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> list[str]:
    """Route the unit-choosing HiGHS solves through ``fault``; return the names of the problems hit."""
    real = solver_core._BACKENDS["highs"]
    hit: list[str] = []

    def backend(prob: pulp.LpProblem, **kwargs: Any) -> Any:
        if kwargs["start"] is None:  # completing a fixed plan into a MIP start: left alone
            return real(prob, **kwargs)
        hit.append(prob.name)
        return fault(real, prob, kwargs)

    monkeypatch.setitem(solver_core._BACKENDS, "highs", backend)
    return hit


def set_binaries(prob: pulp.LpProblem, value: float) -> None:
    for var in prob.variables():
        if var.cat == pulp.LpInteger and var.lowBound == 0 and var.upBound == 1:
            var.varValue = value


def assert_valid_plan(report: dict[str, Any]) -> None:
    """Within the MAC budget, every layer kept at least one unit, and the ONNX file verified."""
    assert report["after"]["macs"] <= BUDGET * report["before"]["macs"] * (1 + 1e-9)
    assert all(w["after"] >= 1 for w in report["widths"].values())
    assert report["onnx"]["passed"]


def warm_start_plan(report: dict[str, Any]) -> None:
    """The MILP changed nothing: the final held-out loss is the warm start's."""
    h = report["mip"]["holdout_loss"]
    assert h["final"] == pytest.approx(h["warm_start"])


# ---- the solver: missing ---------------------------------------------------------------------


def test_scip_without_pyscipopt_fails_fast_with_one_line(model: Path, out: Path, private_tmp: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from oamipc.passes.mip.budget import Calibration

    monkeypatch.setitem(sys.modules, "pyscipopt", None)  # import pyscipopt -> ImportError
    calibrated: list[bool] = []
    real_build = Calibration.build
    monkeypatch.setattr(Calibration, "build", classmethod(
        lambda cls, *args: calibrated.append(True) or real_build.__func__(cls, *args)))
    run = Run(compile_args(model, out, "--solver", "scip"), out)
    line = run.one_error_line()
    assert run.code == 1
    assert line.startswith("error: ") and "solver 'scip' is not available here" in line
    assert "pyscipopt" in line and "highs" in line
    assert calibrated == []  # refused before any MILP work (the warm start alone takes seconds)
    nothing_left(out, private_tmp)


def test_missing_cbc_fails_with_one_line(model: Path, out: Path, private_tmp: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbc_backend, "_cbc_class", lambda: None)
    run = Run(compile_args(model, out, "--solver", "cbc"), out)
    line = run.one_error_line()
    assert run.code == 1
    assert line.startswith("error: ") and "solver 'cbc' is not available here" in line and "PuLP" in line
    nothing_left(out, private_tmp)


def test_unknown_solver_is_a_usage_error(model: Path, out: Path, private_tmp: Path) -> None:
    run = Run(compile_args(model, out, "--solver", "gurobi"), out)
    assert run.code == UsageError.exit_code == 2
    assert "highs, cbc, scip" in run.one_error_line()
    nothing_left(out, private_tmp)


# ---- the solver: crashing, silent, wrong ----------------------------------------------------------


def test_solver_crash_keeps_the_warm_start_and_says_so(model: Path, out: Path, private_tmp: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def crash(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        raise RuntimeError("simulated HiGHS crash")

    hit = inject(monkeypatch, crash)
    run = Run(compile_args(model, out), out)
    assert run.code == 0, run.stderr
    assert hit == ["group_1"]  # the first failure ends the MILP stages: no crash after crash
    mip = run.report["mip"]
    assert "simulated HiGHS crash" in mip["solver_error"]
    first, second = mip["subproblems"]
    assert first["outcome"] == "solver-error" and "simulated HiGHS crash" in first["note"]
    assert second["outcome"] == "skipped" and mip["joint_rounds"] == []
    warm_start_plan(run.report)
    assert_valid_plan(run.report)
    assert any("simulated HiGHS crash" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert sorted(p.name for p in private_tmp.iterdir()) == []


@pytest.mark.parametrize("status", ["no_solution", "infeasible", "error"])
def test_solve_without_a_solution_keeps_the_plan(model: Path, out: Path, private_tmp: Path,
                                                 monkeypatch: pytest.MonkeyPatch, status: str) -> None:
    """A time limit without incumbent, a (wrongly) infeasible verdict, an unusable answer."""
    hit = inject(monkeypatch, lambda real, prob, kw: Outcome(status))
    run = Run(compile_args(model, out), out)
    assert run.code == 0, run.stderr
    mip = run.report["mip"]
    assert [sp["outcome"] for sp in mip["subproblems"]] == ["no-incumbent", "no-incumbent"]
    assert [sp["solve"]["status"] for sp in mip["subproblems"]] == [status, status]
    assert [r["outcome"] for r in mip["joint_rounds"]] == ["no-incumbent"]
    assert len(hit) == 3 and mip["solver_error"] is None
    warm_start_plan(run.report)
    assert_valid_plan(run.report)


def test_solution_over_the_budget_is_ignored(model: Path, out: Path, private_tmp: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The solver says 'optimal' for values that keep every unit: the plan is checked, not trusted."""
    def keep_everything(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        real(prob, **kwargs)
        set_binaries(prob, 1.0)
        return Outcome("optimal")

    inject(monkeypatch, keep_everything)
    run = Run(compile_args(model, out), out)
    assert run.code == 0, run.stderr
    layers = run.report["mip"]["subproblems"]
    assert [sp["outcome"] for sp in layers] == ["invalid", "invalid"]
    assert all("over the budget 0.5" in sp["note"] for sp in layers)
    assert_valid_plan(run.report)


def test_solution_breaking_the_prune_ratio_is_ignored(model: Path, out: Path, private_tmp: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping every unit lowers the loss, so only the plan check stops it from beating the ratio."""
    def keep_everything(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        real(prob, **kwargs)
        set_binaries(prob, 1.0)
        return Outcome("optimal")

    inject(monkeypatch, keep_everything)
    run = Run(compile_args(model, out, target=("--prune-ratio", "0.5")), out)
    assert run.code == 0, run.stderr
    assert [sp["outcome"] for sp in run.report["mip"]["subproblems"]] == ["invalid", "invalid"]
    assert "the target says 8" in run.report["mip"]["subproblems"][0]["note"]
    assert {name: w["after"] for name, w in run.report["widths"].items()} == {"body.0": 8, "body.2": 8, "head": 10}


def test_nan_solution_values_are_ignored(model: Path, out: Path, private_tmp: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_values(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        real(prob, **kwargs)
        for var in prob.variables():
            var.varValue = math.nan
        return Outcome("optimal")

    inject(monkeypatch, nan_values)
    run = Run(compile_args(model, out), out)
    assert run.code == 0, run.stderr
    assert [sp["outcome"] for sp in run.report["mip"]["subproblems"]] == ["invalid", "invalid"]
    assert "fewer than the minimum of 1 per group (min_keep)" in run.report["mip"]["subproblems"][0]["note"]
    assert_valid_plan(run.report)


def test_final_plan_is_checked_against_the_target(model: Path, out: Path, private_tmp: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the MILP stages hand back, a plan over the budget falls back to the warm start."""
    from oamipc.passes import plan_mip

    real = plan_mip.plan_budget

    def broken_plan_budget(*args: Any, **kwargs: Any) -> Any:
        kept, solver = real(*args, **kwargs)
        kept[:] = True
        return kept, solver

    monkeypatch.setattr(plan_mip, "plan_budget", broken_plan_budget)
    run = Run(compile_args(model, out), out)
    assert run.code == 0, run.stderr
    assert "over the budget" in run.report["mip"]["fallback"]
    assert_valid_plan(run.report)


def test_paper_formulation_survives_a_solver_crash(model: Path, out: Path, private_tmp: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        raise RuntimeError("simulated HiGHS crash")

    inject(monkeypatch, crash)
    run = Run(compile_args(model, out, "--formulation", "paper", "--mip-samples", "2", "--bounds", "sample"), out)
    assert run.code == 0, run.stderr
    classes = run.report["mip"]["classes"]
    assert classes and all(c["outcome"] == "solver-error" for c in classes)
    assert_valid_plan(run.report)


# ---- Ctrl-C ----------------------------------------------------------------------------------------


def _assert_interrupted(run: Run, out: Path, tmp: Path) -> None:
    assert run.code == EXIT_INTERRUPTED == 130
    assert run.one_error_line() == "interrupted (no output was written)"
    nothing_left(out, tmp)


def test_ctrl_c_during_a_solve(model: Path, out: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(real: Callable[..., Any], prob: pulp.LpProblem, kwargs: dict[str, Any]) -> Any:
        raise KeyboardInterrupt

    inject(monkeypatch, interrupt)
    _assert_interrupted(Run(compile_args(model, out), out), out, private_tmp)


def test_ctrl_c_during_a_cbc_solve_leaves_no_solver_files(model: Path, out: Path, private_tmp: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """CBC runs as a program fed through files: they live in oamipc's own temporary directory."""
    if "cbc" not in solver_core.available_solvers():
        pytest.skip("CBC is not installed")
    import subprocess

    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> Any:
        proc = real_popen(*args, **kwargs)
        proc.kill()
        proc.wait()
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    _assert_interrupted(Run(compile_args(model, out, "--solver", "cbc"), out), out, private_tmp)


def test_ctrl_c_during_onnx_export(model: Path, out: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export(module: Any, args: Any, f: str, *rest: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half an onnx file")  # the exporter had started writing
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", export)
    _assert_interrupted(Run(compile_args(model, out, "--importance", "l1", target=("--prune-ratio", "0.5")), out),
                        out, private_tmp)


def test_ctrl_c_while_moving_outputs_into_place(model: Path, out: Path, private_tmp: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    copies = _failing_copy(monkeypatch, out, KeyboardInterrupt())
    run = Run(compile_args(model, out, "--importance", "l1", target=("--prune-ratio", "0.5")), out)
    assert copies, "the fault was not reached"
    _assert_interrupted(run, out, private_tmp)


def test_ctrl_c_while_the_command_line_is_imported(tmp_path: Path) -> None:
    """A Ctrl-C in the seconds the ``oamipc`` command spends importing torch: the same exit status
    and one line as during a command, no traceback (the real entry point, in its own process)."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "importing"
    # Holds the import of oamipc.cli until the signal comes, so the Ctrl-C lands inside it.
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import importlib.abc, signal, sys, time\n"
        # A test run started in the background inherits SIGINT ignored: take it back, as a
        # terminal's foreground job has it.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class Hold(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'oamipc.cli':\n"
        f"            open({str(marker)!r}, 'w').close()\n"
        "            time.sleep(60)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hold())\n"
        "sys.argv = ['oamipc', '--help']\n"
        "from oamipc.launch import main\n"
        "main()\n")
    proc = subprocess.Popen([sys.executable, str(launcher)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the launcher never reached the import of oamipc.cli"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr


# ---- a full disk ----------------------------------------------------------------------------------


def _failing_copy(monkeypatch: pytest.MonkeyPatch, where: Path, exc: BaseException) -> list[str]:
    """``shutil.copyfile`` that writes half of a file into ``where``, then raises ``exc``."""
    real = shutil.copyfile
    copies: list[str] = []

    def copyfile(src: Any, dst: Any, **kwargs: Any) -> Any:
        if Path(dst).parent.resolve() != where.resolve():
            return real(src, dst, **kwargs)
        copies.append(str(dst))
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise exc

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    return copies


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_the_output(model: Path, out: Path, private_tmp: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    copies = _failing_copy(monkeypatch, out, _disk_full())
    run = Run(compile_args(model, out, "--importance", "l1", target=("--prune-ratio", "0.5")), out)
    assert copies
    assert run.code == OamipcError.exit_code == 1
    line = run.one_error_line()
    assert re.match(r"error: cannot write \S+/out/(m\.onnx|r\.json): no space left on the disk of \S+/out; "
                    r"free disk space there", line), line
    nothing_left(out, private_tmp)


def test_disk_full_in_the_temporary_directory(model: Path, out: Path, private_tmp: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.is_relative_to(private_tmp):
            raise _disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    run = Run(compile_args(model, out, "--importance", "l1", target=("--prune-ratio", "0.5")), out)
    assert run.code == 1
    line = run.one_error_line()
    assert line.startswith(f"error: cannot write temporary files in {private_tmp}") and "No space left" in line
    assert "TMPDIR" in line
    nothing_left(out, private_tmp)


def test_disk_full_during_onnx_export(model: Path, out: Path, private_tmp: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def export(module: Any, args: Any, f: str, *rest: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half")
        raise _disk_full()

    monkeypatch.setattr(torch.onnx, "export", export)
    run = Run(compile_args(model, out, "--importance", "l1", target=("--prune-ratio", "0.5")), out)
    assert run.code == 1
    line = run.one_error_line()
    assert "No space left on device" in line and "free disk space" in line and "exporter" not in line
    nothing_left(out, private_tmp)


# ---- the documented exit codes ------------------------------------------------------------------


def _readme_errors_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Errors", 1)[1].split("\n## ", 1)[0]


def test_readme_documents_the_exit_codes_the_code_uses() -> None:
    section = _readme_errors_section()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.MULTILINE))
    assert {int(code) for code in table} == {0, OamipcError.exit_code, UsageError.exit_code, EXIT_INTERRUPTED}
    assert "interrupted" in table[str(EXIT_INTERRUPTED)].lower()
    assert "usage" in table[str(UsageError.exit_code)].lower()


def test_readme_quotes_the_messages_the_code_prints(model: Path, out: Path, private_tmp: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    section = _readme_errors_section()
    assert "`interrupted (no output was written)`" in section
    monkeypatch.setattr(cbc_backend, "_cbc_class", lambda: None)
    line = Run(compile_args(model, out, "--solver", "cbc"), out).one_error_line()
    quoted = re.sub(r"pick one of: .*", "pick one of: ...", line)
    assert f"``{quoted}``" in section, quoted


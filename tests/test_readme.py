"""The README stays true: its Python example runs, and CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "small_cnn.onnx").stat().st_size > 0
    result = namespace["result"]
    assert result.report["after"]["macs"] <= 0.5 * result.report["before"]["macs"]  # type: ignore[attr-defined]


def test_ci_runs_the_readme_test_command() -> None:
    commands = [b.strip() for b in _blocks("sh") if "pytest" in b and b.strip().startswith("python3 -m venv")]
    assert len(commands) == 1, "the README must show exactly one install-and-test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, ".ci/run must run the README's test command verbatim"


def test_first_command_compiles_a_shipped_example() -> None:
    first = _blocks("sh")[0].strip()
    assert first.startswith("python3 -m venv") and "oamipc compile examples/" in first
    model = re.search(r"oamipc compile (\S+)", first)
    assert model and (ROOT / model.group(1)).is_file()

"""The ``oamipc`` command line, end to end, in-process.

Oracles: the pruned ONNX file is run with onnxruntime and compared with the ``torch.export``
program written beside it and with a replay of the saved plan; bad input must give exactly one
``error:`` line, exit code 1 (2 for usage mistakes) and leave nothing in the output directory.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.data import load_data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP = str(EXAMPLES / "digits_mlp.pt")
CNN = str(EXAMPLES / "digits_cnn.pt")

runner = CliRunner()


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_compile_writes_verified_outputs_that_agree(tmp_path: Path) -> None:
    out, pt2, plan, report = (tmp_path / n for n in ("small.onnx", "small.pt2", "plan.json", "report.json"))
    code, stdout, stderr = run("compile", MLP, "--data", "digits", "--importance", "l1", "--prune-ratio", "0.5",
                               "--no-bench", "-o", str(out), "--save-pt", str(pt2), "--save-plan", str(plan),
                               "--report", str(report))
    assert code == 0, stderr
    assert "parameters" in stdout and "accuracy" in stdout
    rep = json.loads(report.read_text())
    assert rep["after"]["params"] < rep["before"]["params"]
    assert rep["widths"]["body.0"] == {"before": 128, "after": 64}
    assert rep["onnx"]["passed"] and rep["onnx"]["max_rel_err"] < 1e-4
    assert rep["accuracy"]["before"] > 0.9

    x = load_data("digits").test.x[:50].numpy()
    program = torch.export.load(str(pt2)).module()
    np.testing.assert_allclose(ort_run(out, x), program(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert ort_run(out, x).shape == (50, 10)  # dynamic batch dimension

    # Replaying the saved plan gives the same network.
    again = tmp_path / "again.onnx"
    code, _, stderr = run("compile", MLP, "--data", "digits", "--plan", str(plan), "--no-bench", "-o", str(again))
    assert code == 0, stderr
    np.testing.assert_allclose(ort_run(again, x), ort_run(out, x), rtol=1e-5, atol=1e-6)


def test_compile_is_deterministic(tmp_path: Path) -> None:
    plans = []
    for i in range(2):
        plan = tmp_path / f"plan{i}.json"
        code, _, stderr = run("compile", CNN, "--data", "digits", "--importance", "taylor", "--flops-budget", "0.4",
                              "--no-bench", "-o", str(tmp_path / f"m{i}.onnx"), "--save-plan", str(plan))
        assert code == 0, stderr
        plans.append(json.loads(plan.read_text()))
    assert plans[0] == plans[1]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments before -o, a phrase the error line must contain)."""
    trunc = tmp / "truncated.pt"
    trunc.write_bytes(Path(MLP).read_bytes()[:5000])
    notmodel = tmp / "notmodel.pt"
    torch.save({"a": [1, 2, 3], "b": "x"}, notmodel)
    plain = tmp / "plain.pkl"
    plain.write_bytes(pickle.dumps({"k": 1}))
    full = tmp / "full.pt"
    torch.save(Branchy(), full)
    branchy = tmp / "branchy.pt"
    torch.save(Branchy().state_dict(), branchy)
    return {
        "truncated file": ([str(trunc), "--input-shape", "1,64"], "not a readable PyTorch file"),
        "non-model pickle": ([str(notmodel), "--input-shape", "1,64"], "not a state dict"),
        "plain pickle": ([str(plain), "--input-shape", "1,64"], "--trust-pickle"),
        "model pickle without trust": ([str(full), "--input-shape", "1,64"], "--trust-pickle"),
        "missing class": ([MLP, "--model-class", "oamipc.models:NoSuchNet", "--input-shape", "1,64"], "NoSuchNet"),
        "missing module": ([MLP, "--model-class", "no_such_pkg.mod:Net", "--input-shape", "1,64"], "no_such_pkg"),
        "wrong input shape": ([MLP, "--input-shape", "1,1,28,28"], "--input-shape"),
        "untraceable model": ([str(branchy), "--model-class", "tests.test_cli:Branchy", "--input-shape", "1,64"],
                              "--leaf-module"),
        "missing file": ([str(tmp / "nope.pt"), "--input-shape", "1,64"], "does not exist"),
    }


BAD = ["truncated file", "non-model pickle", "plain pickle", "model pickle without trust", "missing class",
       "missing module", "wrong input shape", "untraceable model", "missing file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_1_nothing_written(case: str, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    args, phrase = _bad_inputs(inputs)[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, stdout, stderr = run("compile", *args, "--prune-ratio", "0.5", "--no-bench",
                               "-o", str(outdir / "m.onnx"), "--report", str(outdir / "r.json"))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1, (stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert phrase in lines[0]
    assert "Traceback" not in stdout + stderr
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("where", ["parent is a file", "parent missing", "is a directory"])
def test_unwritable_output_fails_before_work(where: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = {"parent is a file": blocker / "m.onnx", "parent missing": tmp_path / "no" / "m.onnx",
           "is a directory": tmp_path}[where]
    before = sorted(tmp_path.rglob("*"))
    code, _, stderr = run("compile", MLP, "--input-shape", "1,64", "--prune-ratio", "0.5", "-o", str(out))
    assert code == 1
    assert stderr.startswith("error: cannot write") or stderr.startswith("error: output path")
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_trusted_pickle_loads(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.save(model, full)
    code, _, stderr = run("compile", str(full), "--trust-pickle", "--input-shape", "1,64", "--prune-ratio", "0.5",
                          "--no-bench", "-o", str(tmp_path / "m.onnx"))
    assert code == 0, stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize(("args", "phrase"), [
    (["-p", "prune-units,bogus"], "known passes: "),
    (["--prune-ratio", "0.5", "--flops-budget", "0.5"],
     "give one of --prune-ratio, --flops-budget and --latency-budget, not several"),
    (["--prune-ratio", "1.5"], "error: --prune-ratio must be in [0, 1), got 1.5"),
    (["--input-shape", "1,x"], "--input-shape"),
    (["--importance", "nope", "--prune-ratio", "0.5"], "l1"),
])
def test_usage_errors_exit_2(args: list[str], phrase: str, tmp_path: Path) -> None:
    base = [] if "--input-shape" in args else ["--input-shape", "1,64"]
    code, _, stderr = run("compile", MLP, *base, *args, "--no-bench", "-o", str(tmp_path / "m.onnx"))
    assert code == 2, stderr
    assert phrase in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_pipeline_option_runs_the_named_passes(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, _, stderr = run("compile", CNN, "--input-shape", "1,1,8,8", "-p",
                          "prune-units{importance=l2,prune-ratio=0.25,round-to=4}", "--no-bench",
                          "-o", str(tmp_path / "m.onnx"), "--report", str(report))
    assert code == 0, stderr
    widths = json.loads(report.read_text())["widths"]
    assert widths["conv1"] == {"before": 16, "after": 12}
    assert all(w["after"] % 4 == 0 for name, w in widths.items() if name != "fc2")


def test_inspect_reports_groups_widths_and_barriers() -> None:
    code, stdout, stderr = run("inspect", CNN, "--input-shape", "1,1,8,8", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["params"] == sum(p.numel() for p in _load(CNN).parameters())
    names = [g["name"] for g in summary["units"]["groups"]]
    assert names[:3] == ["conv1", "conv2", "fc1"]
    out_group = summary["units"]["groups"][-1]
    assert out_group["pinned"] == out_group["units"] == 10  # output units are never removed
    code, stdout, _ = run("inspect", CNN, "--input-shape", "1,1,8,8")
    assert code == 0 and "unit groups" in stdout


def _load(path: str) -> nn.Module:
    from oamipc.loading import load_model

    return load_model(path)


def test_bench_two_models_writes_json(tmp_path: Path) -> None:
    small = tmp_path / "small.onnx"
    big = tmp_path / "big.onnx"
    assert run("compile", MLP, "--input-shape", "1,64", "--prune-ratio", "0.5", "--no-bench", "-o", str(small))[0] == 0
    assert run("compile", MLP, "--input-shape", "1,64", "--prune-ratio", "0", "--no-bench", "-o", str(big))[0] == 0
    js = tmp_path / "bench.json"
    code, stdout, stderr = run("bench", str(big), str(small), "--batch", "1,8", "--runs", "5", "--warmup", "1",
                               "--json", str(js))
    assert code == 0, stderr
    data = json.loads(js.read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 8]
    assert data["provider"] == "CPUExecutionProvider"
    assert all(r["a_median_ms"] > 0 and r["b_median_ms"] > 0 for r in data["rows"])
    assert "B/A latency" in stdout


def test_bench_bad_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, _, stderr = run("bench", str(bad))
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1 and str(bad) in stderr


def test_passes_lists_the_registry() -> None:
    code, stdout, _ = run("passes")
    assert code == 0
    for name in ("unit-groups", "importance-l1", "importance-taylor", "plan-greedy", "plan-mip", "prune-units"):
        assert name in stdout


def test_default_importance_is_mip_with_data_and_l1_without(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, stdout, stderr = run("compile", MLP, "--data", "digits", "--flops-budget", "0.5", "--no-bench",
                               "--time-limit", "2", "--total-time-limit", "4", "--mip-samples", "16",
                               "-o", str(tmp_path / "a.onnx"), "--report", str(report))
    assert code == 0, stderr
    assert "MIP analysis (budget, highs, crown bounds)" in stdout and "held-out margin loss" in stdout
    rep = json.loads(report.read_text())
    assert rep["settings"]["importance"] == "mip" and rep["mip"]["formulation"] == "budget"
    code, _, stderr = run("compile", MLP, "--input-shape", "1,1,8,8", "--flops-budget", "0.5", "--no-bench",
                          "-o", str(tmp_path / "b.onnx"),
                          "--report", str(report))
    assert code == 0, stderr
    assert json.loads(report.read_text())["settings"]["importance"] == "l1"


def test_prune_embed_flag_on_inspect_and_compile(tmp_path: Path) -> None:
    """The shipped ViT: inspect shows the stream group kept without --prune-embed and prunable with
    it; compile --prune-embed narrows the stream (class token, positional embedding included) and
    writes a verified file."""
    vit = str(EXAMPLES / "fashion_vit.pt")

    def stream(*flags: str) -> dict:
        code, stdout, stderr = run("inspect", vit, "--input-shape", "1,1,28,28", "--json", *flags)
        assert code == 0, stderr
        return next(g for g in json.loads(stdout)["units"]["groups"] if "patch_embed" in g["producers"])

    kept, free = stream(), stream("--prune-embed")
    assert not kept["prunable"] and free["prunable"] and free["pinned"] == 0 and free["units"] == 64
    assert len(free["producers"]) == 9  # the patch embedding and every block's two output layers
    out, pt2 = tmp_path / "vit.onnx", tmp_path / "vit.pt2"
    code, _, stderr = run("compile", vit, "--input-shape", "1,1,28,28", "--importance", "l1", "--prune-ratio", "0.25",
                          "--prune-embed", "--no-bench", "-o", str(out), "--save-pt", str(pt2))
    assert code == 0, stderr
    pruned = torch.export.load(str(pt2)).module()
    assert pruned.pos_embed.shape == (1, 17, 48) and pruned.cls_token.shape == (1, 1, 48)

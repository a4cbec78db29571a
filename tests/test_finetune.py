"""Fine-tuning: the seeded training loop, its use after pruning, and the CLI around it.

Oracles: the loss and the accuracies of the loop itself (they must improve on learnable data),
bit-identical weights for the same seed, the accuracy of the pruned digits MLP before and after,
the BatchNorm running statistics of a trained ``.pt2`` program, and, for the CLI, the written
ONNX file run with onnxruntime over the whole test split (its accuracy must be the reported one).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.data import Dataset, DataSplits, accuracy, load_data
from oamipc.driver import _save_program, compile  # noqa: A004 - the product's verb
from oamipc.errors import DataError, UsageError
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.loading import load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP = str(EXAMPLES / "digits_mlp.pt")
CNN = str(EXAMPLES / "digits_cnn.pt")

runner = CliRunner()


def _blobs(n: int, seed: int) -> Dataset:
    """Three Gaussian blobs in 8 dimensions: learnable in a few epochs, not at initialisation."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 8])
    return Dataset(f"blobs{seed}", centres[y] + torch.randn(n, 8, generator=gen), y)


class _Net(nn.Module):
    """Linear, batch norm, dropout: everything whose training behaviour the loop must honour."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- the loop ---------------------------------------------------------------------------------


def test_loss_goes_down_and_accuracy_rises() -> None:
    model = _Net().eval()
    train, test = _blobs(240, seed=1), _blobs(120, seed=2)
    acc0 = accuracy(model, test)
    hist = finetune(model, train, FinetuneConfig(epochs=4, lr=1e-2, batch_size=32), eval_data=test)
    losses = [e.loss for e in hist.epochs]
    assert len(hist.epochs) == 4 and [e.epoch for e in hist.epochs] == [1, 2, 3, 4]
    assert losses[-1] < 0.5 * losses[0], losses
    assert hist.epochs[-1].train_accuracy > hist.epochs[0].train_accuracy
    assert hist.final_eval_accuracy is not None and hist.final_eval_accuracy > max(acc0 + 0.3, 0.9)
    assert hist.final_eval_accuracy == accuracy(model, test)  # the module is left as measured
    assert not model.training


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_same_seed_same_weights_other_seed_other_weights(optimizer: str) -> None:
    init = _Net()
    train = _blobs(100, seed=3)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        model = copy.deepcopy(init)
        torch.manual_seed(1234 + len(runs))  # a different global RNG state each time: must not matter
        rng = torch.get_rng_state()
        finetune(model, train, FinetuneConfig(epochs=2, batch_size=16, optimizer=optimizer, input_noise=0.1,
                                              seed=seed))
        assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is left alone
        runs[name] = _state(model)
    assert runs["a"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["fc1.weight"], init.fc1.weight)


def test_progress_reports_every_batch_under_one_key() -> None:
    calls: list[tuple[str, int, int]] = []
    finetune(_Net(), _blobs(50, seed=4), FinetuneConfig(epochs=2, batch_size=20),
             progress=lambda what, done, total: calls.append((what, done, total)))
    assert [c[1] for c in calls] == list(range(1, 7))  # 3 batches per epoch, 2 epochs
    assert {c[2] for c in calls} == {6}
    assert all(c[0].startswith("fine-tune|epoch ") and " loss " in c[0] for c in calls)
    assert calls[0][0].startswith("fine-tune|epoch 1/2") and calls[-1][0].startswith("fine-tune|epoch 2/2")


@pytest.mark.parametrize(("field", "value", "phrase"), [
    ("epochs", 0, "--epochs"),
    ("epochs", 1.5, "--epochs"),
    ("lr", 0.0, "--lr"),
    ("lr", float("nan"), "--lr"),
    ("batch_size", 0, "--batch-size"),
    ("optimizer", "rmsprop", "--optimizer"),
    ("momentum", 1.0, "--momentum"),
    ("weight_decay", -0.1, "--weight-decay"),
    ("label_smoothing", 1.0, "--label-smoothing"),
    ("schedule", "step", "--schedule"),
    ("input_noise", -1.0, "--input-noise"),
    ("eval_every", 0, "eval_every"),
])
def test_config_validation_names_the_option(field: str, value: Any, phrase: str) -> None:
    with pytest.raises(UsageError, match=phrase):
        FinetuneConfig(**{field: value})


def test_unlabelled_or_mismatched_data_is_a_clear_error() -> None:
    blobs = _blobs(30, seed=0)
    with pytest.raises(DataError, match="no labels"):
        finetune(_Net(), Dataset("plain", blobs.x), FinetuneConfig())
    with pytest.raises(DataError, match="only 3 outputs"):
        finetune(_Net(), Dataset("ten", blobs.x, torch.arange(30) % 10), FinetuneConfig())
    with pytest.raises(DataError, match="rejected samples of shape"):
        finetune(_Net(), Dataset("wide", torch.randn(30, 9), blobs.y), FinetuneConfig())
    model = load_model(MLP)
    with pytest.raises(UsageError, match="labelled data"):
        compile(model, torch.zeros(1, 1, 8, 8), importance="l1", prune_ratio=0.5, finetune=FinetuneConfig())
    with pytest.raises(UsageError, match="labelled data"):
        compile(model, torch.zeros(1, 1, 8, 8), data=torch.rand(20, 1, 8, 8), importance="l1",
                prune_ratio=0.5, finetune=FinetuneConfig())


def test_diverging_loss_stops_with_a_hint() -> None:
    with pytest.raises(UsageError, match="lower the learning rate"):
        finetune(_Net(), _blobs(64, seed=0), FinetuneConfig(epochs=3, lr=1e30, optimizer="sgd", batch_size=8))


# ---- after pruning ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


def test_pruned_graph_module_recovers_accuracy(digits: DataSplits) -> None:
    model = load_model(MLP)
    x = digits.train.x[:1]
    pruned = compile(model, x, data=digits, importance="l1", prune_ratio=0.7, reconstruct=False)
    after_prune = accuracy(pruned.module, digits.test)
    assert after_prune < pruned.report["accuracy"]["before"] - 0.2  # pruning really hurt
    config = FinetuneConfig(epochs=2)
    hist = finetune(pruned.module, digits.train, config, eval_data=digits.test)
    assert hist.final_eval_accuracy is not None and hist.final_eval_accuracy > after_prune + 0.1

    # compile(finetune=...) is that same training on the same pruned network: same weights.
    tuned = compile(model, x, data=digits, importance="l1", prune_ratio=0.7, finetune=config, reconstruct=False)
    assert all(torch.equal(a, b) for a, b in zip(tuned.module.state_dict().values(),
                                                 pruned.module.state_dict().values(), strict=True))
    acc, ft = tuned.report["accuracy"], tuned.report["finetune"]
    assert acc["after_prune"] == after_prune and acc["after"] == hist.final_eval_accuracy
    assert ft["accuracy_before"] == after_prune and ft["accuracy_after"] == acc["after"]
    assert ft["epochs"] == 2 and len(ft["history"]) == 2 and ft["config"]["optimizer"] == "adam"
    assert ft["train_samples"] == len(digits.train)  # the whole train split, not the calibration subset
    assert set(ft["history"][0]) >= {"epoch", "loss", "train_accuracy", "eval_accuracy"}


def test_exported_program_trains_with_batch_norm(digits: DataSplits, tmp_path: Path) -> None:
    pruned = compile(load_model(CNN), digits.train.x[:1], importance="l1", prune_ratio=0.5)
    path = tmp_path / "pruned.pt2"
    _save_program(pruned.module, pruned.example_inputs, path, "test")

    # torch 2.13 refuses train() on the raw ExportedProgram.module(): a clear error, not a crash.
    raw = torch.export.load(str(path)).module()
    with pytest.raises(UsageError, match="load_model"):
        finetune(raw, digits.train, FinetuneConfig())

    loaded = load_model(path)  # rebuilt with nn.BatchNorm2d modules: these train normally
    norms = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2
    before = [n.running_mean.clone() for n in norms]
    acc0 = accuracy(loaded, digits.test)
    hist = finetune(loaded, digits.train, FinetuneConfig(epochs=1), eval_data=digits.test)
    assert all(not torch.equal(b, n.running_mean) for b, n in zip(before, norms, strict=True))
    assert hist.final_eval_accuracy is not None and hist.final_eval_accuracy > acc0


# ---- the command line -------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def pruned_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """compile without fine-tuning: the pruned .pt2 program, its plan and its report."""
    d = tmp_path_factory.mktemp("pruned")
    files = {"pt2": d / "p.pt2", "plan": d / "plan.json", "report": d / "r.json"}
    code, _, stderr = run("compile", MLP, "--data", "digits", "--importance", "l1", "--prune-ratio", "0.7",
                          "--no-bench", "--no-reconstruct", "-o", str(d / "p.onnx"), "--save-pt", str(files["pt2"]),
                          "--save-plan", str(files["plan"]), "--report", str(files["report"]))
    assert code == 0, stderr
    return {**files, "acc": json.loads(files["report"].read_text())["accuracy"]}


def test_compile_finetune_epochs_end_to_end(tmp_path: Path, digits: DataSplits,
                                            pruned_files: dict[str, Any]) -> None:
    out, report = tmp_path / "ft.onnx", tmp_path / "r.json"
    code, stdout, stderr = run("compile", MLP, "--data", "digits", "--importance", "l1", "--prune-ratio", "0.7",
                               "--finetune-epochs", "2", "--lr", "0.002", "--batch-size", "64", "--optimizer",
                               "adamw", "--no-bench", "--no-reconstruct", "-o", str(out), "--report", str(report))
    assert code == 0, stderr
    assert "fine-tuning (2 epochs" in stdout and "accuracy after pruning" in stdout
    rep = json.loads(report.read_text())
    ft, acc = rep["finetune"], rep["accuracy"]
    assert ft["config"] | {"lr": 0.002, "batch_size": 64, "optimizer": "adamw", "epochs": 2} == ft["config"]
    assert [h["epoch"] for h in ft["history"]] == [1, 2] and ft["history"][1]["loss"] < ft["history"][0]["loss"]
    assert acc["after_prune"] == pruned_files["acc"]["after"] == ft["accuracy_before"]
    assert acc["after"] == ft["accuracy_after"] > acc["after_prune"] + 0.1
    assert rep["onnx"]["passed"]
    # The written ONNX file is the fine-tuned network: its test accuracy is the reported one.
    onnx_acc = float((ort_logits(out, digits.test.x).argmax(1) == digits.test.y.numpy()).mean())
    assert onnx_acc == pytest.approx(acc["after"], abs=1.5 / len(digits.test))


def test_finetune_command_on_saved_program(tmp_path: Path, digits: DataSplits, pruned_files: dict[str, Any]) -> None:
    out, pt2, report = tmp_path / "ft.onnx", tmp_path / "ft.pt2", tmp_path / "r.json"
    code, stdout, stderr = run("finetune", str(pruned_files["pt2"]), "--data", "digits", "--epochs", "2",
                               "-o", str(out), "--save-pt", str(pt2), "--report", str(report))
    assert code == 0, stderr
    assert "oamipc finetune" in stdout and "2 epochs" in stdout
    rep = json.loads(report.read_text())
    assert rep["accuracy"]["before"] == pytest.approx(pruned_files["acc"]["after"], abs=1e-9)
    assert rep["accuracy"]["after"] > rep["accuracy"]["before"] + 0.1
    assert rep["onnx"]["passed"]
    program = torch.export.load(str(pt2)).module()
    x = digits.test.x[:40]
    np.testing.assert_allclose(ort_logits(out, x), program(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_finetune_command_replays_a_plan(tmp_path: Path, pruned_files: dict[str, Any]) -> None:
    out, report = tmp_path / "ft.onnx", tmp_path / "r.json"
    code, stdout, stderr = run("finetune", MLP, "--plan", str(pruned_files["plan"]), "--data", "digits",
                               "--no-reconstruct", "--epochs", "2", "-o", str(out), "--report", str(report))
    assert code == 0, stderr
    assert "accuracy after pruning" in stdout
    rep = json.loads(report.read_text())
    assert rep["accuracy"]["after_prune"] == pruned_files["acc"]["after"]
    assert rep["accuracy"]["after"] > rep["accuracy"]["after_prune"] + 0.1
    assert rep["after"]["params"] < rep["before"]["params"] and rep["onnx"]["passed"]


def _bad(tmp: Path, pruned: dict[str, Any]) -> dict[str, tuple[list[str], int, str]]:
    """name -> (arguments before -o, exit code, a phrase of the error line)."""
    trunc = tmp / "truncated.pt2"
    trunc.write_bytes(Path(pruned["pt2"]).read_bytes()[:3000])
    unlabelled = tmp / "unlabelled.npz"
    np.savez(unlabelled, x=np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32))
    return {
        "no data": ([str(pruned["pt2"]), "--epochs", "1"], 2, "--data"),
        "unlabelled data": ([str(pruned["pt2"]), "--data", str(unlabelled)], 2, "labels"),
        "zero epochs": ([str(pruned["pt2"]), "--data", "digits", "--epochs", "0"], 2, "--epochs"),
        "bad optimizer": ([str(pruned["pt2"]), "--data", "digits", "--optimizer", "lbfgs"], 2, "--optimizer"),
        "truncated model": ([str(trunc), "--data", "digits"], 1, str(trunc)),
        "missing plan": ([MLP, "--plan", str(tmp / "nope.json"), "--data", "digits"], 1, "does not exist"),
    }


@pytest.mark.parametrize("case", ["no data", "unlabelled data", "zero epochs", "bad optimizer", "truncated model",
                                  "missing plan"])
def test_finetune_bad_input_one_line_nothing_written(case: str, tmp_path: Path,
                                                     pruned_files: dict[str, Any]) -> None:
    inputs, outdir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outdir.mkdir()
    args, expected, phrase = _bad(inputs, pruned_files)[case]
    code, stdout, stderr = run("finetune", *args, "-o", str(outdir / "m.onnx"), "--report", str(outdir / "r.json"),
                               "--save-pt", str(outdir / "m.pt2"))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == expected, (stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], stderr
    assert "Traceback" not in stdout + stderr
    assert list(outdir.iterdir()) == []


def test_compile_finetune_needs_labelled_data(tmp_path: Path) -> None:
    code, _, stderr = run("compile", MLP, "--input-shape", "1,1,8,8", "--importance", "l1", "--prune-ratio", "0.5",
                          "--finetune-epochs", "1", "--no-bench", "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "labelled data" in stderr
    assert list(tmp_path.iterdir()) == []

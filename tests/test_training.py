"""oamipc.training: recipes train deterministically, and the cache returns exactly the weights it stored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from oamipc.data import Dataset
from oamipc.errors import UsageError
from oamipc.training import Recipe, build, cache_root, trained

RECIPE = Recipe("tiny", "oamipc.models:DigitsMLP", {"hidden": [8]}, "digits", epochs=2, batch_size=16, lr=1e-2,
                weight_decay=0.05, label_smoothing=0.1, input_noise=0.1)


def _data(n: int = 96) -> Dataset:
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(n) % 10
    x = torch.rand(n, 1, 8, 8, generator=gen) * 0.2 + y.view(-1, 1, 1, 1) / 10  # separable by brightness
    return Dataset("toy", x, y)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    data = _data()
    a, info_a = trained(RECIPE, data, 0, tmp_path / "one")
    b, info_b = trained(RECIPE, data, 0, tmp_path / "two")
    assert info_a["cached"] is None and info_b["cached"] is None
    assert _same(a, b)  # two cold runs: bit for bit the same weights
    torch.manual_seed(0)
    assert not _same(a, build(RECIPE))  # and they were trained
    c, info_c = trained(RECIPE, data, 0, tmp_path / "one")
    assert info_c["cached"] == str(tmp_path / "one" / f"{RECIPE.key(0)}.pt") and _same(a, c)
    assert info_c["history"] == info_a["history"] and not c.training
    d, _ = trained(RECIPE, data, 1, tmp_path / "one")
    assert not _same(a, d)  # another seed, another network and another file
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted([f"{RECIPE.key(0)}.pt", f"{RECIPE.key(1)}.pt"])


def test_key_changes_with_every_field() -> None:
    keys = {RECIPE.key(0), RECIPE.key(1), RECIPE.with_epochs(3).key(0),
            Recipe(**{**RECIPE.__dict__, "lr": 2e-2}).key(0),
            Recipe(**{**RECIPE.__dict__, "model_args": {"hidden": [9]}}).key(0),
            Recipe(**{**RECIPE.__dict__, "train_samples": 50}).key(0)}
    assert len(keys) == 6
    assert RECIPE.key(0).startswith("tiny_s0_e2_") and RECIPE.with_epochs(3).key(0).startswith("tiny_s0_e3_")


def test_train_samples_is_a_stratified_subset(tmp_path: Path) -> None:
    _, info = trained(Recipe(**{**RECIPE.__dict__, "train_samples": 40}), _data(), 0, tmp_path)
    assert info["train_samples"] == 40


def test_unusable_cache_file_is_trained_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _data()
    good, _ = trained(RECIPE, data, 0, tmp_path)
    path = tmp_path / f"{RECIPE.key(0)}.pt"
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="oamipc.training"):
        again, info = trained(RECIPE, data, 0, tmp_path)
    assert info["cached"] is None and _same(good, again) and "unusable" in caplog.text
    _, info = trained(RECIPE, data, 0, tmp_path)
    assert info["cached"] is not None  # the file was replaced by a good one


def test_training_threads_are_restored(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    try:
        trained(RECIPE, _data(), 0, tmp_path, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_build_rejects_what_is_not_a_module() -> None:
    with pytest.raises(UsageError, match="not an nn.Module"):
        build(Recipe(**{**RECIPE.__dict__, "model_class": "collections:OrderedDict", "model_args": {}}))


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OAMIPC_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("OAMIPC_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "oamipc"

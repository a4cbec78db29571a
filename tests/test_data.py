"""oamipc.data: every data spec, every validation error, sampling, reshaping and resizing.

The IDX parser is tested on small synthetic files written to tmp_path, so it runs without the
Debian package; the real Fashion-MNIST checks skip when the files are not installed.
"""

from __future__ import annotations

import gzip
import logging
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import oamipc.data
from oamipc.data import (
    Dataset,
    DataSplits,
    accuracy,
    fashion_mnist_available,
    load_data,
    read_idx,
    resize_images,
)
from oamipc.errors import DataError

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)",
)


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_and_split() -> None:
    splits = load_data("digits")
    assert isinstance(splits, DataSplits)
    train, test = splits.train, splits.test
    assert train.x.dtype == torch.float32 and train.y is not None and train.y.dtype == torch.int64
    assert train.sample_shape == (1, 8, 8) and test.sample_shape == (1, 8, 8)
    assert (len(train), len(test)) == (1258, 539)
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) == 1.0
    assert train.num_classes == test.num_classes == 10
    # stratified: every class is 30% test, up to rounding
    total = torch.bincount(train.y, minlength=10) + torch.bincount(test.y, minlength=10)
    frac = torch.bincount(test.y, minlength=10) / total
    assert torch.all((frac - 0.3).abs() < 0.01)


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a = load_data("digits")
    assert load_data("digits") is a  # cached
    b = oamipc.data._load_digits.__wrapped__()  # computed afresh
    torch.testing.assert_close(a.test.x, b.test.x, rtol=0, atol=0)
    torch.testing.assert_close(a.train.y, b.train.y, rtol=0, atol=0)
    from sklearn.datasets import load_digits

    ref = torch.from_numpy(load_digits().images.astype(np.float32) / 16).reshape(-1, 64)
    # every digits image is in exactly one split (the set holds a few duplicate images, hence <=)
    both = torch.cat([a.train.x, a.test.x]).reshape(-1, 64)
    assert len(both) == len(ref)
    assert torch.equal(torch.unique(both, dim=0), torch.unique(ref, dim=0))


def test_data_dir_ignored_for_digits_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="oamipc.data"):
        load_data("digits", data_dir="/nonexistent")
    assert "ignored" in caplog.text


# ----------------------------------------------------------------------------- fashion-mnist


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, *, compress: bool = False) -> None:
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + body
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _fake_fashion(root: Path, *, n_train: int = 20, n_test: int = 10, compress: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   compress=compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), compress=compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_synthetic_idx(tmp_path: Path, compress: bool) -> None:
    root = _fake_fashion(tmp_path, compress=compress)
    assert fashion_mnist_available(root)
    splits = load_data("fashion-mnist", data_dir=str(root))
    assert splits.train.x.shape == (20, 1, 28, 28) and splits.test.x.shape == (10, 1, 28, 28)
    assert splits.train.x.dtype == torch.float32
    assert 0.0 <= float(splits.train.x.min()) and float(splits.train.x.max()) <= 1.0
    assert splits.test.y.tolist() == list(range(10))
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes()) if compress else \
        (root / "train-images-idx3-ubyte").read_bytes()
    first = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28) / 255.0
    torch.testing.assert_close(splits.train.x[0, 0], torch.from_numpy(first).float(), rtol=0, atol=1e-7)


def test_fashion_is_cached(tmp_path: Path) -> None:
    root = _fake_fashion(tmp_path)
    assert load_data("fashion-mnist", data_dir=root) is load_data("fashion_mnist", data_dir=str(root))


def test_fashion_missing_files_names_dir_package_and_option(tmp_path: Path) -> None:
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(DataError) as exc:
        load_data("fashion-mnist", data_dir=tmp_path)
    msg = _one_line(exc)
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg


def test_idx_bad_magic_number(tmp_path: Path) -> None:
    root = _fake_fashion(tmp_path, compress=False)
    path = root / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic number 0x12340803"):
        load_data("fashion-mnist", data_dir=root)


def test_idx_unexpected_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    _write_idx(path, np.zeros((4, 2), np.uint8))
    with pytest.raises(DataError, match="magic number 0x00000802, expected 0x00000801"):
        read_idx(path, magic=0x801)
    _write_idx(path, np.zeros(4, np.int32), code=0x0C)  # right shape, wrong type for Fashion-MNIST labels
    with pytest.raises(DataError, match="magic number 0x00000c01, expected 0x00000801"):
        read_idx(path, magic=0x801)
    path.write_bytes(b"\x00\x00\x07\x01" + bytes(8))  # no such type code
    with pytest.raises(DataError, match="magic number 0x00000701, expected 0x0000TTDD"):
        read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_truncated(tmp_path: Path, compress: bool) -> None:
    path = tmp_path / "images"
    _write_idx(path, np.zeros((5, 28, 28), np.uint8))
    raw = path.read_bytes()[:-100]
    if compress:
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    with pytest.raises(DataError, match=r"truncated: shape \(5, 28, 28\) needs 3920 data bytes, found 3820"):
        read_idx(path)


def test_idx_truncated_header_and_gzip(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="truncated inside its header"):
        read_idx(short)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tiny)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(bytes(1000))[:-20])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx(broken)


def test_idx_trailing_bytes_and_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    _write_idx(path, np.arange(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="longer than its header says"):
        read_idx(path)
    root = _fake_fashion(tmp_path / "fm", compress=False)
    _write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="holds 10 images but .* holds 7 labels"):
        load_data("fashion-mnist", data_dir=root)


def test_idx_other_types_are_big_endian(tmp_path: Path) -> None:
    values = np.array([[1, -2, 300], [40000, 5, -6]], dtype=np.int32)
    _write_idx(tmp_path / "ints", values, code=0x0C)
    out = read_idx(tmp_path / "ints")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)
    floats = np.linspace(-1, 1, 6, dtype=np.float64)
    _write_idx(tmp_path / "f8", floats, code=0x0E)
    np.testing.assert_array_equal(read_idx(tmp_path / "f8"), floats)


@needs_fashion
def test_fashion_mnist_installed() -> None:
    splits = load_data("fashion-mnist")
    assert splits.train.x.shape == (60000, 1, 28, 28) and splits.test.x.shape == (10000, 1, 28, 28)
    assert splits.train.x.dtype == torch.float32
    assert float(splits.train.x.min()) == 0.0 and float(splits.train.x.max()) == 1.0
    assert torch.bincount(splits.test.y).tolist() == [1000] * 10
    assert load_data("fashion-mnist") is splits  # cached: tests load it many times


# ------------------------------------------------------------------------------ .pt and .npz


def _save(path: Path, **arrays: object) -> str:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save(arrays, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_array_file_with_test_split(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    x, xt = rng.random((12, 3, 4), dtype=np.float32), rng.random((5, 3, 4), dtype=np.float32)
    y, yt = np.arange(12) % 3, np.arange(5) % 3
    if suffix == ".pt":
        x, xt, y, yt = (torch.from_numpy(a) for a in (x, xt, y, yt))
    splits = load_data(_save(tmp_path / f"d{suffix}", x=x, y=y, x_test=xt, y_test=yt))
    assert splits.train.x.shape == (12, 3, 4) and splits.test.x.shape == (5, 3, 4)
    assert splits.train.y.dtype == torch.int64 and splits.test.y.tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(splits.test.x, torch.as_tensor(xt), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_array_file_without_test_warns(tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture) -> None:
    x = np.ones((4, 2), np.float64)
    with caplog.at_level(logging.WARNING, logger="oamipc.data"):
        splits = load_data(_save(tmp_path / f"d{suffix}", x=torch.from_numpy(x) if suffix == ".pt" else x))
    assert "test split is the train split" in caplog.text
    assert splits.train.y is None and splits.train.x.dtype == torch.float32
    assert torch.equal(splits.test.x, splits.train.x)


def test_integral_float_labels_are_accepted(tmp_path: Path) -> None:
    splits = load_data(_save(tmp_path / "d.npz", x=np.zeros((3, 2), np.float32), y=np.array([0.0, 2.0, 1.0])))
    assert splits.train.y.tolist() == [0, 2, 1] and splits.train.y.dtype == torch.int64


BAD_FILES = {
    "missing x": (dict(inputs=np.zeros((2, 2), np.float32), y=np.zeros(2)),
                  r"no 'x' array \(found keys: inputs, y\)"),
    "x not floating": (dict(x=np.zeros((2, 2), np.uint8)), "dtype torch.uint8, expected floating point"),
    "x not convertible": (dict(x=np.array([["a", "b"], ["c", "d"]])), "cannot be converted to a tensor"),
    "length mismatch": (dict(x=np.zeros((3, 2), np.float32), y=np.zeros(2, np.int64)),
                        "y has 2 labels but x has 3 samples"),
    "negative labels": (dict(x=np.zeros((2, 2), np.float32), y=np.array([0, -1])), "negative labels"),
    "fractional labels": (dict(x=np.zeros((2, 2), np.float32), y=np.array([0.0, 0.5])),
                          r"non-integer labels \(e.g. 0.5\)"),
    "bool labels": (dict(x=np.zeros((2, 2), np.float32), y=np.array([True, False])), "expected integer class"),
    "one-hot labels": (dict(x=np.zeros((2, 2), np.float32), y=np.eye(2, dtype=np.int64)), r"y.argmax\(1\)"),
    "nan in x": (dict(x=np.array([[0.0, 1.0], [np.nan, 2.0]], np.float32)),
                 "1 NaN or infinite values \\(first in sample 1\\)"),
    "empty": (dict(x=np.zeros((0, 2), np.float32)), "empty"),
    "no sample dim": (dict(x=np.zeros(5, np.float32)), "at least 2 dimensions"),
    "test labels without inputs": (dict(x=np.zeros((2, 2), np.float32), y_test=np.zeros(2)),
                                   "'y_test' but no 'x_test'"),
    "test shape differs": (dict(x=np.zeros((2, 2), np.float32), x_test=np.zeros((2, 3), np.float32)),
                           r"shape \(2,\) but test samples .* shape \(3,\)"),
    "test labels negative": (dict(x=np.zeros((2, 2), np.float32), x_test=np.zeros((1, 2), np.float32),
                                  y_test=np.array([-3])), "y_test holds negative labels"),
}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_array_files(tmp_path: Path, case: str, suffix: str) -> None:
    arrays, pattern = BAD_FILES[case]
    if suffix == ".pt":
        if case == "x not convertible":
            pytest.skip("a .pt file cannot hold string arrays weights-only")
        arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
    path = _save(tmp_path / f"bad{suffix}", **arrays)
    with pytest.raises(DataError, match=pattern) as exc:
        load_data(path)
    assert path in _one_line(exc)  # every message names the file


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="object \\(pickled\\) arrays"):
        load_data(str(path))


def test_pt_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save({"x": torch.zeros(2, 2), "model": nn.Linear(2, 2)}, path)
    with pytest.raises(DataError, match=r"holds a torch.nn.modules.linear.Linear object.*save a dict of tensors"):
        load_data(str(path))


def test_pt_not_a_dict_and_corrupt_files(tmp_path: Path) -> None:
    torch.save(torch.zeros(3, 2), tmp_path / "t.pt")
    with pytest.raises(DataError, match="holds a Tensor, expected a dict"):
        load_data(str(tmp_path / "t.pt"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read .*junk.npz: it is not an .npz"):
        load_data(str(tmp_path / "junk.npz"))
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load .*junk.pt"):
        load_data(str(tmp_path / "junk.pt"))


def test_missing_file_unsupported_suffix_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "nope.npz"))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"unsupported type \.csv"):
        load_data(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="unknown data spec 'mnist': use digits, fashion-mnist"):
        load_data("mnist")


# ---------------------------------------------------------------------------- pkg.module:fn


@pytest.fixture
def data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway importable module with data functions of every accepted return type."""
    name = f"oamipc_testdata_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch
        from oamipc.data import DataSplits, Dataset

        def splits():
            return DataSplits(Dataset("a", torch.zeros(4, 2)), Dataset("b", torch.ones(2, 2)))

        def dataset():
            return Dataset("one", torch.zeros(3, 5), torch.tensor([0, 1, 2]))

        def pair():
            return np.ones((3, 2), np.float32), [1, 0, 1]

        def tensor():
            return torch.zeros(6, 1, 2, 2)

        def wrong():
            return "hello"

        class holder:
            @staticmethod
            def nested():
                return torch.zeros(2, 2)

        not_callable = 3
    """))
    monkeypatch.chdir(tmp_path)  # found through the current-directory fallback, not sys.path
    yield name
    sys.modules.pop(name, None)


def test_callable_specs(data_module: str, caplog: pytest.LogCaptureFixture) -> None:
    s = load_data(f"{data_module}:splits")
    assert (s.train.name, s.test.name) == ("a", "b")
    with caplog.at_level(logging.WARNING, logger="oamipc.data"):
        s = load_data(f"{data_module}:dataset")
    assert s.train is s.test and s.train.num_classes == 3 and "train split" in caplog.text
    s = load_data(f"{data_module}:pair")
    assert s.train.y.tolist() == [1, 0, 1] and s.train.x.dtype == torch.float32
    assert load_data(f"{data_module}:tensor").train.sample_shape == (1, 2, 2)
    assert load_data(f"{data_module}:holder.nested").train.y is None
    assert str(Path.cwd()) not in sys.path  # the fallback does not leave the directory behind


def test_callable_spec_errors(data_module: str) -> None:
    with pytest.raises(DataError, match="returned a str; return a DataSplits"):
        load_data(f"{data_module}:wrong")
    with pytest.raises(DataError, match="has no attribute missing"):
        load_data(f"{data_module}:missing")
    with pytest.raises(DataError, match="is a int, not a function"):
        load_data(f"{data_module}:not_callable")
    with pytest.raises(DataError, match="cannot import no_such_pkg_xyz.mod .*PYTHONPATH"):
        load_data("no_such_pkg_xyz.mod:f")


# --------------------------------------------------------------------------------- Dataset


def _labelled(n_per_class: tuple[int, ...] = (10, 10, 10), features: int = 4) -> Dataset:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = torch.arange(len(y) * features, dtype=torch.float32).reshape(len(y), features)
    return Dataset("synthetic", x, y)


def test_dataset_validates_on_construction() -> None:
    ds = Dataset("f64", torch.zeros(3, 2, dtype=torch.float64))
    assert ds.x.dtype == torch.float32 and ds.num_classes is None and len(ds) == 3
    with pytest.raises(DataError, match="y has dtype torch.int32, expected int64"):
        Dataset("ints", torch.zeros(2, 2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(DataError, match="x must be a torch.Tensor"):
        Dataset("np", np.zeros((2, 2)))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="inf"):
        Dataset("inf", torch.tensor([[1.0], [float("inf")]]))


def test_reshaped_round_trip_and_mismatch() -> None:
    ds = load_data("digits").test
    flat = ds.reshaped((64,))
    assert flat.sample_shape == (64,) and flat.y is ds.y
    torch.testing.assert_close(flat.reshaped((1, 8, 8)).x, ds.x, rtol=0, atol=0)
    with pytest.raises(DataError) as exc:
        ds.reshaped((1, 28, 28))
    msg = _one_line(exc)
    assert "(1, 8, 8)" in msg and "(1, 28, 28)" in msg and "resize_images" in msg


def test_subset_keeps_order_and_labels() -> None:
    ds = _labelled()
    sub = ds.subset([5, 0, 29])
    assert sub.y.tolist() == [0, 0, 2]
    torch.testing.assert_close(sub.x[0], ds.x[5], rtol=0, atol=0)
    assert len(ds.subset(ds.y == 1)) == 10 and len(ds.subset(slice(0, 4))) == 4
    with pytest.raises(DataError, match="empty"):
        ds.subset([])


def test_stratified_sample_is_deterministic_and_balanced() -> None:
    ds = load_data("digits").train
    a, b = ds.stratified_sample(95, seed=3), ds.stratified_sample(95, seed=3)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert torch.equal(a.y, b.y)
    counts = torch.bincount(a.y, minlength=10)
    assert counts.sum() == 95 and int(counts.max() - counts.min()) <= 1
    assert not torch.equal(ds.stratified_sample(95, seed=4).x, a.x)
    one_each = ds.stratified_sample(10, seed=0)
    assert sorted(one_each.y.tolist()) == list(range(10))  # the paper's one image per class
    unique = _labelled((7, 9, 8)).stratified_sample(20, seed=0)
    assert len(torch.unique(unique.x[:, 0])) == 20  # no sample twice


def test_stratified_sample_small_class_and_unlabelled() -> None:
    ds = _labelled((2, 20, 20))
    counts = torch.bincount(ds.stratified_sample(30, seed=0).y, minlength=3).tolist()
    assert counts[0] == 2 and sorted(counts[1:]) == [14, 14]
    full = ds.stratified_sample(len(ds), seed=1)
    assert sorted(full.x[:, 0].tolist()) == sorted(ds.x[:, 0].tolist())  # a permutation of everything
    unlabelled = Dataset("u", ds.x)
    s1, s2 = unlabelled.stratified_sample(7, seed=5), unlabelled.stratified_sample(7, seed=5)
    assert s1.y is None and torch.equal(s1.x, s2.x)
    assert len(torch.unique(s1.x[:, 0])) == 7
    for n in (0, len(ds) + 1):
        with pytest.raises(DataError, match=f"cannot sample {n} of 42 samples"):
            ds.stratified_sample(n, seed=0)


def test_splits_require_same_sample_shape() -> None:
    with pytest.raises(DataError, match="same shape"):
        DataSplits(Dataset("a", torch.zeros(2, 4)), Dataset("b", torch.zeros(2, 5)))


# ------------------------------------------------------------------------------ resize_images


def test_resize_images_up_and_back() -> None:
    ds = load_data("digits").test
    up = resize_images(ds, (28, 28))
    assert up.sample_shape == (1, 28, 28) and up.y is ds.y and up.x.dtype == torch.float32
    assert float(up.x.min()) >= 0.0 and float(up.x.max()) <= 1.0
    back = resize_images(up, (8, 8))
    assert back.sample_shape == (1, 8, 8)
    assert float((back.x - ds.x).abs().mean()) < 0.15  # blurred, but the same digits


def test_resize_images_keeps_constants_and_rejects_flat_data() -> None:
    const = Dataset("c", torch.full((2, 3, 5, 7), 0.25))
    torch.testing.assert_close(resize_images(const, (11, 4)).x, torch.full((2, 3, 11, 4), 0.25),
                               rtol=0, atol=1e-6)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        resize_images(Dataset("flat", torch.zeros(2, 64)), (28, 28))


# ---------------------------------------------------------------------------------- accuracy


class _Lookup(nn.Module):
    """Predicts the label stored in the first feature (x[:, 0]) -- an oracle classifier."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_accuracy_oracles() -> None:
    y = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    ds = Dataset("acc", torch.stack([y.float(), torch.zeros(7)], dim=1), y)
    model = _Lookup().train()
    assert accuracy(model, ds) == 1.0 and model.training  # the mode is restored
    assert accuracy(model, ds, batch_size=2) == 1.0
    always_two = lambda x: torch.tensor([[0.0, 0.0, 1.0]]).expand(len(x), 3)  # noqa: E731
    assert accuracy(always_two, ds, batch_size=3) == pytest.approx(3 / 7)


def test_accuracy_errors() -> None:
    with pytest.raises(DataError, match="no labels"):
        accuracy(_Lookup(), Dataset("u", torch.zeros(3, 2)))
    ds = load_data("digits").test
    with pytest.raises(DataError, match=r"rejected samples of shape \(1, 8, 8\).*resize_images"):
        accuracy(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), ds)
